"""Answers megatron-core's CUDA assumptions on machines without CUDA.

megatron-core 0.16.1 runs its GPT/MoE model on CPU with gloo once a few places that assume a
CUDA device are answered. Every answer lives here, is applied only when CUDA is absent, and
is idempotent. On CUDA machines `apply_cpu_compat()` only answers the one gap that is about
Transformer Engine rather than CUDA (a GPU image without TE hits it too; seen on an H200).
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """Named RNG streams for the model-parallel regions, kept as CPU generator states.

    megatron's CudaRNGStatesTracker keeps CUDA generator states; layers call
    `get_cuda_rng_tracker().fork(name)` around initialisation and dropout. Same contract here
    with torch's CPU default generator.
    """

    def __init__(self, *args, **kwargs):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _answer_missing_transformer_engine() -> None:
    """router_gating_linear names te_general_gemm, which only exists when Transformer Engine
    imports (NameError otherwise, on CPU and on GPUs without TE); None selects its torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_cpu_compat() -> None:
    """Patch the CUDA-only spots of megatron-core; a no-op when CUDA is available."""
    global _APPLIED
    _answer_missing_transformer_engine()
    if _APPLIED or torch.cuda.is_available():
        return

    # 1. Buffers (DotProductAttention, GlobalMemoryBuffer) are allocated on
    #    torch.cuda.current_device(); answer with the CPU device.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # 2. The model-parallel RNG tracker forks CUDA generator states; track CPU states instead.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # 3. dist_checkpointing's async filesystem writer synchronises CUDA after its copies to CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None

    _answer_alltoall_dispatcher_cuda_assumptions()
    _APPLIED = True


class _HostEvent:
    """Work on the host is done when it returns: nothing to wait for."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream(torch.cpu.Stream):
    def record_event(self, event=None):
        return event or _HostEvent()


def _answer_alltoall_dispatcher_cuda_assumptions() -> None:
    """megatron's MoEAlltoAllTokenDispatcher (the baseline of benchmarks/dispatch.py):
    - it makes a side stream for its device→host copies (torch.cuda.Stream, current_stream,
      torch.cuda.stream) and an event on it: torch.cpu's streams are no-ops with the same
      methods, but record no event, so the stream answers with a no-op event;
    - its split sizes reach all_to_all_single as numpy arrays only when maybe_move_tensor_to_cpu
      converts them, which it does for CUDA tensors only; on CPU they stay tensors, so the
      conversion is applied to CPU tensors too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.stream = torch.cpu.stream
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
