"""Exact inference in ProbMoE's subset distribution: the dynamic program over (expert, count).

For one token with router logits l in R^E, ProbMoE puts a distribution on expert subsets
z in {0,1}^E:

    p(z) = exp(z . l) / Z,   restricted to  k_min <= sum(z) <= k_max   (exact-k: k_min = k_max).

Everything here (normaliser, per-expert marginals mu_i = P(z_i = 1), exact samples, the most
probable subset) comes from one table of log elementary symmetric polynomials

    alpha[i, j] = log e_j(w_1..w_i),   w = exp(l),   e_j = sum over j-subsets of the product of w,

filled by  e_j(w_1..w_i) = e_j(w_1..w_{i-1}) + w_i * e_{j-1}(w_1..w_{i-1})  (a loop over experts
with the count and token dimensions vectorised; O(E * k_max) per token).

Deviation from the official code (HengHugoZhao/ProbMoE), same distribution: the official code runs
the DP on independent Bernoulli(sigmoid(l_i)) probabilities, Pr(sum = j) = e_j(w) / prod(1 + w_i).
The product is a per-token constant, so conditionals, marginals and samples are identical; the
Bernoulli table is available from `log_count_table`. We drop that constant inside the DP because
it makes log values huge (about -sum softplus(l), -3200 for 64 logits of +-50), and fp32 then
loses ~3 digits in every difference of logs; the official -300 "minus infinity" is also not
small enough for such logits. Our table values stay within about k_max * (max l - min l): the
logits are shifted by their per-token maximum m first (e_j(w e^-m) = e^-jm e_j(w), exact), and
"impossible" entries hold a finite sentinel far below every reachable value, so gradients of
logaddexp stay finite.

Marginals come from an explicit forward-backward pass with a hand-written backward instead of
the official double autograd through the DP (see `marginals`); the autograd route is kept as
`method="autograd"` and serves as a reference. Speed notes (CPU, torch 2.13): torch.logaddexp is
~20x slower than max + log1p(exp(-|d|)), and exp() slows down 7-25x when it underflows, so every
exp argument is clamped at -80 (exp(-80) ~ 2e-35, far below fp32 rounding).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from megatron_grouter.errors import UserError

# Stand-in for log(0): far below any reachable log value (|logits| * k_max), finite so that
# logaddexp(NEG, NEG) has a finite gradient, and twice of it still fits in fp32.
_NEG = -1.0e30
# exp() arguments are clamped here: CPU exp is ~7x slower below about -88 (fp32 underflow) and
# ~25x slower when it returns denormals; exp(-80) ~ 2e-35 is below every rounding error we keep.
_EXP_FLOOR = -80.0

InferenceRule = Literal["map", "official", "top_p"]
MarginalsMethod = Literal["forward_backward", "autograd"]


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_logits(logits_TE: torch.Tensor) -> None:
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.dim() != 2:
        raise UserError("ProbMoE logits must be a 2-D tensor [tokens, experts]; flatten the batch first")
    if not logits_TE.is_floating_point():
        raise UserError(f"ProbMoE logits must be floating point, got {logits_TE.dtype}; cast them first")


def _check_range(num_experts: int, k_min: int, k_max: int) -> None:
    if not (0 <= k_min <= k_max <= num_experts):
        raise UserError(
            f"ProbMoE needs 0 <= k_min <= k_max <= num_experts, got k_min={k_min}, k_max={k_max}, "
            f"num_experts={num_experts}; fix the router's k range"
        )


def _counts_to_range(counts: int | Sequence[int] | range) -> tuple[int, int]:
    if isinstance(counts, range):
        if counts.step != 1 or len(counts) == 0:
            raise UserError(f"counts must be a non-empty contiguous range, got {counts}")
        return counts.start, counts.stop - 1
    if isinstance(counts, int):
        return counts, counts
    values = tuple(counts)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise UserError(f"counts must be an int k or a pair (k_min, k_max), got {counts!r}")
    return values[0], values[1]


def _compute_dtype(logits_TE: torch.Tensor) -> torch.dtype:
    # Half-precision logits are upcast: the DP needs fp32 at least (fp64 stays fp64 for gradcheck).
    return torch.float64 if logits_TE.dtype == torch.float64 else torch.float32


def _shifted(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits minus their per-token maximum (all <= 0), and that maximum (no gradient)."""
    logits_TE = logits_TE.to(_compute_dtype(logits_TE))
    shift_T = logits_TE.detach().amax(dim=1)
    return logits_TE - shift_T[:, None], shift_T


