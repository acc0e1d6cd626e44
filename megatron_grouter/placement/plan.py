"""The EP placement plan that training loads: where experts sit and which rank gets each sample.

`slot_to_expert[i]` is the Grouter expert served by model expert slot i; slots are contiguous
per EP rank (rank r owns slots r·E/EP .. (r+1)·E/EP - 1), so the model's own contiguous expert
layout realises the grouping once the router maps Grouter expert ids through the inverse
permutation. `placement_QRM[q, r]` lists the sample ids rank r trains on in global batch q. The
plan is tied to one routing cache by `routing_cache_fingerprint` and, through `training`, to one
GPTDataset sample order; training refuses a plan made for other routing or other samples. It
is stored as one .npz whose `meta` entry is a json string, written atomically (temporary file, then os.replace).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_grouter.atomic_files import save_npz_atomic
from megatron_grouter.errors import UserError

GRANULARITIES = ("gpu", "node")
FORMAT_VERSION = 1


@dataclass
class Plan:
    """Expert slots, per-batch sample placement and the metadata that ties them to a run."""

    num_experts: int
    top_k: int
    ep_size: int
    ranks_per_node: int
    granularity: str
    routing_cache_fingerprint: str
    slot_to_expert: np.ndarray
    placement_QRM: np.ndarray
    stats: dict = field(default_factory=dict)
    # what the sample ids mean: GPTDataset sample-order fingerprint, seq_length, seed, ... (plan_ep)
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slot_to_expert = np.asarray(self.slot_to_expert, dtype=np.int64)
        self.placement_QRM = np.asarray(self.placement_QRM, dtype=np.int64)
        self.validate()

    @property
    def num_partitions(self) -> int:
        """Partitions the planner optimised over: EP ranks (gpu) or nodes (node)."""
        return self.ep_size if self.granularity == "gpu" else self.ep_size // self.ranks_per_node

    @property
    def global_batch(self) -> int:
        return int(self.placement_QRM.shape[1] * self.placement_QRM.shape[2])

    def validate(self) -> None:
        """Raise UserError unless the plan is internally consistent."""
        if self.granularity not in GRANULARITIES:
            raise UserError(f"plan granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.num_experts % self.ep_size or self.ep_size % self.ranks_per_node:
            raise UserError(
                f"plan shape is inconsistent: {self.num_experts} experts, EP {self.ep_size}, "
                f"{self.ranks_per_node} ranks per node; regenerate the plan"
            )
        if not np.array_equal(np.sort(self.slot_to_expert), np.arange(self.num_experts)):
            raise UserError("plan slot_to_expert is not a permutation of the experts; regenerate the plan")
        if self.placement_QRM.ndim != 3 or self.placement_QRM.shape[1] != self.ep_size:
            raise UserError(f"plan placement has shape {self.placement_QRM.shape}, expected [batches, {self.ep_size}, per-rank]")
        ids = self.placement_QRM.ravel()
        if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.size):
            raise UserError("plan places a sample twice or uses a negative sample id; regenerate the plan")

    def expert_to_slot(self) -> np.ndarray:
        """Inverse permutation: the model slot that serves each Grouter expert."""
        inverse = np.empty_like(self.slot_to_expert)
        inverse[self.slot_to_expert] = np.arange(self.num_experts)
        return inverse

    def expert_to_rank(self) -> np.ndarray:
        """EP rank that hosts each Grouter expert."""
        return self.expert_to_slot() // (self.num_experts // self.ep_size)

    def expert_to_node(self) -> np.ndarray:
        """Node that hosts each Grouter expert (node of EP rank r: r // ranks_per_node)."""
        return self.expert_to_rank() // self.ranks_per_node

    def groups(self) -> dict[str, list[int]]:
        """GPU- and node-level expert groups: the EP rank and the node of each Grouter expert."""
        return {"gpu": self.expert_to_rank().tolist(), "node": self.expert_to_node().tolist()}

    def fingerprint(self) -> str:
        """sha256 over what training depends on: metadata (but stats), expert slots and placement.

        A run stores it in its train state, so it cannot resume under another plan.
        """
        digest = hashlib.sha256()
        identity = {key: value for key, value in self._meta().items() if key != "stats"}
        digest.update(json.dumps(identity, sort_keys=True).encode())
        for array in (self.slot_to_expert, self.placement_QRM):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def sample_to_rank(self, num_samples: int) -> np.ndarray:
        """EP rank of every sample id below num_samples, -1 for samples the plan does not place."""
        rank_S = np.full(num_samples, -1, dtype=np.int64)
        ranks = np.broadcast_to(np.arange(self.ep_size)[None, :, None], self.placement_QRM.shape)
        inside = self.placement_QRM < num_samples
        rank_S[self.placement_QRM[inside]] = ranks[inside]
        return rank_S

    def check_matches(self, fingerprint: str) -> None:
        """Refuse a plan computed for a different routing cache."""
        if fingerprint != self.routing_cache_fingerprint:
            raise UserError(
                f"placement plan was made for routing cache {self.routing_cache_fingerprint!r}, "
                f"not {fingerprint!r}; rerun the planner on this routing cache"
            )

    def _meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "ep_size": self.ep_size,
            "ranks_per_node": self.ranks_per_node,
            "granularity": self.granularity,
            "groups": self.groups(),
            "routing_cache_fingerprint": self.routing_cache_fingerprint,
            "stats": self.stats,
            "training": self.training,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to one .npz file atomically; returns the path."""
        return save_npz_atomic(path, self._meta(), slot_to_expert=self.slot_to_expert,
                               placement_QRM=self.placement_QRM)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by `save` (no pickle)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"placement plan {path} does not exist; run the planner first or fix the path")
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                slot_to_expert, placement_QRM = archive["slot_to_expert"], archive["placement_QRM"]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"placement plan {path} is unreadable ({type(error).__name__}); regenerate it") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"placement plan {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}; regenerate it")
        return cls(
            num_experts=meta["num_experts"],
            top_k=meta["top_k"],
            ep_size=meta["ep_size"],
            ranks_per_node=meta["ranks_per_node"],
            granularity=meta["granularity"],
            routing_cache_fingerprint=meta["routing_cache_fingerprint"],
            slot_to_expert=slot_to_expert,
            placement_QRM=placement_QRM,
            stats=meta.get("stats", {}),
            training=meta.get("training", {}),
        )
