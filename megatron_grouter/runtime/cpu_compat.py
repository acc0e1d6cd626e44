"""Answers megatron-core's CUDA assumptions on machines without CUDA.

megatron-core runs its GPT/MoE model on CPU with gloo once a few places that assume a CUDA
device are answered. Every answer lives in `ANSWERS` below with the megatron-core releases that
need it (read against 0.16.1, 0.17.1, 0.18.2 and 0.19.2; `megatron_compat.needs`) and whether it
is about CUDA (applied only without CUDA) or about a missing Transformer Engine (applied on any
device: a GPU image without TE hits it too; seen on an H200). Each is applied once per process.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_grouter.megatron_compat import needs


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
    """router_gating_linear names te_general_gemm, which 0.16.x only binds when Transformer Engine
    imports (NameError otherwise, on CPU and on GPUs without TE); None selects its torch.mm path.
    0.17.0+ binds it to None itself."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _CudaFactoriesOnCpu(types.ModuleType):
    """`torch` as seen by a megatron module that builds small tensors with device='cuda'
    (found-inf flags, norm accumulators, token counters): the same torch, with 'cuda' read as
    the CPU. Everything else is torch itself."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:  # set once: the optimizer step calls them every step
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory):
        @functools.wraps(factory)
        def on_cpu(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return factory(*args, device=device, **kwargs)
        return on_cpu

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                   "torch.HalfTensor": "torch.cuda.HalfTensor",
                   "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """While active, `tensor.type()` of a CPU float tensor answers its CUDA name."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return _CPU_TYPE_NAMES.get(name, name) if not args and not kwargs else name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cpu_tensors_named_as_cuda(function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _cpu_tensors_named_as_cuda():
            return function(*args, **kwargs)
    return wrapped


class _HostStream(torch.cpu.Stream):
    """torch.cpu's no-op stream, whose record_event returns an event (torch.cpu's returns None;
    the all-to-all dispatcher synchronises on it)."""

    def record_event(self, event=None):
        event = event or torch.cpu.Event()
        event.record()
        return event


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """moe_utils.maybe_move_tensor_to_cpu, for tensors that already live on the CPU: the
    all-to-all dispatcher expects numpy split sizes back either way."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _answer_optimizer_and_schedule_assumptions() -> None:
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as core_optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # 5. Flags, norms and token counters are created with device='cuda'.
    shim = _CudaFactoriesOnCpu()
    for module in (core_optimizer, clip_grads, core_utils, schedules):
        module.torch = shim
    # 6. The mixed-precision/distributed optimizers and the clipping check tensor.type() against
    #    'torch.cuda.*Tensor' names, only while they are built and while they clip.
    core_optimizer.Float16OptimizerWithFloat16Params.__init__ = _with_cpu_tensors_named_as_cuda(
        core_optimizer.Float16OptimizerWithFloat16Params.__init__)
    distrib_optimizer.DistributedOptimizer.__init__ = _with_cpu_tensors_named_as_cuda(
        distrib_optimizer.DistributedOptimizer.__init__)
    clipping = _with_cpu_tensors_named_as_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipping
    core_optimizer.clip_grad_by_total_norm_fp32 = clipping
    # 7. The all-to-all dispatcher copies split sizes on a side CUDA stream; torch.cpu has
    #    no-op streams with the same interface.
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.stream = torch.cpu.stream
    # 8. ...and turns only CUDA tensors into numpy split sizes.
    moe_utils.maybe_move_tensor_to_cpu = _move_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_host


def _answer_cuda_device_buffers() -> None:
    """DotProductAttention and GlobalMemoryBuffer allocate on torch.cuda.current_device()."""
    torch.cuda.current_device = lambda: torch.device("cpu")


def _answer_rng_tracker() -> None:
    """The model-parallel RNG tracker forks CUDA generator states; track CPU states instead, and
    activation recomputation's save/restore of the (absent) CUDA generator becomes a no-op."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _answer_checkpoint_synchronize() -> None:
    """dist_checkpointing's async filesystem writer synchronises CUDA after its copies to CPU."""
    torch.cuda.synchronize = lambda *args, **kwargs: None


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """The RMSNorm of megatron-core's local layer spec, for sequence parallelism without
    Transformer Engine (every release we support: its WrappedTorchNorm asserts
    `not config.sequence_parallel`). Normalising is per token, so a sequence shard needs nothing
    else; each TP rank's weight gradient covers only its shard, so the weight is marked
    `sequence_parallel` and megatron's finalize_model_grads sums it over the TP group, as it does
    for TE's norms. Same parameter name and initial value as torch's RMSNorm, which megatron's
    local spec builds without sequence parallelism. training/model.py selects it in the layer
    spec only when Transformer Engine is absent and sequence parallelism is on. (gloo's
    reduce-scatter, which megatron's sequence-parallel mappings call, needs no answer: torch
    ≥ 2.x gloo has reduce_scatter_tensor.)"""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm; the config asks for {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


@dataclass(frozen=True)
class Answer:
    name: str
    lowest: str  # first megatron-core release that needs it
    below: str | None  # first release that no longer does (None: every supported one so far)
    cpu_only: bool
    apply: Callable[[], None]


ANSWERS = (
    Answer("te_general_gemm bound when Transformer Engine is missing", "0.16.1", "0.17.0", False,
           _answer_missing_transformer_engine),
    Answer("CUDA device for buffers", "0.16.1", None, True, _answer_cuda_device_buffers),
    Answer("CPU model-parallel RNG tracker", "0.16.1", None, True, _answer_rng_tracker),
    Answer("no-op CUDA synchronize in the checkpoint writer", "0.16.1", None, True,
           _answer_checkpoint_synchronize),
    Answer("optimizer, clipping, schedules and all-to-all dispatcher on CPU tensors", "0.16.1", None, True,
           _answer_optimizer_and_schedule_assumptions),
)
_APPLIED: set[str] = set()


def answers_for(version: str, cuda: bool) -> list[str]:
    """Names of the answers a process with megatron-core `version` (and CUDA or not) gets."""
    return [answer.name for answer in ANSWERS
            if (not answer.cpu_only or not cuda) and needs(answer.lowest, answer.below, version)]


def apply_cpu_compat() -> list[str]:
    """Apply the answers this megatron-core and device need (once each); returns their names."""
    from megatron_grouter.megatron_compat import installed_version

    wanted = answers_for(installed_version(), torch.cuda.is_available())
    for answer in ANSWERS:
        if answer.name in wanted and answer.name not in _APPLIED:
            answer.apply()
            _APPLIED.add(answer.name)
    return wanted
