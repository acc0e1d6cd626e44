"""Optimizer state around a checkpoint load, for whichever optimizer class megatron-core built.

megatron-core allocates and restores the state of every optimizer it builds (`init_state_fn` in
`sharded_state_dict(is_loading=True)`, the distributed optimizer's own `load_state_dict`), and
this module leaves that to it, with one exception: torch's Adam/AdamW — what megatron-core builds
when neither Transformer Engine nor apex imports — under the distributed optimizer
(megatron-core 0.16 … 0.19):
- its `state_dict()` reads a per-parameter `step`, which torch creates only at the first
  `step()`: the loading template of a fresh optimizer has none (AssertionError);
- its load gives every parameter the *same* `step` tensor, which torch's Adam then increments
  once per parameter per step, and with the `dp_reshardable` layout leaves it at the template's
  value instead of the checkpoint's (measured: 0 after resuming at step 2). Either way the bias
  correction is wrong after a resume.
Transformer Engine's and apex's FusedAdam keep `step` in the parameter group; their per-parameter
state has no `step` key, and nothing here writes into it.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_grouter.training.optimizer import torch_optimizers


def _torch_adam_under_distributed_optimizer(optimizer) -> list:
    return [chained for chained in torch_optimizers(optimizer)
            if isinstance(chained, DistributedOptimizer)
            and type(chained.optimizer) in (torch.optim.Adam, torch.optim.AdamW)]


def prepare_for_load(optimizer) -> None:
    """Before `sharded_state_dict(is_loading=True)`: give a fresh torch Adam under the distributed
    optimizer the state torch would create at its first step (megatron's own allocation, plus
    torch's per-parameter step count)."""
    for chained in _torch_adam_under_distributed_optimizer(optimizer):
        if chained.optimizer.state:
            continue
        chained.init_state_fn(chained.optimizer, chained.config)
        for param_state in chained.optimizer.state.values():
            param_state["step"] = torch.zeros((), dtype=torch.float32)  # torch Adam's own key


def restore_step_counts(optimizer, step: int) -> None:
    """After megatron's load: torch Adam's count of updates, one tensor per parameter. The
    optimizer updates every parameter once per training step, so each count is `step`."""
    for chained in _torch_adam_under_distributed_optimizer(optimizer):
        for param_state in chained.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step), dtype=torch.float32)
