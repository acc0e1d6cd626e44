"""megatron-grouter: preemptive (Grouter) and probabilistic (ProbMoE) routing for Megatron-Core MoE.

Importing the package checks that the installed megatron-core is one we support (from its
metadata; megatron itself is not imported here). A command (`mg-*`, `python -m megatron_grouter...`)
refuses an unsupported one with a single `error:` line and exit status 2; a library import
raises `UnsupportedMegatronCore` (an ImportError) with the same line.
"""

import sys as _sys

from megatron_grouter.megatron_compat import UnsupportedMegatronCore, unsupported_reason, installed_version

__version__ = "0.1.0"


def _started_as_command() -> bool:
    argv = getattr(_sys, "orig_argv", None) or _sys.argv
    if any(arg.startswith("megatron_grouter") for arg in argv[1:3]) and "-m" in argv[1:3]:
        return True
    program = argv[0].rsplit("/", 1)[-1] if argv else ""
    return program.startswith("mg-") or (len(argv) > 1 and argv[1].rsplit("/", 1)[-1].startswith("mg-"))


_reason = unsupported_reason(installed_version())
if _reason:
    if _started_as_command():
        print(f"error: {_reason}", file=_sys.stderr, flush=True)
        raise SystemExit(2)
    raise UnsupportedMegatronCore(_reason)

__all__ = ["UnsupportedMegatronCore", "__version__"]
