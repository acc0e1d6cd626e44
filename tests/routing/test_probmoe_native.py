"""The fused CPU kernel of the ProbMoE tree against the torch tree, across threads, and its build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.routing import probmoe_native
from megatron_grouter.routing import probmoe_tree as tree

REPO = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                    reason="no C compiler: the native kernel cannot be built here")


def _route_both(logits_TE, k_min, k_max, monkeypatch):
    """(native, torch) results: mu, log Z, entropy and the gradient of a fixed projection of mu."""
    probe_TE = torch.randn(logits_TE.shape, generator=torch.Generator().manual_seed(5), dtype=logits_TE.dtype)
    outputs = []
    for choice in ("native", "torch"):
        monkeypatch.setenv(probmoe_native.ENV, choice)
        leaf_TE = logits_TE.clone().requires_grad_(True)
        result = tree.route(leaf_TE, k_min, k_max, sample=False)
        (grad_TE,) = torch.autograd.grad((result.mu_TE * probe_TE).sum() + result.log_z_T.sum(), leaf_TE)
        outputs.append((result.mu_TE.detach(), result.log_z_T.detach(), result.entropy_T, grad_TE))
    return outputs


@needs_compiler
def test_the_kernel_builds_wherever_a_compiler_exists():
    assert probmoe_native.available(), probmoe_native.failure()


@needs_compiler
@pytest.mark.parametrize("tokens,experts,k_min,k_max,scale", [
    (8192 + 5, 64, 8, 8, 2.0), (301, 128, 8, 8, 30.0), (77, 64, 2, 8, 5.0), (13, 33, 1, 33, 1.0),
    (9, 16, 0, 4, 200.0),
])
def test_kernel_matches_the_torch_tree_on_two_threads(tokens, experts, k_min, k_max, scale, monkeypatch):
    logits_TE = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens),
                            dtype=torch.float64) * scale
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # token ranges split across two kernel threads
    try:
        native, reference = _route_both(logits_TE, k_min, k_max, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(native, reference):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@needs_compiler
def test_samples_do_not_depend_on_the_thread_split(monkeypatch):
    monkeypatch.setenv(probmoe_native.ENV, "native")
    logits_TE = torch.randn(999, 64, generator=torch.Generator().manual_seed(0))
    threads, masks = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            masks.append(tree.sample_subsets(logits_TE, 2, 8, generator=torch.Generator().manual_seed(4)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], tree.sample_subsets(logits_TE, 2, 8, generator=torch.Generator().manual_seed(5)))


def test_an_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv(probmoe_native.ENV, "fast")
    with pytest.raises(UserError, match=probmoe_native.ENV):
        tree.marginals(torch.zeros(2, 8), 2, 2)


def _fresh_interpreter(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MEGATRON_GROUTER_KERNEL_CACHE": str(tmp_path / "kernels"), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_without_a_compiler_auto_falls_back_and_native_is_refused(tmp_path):
    code = ("import torch\nfrom megatron_grouter.routing import probmoe_native, probmoe_tree as tree\n"
            "from megatron_grouter.routing import probmoe_dp as dp\n"
            "x = torch.randn(20, 8, dtype=torch.float64)\n"
            "assert not probmoe_native.available() and 'no C compiler' in probmoe_native.failure()\n"
            "torch.testing.assert_close(tree.marginals(x, 2, 3), dp.marginals(x, 2, 3))\n"
            "import os; os.environ[probmoe_native.ENV] = 'native'\n"
            "try:\n    tree.marginals(x, 2, 3)\nexcept Exception as error:\n    print(type(error).__name__, error)\n")
    result = _fresh_interpreter(code, tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert result.returncode == 0, result.stderr
    assert "using the torch tree" in result.stderr
    assert result.stdout.startswith("UserError") and "could not be built" in result.stdout


@needs_compiler
def test_the_build_is_cached_atomically_and_reused(tmp_path):
    code = ("from megatron_grouter.routing import probmoe_native\n"
            "assert probmoe_native.available(), probmoe_native.failure()\nprint(probmoe_native._library._name)\n")
    first = _fresh_interpreter(code, tmp_path)
    assert first.returncode == 0, first.stderr
    built = sorted((tmp_path / "kernels").iterdir())
    assert [path.suffix for path in built] == [".so"]  # no partial file left behind
    stamp = built[0].stat().st_mtime_ns
    second = _fresh_interpreter(code, tmp_path)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_compiler
def test_a_compiler_without_openmp_builds_a_one_thread_kernel(tmp_path):
    real = shutil.which(os.environ.get("CC", "cc"))
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP" >&2; exit 1; }}; done\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    code = ("import torch\nfrom megatron_grouter.routing import probmoe_native, probmoe_tree as tree\n"
            "from megatron_grouter.routing import probmoe_dp as dp\n"
            "assert probmoe_native.available(), probmoe_native.failure()\n"
            "assert probmoe_native._library.probmoe_openmp() == 0\n"
            "x = torch.randn(50, 12, dtype=torch.float64)\n"
            "torch.testing.assert_close(tree.marginals(x, 2, 5), dp.marginals(x, 2, 5))\n")
    result = _fresh_interpreter(code, tmp_path, CC=str(wrapper))
    assert result.returncode == 0, result.stderr
    assert "with OpenMP failed" in result.stderr and "no OpenMP" in result.stderr


@needs_compiler
def test_an_unwritable_cache_falls_back_with_the_fix_in_the_log(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    code = ("import torch\nfrom megatron_grouter.routing import probmoe_native, probmoe_tree as tree\n"
            "assert not probmoe_native.available()\n"
            "print(tree.marginals(torch.zeros(2, 8), 2, 2).sum().item())\n")
    result = _fresh_interpreter(code, tmp_path, MEGATRON_GROUTER_KERNEL_CACHE=str(blocker / "kernels"))
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(4.0)
    assert "MEGATRON_GROUTER_KERNEL_CACHE" in result.stderr and "using the torch tree" in result.stderr
    assert "OpenMP" not in result.stderr  # the cache, not the compiler, is the problem
