"""ProbMoE dynamic program against brute-force enumeration of every expert subset (E <= 8)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from megatron_grouter.errors import UserError
from megatron_grouter.routing import probmoe_dp as dp

torch.set_num_threads(1)

RANGES = [(3, 3), (1, 1), (5, 5), (0, 2), (2, 4), (1, 5), (0, 5)]  # (k_min, k_max), E = 5 or more


def all_subsets(num_experts: int, k_min: int, k_max: int, dtype=torch.float64) -> torch.Tensor:
    """Every z in {0,1}^E with k_min <= |z| <= k_max, as rows [S, E]."""
    rows = [z for z in itertools.product([0, 1], repeat=num_experts) if k_min <= sum(z) <= k_max]
    return torch.tensor(rows, dtype=dtype)


def brute_force(logits_TE: torch.Tensor, k_min: int, k_max: int):
    """(subsets [S, E], log Z [T], subset probabilities [T, S], marginals [T, E])."""
    subsets_SE = all_subsets(logits_TE.shape[1], k_min, k_max, logits_TE.dtype)
    scores_TS = logits_TE @ subsets_SE.t()
    return subsets_SE, torch.logsumexp(scores_TS, 1), torch.softmax(scores_TS, 1), torch.softmax(scores_TS, 1) @ subsets_SE


def random_logits(tokens: int, experts: int, scale: float = 3.0, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=generator, dtype=dtype) * scale


# ------------------------------------------------------------------------------------------------
# partition functions and the count table


@pytest.mark.parametrize("k_min,k_max", RANGES)
def test_log_partition_is_bernoulli_probability_of_the_count_range(k_min, k_max):
    logits_TE = random_logits(6, 7)
    subsets_SE = all_subsets(7, k_min, k_max)
    log_p_TE, log_q_TE = torch.nn.functional.logsigmoid(logits_TE), torch.nn.functional.logsigmoid(-logits_TE)
    expected_T = torch.logsumexp(log_p_TE @ subsets_SE.t() + log_q_TE @ (1 - subsets_SE).t(), dim=1)
    for counts in [(k_min, k_max), range(k_min, k_max + 1)] + ([k_min] if k_min == k_max else []):
        torch.testing.assert_close(dp.log_partition(logits_TE, counts), expected_T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k_min,k_max", RANGES)
def test_log_normaliser_matches_enumeration(k_min, k_max):
    logits_TE = random_logits(6, 7, seed=1)
    _, log_z_T, _, _ = brute_force(logits_TE, k_min, k_max)
    torch.testing.assert_close(dp.log_normaliser(logits_TE, k_min, k_max), log_z_T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k_min,k_max", RANGES)
def test_subset_entropy_matches_enumeration(k_min, k_max):
    logits_TE = random_logits(6, 7, seed=4)
    _, _, probs_TS, _ = brute_force(logits_TE, k_min, k_max)
    expected_T = -(probs_TS * probs_TS.clamp_min(1e-300).log()).sum(1)
    torch.testing.assert_close(dp.subset_entropy(logits_TE, k_min, k_max), expected_T, atol=1e-6, rtol=0)
    known_mu_TE = dp.marginals(logits_TE, k_min, k_max)
    torch.testing.assert_close(dp.subset_entropy(logits_TE, k_min, k_max, known_mu_TE), expected_T,
                               atol=1e-6, rtol=0)
    uniform = dp.subset_entropy(torch.zeros(1, 7, dtype=torch.float64), k_min, k_max)
    torch.testing.assert_close(uniform, torch.tensor([float(len(probs_TS[0]))]).log().double())


def test_log_count_table_matches_enumeration_of_every_prefix():
    logits_TE = random_logits(4, 6, seed=2)
    table_TIK = dp.log_count_table(logits_TE, k_max=4)
    assert table_TIK.shape == (4, 7, 5)
    probs_TE = torch.sigmoid(logits_TE)
    for prefix in range(7):
        for count in range(5):
            expected_T = torch.zeros(4, dtype=torch.float64)
            for z in itertools.product([0, 1], repeat=prefix):
                if sum(z) == count:
                    z_E = torch.tensor(z, dtype=torch.float64)
                    p_TE = probs_TE[:, :prefix]
                    expected_T += (p_TE ** z_E * (1 - p_TE) ** (1 - z_E)).prod(dim=1)
            torch.testing.assert_close(table_TIK[:, prefix, count].exp(), expected_T, atol=1e-10, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# marginals


@pytest.mark.parametrize("method", ["forward_backward", "autograd"])
@pytest.mark.parametrize("k_min,k_max", RANGES)
def test_marginals_match_enumeration(method, k_min, k_max):
    for experts, dtype in [(5, torch.float64), (8, torch.float64), (8, torch.float32)]:
        logits_TE = random_logits(5, experts, seed=experts, dtype=dtype)
        _, _, _, mu_TE = brute_force(logits_TE.double(), k_min, k_max)
        got_TE = dp.marginals(logits_TE, k_min, k_max, method=method)
        assert got_TE.dtype == dtype
        torch.testing.assert_close(got_TE.double(), mu_TE, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["forward_backward", "autograd"])
@pytest.mark.parametrize("k_min,k_max", [(3, 3), (1, 4), (0, 6), (6, 6)])
def test_marginals_pass_gradcheck(method, k_min, k_max):
    logits_TE = random_logits(3, 6, scale=2.0, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dp.marginals(x, k_min, k_max, method=method), (logits_TE,))


@pytest.mark.parametrize("k_min,k_max", [(2, 2), (1, 4)])
def test_marginal_gradient_is_the_subset_covariance(k_min, k_max):
    logits_TE = random_logits(4, 6, seed=4).requires_grad_(True)
    direction_TE = random_logits(4, 6, scale=1.0, seed=5)
    mu_TE = dp.marginals(logits_TE, k_min, k_max)
    (grad_TE,) = torch.autograd.grad((mu_TE * direction_TE).sum(), logits_TE)
    subsets_SE, _, probs_TS, brute_mu_TE = brute_force(logits_TE.detach(), k_min, k_max)
    second_TEE = torch.einsum("ts,se,sf->tef", probs_TS, subsets_SE, subsets_SE)
    cov_TEE = second_TEE - brute_mu_TE[:, :, None] * brute_mu_TE[:, None, :]
    torch.testing.assert_close(grad_TE, torch.einsum("tef,tf->te", cov_TEE, direction_TE), atol=1e-8, rtol=0)


def test_exact_k_marginals_do_not_depend_on_a_logit_offset():
    logits_TE = random_logits(4, 8, seed=6)
    torch.testing.assert_close(dp.marginals(logits_TE, 3, 3), dp.marginals(logits_TE + 7.5, 3, 3))
    # a range is not offset-invariant: a larger offset favours larger subsets
    sizes_low = dp.marginals(logits_TE, 1, 5).sum(1)
    sizes_high = dp.marginals(logits_TE + 5.0, 1, 5).sum(1)
    assert bool((sizes_high > sizes_low).all())


@pytest.mark.parametrize("k_min,k_max", [(8, 8), (2, 8)])
def test_extreme_logits_give_finite_exact_marginals_and_gradients(k_min, k_max):
    generator = torch.Generator().manual_seed(7)
    logits_TE = (torch.rand(128, 64, generator=generator) * 100 - 50)
    logits_TE[:8] = 50.0  # every logit equal and large
    logits_TE[8:16] = -50.0
    logits_TE[16:24, :32] = 50.0  # half +50, half -50
    logits_TE[16:24, 32:] = -50.0
    leaf_TE = logits_TE.clone().requires_grad_(True)
    mu_TE = dp.marginals(leaf_TE, k_min, k_max)
    assert bool(torch.isfinite(mu_TE).all())
    reference_TE = dp.marginals(logits_TE.double(), k_min, k_max)
    torch.testing.assert_close(mu_TE.double(), reference_TE, atol=1e-4, rtol=0)
    sizes_T = mu_TE.sum(dim=1)
    if k_min == k_max:
        torch.testing.assert_close(sizes_T, torch.full_like(sizes_T, float(k_min)), atol=1e-4, rtol=0)
    assert bool(((sizes_T >= k_min - 1e-4) & (sizes_T <= k_max + 1e-4)).all())
    (grad_TE,) = torch.autograd.grad((mu_TE * torch.randn_like(mu_TE)).sum(), leaf_TE)
    assert bool(torch.isfinite(grad_TE).all())
    mask_TE = dp.sample_subsets(logits_TE, k_min, k_max)
    assert bool(((mask_TE.sum(1) >= k_min) & (mask_TE.sum(1) <= k_max)).all())


# ------------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("k_min,k_max", [(2, 2), (1, 3), (0, 5)])
def test_sample_frequencies_match_subset_probabilities(k_min, k_max):
    samples = 40_000
    logits_E = torch.tensor([1.2, -0.4, 0.3, 0.0, -1.0], dtype=torch.float64)
    logits_TE = logits_E.expand(samples, -1).contiguous()
    generator = torch.Generator().manual_seed(11)
    mask_TE = dp.sample_subsets(logits_TE, k_min, k_max, generator=generator)
    subsets_SE, _, probs_1S, _ = brute_force(logits_E[None], k_min, k_max)
    sizes_T = mask_TE.sum(dim=1)
    assert bool(((sizes_T >= k_min) & (sizes_T <= k_max)).all())
    code_T = (mask_TE.long() * (2 ** torch.arange(5))).sum(dim=1)
    code_S = (subsets_SE.long() * (2 ** torch.arange(5))).sum(dim=1)
    observed_S = (code_T[:, None] == code_S[None, :]).sum(dim=0)
    assert int(observed_S.sum()) == samples  # no sample outside the support
    expected_S = probs_1S[0] * samples
    assert float(expected_S.min()) >= 5  # chi-square validity
    assert chisquare(observed_S.numpy(), expected_S.numpy()).pvalue > 1e-3


def test_exact_k_samples_have_exactly_k_experts_and_follow_marginals():
    logits_TE = random_logits(20_000, 16, scale=2.0, seed=8, dtype=torch.float32)[:1].expand(20_000, -1)
    mask_TE = dp.sample_subsets(logits_TE.contiguous(), 4, 4, generator=torch.Generator().manual_seed(0))
    assert bool((mask_TE.sum(dim=1) == 4).all())
    mu_E = dp.marginals(logits_TE[:1], 4, 4)[0]
    torch.testing.assert_close(mask_TE.float().mean(dim=0), mu_E, atol=0.02, rtol=0)


@pytest.mark.parametrize("k_min,k_max", [(8, 8), (3, 8), (1, 2)])
def test_samples_never_leave_the_count_range(k_min, k_max):
    logits_TE = random_logits(2048, 64, scale=6.0, seed=9, dtype=torch.float32)
    mask_TE = dp.sample_subsets(logits_TE, k_min, k_max, generator=torch.Generator().manual_seed(1))
    sizes_T = mask_TE.sum(dim=1)
    assert mask_TE.dtype == torch.bool and mask_TE.shape == logits_TE.shape
    assert bool(((sizes_T >= k_min) & (sizes_T <= k_max)).all())


def test_sample_with_marginals_equals_the_separate_calls():
    logits_TE = random_logits(256, 32, seed=10, dtype=torch.float32)
    mask_TE, mu_TE = dp.sample_with_marginals(logits_TE, 2, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask_TE, dp.sample_subsets(logits_TE, 2, 6, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(mu_TE, dp.marginals(logits_TE, 2, 6))


# ------------------------------------------------------------------------------------------------
# inference


@pytest.mark.parametrize("rule", ["map", "official"])
@pytest.mark.parametrize("k_min,k_max", RANGES)
def test_most_probable_subset_is_the_enumerated_argmax(rule, k_min, k_max):
    for seed in range(5):
        logits_TE = random_logits(8, 7, scale=1.5, seed=100 + seed)
        subsets_SE, _, probs_TS, _ = brute_force(logits_TE, k_min, k_max)
        expected_TE = subsets_SE[probs_TS.argmax(dim=1)].bool()
        assert torch.equal(dp.most_probable_subset(logits_TE, k_min, k_max, rule=rule), expected_TE)


def test_top_p_rule_takes_the_smallest_prefix_reaching_the_mass():
    logits_TE = random_logits(64, 16, seed=12, dtype=torch.float32)
    mask_TE = dp.most_probable_subset(logits_TE, 2, 6, rule="top_p", top_p=0.6)
    sizes_T = mask_TE.sum(dim=1)
    probs_TE = torch.softmax(logits_TE, dim=1)
    mass_T = (probs_TE * mask_TE).sum(dim=1)
    assert bool(((sizes_T >= 2) & (sizes_T <= 6)).all())
    assert bool(((mass_T >= 0.6) | (sizes_T == 6)).all())
    smaller_T = mass_T - (probs_TE * mask_TE).masked_fill(~mask_TE, 2.0).amin(dim=1)
    assert bool(((smaller_T < 0.6) | (sizes_T == 2)).all())
    assert bool((mask_TE <= (logits_TE >= torch.topk(logits_TE, 6, dim=1).values[:, -1:])).all())


# ------------------------------------------------------------------------------------------------
# gates


def test_gates_forward_values_are_softmax_on_the_chosen_experts():
    logits_TE = random_logits(32, 12, seed=13, dtype=torch.float32)
    mask_TE = dp.sample_subsets(logits_TE, 2, 5, generator=torch.Generator().manual_seed(0))
    mu_TE = dp.marginals(logits_TE, 2, 5)
    probs_TE = torch.softmax(logits_TE, dim=1)
    official_TE = dp.straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=False)
    assert torch.equal(official_TE, probs_TE * mask_TE)
    gates_TE = dp.straight_through_gates(logits_TE, mask_TE, mu_TE)
    chosen_TE = torch.softmax(logits_TE.masked_fill(~mask_TE, float("-inf")), dim=1)
    torch.testing.assert_close(gates_TE, chosen_TE)
    torch.testing.assert_close(gates_TE.sum(dim=1), torch.ones(32))


@pytest.mark.parametrize("renormalise", [False, True])
def test_gate_gradient_reaches_mu_as_the_straight_through_estimator(renormalise):
    logits_TE = random_logits(8, 6, seed=14)
    mask_TE = dp.most_probable_subset(logits_TE, 3, 3)
    mu_TE = dp.marginals(logits_TE, 3, 3).requires_grad_(True)
    upstream_TE = random_logits(8, 6, scale=1.0, seed=15)
    gates_TE = dp.straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=renormalise)
    (grad_mu_TE,) = torch.autograd.grad((gates_TE * upstream_TE).sum(), mu_TE)
    probs_TE = torch.softmax(logits_TE, dim=1)
    if not renormalise:
        expected_TE = upstream_TE * probs_TE
    else:
        total_T1 = (probs_TE * mask_TE).sum(dim=1, keepdim=True)
        weights_TE = probs_TE * mask_TE / total_T1
        mean_upstream_T1 = (upstream_TE * weights_TE).sum(dim=1, keepdim=True)
        # d gate_m / d g_i = s_i (delta_mi - w_m [i chosen]) / total
        expected_TE = probs_TE / total_T1 * (upstream_TE - mean_upstream_T1 * mask_TE)
    torch.testing.assert_close(grad_mu_TE, expected_TE)


def _composed_gates(logits_TE, mask_TE, mu_TE, renormalise):
    """The gate formula as plain autograd ops: the reference for the fused backward."""
    picked_TE = mask_TE.to(logits_TE.dtype)
    weights_TE = (picked_TE + (mu_TE - mu_TE.detach())) * torch.softmax(logits_TE, dim=1)
    if renormalise:
        total_T1 = (weights_TE * picked_TE).sum(dim=1, keepdim=True)
        weights_TE = weights_TE / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return weights_TE


@pytest.mark.parametrize("renormalise", [False, True])
def test_fused_gate_backward_equals_autograd_through_the_formula(renormalise):
    logits_TE = random_logits(40, 7, seed=18).requires_grad_(True)
    mask_TE = dp.sample_subsets(logits_TE.detach(), 0, 4, generator=torch.Generator().manual_seed(1))
    mask_TE[::9] = False  # empty subsets (k_min = 0) take the no-renormalisation branch
    mu_TE = dp.marginals(logits_TE.detach(), 0, 4).requires_grad_(True)
    upstream_TE = random_logits(40, 7, scale=1.0, seed=19)
    fused_TE = dp.straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=renormalise)
    composed_TE = _composed_gates(logits_TE, mask_TE, mu_TE, renormalise)
    torch.testing.assert_close(fused_TE, composed_TE, atol=1e-14, rtol=0)
    fused = torch.autograd.grad((fused_TE * upstream_TE).sum(), (logits_TE, mu_TE))
    composed = torch.autograd.grad((composed_TE * upstream_TE).sum(), (logits_TE, mu_TE))
    for got, want in zip(fused, composed):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # the forward value does not depend on mu (straight-through), so only the softmax path is checkable
    assert torch.autograd.gradcheck(
        lambda x: dp.straight_through_gates(x, mask_TE[:10], mu_TE.detach()[:10], renormalise=renormalise),
        (logits_TE.detach()[:10].requires_grad_(True),))


def test_router_logits_receive_gradient_from_the_marginals():
    logits_TE = random_logits(16, 8, seed=16, dtype=torch.float32).requires_grad_(True)
    mask_TE, mu_TE = dp.sample_with_marginals(logits_TE, 2, 2, generator=torch.Generator().manual_seed(0))
    upstream_TE = random_logits(16, 8, scale=1.0, seed=17, dtype=torch.float32)
    loss = (dp.straight_through_gates(logits_TE, mask_TE, mu_TE, renormalise=False) * upstream_TE).sum()
    (with_mu_TE,) = torch.autograd.grad(loss, logits_TE)
    loss_plain = (dp.straight_through_gates(logits_TE, mask_TE, None, renormalise=False) * upstream_TE).sum()
    (without_mu_TE,) = torch.autograd.grad(loss_plain, logits_TE)
    # the surrogate adds Cov(z) (upstream * softmax), which is non-zero for non-degenerate logits
    assert float((with_mu_TE - without_mu_TE).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call", [
    lambda x: dp.marginals(x, 3, 9),
    lambda x: dp.marginals(x, 4, 3),
    lambda x: dp.sample_subsets(x, -1, 2),
    lambda x: dp.marginals(x[0], 1, 2),
    lambda x: dp.marginals(x.long(), 1, 2),
    lambda x: dp.marginals(x, 1, 2, method="magic"),
    lambda x: dp.most_probable_subset(x, 1, 2, rule="magic"),
    lambda x: dp.most_probable_subset(x, 1, 2, rule="top_p", top_p=1.5),
    lambda x: dp.log_partition(x, (1, 2, 3)),
    lambda x: dp.straight_through_gates(x, torch.ones(2, 2, dtype=torch.bool), None),
])
def test_bad_input_raises_user_error(call):
    with pytest.raises(UserError):
        call(torch.zeros(3, 8))
