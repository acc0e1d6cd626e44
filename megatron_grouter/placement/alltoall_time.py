"""Predicted all-to-all time of an EP layout on a GPU cluster: an α–β model.

Input: the per-rank send matrix pairs_RR[i, j] (token copies rank i sends to rank j in one
global batch; the diagonal stays local) and a topology — GPUs per node (rank r on node
r // gpus_per_node), per-GPU intra-node bandwidth (NVLink), per-GPU inter-node bandwidth (NIC),
per-message latency α — and the bytes of one token row (hidden size × bytes per element).

Model (stated, not fitted): links are full duplex and a GPU's NVLink and NIC run concurrently,
so rank i needs
    T_i = α · peers_i + max( max(out_intra_i, in_intra_i) · b / β_intra,
                             max(out_inter_i, in_inter_i) · b / β_inter )
where out/in are the rows rank i sends/receives within and across nodes, b the row bytes and
peers_i the number of other ranks it exchanges a non-empty message with (either direction). The
all-to-all ends with its slowest rank: T = max_i T_i. One MoE layer's forward runs two (dispatch,
combine = the transposed matrix, so the same T), its backward two more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_grouter.errors import UserError


@dataclass(frozen=True)
class Topology:
    gpus_per_node: int = 8
    intra_node_GBps: float = 400.0  # per GPU, one direction (NVLink 4: ~450 GB/s)
    inter_node_GBps: float = 50.0  # per GPU, one direction (400 Gb/s InfiniBand NIC)
    latency_us: float = 10.0  # α: per message
    hidden_size: int = 4096
    bytes_per_element: int = 2  # bf16 activations

    def check(self, num_ranks: int) -> None:
        if self.gpus_per_node < 1 or (num_ranks > self.gpus_per_node and num_ranks % self.gpus_per_node):
            raise UserError(f"{num_ranks} EP ranks do not fill nodes of topology.gpus_per_node="
                            f"{self.gpus_per_node}; pick a divisor of the EP size")
        if min(self.intra_node_GBps, self.inter_node_GBps) <= 0 or self.latency_us < 0:
            raise UserError("topology bandwidths must be positive and the latency non-negative")

    @property
    def row_bytes(self) -> int:
        return self.hidden_size * self.bytes_per_element

    def describe(self) -> str:
        return (f"{self.gpus_per_node} GPUs/node, intra {self.intra_node_GBps:g} GB/s, inter "
                f"{self.inter_node_GBps:g} GB/s per GPU, α {self.latency_us:g} µs, rows of "
                f"{self.hidden_size}×{self.bytes_per_element} B")


def rank_terms(pairs_RR: np.ndarray, topology: Topology) -> dict[str, np.ndarray]:
    """Per-rank terms of the model, in seconds: latency, intra-node and inter-node transfer."""
    num_ranks = pairs_RR.shape[0]
    topology.check(num_ranks)
    sends_RR = np.asarray(pairs_RR, dtype=np.float64).copy()
    np.fill_diagonal(sends_RR, 0.0)
    node_R = np.arange(num_ranks) // topology.gpus_per_node
    same_RR = node_R[:, None] == node_R[None, :]
    intra_R = np.maximum((sends_RR * same_RR).sum(1), (sends_RR * same_RR).sum(0))
    inter_R = np.maximum((sends_RR * ~same_RR).sum(1), (sends_RR * ~same_RR).sum(0))
    peers_R = ((sends_RR > 0) | (sends_RR.T > 0)).sum(1)
    return {"latency": topology.latency_us * 1e-6 * peers_R,
            "intra": intra_R * topology.row_bytes / (topology.intra_node_GBps * 1e9),
            "inter": inter_R * topology.row_bytes / (topology.inter_node_GBps * 1e9)}


def alltoall_seconds(pairs_RR: np.ndarray, topology: Topology) -> float:
    """T = max_i T_i of the α–β model above, for one all-to-all of matrix pairs_RR (rows)."""
    terms = rank_terms(pairs_RR, topology)
    return float((terms["latency"] + np.maximum(terms["intra"], terms["inter"])).max())


def _describe(pairs_RR: np.ndarray, topology: Topology) -> str:
    terms = rank_terms(pairs_RR, topology)
    slowest = int((terms["latency"] + np.maximum(terms["intra"], terms["inter"])).argmax())
    total = terms["latency"][slowest] + max(terms["intra"][slowest], terms["inter"][slowest])
    return (f"{2e3 * total:.3f} ms (slowest rank {slowest}: latency {1e3 * terms['latency'][slowest]:.3f}, "
            f"intra {1e3 * terms['intra'][slowest]:.3f}, inter {1e3 * terms['inter'][slowest]:.3f} ms per all-to-all)")


def layer_time_lines(default_RR: np.ndarray, planned_RR: np.ndarray, batches: int, topology: Topology) -> list[str]:
    """Predicted per-MoE-layer all-to-all times (per global batch) of the default and planned layouts."""
    default = alltoall_seconds(default_RR / batches, topology)
    planned = alltoall_seconds(planned_RR / batches, topology)
    ratio = f"{planned / default:.3f}x" if default else "n/a"
    return [f"α–β all-to-all model ({topology.describe()}), per MoE layer and global batch, forward = dispatch + "
            f"combine (backward doubles it): default {_describe(default_RR / batches, topology)}",
            f"α–β all-to-all model: planned {_describe(planned_RR / batches, topology)}; planned ÷ default {ratio}"]
