"""A placement plan as a training schedule: which samples each data-parallel rank trains on.

Global batch q of the plan holds exactly the samples of mg-train's default step q (samples
[q·G, (q+1)·G) of the GPTDataset), only redistributed: EP rank r gets `placement_QRM[q, r]`.
With more data-parallel ranks than EP ranks (DP = R·EP, megatron puts EP rank r of every EP group
at dp_rank ≡ r mod EP) the R ranks that share EP rank r split its samples in order. Everything
depends on (step, dp_rank) alone, so a run resumes anywhere, and a rank can ask what its peers
train on (the planned dispatcher does).
"""

from __future__ import annotations

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.plan import Plan


class PlannedSchedule:
    """`rank_sample_ids(step, dp_rank)` from a plan; same interface as SequentialSchedule."""

    def __init__(self, plan: Plan, dp_size: int):
        ep_size = plan.ep_size
        per_rank = plan.placement_QRM.shape[2]
        if dp_size % ep_size or per_rank % (dp_size // ep_size):
            raise UserError(f"a plan for EP {ep_size} with {per_rank} samples per EP rank cannot feed "
                            f"{dp_size} data-parallel ranks; use a DP size that is EP times a divisor of {per_rank}")
        num_batches, global_batch = plan.placement_QRM.shape[0], plan.global_batch
        expected_QB = np.arange(num_batches * global_batch).reshape(num_batches, global_batch)
        if not np.array_equal(np.sort(plan.placement_QRM.reshape(num_batches, -1), axis=1), expected_QB):
            raise UserError("the plan's global batches are not mg-train's (samples [q·G, (q+1)·G) per step); "
                            "regenerate it with mg-plan-ep")
        self.plan = plan
        self.dp_size = dp_size
        self.replicas = dp_size // ep_size
        self.num_batches = num_batches

    def rank_sample_ids(self, step: int, dp_rank: int) -> list[int]:
        """Sample ids of `dp_rank` at `step` (the plan repeats after its last batch)."""
        ep_rank, replica = dp_rank % self.plan.ep_size, dp_rank // self.plan.ep_size
        ids = self.plan.placement_QRM[step % self.num_batches, ep_rank]
        share = ids.size // self.replicas
        return [int(index) for index in ids[replica * share : (replica + 1) * share]]
