"""megatron-grouter: preemptive (Grouter) and probabilistic (ProbMoE) routing for Megatron-Core MoE."""

__version__ = "0.1.0"
