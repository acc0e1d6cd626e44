"""The Grouter: a small token-id encoder that routes for every MoE layer, and its checkpoint format.

config.py      GrouterConfig (architecture + routing rule)
layers.py      RoPE, causal (default) or bidirectional attention, SwiGLU
encoders.py    encoder stacks by name: "mha", "residual_linear"
gating.py      logits -> top-k experts and gate weights
network.py     Grouter (embedding -> encoder -> norm -> score), count_parameters
checkpoint.py  save_grouter / load_grouter / grouter_fingerprint
"""

from megatron_grouter.grouter.checkpoint import (GrouterCheckpointInfo, grouter_fingerprint, load_grouter,
                                                 new_provenance, save_grouter, with_history_step)
from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.network import Grouter, count_parameters

__all__ = ["Grouter", "GrouterCheckpointInfo", "GrouterConfig", "count_parameters", "grouter_fingerprint",
           "load_grouter", "new_provenance", "save_grouter", "with_history_step"]
