"""mg-train under torchrun that also saves this rank's weights (at init and after training) with
its place in megatron's rank grids, for tests comparing parallel layouts weight by weight.

    python -m torch.distributed.run --nproc-per-node=2 -m tests.training.layout_worker <dump dir> <overrides...>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def rank_weights(trainer) -> dict:
    from megatron.core import parallel_state as ps

    state = {name: param.detach().clone() for chunk in trainer.raw_chunks
             for name, param in chunk.named_parameters()}
    return {"weights": state,
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())}


def main(dump_dir: str, overrides: list[str]) -> None:
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed
    from megatron_grouter.train import build_trainer
    from megatron_grouter.training.config import to_train_config, validate
    from tests.train_runs import compose

    root = to_train_config(compose(overrides))
    validate(root, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    layout = init_distributed(root.parallel.tensor, root.parallel.pipeline, root.parallel.expert,
                              num_experts=root.model.num_experts,
                              expert_tensor_parallel=root.parallel.expert_tensor)
    trainer = build_trainer(root, layout)
    initial = rank_weights(trainer)
    trainer.run()
    out = Path(dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"initial": initial, "trained": rank_weights(trainer)}, out / f"rank{layout.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
