"""Every micro-batch's dispatch plan, computed offline by mg-plan-ep and looked up in training.

With cached routing and a placement plan's static schedule, the tokens each EP rank sends to
each expert slot in every micro-batch of every step are known before training starts. The book
stores them as counts_QXMRE[step, replica, micro-batch, EP rank, slot]: replica x = dp_rank // EP
is the EP group, micro-batch m the m-th micro_batch_size samples of the rank's share (as
PlannedSchedule and micro_batches cut them). Training then needs no routing of peers, no
collective and no host work beyond an index per micro-batch.

The book is only valid for one run layout, so it carries a key — the plan's fingerprint, the
routing cache, the sample order, micro-batch size, global batch, EP and DP size — and training
refuses a book whose key differs from the run's, naming the field. Stored beside the plan as
<plan>.dispatch.npz (one .npz, `meta` a json string, written atomically).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_grouter.atomic_files import save_npz_atomic
from megatron_grouter.dispatch.plan import DispatchPlan
from megatron_grouter.errors import UserError

FORMAT_VERSION = 1
KEY_FIELDS = ("plan", "routing_cache", "sample_order", "micro_batch_size", "global_batch", "ep_size", "dp_size")


def book_path(plan_path: str | os.PathLike) -> Path:
    """Where mg-plan-ep writes the book of a plan: beside it, <plan stem>.dispatch.npz."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.stem + ".dispatch.npz")


def book_key(plan, micro_batch_size: int, dp_size: int) -> dict:
    """What a book must match: the plan (and through it routing cache and samples) and the layout."""
    return {"plan": plan.fingerprint(), "routing_cache": plan.routing_cache_fingerprint,
            "sample_order": plan.training.get("sample_order"), "micro_batch_size": int(micro_batch_size),
            "global_batch": plan.global_batch, "ep_size": plan.ep_size, "dp_size": int(dp_size)}


def _micro_batch_ids(plan, micro_batch_size: int, dp_size: int) -> np.ndarray:
    """Sample ids [Q, X, M, R, b] of micro-batch m of EP rank r in replica x at step q."""
    num_batches, ep_size, per_rank = plan.placement_QRM.shape
    if dp_size % ep_size or per_rank % (dp_size // ep_size):
        raise UserError(f"dp_size={dp_size} does not split the plan's {per_rank} samples per EP rank "
                        f"over {dp_size // max(ep_size, 1)} replicas; use EP times a divisor of {per_rank}")
    replicas = dp_size // ep_size
    share = per_rank // replicas
    if micro_batch_size < 1 or share % micro_batch_size:
        raise UserError(f"train.micro_batch_size={micro_batch_size} does not divide the {share} samples each "
                        "rank trains per step; pick a divisor")
    micro = share // micro_batch_size
    ids_QRXMB = plan.placement_QRM.reshape(num_batches, ep_size, replicas, micro, micro_batch_size)
    return ids_QRXMB.transpose(0, 2, 3, 1, 4)


def build_counts(plan, topk_SLK: np.ndarray, micro_batch_size: int, dp_size: int,
                 chunk_pairs: int = 1 << 24) -> np.ndarray:
    """counts_QXMRE: token copies per expert slot of every micro-batch (slots = the plan's), counted
    by the routers' own rule (routing.microbatch), in chunks of whole steps of about `chunk_pairs`
    token-expert pairs."""
    from megatron_grouter.routing.microbatch import RoutingRule, copies_per_slot, route_tokens

    ids_QXMRB = _micro_batch_ids(plan, micro_batch_size, dp_size)
    chunk_steps = max(1, chunk_pairs // max(1, plan.global_batch * topk_SLK.shape[1] * topk_SLK.shape[2]))
    num_experts = plan.num_experts
    rule = RoutingRule(num_experts, torch.from_numpy(plan.expert_to_slot()).long())
    shape = (*ids_QXMRB.shape[:4], num_experts)
    groups = int(np.prod(ids_QXMRB.shape[1:4]))
    counts = np.empty(shape, dtype=np.int32)
    for start in range(0, shape[0], chunk_steps):
        ids = ids_QXMRB[start:start + chunk_steps]
        steps = ids.shape[0]
        experts = torch.from_numpy(np.ascontiguousarray(topk_SLK[ids.reshape(steps * groups, -1)]))
        routed = route_tokens(experts, torch.ones(experts.shape), rule)
        per_group = copies_per_slot(routed, num_experts, groups=steps * groups)
        counts[start:start + steps] = per_group.reshape(steps, *shape[1:]).numpy()
    return counts


@dataclass
class DispatchPlanBook:
    key: dict
    counts_QXMRE: np.ndarray

    def __post_init__(self) -> None:
        if self.counts_QXMRE.ndim != 5 or (self.counts_QXMRE.size and self.counts_QXMRE.min() < 0):
            raise UserError(f"dispatch plan book has shape {self.counts_QXMRE.shape} or negative counts; "
                            "regenerate it with mg-plan-ep")
        # checked once here, so each look-up is an index and a view
        self._counts = torch.from_numpy(self.counts_QXMRE.astype(np.int64))

    @classmethod
    def build(cls, plan, topk_SLK: np.ndarray, micro_batch_size: int, dp_size: int) -> "DispatchPlanBook":
        return cls(book_key(plan, micro_batch_size, dp_size),
                   build_counts(plan, topk_SLK, micro_batch_size, dp_size))

    @property
    def micro_batches(self) -> int:
        return self.counts_QXMRE.shape[2]

    def plan_at(self, step: int, replica: int, micro_batch_index: int) -> DispatchPlan:
        """The plan of micro-batch `micro_batch_index` at `step` (the book repeats like the schedule)."""
        return DispatchPlan.trusted(self._counts[step % self._counts.shape[0], replica, micro_batch_index])

    def check_fits(self, expected: dict, path) -> None:
        """One UserError naming the first key field that differs from this run's."""
        for name in KEY_FIELDS:
            if self.key.get(name) != expected.get(name):
                raise UserError(f"dispatch plan book {path} was made for {name}={self.key.get(name)!r}, this run "
                                f"has {expected.get(name)!r}; rerun mg-plan-ep with this run's settings or delete "
                                "the book (counts are then exchanged per micro-batch)")

    def save(self, path: str | os.PathLike) -> Path:
        return save_npz_atomic(path, {"format_version": FORMAT_VERSION, "key": self.key},
                               counts_QXMRE=self.counts_QXMRE)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DispatchPlanBook":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                counts = archive["counts_QXMRE"]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"dispatch plan book {path} is unreadable ({type(error).__name__}); "
                            "regenerate it with mg-plan-ep") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"dispatch plan book {path} has format {meta.get('format_version')}, expected "
                            f"{FORMAT_VERSION}; regenerate it with mg-plan-ep")
        return cls(meta["key"], counts)
