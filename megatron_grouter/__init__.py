"""megatron-grouter: preemptive (Grouter) and probabilistic (ProbMoE) routing for Megatron-Core MoE."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import time on every machine without Transformer Engine / apex; on
# CPU that is the expected configuration, so say it once in the docs instead of on every run.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex|TE) .*not installed.*")
_warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
_warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
