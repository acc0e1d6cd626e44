"""Product-tree ProbMoE DP against brute-force enumeration (E <= 10) and the sequential DP.

Every test runs twice: on the fused CPU kernel (`probmoe_native`) and on the torch tree.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from scipy.stats import chisquare

from megatron_grouter.errors import UserError
from megatron_grouter.routing import probmoe_dp as sequential
from megatron_grouter.routing import probmoe_native
from megatron_grouter.routing import probmoe_tree as tree

from tests.routing.test_probmoe_dp import brute_force, random_logits

torch.set_num_threads(1)


@pytest.fixture(params=["native", "torch"], autouse=True)
def implementation(request, monkeypatch):
    if request.param == "native" and shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    monkeypatch.setenv(probmoe_native.ENV, request.param)
    return request.param

# (experts, k_min, k_max): powers of two and not, exact-k and dynamic-k, empty sets allowed
CASES = [(5, 2, 2), (8, 3, 3), (10, 4, 4), (7, 1, 4), (8, 0, 3), (10, 2, 6), (6, 6, 6), (9, 1, 1),
         (3, 0, 3), (1, 1, 1)]


@pytest.mark.parametrize("experts,k_min,k_max", CASES)
def test_log_z_marginals_and_entropy_match_enumeration_and_the_sequential_dp(experts, k_min, k_max):
    logits_TE = random_logits(6, experts, scale=3.0, seed=experts + k_max)
    _, log_z_T, probs_TS, mu_TE = brute_force(logits_TE, k_min, k_max)
    result = tree.route(logits_TE, k_min, k_max, sample=False)
    torch.testing.assert_close(result.log_z_T, log_z_T, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.mu_TE, mu_TE, atol=1e-10, rtol=0)
    entropy_T = -(probs_TS * probs_TS.clamp_min(1e-300).log()).sum(1)
    torch.testing.assert_close(result.entropy_T, entropy_T, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.mu_TE, sequential.marginals(logits_TE, k_min, k_max), atol=1e-10, rtol=0)
    torch.testing.assert_close(result.log_z_T, sequential.log_normaliser(logits_TE, k_min, k_max),
                               atol=1e-10, rtol=0)
    assert result.mask_TE.shape == (0, experts)  # sample=False draws nothing


def test_tree_has_log_depth():
    assert [tree.tree_depth(e) for e in (1, 2, 3, 8, 9, 64, 128)] == [0, 1, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("experts,k_min,k_max", [(6, 3, 3), (7, 1, 4), (5, 0, 5), (8, 2, 2)])
def test_marginals_and_log_z_pass_gradcheck(experts, k_min, k_max):
    logits_TE = random_logits(3, experts, scale=2.0, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tree.marginals(x, k_min, k_max), (logits_TE,))
    assert torch.autograd.gradcheck(lambda x: tree.log_normaliser(x, k_min, k_max), (logits_TE,))


@pytest.mark.parametrize("k_min,k_max", [(2, 2), (1, 4)])
def test_marginal_gradient_is_the_subset_covariance(k_min, k_max):
    logits_TE = random_logits(4, 7, seed=4).requires_grad_(True)
    direction_TE = random_logits(4, 7, scale=1.0, seed=5)
    (grad_TE,) = torch.autograd.grad((tree.marginals(logits_TE, k_min, k_max) * direction_TE).sum(), logits_TE)
    subsets_SE, _, probs_TS, mu_TE = brute_force(logits_TE.detach(), k_min, k_max)
    second_TEE = torch.einsum("ts,se,sf->tef", probs_TS, subsets_SE, subsets_SE)
    cov_TEE = second_TEE - mu_TE[:, :, None] * mu_TE[:, None, :]
    torch.testing.assert_close(grad_TE, torch.einsum("tef,tf->te", cov_TEE, direction_TE), atol=1e-10, rtol=0)


@pytest.mark.parametrize("experts,k_min,k_max", [(5, 2, 2), (6, 1, 3), (5, 0, 5), (7, 3, 3)])
def test_sample_frequencies_match_subset_probabilities(experts, k_min, k_max):
    samples = 30_000
    logits_E = random_logits(1, experts, scale=1.0, seed=11 + experts)[0]
    mask_TE = tree.sample_subsets(logits_E.expand(samples, -1).contiguous(), k_min, k_max,
                                  generator=torch.Generator().manual_seed(11))
    subsets_SE, _, probs_1S, _ = brute_force(logits_E[None], k_min, k_max)
    sizes_T = mask_TE.sum(dim=1)
    assert bool(((sizes_T >= k_min) & (sizes_T <= k_max)).all())
    bits_E = 2 ** torch.arange(experts)
    code_T, code_S = (mask_TE.long() * bits_E).sum(1), (subsets_SE.long() * bits_E).sum(1)
    observed_S = (code_T[:, None] == code_S[None, :]).sum(dim=0)
    assert int(observed_S.sum()) == samples  # no sample outside the support
    expected_S = probs_1S[0] * samples
    assert float(expected_S.min()) >= 5  # chi-square validity
    assert chisquare(observed_S.numpy(), expected_S.numpy()).pvalue > 1e-3


def test_samples_are_not_all_the_same_subset_for_different_tokens():
    # a per-token (not per-batch) draw: two tokens with equal logits get different subsets
    logits_TE = torch.zeros(512, 16)
    mask_TE = tree.sample_subsets(logits_TE, 4, 4, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask_TE}) > 400


@pytest.mark.parametrize("k_min,k_max", [(8, 8), (2, 8)])
def test_fp32_at_large_logit_scales_matches_the_fp64_sequential_dp(k_min, k_max):
    generator = torch.Generator().manual_seed(7)
    logits_TE = torch.rand(96, 64, generator=generator) * 100 - 50
    logits_TE[:8] = 50.0  # every logit equal and large
    logits_TE[8:16] = -50.0
    logits_TE[16:24, :32] = 50.0  # half +50, half -50
    logits_TE[16:24, 32:] = -50.0
    logits_TE[24:32] = torch.randn(8, 64, generator=generator) * 400  # beyond the clamp radius
    leaf_TE = logits_TE.clone().requires_grad_(True)
    result = tree.route(leaf_TE, k_min, k_max, generator=torch.Generator().manual_seed(1))
    assert result.mu_TE.dtype == torch.float32
    reference_TE = sequential.marginals(logits_TE.double(), k_min, k_max)
    torch.testing.assert_close(result.mu_TE.double(), reference_TE, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.log_z_T.double(), sequential.log_normaliser(logits_TE.double(), k_min, k_max),
                               atol=1e-3, rtol=1e-6)
    sizes_T = result.mask_TE.sum(dim=1)
    assert bool(((sizes_T >= k_min) & (sizes_T <= k_max)).all())
    assert bool(torch.isfinite(result.entropy_T).all()) and float(result.entropy_T.min()) >= 0
    (grad_TE,) = torch.autograd.grad((result.mu_TE * torch.randn_like(result.mu_TE)).sum(), leaf_TE)
    assert bool(torch.isfinite(grad_TE).all())


def test_clamped_logits_are_exact_against_enumeration():
    # tilted logits far outside [-R, R]: the clamp must not move anything visibly
    logits_TE = torch.tensor([[900.0, 850.0, 0.0, -3.0, -700.0, 2.0, -1.0, 1.0],
                              [-900.0, 300.0, 299.0, 301.0, -5.0, 0.0, 400.0, -400.0]], dtype=torch.float64)
    for k_min, k_max in [(3, 3), (1, 4), (0, 2)]:
        _, log_z_T, probs_TS, mu_TE = brute_force(logits_TE, k_min, k_max)
        result = tree.route(logits_TE, k_min, k_max, sample=False)
        torch.testing.assert_close(result.mu_TE, mu_TE, atol=1e-12, rtol=0)
        torch.testing.assert_close(result.log_z_T, log_z_T, atol=1e-9, rtol=1e-12)
        entropy_T = -(probs_TS * probs_TS.clamp_min(1e-300).log()).sum(1)
        torch.testing.assert_close(result.entropy_T, entropy_T, atol=1e-9, rtol=0)


def test_chunked_and_unchunked_passes_agree(monkeypatch, implementation):
    if implementation == "native":
        pytest.skip("chunks are the torch tree's")
    logits_TE = random_logits(50, 12, scale=2.0, seed=21, dtype=torch.float32).requires_grad_(True)
    probe_TE = torch.randn(50, 12, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk in (7, 1 << 20):
        monkeypatch.setattr(tree, "_CPU_CHUNK", chunk)
        mu_TE = tree.marginals(logits_TE, 2, 5)
        (grad_TE,) = torch.autograd.grad((mu_TE * probe_TE).sum(), logits_TE)
        results.append((mu_TE.detach(), grad_TE))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_exact_k_sample_follows_the_marginals_at_scale():
    logits_E = random_logits(1, 64, scale=1.5, seed=8, dtype=torch.float32)[0]
    mask_TE = tree.sample_subsets(logits_E.expand(20_000, -1).contiguous(), 8, 8,
                                  generator=torch.Generator().manual_seed(0))
    assert bool((mask_TE.sum(dim=1) == 8).all())
    mu_E = tree.marginals(logits_E[None], 8, 8)[0]
    torch.testing.assert_close(mask_TE.float().mean(dim=0), mu_E, atol=0.015, rtol=0)
    assert abs(float(mu_E.sum()) - 8.0) < 1e-4


@pytest.mark.parametrize("call", [
    lambda x: tree.marginals(x, 3, 9),
    lambda x: tree.marginals(x, 4, 3),
    lambda x: tree.sample_subsets(x, -1, 2),
    lambda x: tree.marginals(x[0], 1, 2),
    lambda x: tree.marginals(x.long(), 1, 2),
])
def test_bad_input_raises_user_error(call):
    with pytest.raises(UserError):
        call(torch.zeros(3, 8))


def test_clamp_radius_keeps_coefficients_in_fp64_range():
    for experts, k_max in [(8, 2), (64, 8), (128, 8), (256, 16), (128, 64)]:
        radius = tree.clamp_radius(experts, k_max)
        log_binomial = math.lgamma(experts + 1) - math.lgamma(k_max + 1) - math.lgamma(experts - k_max + 1)
        assert 0 < radius <= 80 and k_max * radius + log_binomial <= 690 + 1e-9
