"""mg-train: pretrain a Megatron-Core MoE GPT (python -m megatron_grouter.train).

Hydra app over conf/ (groups: model, router, data, parallel, train, logger, experiment).
  mg-train                                   tiny_cpu on the built-in stdlib corpus
  mg-train router=seq_aux_loss train.steps=600
  torchrun --nproc-per-node 2 -m megatron_grouter.train parallel=ep2
  mg-train --cfg job                         print the composed config
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from megatron_grouter.app import CONF_DIR, run_app
from megatron_grouter.training.config import register_schema

log = logging.getLogger("megatron_grouter")


def build_trainer(root, layout):
    """Data, model, optimizer, and for preemptive routers what routes each micro-batch."""
    from megatron_grouter.dispatch.setup import build_dispatch_planner
    from megatron_grouter.placement.plan_state import PlanIdentityHook
    from megatron_grouter.placement.training_plan import load_training_plan, traffic_meter
    from megatron_grouter.routing.setup import build_preemptive_routing, routing_rule
    from megatron_grouter.runtime.seed import set_seed
    from megatron_grouter.training.config import validate
    from megatron_grouter.training.data_setup import prepare_datasets
    from megatron_grouter.training.trainer import Trainer

    set_seed(root.train.seed)
    data = prepare_datasets(root, layout)
    validate(root, layout.world_size, tokenizer_vocab=data.tokenizer.vocab_size)
    planned = load_training_plan(root, data.prefix, data.train)
    arguments = planned.trainer_arguments() if planned else {}
    trainer = Trainer(root, layout, data.train, data.valid, vocab_size=data.model_vocab_size, **arguments)
    trainer.hooks.append(PlanIdentityHook(planned.plan if planned else None, root.router.grouter.plan))
    rule = routing_rule(root, arguments.get("slot_of_expert"))  # None for learned routers
    planner = build_dispatch_planner(root, trainer, rule, planned)
    traffic = traffic_meter(root, planned.plan if planned else None)
    if traffic is not None:
        trainer.hooks.append(traffic)
    trainer.routing_provider = build_preemptive_routing(
        root, data.prefix, data.tokenizer, trainer.vocab_size, layout.device, rule, planner=planner,
        observers=[traffic] if traffic is not None else [])
    return trainer


def train(cfg: DictConfig) -> dict:
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed
    from megatron_grouter.training.config import to_train_config, validate
    from megatron_grouter.training.device_check import check_device
    from megatron_grouter.training import fork_guard
    from megatron_grouter.training.loggers import setup_console_logging
    from megatron_grouter.training.run_lock import hold_run_lock

    fork_guard.install()  # megatron's forked checkpoint writers die with this process
    root = to_train_config(cfg)
    check_device(root.train.device)  # a GPU preset without a GPU stops here, not on CPU over gloo
    validate(root, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # One hardware queue per GPU keeps megatron's TP/SP and grad-reduce collectives in issue order
    # (what Megatron-LM's launch scripts export); set before CUDA starts, overridable.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    layout = init_distributed(root.parallel.tensor, root.parallel.pipeline, root.parallel.expert,
                              num_experts=root.model.num_experts,
                              virtual_pipeline=root.parallel.virtual_pipeline,
                              expert_tensor_parallel=root.parallel.expert_tensor)
    setup_console_logging(layout.is_main)
    lock = None
    try:
        lock = hold_run_lock(root.train.out_dir, layout.is_main)  # one run per out_dir
        log.info("mg-train: model=%s router=%s world=%d (TP=%d PP=%d EP=%d ETP=%d DP=%d) on %s/%s",
                 root.model.name, root.router.name, layout.world_size, layout.tensor_parallel,
                 layout.pipeline_parallel, layout.expert_parallel, layout.expert_tensor_parallel,
                 layout.data_parallel,
                 layout.device.type, layout.backend)
        summary = build_trainer(root, layout).run()
        log.info("done: %s", summary)
        return summary
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from megatron_grouter.training.preemption import exit_status

    # A preempted run (SIGUSR1/SIGTERM: checkpointed and stopped early) exits with 75 so a
    # scheduler can requeue it (Slurm: RequeueExit=75); a finished run exits 0.
    status = exit_status(run_app(train, cfg))
    if status:
        sys.exit(status)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
