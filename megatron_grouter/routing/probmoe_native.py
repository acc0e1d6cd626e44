"""The fused CPU kernel of ProbMoE's product tree (`probmoe_kernel.c`): build, load, call.

On CPU the torch tree is bound by the dispatch and memory traffic of ~1000 small tensor ops per
chunk, not by arithmetic; the kernel walks the whole tree for 8 tokens at a time with its tables
in cache (same numerics: fp64, tilt, clamp, linear space). It is compiled on first use with the
system C compiler (`cc`, or $CC) into a per-user cache keyed by the source, the compiler, its
flags and the CPU, written atomically, so concurrent ranks on one node build it once each at
worst and never load a half-written file. It is built with OpenMP where the compiler has it and
splits tokens across `torch.get_num_threads()` threads; inside a torch process the OpenMP runtime
is torch's own (same soname, loaded once), so the kernel's threads are torch's intra-op pool and
never compete with its spinning workers. Without OpenMP it runs on the calling thread (logged).

Without a working compiler (or a writable cache) `available()` is False and the tree falls back
to its torch implementation (logged once, here); `MEGATRON_GROUTER_PROBMOE_KERNEL=torch` forces that fallback,
`=native` makes a missing compiler an error instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from megatron_grouter.errors import UserError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("probmoe_kernel.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
OPENMP = "-fopenmp"
CHOICES = ("auto", "native", "torch")
ENV = "MEGATRON_GROUTER_PROBMOE_KERNEL"
CACHE_ENV = "MEGATRON_GROUTER_KERNEL_CACHE"

_library: ctypes.CDLL | None = None
_failure: str | None = None
_lock = threading.Lock()


def choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}; unset it or pick one")
    return value


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megatron_grouter" / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    name = os.environ.get("CC", "cc")
    return shutil.which(name)


class CompileError(OSError):
    """The compiler ran and refused (as opposed to an unwritable cache or a missing compiler)."""


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(flags),
                                    _cpu_signature()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"probmoe_kernel_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise CompileError(f"{compiler} {' '.join(flags)} failed: {last}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _build_best(compiler: str) -> Path:
    """With OpenMP if the compiler has it, else single-threaded."""
    try:
        return _build(compiler, (*FLAGS, OPENMP))
    except CompileError as error:
        log.warning("ProbMoE: building the CPU kernel with OpenMP failed (%s); it will run on one thread",
                    error)
        return _build(compiler, FLAGS)


def _load() -> ctypes.CDLL | None:
    with _lock:
        return _library if _library is not None or _failure is not None else _load_once()


def _load_once() -> ctypes.CDLL | None:
    global _library, _failure
    compiler = _compiler()
    try:
        if compiler is None:
            raise OSError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
        library = ctypes.CDLL(str(_build_best(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        _failure = str(error)
        log.warning("ProbMoE: native CPU kernel unavailable (%s); using the torch tree (slower). It needs a C "
                    "compiler (cc or $CC) and a writable cache (%s, or set %s)", _failure, cache_dir(), CACHE_ENV)
        return None
    pointer, i32, u64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_double
    library.probmoe_forward.argtypes = [i32, i32, i32, i32, f64, pointer, pointer, pointer, pointer, pointer,
                                        pointer, u64, i32]
    library.probmoe_forward.restype = i32
    library.probmoe_covariance_vector.argtypes = [i32, i32, i32, i32, f64, pointer, pointer, pointer, pointer,
                                                  i32]
    library.probmoe_covariance_vector.restype = i32
    library.probmoe_openmp.restype = i32
    _library = library
    log.info("ProbMoE: native CPU kernel loaded (%s, %s)", library._name,
             "OpenMP" if library.probmoe_openmp() else "one thread")
    return _library


def available() -> bool:
    """True when the kernel is built and loaded (builds it on first call)."""
    return _load() is not None


def failure() -> str | None:
    """Why the kernel could not be built or loaded, once `available()` said False."""
    _load()
    return _failure


def _call(function, *arguments) -> None:
    if function(*arguments, torch.get_num_threads()) != 0:
        raise MemoryError("ProbMoE native kernel could not allocate its scratch tables")


def _check(logits_TE: torch.Tensor, k_max: int) -> None:
    if logits_TE.device.type != "cpu" or logits_TE.dtype != torch.float64 or not logits_TE.is_contiguous():
        raise ValueError("the native ProbMoE kernel takes contiguous fp64 CPU logits")
    if k_max < 1:
        raise ValueError(f"the native ProbMoE kernel needs k_max >= 1, got {k_max}")


def forward(logits_TE: torch.Tensor, k_min: int, k_max: int, radius: float, seed: int | None):
    """(mu [T, E], mask [T, E] bool or None, log Z [T], entropy [T], tilt [T]) for fp64 CPU logits;
    `seed` None: no sample. The tilt (k_max-th largest logit) goes back into `covariance_vector`."""
    _check(logits_TE, k_max)
    library = _load()
    T, E = logits_TE.shape
    mu_TE = torch.empty_like(logits_TE)
    log_z_T, entropy_T, tilt_T = (logits_TE.new_empty(T) for _ in range(3))
    mask_TE = torch.empty((T, E), dtype=torch.uint8) if seed is not None else None
    _call(library.probmoe_forward, T, E, k_min, k_max, radius, logits_TE.data_ptr(), mu_TE.data_ptr(),
         mask_TE.data_ptr() if mask_TE is not None else None, log_z_T.data_ptr(), entropy_T.data_ptr(),
         tilt_T.data_ptr(), (seed or 0) & (2 ** 64 - 1))
    return mu_TE, None if mask_TE is None else mask_TE.view(torch.bool), log_z_T, entropy_T, tilt_T


def covariance_vector(logits_TE: torch.Tensor, tilt_T: torch.Tensor, v_TE: torch.Tensor, k_min: int,
                      k_max: int, radius: float) -> torch.Tensor:
    """Cov(z) v per token, 0 on clamped logits ([T, E] fp64): the backward of the marginals."""
    _check(logits_TE, k_max)
    library = _load()
    v_TE = v_TE.to(torch.float64).contiguous()
    grad_TE = torch.empty_like(logits_TE)
    T, E = logits_TE.shape
    _call(library.probmoe_covariance_vector, T, E, k_min, k_max, radius, logits_TE.data_ptr(),
         tilt_T.contiguous().data_ptr(), v_TE.data_ptr(), grad_TE.data_ptr())
    return grad_TE
