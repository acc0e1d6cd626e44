"""Process groups: torch.distributed (NCCL with CUDA, gloo without) and megatron parallel_state.

Works with torchrun (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and as a plain
single process (a one-rank group on a free loopback port). `start_process_group` is the one place
that starts torch.distributed, for mg-train (`init_distributed`) and the offline tools alike.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_grouter.errors import UserError
from megatron_grouter.runtime.cpu_compat import apply_cpu_compat
from megatron_grouter.runtime.peer_failure import announce_rank


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    expert_parallel: int
    data_parallel: int
    expert_tensor_parallel: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout(world_size: int, tensor_parallel: int, pipeline_parallel: int,
                 expert_parallel: int, num_experts: int | None, expert_tensor_parallel: int | None = None) -> int:
    """Validate a parallel layout; return the data-parallel size. The dense layers tile the
    world as TP×PP×DP, the experts as ETP×EP×PP×expert-DP (megatron's two rank grids)."""
    expert_tensor_parallel = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
    model_parallel = tensor_parallel * pipeline_parallel
    if min(tensor_parallel, pipeline_parallel, expert_parallel, expert_tensor_parallel) < 1:
        raise UserError("parallel sizes must be >= 1; set parallel.tensor/pipeline/expert/expert_tensor to 1 or more")
    if world_size % model_parallel:
        raise UserError(f"world size {world_size} is not divisible by TP×PP = {model_parallel}; "
                        "change parallel.tensor/pipeline or the number of processes")
    data_parallel = world_size // model_parallel
    expert_grid = expert_tensor_parallel * expert_parallel * pipeline_parallel
    if world_size % expert_grid:
        raise UserError(f"world size {world_size} is not divisible by ETP×EP×PP = {expert_grid}; "
                        "change parallel.expert/expert_tensor or the number of processes")
    if num_experts is not None and num_experts % expert_parallel:
        raise UserError(f"{num_experts} experts are not divisible by EP={expert_parallel}; "
                        "choose parallel.expert dividing model.num_experts")
    return data_parallel


def start_process_group(timeout_minutes: float = 30) -> str:
    """Start torch.distributed for this process unless it already runs; returns the backend.

    nccl with CUDA (on GPU LOCAL_RANK, which becomes the current device), gloo without. RANK and
    WORLD_SIZE come from torchrun (or MASTER_ADDR/MASTER_PORT set by hand). A plain process without
    them gets a one-rank group on a free loopback port, passed as the init method and never
    written into os.environ: a child process started later must not inherit a port that may
    still be listening here.
    """
    if dist.is_initialized():
        return dist.get_backend()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world_size == 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                world_size=1, rank=0, timeout=timeout)
        return backend
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(f"WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT; start the processes "
                        "with torchrun or set both")
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank, timeout=timeout)
    announce_rank()  # so that a survivor can name this rank if it dies (runtime/peer_failure.py)
    return backend


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
                     num_experts: int | None = None, timeout_minutes: int = 30,
                     virtual_pipeline: int | None = None,
                     expert_tensor_parallel: int | None = None) -> ParallelLayout:
    """Initialise torch.distributed and megatron's parallel_state; idempotent per process.
    `expert_tensor_parallel` None: the tensor-parallel size (megatron's default)."""
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    apply_cpu_compat()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    data_parallel = check_layout(world_size, tensor_parallel, pipeline_parallel, expert_parallel,
                                 num_experts, expert_tensor_parallel)
    expert_tensor_parallel = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
    backend = start_process_group(timeout_minutes)  # also makes GPU LOCAL_RANK the current device
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=cuda,
    )
    return ParallelLayout(world_size=world_size, rank=rank, local_rank=local_rank,
                          tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                          expert_parallel=expert_parallel, data_parallel=data_parallel,
                          expert_tensor_parallel=expert_tensor_parallel,
                          device=device, backend=backend)


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_host(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce of a host-side statistic on any backend; returns the reduced tensor on the host.

    NCCL reduces device tensors only, so under NCCL the value makes a round trip through the
    current GPU; gloo reduces it in place. Without a process group the tensor comes back as is.
    """
    if not dist.is_initialized():
        return tensor
    if dist.get_backend(group) == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op, group=group)
        return on_device.to(tensor.device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor
