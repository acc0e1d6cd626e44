"""The α–β all-to-all model (placement/alltoall_time.py) against the emulated-cluster runs, and its
prediction for EP 8 / 16 / 32 on 8-GPU nodes.

Calibration: each layout's measured send matrix (rows rank i sent rank j per token all-to-all,
from the ranks' collective logs) goes through the model with the emulated link's figures — 2
ranks per node sharing one link (so β_inter per rank = link rate ÷ 2), loopback TCP for intra-node
pairs, fp32 rows of hidden_size — and the prediction per MoE layer (4 all-to-alls: dispatch and
combine, forward and backward) is set against the measured time per layer (a rank's seconds inside
token all-to-all calls, mean over ranks). α is taken as 0 (no delay is added to the link), then
fitted on the default layout and carried to the planned one, which is the check.

Scale: the planner (make_plan) on a Grouter's routing cache at EP 8, 16, 32, 8 ranks per node, and
the model with published per-GPU figures on each layout's planned/default send matrices, scaled to
`tokens_per_rank` tokens per rank (the matrices are linear in tokens; ratios do not change).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from megatron_grouter.placement.alltoall_time import Topology, alltoall_seconds, rank_terms

ALLTOALLS_PER_LAYER = 4  # dispatch + combine, forward and backward
# Published per-GPU, one-direction figures: H100 SXM NVLink 4 is 900 GB/s bidirectional (450 each
# way); a ConnectX-7 NDR InfiniBand NIC per GPU is 400 Gb/s = 50 GB/s; α ≈ 10 µs per message for an
# NCCL all-to-all peer (launch + protocol; IB hardware latency alone is ~1–2 µs).
SCALE_TOPOLOGY = dict(gpus_per_node=8, intra_node_GBps=450.0, inter_node_GBps=50.0, latency_us=10.0,
                      hidden_size=4096, bytes_per_element=2)
LOOPBACK_GBps = 2.0  # intra-node pairs of the emulated nodes: TCP over the namespace's own address


def emulated_topology(rate_mbit: float, hidden_size: int, row_bytes: int, latency_us: float = 0.0,
                      ranks_per_node: int = 2) -> Topology:
    return Topology(gpus_per_node=ranks_per_node, intra_node_GBps=LOOPBACK_GBps,
                    inter_node_GBps=rate_mbit / 8e3 / ranks_per_node, latency_us=latency_us,
                    hidden_size=hidden_size, bytes_per_element=max(1, row_bytes // hidden_size))


def fit_latency_us(sends_RR: np.ndarray, measured_layer_s: float, topology: Topology,
                   calls_per_layer: float = ALLTOALLS_PER_LAYER) -> float:
    """α (µs per message) that makes the model's slowest rank match `measured_layer_s` for this
    matrix; 0 when the bandwidth terms alone already exceed the measurement."""
    terms = rank_terms(sends_RR, replace(topology, latency_us=0.0))
    bandwidth_R = np.maximum(terms["intra"], terms["inter"])
    sends = np.asarray(sends_RR, dtype=np.float64).copy()
    np.fill_diagonal(sends, 0.0)
    peers_R = ((sends > 0) | (sends.T > 0)).sum(1)
    slowest = int(bandwidth_R.argmax())
    spare_s = measured_layer_s - ALLTOALLS_PER_LAYER * float(bandwidth_R[slowest])
    return max(0.0, spare_s / calls_per_layer / max(int(peers_R[slowest]), 1) * 1e6)


def layer_seconds(sends_RR: np.ndarray, topology: Topology, figures: dict, num_layers: int) -> float:
    """Model time of one MoE layer's token all-to-alls: the 4 of hidden rows, plus any further
    calls per layer the run made (megatron's and the planned dispatcher's forward all-to-all of the
    routing probabilities: one fp32 per row, so latency-bound)."""
    hidden = ALLTOALLS_PER_LAYER * alltoall_seconds(sends_RR, topology)
    extra = max(0.0, figures.get("alltoall_calls_per_step", 0) / num_layers - ALLTOALLS_PER_LAYER)
    probs = replace(topology, hidden_size=1, bytes_per_element=4)
    return hidden + extra * alltoall_seconds(sends_RR, probs)


def calibrate(summary: dict, rate_mbit: float, hidden_size: int, num_layers: int) -> dict:
    """Predicted vs measured all-to-all seconds per MoE layer, α = 0 and α fitted on the default."""
    rows = {}
    default = summary["default"]
    nominal = emulated_topology(rate_mbit, hidden_size, default["row_bytes"])
    calls_per_layer = max(ALLTOALLS_PER_LAYER, default.get("alltoall_calls_per_step", 0) / num_layers)
    alpha = fit_latency_us(np.asarray(default["sends_RR_per_call"]), default["alltoall_s_per_layer"], nominal,
                           calls_per_layer)
    fitted = emulated_topology(rate_mbit, hidden_size, default["row_bytes"], latency_us=alpha)
    for layout, figures in summary.items():
        sends_RR = np.asarray(figures["sends_RR_per_call"])
        measured = figures["alltoall_s_per_layer"]
        predicted = layer_seconds(sends_RR, nominal, figures, num_layers)
        predicted_fitted = layer_seconds(sends_RR, fitted, figures, num_layers)
        rows[layout] = {"measured_s": measured, "predicted_s": predicted, "error": predicted / measured - 1,
                        "predicted_fitted_s": predicted_fitted, "error_fitted": predicted_fitted / measured - 1}
    return {"alpha_fitted_us": alpha, "topology": nominal.describe(), "layouts": rows}


def calibration_lines(calibration: dict) -> list[str]:
    lines = [f"α–β model vs measured all-to-all time per MoE layer (4 of hidden rows + the routing probabilities'; "
             f"model: {calibration['topology']};"
             f" α fitted on the default layout: {calibration['alpha_fitted_us']:.0f} µs per message)",
             "| layout | measured ms/layer | predicted, α=0 | error | predicted, fitted α | error |",
             "|---|---:|---:|---:|---:|---:|"]
    for layout, row in calibration["layouts"].items():
        lines.append(f"| {layout} | {row['measured_s'] * 1e3:.1f} | {row['predicted_s'] * 1e3:.1f} | "
                     f"{row['error']:+.0%} | {row['predicted_fitted_s'] * 1e3:.1f} | {row['error_fitted']:+.0%} |")
    return lines


def scale_predictions(topk_SLK: np.ndarray, num_experts: int, ep_sizes=(8, 16, 32), global_batch: int = 64,
                      tokens_per_rank: int = 16384, topology: dict | None = None) -> list[dict]:
    """Planner at each EP size (8 ranks per node, node-level groups), the model on both layouts."""
    from megatron_grouter.placement.planner import PlannerSettings, make_plan

    topology = Topology(**(topology or SCALE_TOPOLOGY))
    rows = []
    for ep in ep_sizes:
        settings = PlannerSettings(ep_size=ep, global_batch=max(global_batch, ep), ranks_per_node=8,
                                   granularity="node" if ep > 8 else "gpu", perturbations=1,
                                   search_samples=2048, report_samples=8192)
        _, report = make_plan(topk_SLK, num_experts, settings, "ep-cluster-scale")
        tokens_per_batch = settings.global_batch * topk_SLK.shape[1]
        scale = tokens_per_rank * ep / tokens_per_batch / report.batches
        default = alltoall_seconds(report.default.pairs_RR * scale, topology) * ALLTOALLS_PER_LAYER
        planned = alltoall_seconds(report.planned.pairs_RR * scale, topology) * ALLTOALLS_PER_LAYER
        ratios = report.planned.ratios_to(report.default)
        rows.append({"ep": ep, "nodes": max(1, ep // 8), "granularity": settings.granularity,
                     "default_ms": default * 1e3, "planned_ms": planned * 1e3, "ratio": planned / default,
                     "pairs_leaving_rank": ratios["pairs_leaving_rank"], "pairs_leaving_node": ratios["pairs_leaving_node"]})
    return rows


def scale_lines(rows: list[dict], tokens_per_rank: int, topology: dict | None = None) -> list[str]:
    shown = Topology(**(topology or SCALE_TOPOLOGY))
    lines = [f"Predicted all-to-all time per MoE layer (fwd+bwd, 4 all-to-alls) at {tokens_per_rank} tokens per rank; "
             f"{shown.describe()} (NVLink 4: 450 GB/s per direction; NDR InfiniBand 400 Gb/s per GPU)",
             "| EP | nodes | groups | default ms | planned ms | planned ÷ default | pairs leaving rank | pairs leaving node |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        node = "n/a" if row["pairs_leaving_node"] is None else f"{row['pairs_leaving_node']:.3f}x"
        lines.append(f"| {row['ep']} | {row['nodes']} | {row['granularity']} | {row['default_ms']:.2f} | "
                     f"{row['planned_ms']:.2f} | {row['ratio']:.3f}x | {row['pairs_leaving_rank']:.3f}x | {node} |")
    return lines
