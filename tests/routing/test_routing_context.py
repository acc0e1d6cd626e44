"""The routing handed to each MoE layer lines up token for token with its hidden states."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch
from megatron_grouter.runtime.distributed import free_port


def token_ids_BS(batch: int, seq: int) -> torch.Tensor:
    return torch.arange(batch * seq).view(batch, seq) * 10


def test_sequence_first_flattening_matches_megatron_token_order():
    batch, seq = 3, 5
    ids_BS = token_ids_BS(batch, seq)
    indices_BSK = torch.stack([ids_BS, ids_BS + 1], dim=-1)
    context = RoutingContext()
    routing = route_micro_batch(indices_BSK, indices_BSK.float(), RoutingRule(num_experts=int(ids_BS.max()) + 2))
    # megatron's decoder input: [s, b, h]; the router flattens it to s·b tokens.
    hidden_SBH = ids_BS.t().unsqueeze(-1).float()
    with context.serving(routing):
        tokens = context.local(seq * batch)
        assert torch.equal(tokens.slots[:, 0], hidden_SBH.reshape(-1).long())
        assert torch.equal(tokens.weights[:, 1], hidden_SBH.reshape(-1) + 1)
        with pytest.raises(RuntimeError, match="out of step"):
            context.local(seq * batch - 1)
        with pytest.raises(RuntimeError, match="inside another forward"):
            with context.serving(routing):
                pass
    with pytest.raises(UserError, match="without routing"):
        context.local(seq * batch)


def _sequence_parallel_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    from megatron_grouter.runtime.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        batch, seq = 2, 8
        ids_BS = token_ids_BS(batch, seq)
        # What megatron hands this rank's MoE layers under sequence parallelism.
        local_hidden_SBH = scatter_to_sequence_parallel_region(ids_BS.t().unsqueeze(-1).float())
        context = RoutingContext(sequence_parallel=True)
        routing = route_micro_batch(ids_BS.unsqueeze(-1), ids_BS.unsqueeze(-1).float(),
                                    RoutingRule(num_experts=int(ids_BS.max()) + 1))
        with context.serving(routing):
            slots_TK = context.local(local_hidden_SBH.shape[0] * batch).slots
        results[rank] = bool(torch.equal(slots_TK[:, 0], local_hidden_SBH.reshape(-1).long()))
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_sequence_parallel_slice_matches_megatron_scatter():
    # megatron-core 0.16.1 cannot build an MoE model with TP>1 on CPU (MoE+TP requires sequence
    # parallelism, which its local norms refuse), so the slicing is checked against megatron's own
    # sequence-parallel scatter on 2 gloo processes.
    results = mp.Manager().dict()
    mp.spawn(_sequence_parallel_worker, args=(free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: True, 1: True}
