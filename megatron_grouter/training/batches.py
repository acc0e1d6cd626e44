"""Global batches → this rank's micro-batches, by sample index: deterministic and resumable.

Step `i` consumes samples [i·G, (i+1)·G) of the (already shuffled) GPTDataset; data-parallel rank
r takes the r-th contiguous block of G/DP and splits it into micro-batches. Resuming at step i
needs nothing but i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_grouter.data.sample_tokens import input_token_positions


@dataclass
class MicroBatch:
    tokens_BS: torch.Tensor
    labels_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    sample_ids_B: torch.Tensor  # indices into the dataset
    # Global .bin positions of the input tokens (GPTDataset only): how preemptive routing
    # computed per document finds these tokens. Stays on the host.
    token_positions_BS: np.ndarray | None = None
    # Which micro-batch of this rank's step this is (0-based); -1 outside a training step.
    micro_batch_index: int = -1
    # Preemptive routing of these tokens (routing.microbatch.MicroBatchRouting), attached before
    # the schedule runs and handed to the MoE layers by the forward step; None for learned routers.
    routing: object | None = None
    # The routing as computed on the host (observers read it) once `routing` is on the device.
    host_routing: object | None = None
    # A CUDA event recorded after the batch's upload on a side stream (training/device_batches.py).
    ready: object | None = None

    def to(self, device: torch.device) -> "MicroBatch":
        tensors = (self.tokens_BS, self.labels_BS, self.loss_mask_BS, self.position_ids_BS,
                   self.sample_ids_B)
        return MicroBatch(*(tensor.to(device, non_blocking=True) for tensor in tensors),
                          token_positions_BS=self.token_positions_BS,
                          micro_batch_index=self.micro_batch_index,
                          routing=None if self.routing is None else self.routing.to(device, non_blocking=True),
                          host_routing=self.host_routing, ready=self.ready)


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def collate(dataset, sample_ids: list[int], micro_batch_index: int = -1) -> MicroBatch:
    items = [dataset[index] for index in sample_ids]
    stack = lambda key: torch.stack([_as_tensor(item[key]) for item in items])  # noqa: E731
    positions = (input_token_positions(dataset, sample_ids) if hasattr(dataset, "sample_index")
                 else None)
    return MicroBatch(tokens_BS=stack("tokens").long(), labels_BS=stack("labels").long(),
                      loss_mask_BS=stack("loss_mask").float(),
                      position_ids_BS=stack("position_ids").long(),
                      sample_ids_B=torch.tensor(sample_ids, dtype=torch.long),
                      token_positions_BS=positions, micro_batch_index=micro_batch_index)


class SequentialSchedule:
    """Which samples each data-parallel rank trains on at each step (the default order).

    Step i takes samples [i·G, (i+1)·G) of the shuffled dataset; DP rank r the r-th contiguous
    block of G/DP. Any schedule (e.g. a placement plan's) offers the same method, so a rank can
    also ask which samples its peers train on — the planned dispatcher needs that.
    """

    def __init__(self, global_batch_size: int, dp_size: int, dataset_size: int):
        self.global_batch_size = global_batch_size
        self.dp_size = dp_size
        self.dataset_size = dataset_size

    def rank_sample_ids(self, step: int, dp_rank: int) -> list[int]:
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + dp_rank * per_rank
        return [index % self.dataset_size for index in range(start, start + per_rank)]


def micro_batches(dataset, sample_ids: list[int], micro_batch_size: int) -> list[MicroBatch]:
    return [collate(dataset, sample_ids[start:start + micro_batch_size], index)
            for index, start in enumerate(range(0, len(sample_ids), micro_batch_size))]
