"""The ProbMoE convergence benchmark's dynamic-k verdict: 2.00 of 2 experts is never 'fewer'."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "probmoe_convergence.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("probmoe_convergence", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dynamic_k_verdict_needs_fewer_experts_on_every_seed():
    verdict = load_benchmark().dynamic_k_verdict
    assert verdict("probmoe_dynamic_k", [2.0, 2.0], [-0.0018, -0.0086], 2).split(": ")[2].startswith("no")
    assert verdict("d", [1.995, 1.5], [-0.01, -0.01], 2).split(": ")[2].startswith("no")  # < 1 % fewer on one seed
    assert verdict("d", [1.52, 1.53], [0.08, 0.11], 2).split(": ")[2].startswith("no")    # worse than exact-k
    assert verdict("d", [1.52, 1.53], [-0.01, 0.0], 2).split(": ")[2].startswith("yes")
    assert verdict("d", [None, 1.5], [-0.01, -0.01], 2).split(": ")[2].startswith("no")


def test_recorded_doc_agrees_with_the_rule():
    doc = (BENCHMARK.parents[1] / "docs" / "results" / "probmoe" / "tiny_cpu.md").read_text()
    lines = [line for line in doc.splitlines() if "fewer active experts than k_max" in line]
    assert lines and all(": no (" in line for line in lines)