def _count_offsets(shift_T: torch.Tensor, k_max: int) -> torch.Tensor:
    """log e_j(w) - log e_j(w e^-m) = j * m, for j = 0..k_max: [T, k_max + 1]."""
    counts_K = torch.arange(k_max + 1, device=shift_T.device, dtype=shift_T.dtype)
    return shift_T[:, None] * counts_K[None, :]


def _range_mask(k_min: int, k_max: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(k_max + 1, device=device) >= k_min)


# ----------------------------------------------------------------------------------------------
# the DP


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp a + exp b), differentiable; ~20x faster than torch.logaddexp on CPU (torch 2.13)."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs().clamp(max=-_EXP_FLOOR)))


def _logaddexp_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """No-grad logaddexp written into `out` (b is overwritten)."""
    torch.maximum(a, b, out=out)
    out.add_(b.sub_(a).abs_().neg_().clamp_(min=_EXP_FLOOR).exp_().log1p_())


def _esp_rows(shifted_TE: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """Differentiable forward DP: rows alpha_i[T, k_max + 1] for i = 0..E, plain autograd ops."""
    T, E = shifted_TE.shape
    row_TK = torch.full((T, k_max + 1), _NEG, dtype=shifted_TE.dtype, device=shifted_TE.device)
    row_TK[:, 0] = 0.0
    rows = [row_TK]
    for i in range(E):
        grown_TK = _logaddexp(row_TK[:, 1:], row_TK[:, :-1] + shifted_TE[:, i:i + 1])
        row_TK = torch.cat([row_TK[:, :1], grown_TK], dim=1)
        rows.append(row_TK)
    return rows


# The no-grad tables are laid out [expert step N, count K = k_max+1, token T] so that each step
# of a loop reads and writes contiguous [K, T] blocks.


def _alpha_table(shifted_ET: torch.Tensor, k_max: int) -> torch.Tensor:
    """No-grad forward DP: alpha[n, j, t] = log e_j(w_1..w_n) of token t, shape [E+1, K+1, T]."""
    E, T = shifted_ET.shape
    alpha_NKT = torch.empty((E + 1, k_max + 1, T), dtype=shifted_ET.dtype, device=shifted_ET.device)
    alpha_NKT[0] = _NEG  # rows n >= 1 are written by the loop, except column 0
    alpha_NKT[:, 0] = 0.0
    for n in range(1, E + 1):
        prev_KT = alpha_NKT[n - 1]
        _logaddexp_into(prev_KT[1:], prev_KT[:-1] + shifted_ET[n - 1], out=alpha_NKT[n, 1:])
    return alpha_NKT


def _pick_shares(shifted_ET: torch.Tensor, alpha_NKT: torch.Tensor) -> torch.Tensor:
    """share[n-1, j] = P(z_n = 1 | j picks among experts 1..n) = w_n e_{j-1}(..n-1) / e_j(..n).

    [E, K+1, T]. Column j = 0 is exactly 0 and entries with j >= n exactly 1 (every expert so
    far was picked), so walks over this table can never over- or under-shoot their count.
    """
    E = shifted_ET.shape[0]
    K = alpha_NKT.shape[1] - 1
    share_NKT = torch.empty_like(alpha_NKT[1:])
    share_NKT[:, 0] = 0.0
    torch.add(alpha_NKT[:-1, :-1], shifted_ET[:, None, :], out=share_NKT[:, 1:])
    share_NKT[:, 1:].sub_(alpha_NKT[1:, 1:]).clamp_(min=_EXP_FLOOR, max=0.0).exp_()
    for n in range(1, min(E, K) + 1):
        share_NKT[n - 1, n:] = 1.0
    return share_NKT


def _count_posterior(alpha_NKT: torch.Tensor, shift_T: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """P(|z| = c | k_min <= |z| <= k_max) for c = 0..k_max (0 outside the range): [K+1, T]."""
    log_mass_KT = alpha_NKT[-1] + _count_offsets(shift_T, k_max).t()
    allowed_K1 = _range_mask(k_min, k_max, shift_T.device)[:, None]
    log_mass_KT = log_mass_KT.masked_fill(~allowed_K1, float("-inf"))
    return torch.softmax(log_mass_KT, dim=0)


# ----------------------------------------------------------------------------------------------
# public: tables and partition functions


def log_count_table(logits_TE: torch.Tensor, k_max: int) -> torch.Tensor:
    """log Pr(sum_{m<=i} z_m = j) under independent z_m ~ Bernoulli(sigmoid(l_m)).

    Returns [T, E+1, k_max+1]: row i = 0..E (first i experts), column j = 0..k_max; impossible
    entries (j > i) are -inf. This is the official code's table `a` (without its padding
    column); differentiable.
    """
    _check_logits(logits_TE)
    T, E = logits_TE.shape
    _check_range(E, 0, k_max)
    shifted_TE, shift_T = _shifted(logits_TE)
    alpha_TIK = torch.stack(_esp_rows(shifted_TE, k_max), dim=1)
    alpha_TIK = alpha_TIK + _count_offsets(shift_T, k_max)[:, None, :]
    softplus_TE = F.softplus(logits_TE.to(shifted_TE.dtype))
    log_norm_TI = F.pad(softplus_TE.cumsum(dim=1), (1, 0))
    table_TIK = alpha_TIK - log_norm_TI[:, :, None]
    rows_I = torch.arange(E + 1, device=logits_TE.device)
    cols_K = torch.arange(k_max + 1, device=logits_TE.device)
    impossible_IK = cols_K[None, :] > rows_I[:, None]
    return table_TIK.masked_fill(impossible_IK[None], float("-inf"))


def log_normaliser(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """log Z = log sum_{z: k_min <= |z| <= k_max} exp(z . l), per token: [T]. Differentiable;
    its gradient with respect to the logits is the marginal vector mu."""
    _check_logits(logits_TE)
    _check_range(logits_TE.shape[1], k_min, k_max)
    shifted_TE, shift_T = _shifted(logits_TE)
    final_TK = _esp_rows(shifted_TE, k_max)[-1] + _count_offsets(shift_T, k_max)
    return torch.logsumexp(final_TK[:, k_min:], dim=1)


def log_partition(logits_TE: torch.Tensor, counts: int | Sequence[int] | range) -> torch.Tensor:
    """log Pr(sum z in counts) for independent z_i ~ Bernoulli(sigmoid(l_i)), per token: [T].

    `counts` is k (exact-k), a pair (k_min, k_max) inclusive, or a `range`. This is the official
    code's `log_pr`; it equals `log_normaliser - sum softplus(l)`, so its gradient is
    mu - sigmoid(l) (the official code gets mu by differentiating with log(1 - p) held fixed).
    """
    k_min, k_max = _counts_to_range(counts)
    log_z_T = log_normaliser(logits_TE, k_min, k_max)
    return log_z_T - F.softplus(logits_TE.to(log_z_T.dtype)).sum(dim=1)


def subset_entropy(logits_TE: torch.Tensor, k_min: int, k_max: int,
                   mu_TE: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of the routing distribution over subsets, per token: [T].

    For p(z) = exp(z . l) / Z, H = -E[log p(z)] = log Z - sum_i mu_i l_i: exact from the
    log-normaliser and the marginals, no enumeration. 0 for a certain subset; log C(E, k) for
    equal logits with exact-k. Pass `mu_TE` when the marginals are known already.
    """
    with torch.no_grad():
        mu_TE = marginals(logits_TE, k_min, k_max) if mu_TE is None else mu_TE.detach()
        log_z_T = log_normaliser(logits_TE, k_min, k_max)
        return (log_z_T - (mu_TE * logits_TE.to(mu_TE.dtype)).sum(dim=1)).clamp_min(0)


# ----------------------------------------------------------------------------------------------
# marginals


class _ForwardBackwardMarginals(torch.autograd.Function):
    """mu by one log-space forward pass and one linear-space backward pass; hand-written backward.

    Reading the DP as a Markov chain over states (n, j) = "j picks among the first n experts",
    run backwards from the final count, the step n -> n-1 picks expert n with probability
    share[n-1, j] (see `_pick_shares`). So the posterior state probabilities
    delta_n[j] = P(j picks among the first n | allowed) obey the linear recursion
        delta_{n-1}[j] = delta_n[j] (1 - share_n[j]) + delta_n[j+1] share_n[j+1],
    starting from delta_E = the count posterior, and mu_n = sum_j delta_n[j] share_n[j].
    Only alpha needs log space; delta and share are probabilities in [0, 1] (no overflow, and
    what underflows is below fp rounding).

    Backward: the Hessian of log Z is Cov(z), symmetric, so the vector-Jacobian product equals
    the Jacobian-vector product d/dt mu(l + t v): tangents pushed through both loops by hand
    (a few fused ops per step, no autograd graph).
    """

    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, k_min: int, k_max: int):
        with torch.no_grad():
            shifted_TE, shift_T = _shifted(logits_TE)
            shifted_ET = shifted_TE.t().contiguous()
            alpha_NKT = _alpha_table(shifted_ET, k_max)
            share_NKT = _pick_shares(shifted_ET, alpha_NKT)
            counts_KT = _count_posterior(alpha_NKT, shift_T, k_min, k_max)
            E = shifted_ET.shape[0]
            delta_NKT = torch.empty_like(alpha_NKT)
            delta_NKT[E] = counts_KT
            mu_ET = torch.empty_like(shifted_ET)
            for n in range(E, 0, -1):
                flow_KT = delta_NKT[n] * share_NKT[n - 1]  # mass that picked expert n
                torch.sum(flow_KT, dim=0, out=mu_ET[n - 1])
                torch.sub(delta_NKT[n], flow_KT, out=delta_NKT[n - 1])
                delta_NKT[n - 1, :-1] += flow_KT[1:]
        ctx.save_for_backward(share_NKT, delta_NKT)
        ctx.input_dtype = logits_TE.dtype
        ctx.mark_non_differentiable(share_NKT, counts_KT)
        return mu_ET.t().contiguous(), share_NKT, counts_KT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mu_TE: torch.Tensor, _grad_share, _grad_counts):
        share_NKT, delta_NKT = ctx.saved_tensors
        E = share_NKT.shape[0]
        v_ET = grad_mu_TE.t().to(share_NKT.dtype).contiguous()

        # forward tangents: alpha_dot, then share_dot_n[j] = share (1 - share) (step), where
        # step = alpha_dot_{n-1}[j-1] + v_n - alpha_dot_{n-1}[j]
        spread_NKT = share_NKT * (1.0 - share_NKT)
        share_dot_NKT = torch.empty_like(share_NKT)
        share_dot_NKT[:, 0] = 0.0
        alpha_dot_KT = torch.zeros_like(share_NKT[0])
        for n in range(1, E + 1):
            step_KT = (alpha_dot_KT[:-1] + v_ET[n - 1]).sub_(alpha_dot_KT[1:])
            torch.mul(spread_NKT[n - 1, 1:], step_KT, out=share_dot_NKT[n - 1, 1:])
            alpha_dot_KT[1:].addcmul_(share_NKT[n - 1, 1:], step_KT)

        # count posterior tangent (softmax over the range; delta_E is 0 outside it)
        counts_KT = delta_NKT[E]
        delta_dot_KT = counts_KT * (alpha_dot_KT - (counts_KT * alpha_dot_KT).sum(dim=0))
        mu_dot_ET = torch.empty_like(v_ET)
        for n in range(E, 0, -1):
            flow_dot_KT = delta_dot_KT * share_NKT[n - 1]
            flow_dot_KT.addcmul_(delta_NKT[n], share_dot_NKT[n - 1])
            torch.sum(flow_dot_KT, dim=0, out=mu_dot_ET[n - 1])
            delta_dot_KT -= flow_dot_KT
            delta_dot_KT[:-1] += flow_dot_KT[1:]
        return mu_dot_ET.t().to(ctx.input_dtype), None, None


def _marginals_autograd(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """mu as the gradient of log Z through the plain DP (the official recipe); double-backward
    through the E sequential steps when the result is differentiated."""
    keep_graph = logits_TE.requires_grad and torch.is_grad_enabled()
    with torch.enable_grad():
        source_TE = logits_TE if keep_graph else logits_TE.detach().requires_grad_(True)
        log_z_T = log_normaliser(source_TE, k_min, k_max)
        (mu_TE,) = torch.autograd.grad(log_z_T.sum(), source_TE, create_graph=keep_graph)
    return mu_TE.to(_compute_dtype(logits_TE))


def marginals(logits_TE: torch.Tensor, k_min: int, k_max: int,
              method: MarginalsMethod = "forward_backward") -> torch.Tensor:
    """Exact mu_i = P(z_i = 1 | k_min <= |z| <= k_max) per token: [T, E], differentiable.

    mu = d log Z / d l because d/dl_i log sum_z exp(z . l) = E[z_i]. The default computes it
    explicitly, with one forward DP in log space and one backward pass over posterior state
    probabilities, and a hand-written backward (Cov(z) v); see `_ForwardBackwardMarginals`.
    `method="autograd"` differentiates the DP with autograd instead (create_graph, so training
    double-backpropagates through E sequential steps), as the official code does: same values,
    about 3x slower and more memory. The result is fp32 (fp64 for fp64 logits).
    """
    _check_logits(logits_TE)
    _check_range(logits_TE.shape[1], k_min, k_max)
    if method == "autograd":
        return _marginals_autograd(logits_TE, k_min, k_max)
    if method != "forward_backward":
        raise UserError(f"unknown marginals method {method!r}; use 'forward_backward' or 'autograd'")
    mu_TE, _, _ = _ForwardBackwardMarginals.apply(logits_TE, k_min, k_max)
    return mu_TE


# ----------------------------------------------------------------------------------------------
# sampling


def _sample_counts(counts_KT: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one count per token from the count posterior [K+1, T] (inverse CDF): [T] long."""
    cdf_TK = counts_KT.t().cumsum(dim=1)
    u_T = torch.rand(cdf_TK.shape[0], generator=generator, device=cdf_TK.device, dtype=cdf_TK.dtype)
    return (u_T[:, None] >= cdf_TK[:, :-1]).sum(dim=1)  # the last count takes rounding slack


def _walk_back(share_NKT: torch.Tensor, counts_T: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    """Pick experts n = E..1 with probability share[n-1, picks still owed]: mask [T, E]."""
    E, _, T = share_NKT.shape
    u_NT = torch.rand((E, T), generator=generator, device=share_NKT.device, dtype=share_NKT.dtype)
    owed_1T = counts_T.unsqueeze(0).clone()
    picked_NT = torch.empty((E, T), dtype=torch.bool, device=share_NKT.device)
    for n in range(E, 0, -1):
        share_T = share_NKT[n - 1].gather(0, owed_1T).squeeze(0)
        torch.lt(u_NT[n - 1], share_T, out=picked_NT[n - 1])
        owed_1T -= picked_NT[n - 1].long()
    return picked_NT.t()


def _tables(logits_TE: torch.Tensor, k_min: int, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pick shares [E, K+1, T], count posterior [K+1, T]) without gradient."""
    with torch.no_grad():
        shifted_TE, shift_T = _shifted(logits_TE)
        shifted_ET = shifted_TE.t().contiguous()
        alpha_NKT = _alpha_table(shifted_ET, k_max)
        return _pick_shares(shifted_ET, alpha_NKT), _count_posterior(alpha_NKT, shift_T, k_min, k_max)


def _sample(share_NKT: torch.Tensor, counts_KT: torch.Tensor, k_min: int, k_max: int,
            generator: torch.Generator | None) -> torch.Tensor:
    with torch.no_grad():
        T = counts_KT.shape[1]
        if k_min == k_max:
            counts_T = torch.full((T,), k_min, dtype=torch.long, device=counts_KT.device)
        else:
            counts_T = _sample_counts(counts_KT, generator)
        return _walk_back(share_NKT, counts_T, generator)


def sample_subsets(logits_TE: torch.Tensor, k_min: int, k_max: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples z ~ p(z | k_min <= |z| <= k_max): bool mask [T, E], no gradient.

    First the size c ~ e_c(w) / sum_range e (dynamic-k; fixed for exact-k), then a backward walk
    over experts n = E..1 picking n with probability w_n e_{j-1}(w_1..w_{n-1}) / e_j(w_1..w_n),
    j = picks still owed (the official Bernoulli ratio p_n Pr(S_{n-1}=j-1) / Pr(S_n=j) with the
    constants cancelled). Every sample has exactly c experts.
    """
    _check_logits(logits_TE)
    _check_range(logits_TE.shape[1], k_min, k_max)
    share_NKT, counts_KT = _tables(logits_TE, k_min, k_max)
    return _sample(share_NKT, counts_KT, k_min, k_max, generator)


def sample_with_marginals(logits_TE: torch.Tensor, k_min: int, k_max: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_TE, mu_TE): one exact sample and the differentiable marginals, sharing one DP pass.

    Same results as `sample_subsets` and `marginals` called separately with the same generator
    state, for the price of one forward DP instead of two.
    """
    _check_logits(logits_TE)
    _check_range(logits_TE.shape[1], k_min, k_max)
    mu_TE, share_NKT, counts_KT = _ForwardBackwardMarginals.apply(logits_TE, k_min, k_max)
    return _sample(share_NKT, counts_KT, k_min, k_max, generator), mu_TE


# ----------------------------------------------------------------------------------------------
# inference


def _mask_of_sorted_prefix(order_TE: torch.Tensor, sizes_T: torch.Tensor) -> torch.Tensor:
    ranks_E = torch.arange(order_TE.shape[1], device=order_TE.device)
    keep_TE = ranks_E[None, :] < sizes_T[:, None]
    return torch.zeros_like(keep_TE).scatter(1, order_TE, keep_TE)


def most_probable_subset(logits_TE: torch.Tensor, k_min: int, k_max: int,
                         rule: InferenceRule = "map", top_p: float = 0.9) -> torch.Tensor:
    """Deterministic inference-time routing mask [T, E] (bool).

    rule="map": the most probable subset z* = argmax p(z | k_min <= |z| <= k_max).
      Proof. log p(z) = z . l - log Z. Among subsets of a fixed size j the largest z . l is the
      sum of the j largest logits (exchange any chosen expert for a larger unchosen one and the
      sum does not drop), so z* is a top-j set for j* = argmax_{k_min <= j <= k_max} C_j with
      C_j = l_(1) + ... + l_(j) (sorted descending). C_j - C_{j-1} = l_(j) is non-increasing, so
      C is concave: it grows while l_(j) > 0 and falls after. Hence j* = number of positive
      logits clamped to [k_min, k_max]; for exact-k this is plain top-k. Ties (a zero logit,
      equal logits) have several maximisers; we take the smallest j and torch.topk's order.
    rule="official": the official code's rule: top-k of the softmax for exact-k; for dynamic-k,
      argmax over j in range of the cumulative sum of the sorted logits (first maximum). Same
      selection as "map" by the proof above, up to ties; kept to mirror the reference.
      (The official code has no softmax-threshold rule for dynamic-k.)
    rule="top_p": not part of ProbMoE: the smallest j in range whose top-j softmax mass reaches
      `top_p`. It ignores the training distribution's size preference (a positive logit makes an
      expert more likely to be included than excluded; softmax mass is shift-invariant), so
      train and inference sizes can disagree. Offered for experiments only.
    """
    _check_logits(logits_TE)
    T, E = logits_TE.shape
    _check_range(E, k_min, k_max)
    with torch.no_grad():
        sorted_TE, order_TE = torch.sort(logits_TE.to(_compute_dtype(logits_TE)), dim=1, descending=True)
        if rule == "map":
            positive_T = (sorted_TE > 0).sum(dim=1)
            sizes_T = positive_T.clamp(min=k_min, max=k_max)
        elif rule == "official":
            prefix_TC = sorted_TE.cumsum(dim=1)[:, max(k_min - 1, 0):k_max]
            sizes_T = prefix_TC.argmax(dim=1) + max(k_min, 1)
            if k_min == 0:  # the official code assumes k_min >= 1; the empty set scores 0
                sizes_T = torch.where(prefix_TC.amax(dim=1) > 0, sizes_T, torch.zeros_like(sizes_T))
        elif rule == "top_p":
            if not 0.0 < top_p <= 1.0:
                raise UserError(f"top_p must be in (0, 1], got {top_p}")
            mass_TE = torch.softmax(sorted_TE, dim=1).cumsum(dim=1)
            reached_T = (mass_TE < top_p).sum(dim=1) + 1
            sizes_T = reached_T.clamp(min=k_min, max=k_max)
        else:
            raise UserError(f"unknown inference rule {rule!r}; use 'map', 'official' or 'top_p'")
        return _mask_of_sorted_prefix(order_TE, sizes_T)


# ----------------------------------------------------------------------------------------------
# gates


class _StraightThroughGates(torch.autograd.Function):
    """y = u / total, u = g * softmax(l), g = z + mu - stopgrad(mu), total = sum_i u_i z_i (or 1
    without renormalisation): the autograd graph of the formula in `straight_through_gates`, with
    its backward written out (half the tensor operations of the composed graph):
        du = (G - z (G . y)) / total,  dmu = du * p,  dl = p * (dp - p . dp) with dp = du * z."""

    @staticmethod
    def forward(ctx, logits_TE, picked_TE, mu_TE, renormalise):
        probs_TE = torch.softmax(logits_TE, dim=1)
        weights_TE = probs_TE * picked_TE
        total_T1 = None
        if renormalise:
            total_T1 = weights_TE.sum(dim=1, keepdim=True)
            # tokens with an empty subset (k_min = 0) keep all-zero gates instead of 0/0
            total_T1 = torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
            weights_TE = weights_TE / total_T1
        ctx.save_for_backward(probs_TE, picked_TE, weights_TE, total_T1)
        ctx.renormalise = renormalise
        ctx.mark_non_differentiable(picked_TE)
        return weights_TE

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TE):
        probs_TE, picked_TE, weights_TE, total_T1 = ctx.saved_tensors
        grad_u_TE = grad_TE
        if ctx.renormalise:
            grad_u_TE = (grad_TE - picked_TE * (grad_TE * weights_TE).sum(dim=1, keepdim=True)) / total_T1
        grad_mu_TE = grad_u_TE * probs_TE if ctx.needs_input_grad[2] else None
        grad_logits_TE = None
        if ctx.needs_input_grad[0]:
            grad_p_TE = grad_u_TE * picked_TE
            grad_logits_TE = probs_TE * (grad_p_TE - (probs_TE * grad_p_TE).sum(dim=1, keepdim=True))
        return grad_logits_TE, None, grad_mu_TE, None


def straight_through_gates(logits_TE: torch.Tensor, mask_TE: torch.Tensor, mu_TE: torch.Tensor | None,
                           renormalise: bool = True) -> torch.Tensor:
    """Gate weights [T, E]: g * softmax(l) with g = z + mu - stopgrad(mu) (forward value z).

    Forward: the softmax probabilities of the selected experts, 0 elsewhere. Backward: through
    the softmax and through mu (the ProbMoE surrogate for d z / d l). `mu_TE=None` gives the
    inference gates (no straight-through term).

    renormalise=True (default) divides by the selected experts' total, so each token's gates
    sum to 1, as megatron's top-k router gives with moe_router_pre_softmax=False (softmax over
    the chosen logits). MoELayer has no notion of a per-token output scale, and with dynamic-k
    the unnormalised sum changes with the sampled size (8 of 64 experts start near 1/8 of the
    scale), which a pretraining run would have to learn around. renormalise=False is the
    official formula (OLMoE / Qwen1.5-MoE, norm_topk_prob False), for fidelity runs.
    """
    _check_logits(logits_TE)
    if mask_TE.shape != logits_TE.shape:
        raise UserError(f"mask shape {tuple(mask_TE.shape)} must match logits {tuple(logits_TE.shape)}")
    dtype = _compute_dtype(logits_TE)
    if mu_TE is None:  # no straight-through term: a constant mu (no gradient) is the same graph
        mu_TE = logits_TE.new_zeros((), dtype=dtype).expand(logits_TE.shape)
    return _StraightThroughGates.apply(logits_TE.to(dtype), mask_TE.to(dtype), mu_TE.to(dtype), renormalise)
