"""ProbMoE's subset distribution by a product tree: log-depth, batched, no host synchronisation.

For one token with router logits l in R^E the distribution is p(z) ~ exp(z . l) on z in {0,1}^E
with k_min <= |z| <= k_max. Its normaliser is a sum of coefficients of one polynomial,

    Z = sum_{c = k_min..k_max} [x^c] prod_i (1 + w_i x),    w_i = exp(l_i),

and everything the router needs comes from a balanced binary tree over the experts whose nodes
hold the product polynomial of their leaves, truncated after x^k_max:

- up-sweep (depth ceil(log2 E)): node = left * right, a convolution of two coefficient vectors
  (O(E k_max^2) work per token in total);
- down-sweep (same depth): the outside coefficients d Z / d node[c] / Z, whose leaf values give
  the exact marginals mu_i = w_i * dZ/dw_i / Z (inside-outside; no second autograd pass);
- exact samples top-down: the root count c is k (exact-k) or drawn from the count posterior
  (dynamic-k), and a node holding c picks is split into (a, c - a) between its children with
  probability left[a] * right[c - a] / node[c]; at the leaves the counts are the subset;
- backward: d(v . mu)/dl = Cov(z) v (the Hessian of log Z, symmetric), computed as the forward
  tangent of mu along v by pushing tangents through both sweeps (a few more convolutions);
- entropy H = log Z - mu . l and log Z from the same tables (metering costs no second DP).

Every shape is fixed by (tokens, E, k_max): no .item(), no data-dependent shapes, so the router
runs under torch.cuda.set_sync_debug_mode("error") and inside CUDA graphs.

Numerics (why linear space in fp64 and why the clamp is exact to far below rounding). A log-space
convolution costs an exp per coefficient pair; linear space costs one multiply-add, 3-5x less work
on CPU, but needs the coefficients to stay inside the float range. Two exact transformations and
one negligible one make that hold in fp64 for every input:
1. tilt: logits are shifted by the k_max-th largest logit tau per token. e_c(w) = e^{c tau}
   e_c(w e^-tau) for every count c, so the tilt only reweights the count posterior by e^{c tau}
   (exact-k: not at all). After the tilt the k_max largest weights are >= 1, so every root
   coefficient e_c, c <= k_max, is >= 1: nothing reachable underflows.
2. clamp: tilted logits are clamped to [-R, R] with R = min(80, (690 - log C(E, k_max)) / k_max),
   which keeps every coefficient of every node in [e^-690, e^+690]. An expert below -R is beaten by
   an unpicked top-k_max expert that is e^R times heavier, so its inclusion probability is below
   E e^-R; an expert above +R is one of at most k_max - 1 such experts and is excluded with
   probability below E e^-R; clamping moves both by less than E e^-R (~1e-33 for R = 80), far
   below fp32 and fp64 rounding of the probabilities. log Z adds back the clamped excess.
   Gradients through clamped logits are 0 (the true ones are below E e^-R as well).
Two implementations of the same numerics: on CPU the fused C kernel of `probmoe_native` (one pass
over 8-token vector blocks with the tables in cache: the torch version below is bound by the
dispatch and memory traffic of ~1000 small ops per chunk, not by arithmetic; its samples use its
own counter-based generator seeded from the torch one), and the torch tree below, which runs on
CUDA and wherever the kernel cannot be built. MEGATRON_GROUTER_PROBMOE_KERNEL=auto|native|torch
chooses (auto: the kernel on CPU when it builds). The tests run both against enumeration.
The sequential (expert by expert) DP in `probmoe_dp` is kept as the oracle the tests compare with.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from megatron_grouter.errors import UserError
from megatron_grouter.routing import probmoe_native
from megatron_grouter.routing.probmoe_dp import _check_logits, _check_range, _compute_dtype


_WORK = torch.float64
_CPU_CHUNK = 1024


class TreeRouting(NamedTuple):
    """One pass of the tree: marginals (differentiable), a sample, log Z and the entropy."""
    mu_TE: torch.Tensor          # P(z_i = 1), fp32 (fp64 for fp64 logits), differentiable
    mask_TE: torch.Tensor        # exact sample, bool [T, E] (empty [0, E] when not sampled)
    log_z_T: torch.Tensor        # log Z, differentiable (its gradient is mu)
    entropy_T: torch.Tensor      # subset entropy (nats), no gradient


def clamp_radius(num_experts: int, k_max: int) -> float:
    """R above: tilted logits live in [-R, R]; k_max R + log C(E, k_max) stays below 690."""
    log_binomial = math.lgamma(num_experts + 1) - math.lgamma(k_max + 1) - math.lgamma(num_experts - k_max + 1)
    return min(80.0, (690.0 - log_binomial) / max(k_max, 1))


def tree_depth(num_experts: int) -> int:
    return max(0, math.ceil(math.log2(num_experts)))


# ----------------------------------------------------------------------------------------------
# polynomial products on [nodes N, counts, tokens T] tables (tokens last: every op is a
# contiguous [N, counts, T] block). Level l pairs node j with node j + N/2 (contiguous halves).


def _convolve_into(out_NST: torch.Tensor, a_NAT: torch.Tensor, b_NBT: torch.Tensor) -> None:
    """out[c] += sum_{i + j = c} a[i] b[j], truncated to out's S counts (one fused multiply-add
    per shift i; a sliding-window product and sum measured 1.4x slower on CPU)."""
    size = out_NST.shape[1]
    for i in range(min(a_NAT.shape[1], size)):
        width = min(b_NBT.shape[1], size - i)
        out_NST[:, i:i + width].addcmul_(a_NAT[:, i:i + 1], b_NBT[:, :width])


def _correlate_into(out_NAT: torch.Tensor, parent_NST: torch.Tensor, other_NBT: torch.Tensor) -> None:
    """out[i] += sum_j parent[i + j] other[j]: the outside of one child from its parent and sibling."""
    size = parent_NST.shape[1]
    for j in range(min(other_NBT.shape[1], size)):
        width = min(out_NAT.shape[1], size - j)
        out_NAT[:, :width].addcmul_(parent_NST[:, j:j + width], other_NBT[:, j:j + 1])


def _leaf_table(weight_PT: torch.Tensor, k_max: int) -> torch.Tensor:
    """Leaf polynomials 1 + w x as [P, min(1, k_max) + 1, T]."""
    leaf_PST = torch.empty((weight_PT.shape[0], min(1, k_max) + 1, weight_PT.shape[1]),
                           dtype=weight_PT.dtype, device=weight_PT.device)
    leaf_PST[:, 0] = 1.0
    if k_max >= 1:
        leaf_PST[:, 1] = weight_PT
    return leaf_PST


def _up(leaf_PST: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """Tables of every level, leaves first, root [1, k_max + 1, T] last."""
    levels = [leaf_PST]
    while levels[-1].shape[0] > 1:
        nodes_NST = levels[-1]
        half = nodes_NST.shape[0] // 2
        size = min(2 * nodes_NST.shape[1] - 1, k_max + 1)
        parent_NST = nodes_NST.new_zeros((half, size, nodes_NST.shape[2]))
        _convolve_into(parent_NST, nodes_NST[:half], nodes_NST[half:])
        levels.append(parent_NST)
    return levels


def _up_tangent(levels: list[torch.Tensor], leaf_dot_PST: torch.Tensor) -> list[torch.Tensor]:
    dots = [leaf_dot_PST]
    for level, parent_NST in zip(levels[:-1], levels[1:]):
        dot_NST = dots[-1]
        half = level.shape[0] // 2
        parent_dot_NST = torch.zeros_like(parent_NST)
        _convolve_into(parent_dot_NST, dot_NST[:half], level[half:])
        _convolve_into(parent_dot_NST, level[:half], dot_NST[half:])
        dots.append(parent_dot_NST)
    return dots


def _down(levels: list[torch.Tensor], root_outside_1ST: torch.Tensor) -> list[torch.Tensor]:
    """Outside tables (dZ/d node[c] / Z), same shapes as `levels`."""
    outside = [root_outside_1ST]
    for nodes_NST in reversed(levels[:-1]):
        parent_NST = outside[-1]
        half = nodes_NST.shape[0] // 2
        child_NST = torch.zeros_like(nodes_NST)
        _correlate_into(child_NST[:half], parent_NST, nodes_NST[half:])
        _correlate_into(child_NST[half:], parent_NST, nodes_NST[:half])
        outside.append(child_NST)
    return outside[::-1]


def _down_tangent(levels, outside, dots, root_outside_dot_1ST) -> list[torch.Tensor]:
    outside_dots = [root_outside_dot_1ST]
    for depth in range(len(levels) - 2, -1, -1):
        nodes_NST, dot_NST = levels[depth], dots[depth]
        parent_NST, parent_dot_NST = outside[depth + 1], outside_dots[-1]
        half = nodes_NST.shape[0] // 2
        child_dot_NST = torch.zeros_like(nodes_NST)
        _correlate_into(child_dot_NST[:half], parent_dot_NST, nodes_NST[half:])
        _correlate_into(child_dot_NST[:half], parent_NST, dot_NST[half:])
        _correlate_into(child_dot_NST[half:], parent_dot_NST, nodes_NST[:half])
        _correlate_into(child_dot_NST[half:], parent_NST, dot_NST[:half])
        outside_dots.append(child_dot_NST)
    return outside_dots[::-1]


# ----------------------------------------------------------------------------------------------
# the count posterior at the root


def _root_posterior(root_ST: torch.Tensor, tilt_T: torch.Tensor, k_min: int, k_max: int):
    """(posterior P(|z| = c) [S, T] (0 outside the range), log root [S, T], outside [S, T],
    log sum_c e^{c tau} root[c] over the range [T])."""
    log_root_ST = root_ST.log()
    counts_S1 = torch.arange(root_ST.shape[0], device=root_ST.device, dtype=root_ST.dtype)[:, None]
    allowed_S1 = (counts_S1 >= k_min) & (counts_S1 <= k_max)
    scores_ST = (log_root_ST + counts_S1 * tilt_T[None, :]).masked_fill(~allowed_S1, float("-inf"))
    log_total_T = torch.logsumexp(scores_ST, dim=0)
    posterior_ST = (scores_ST - log_total_T).exp()
    return posterior_ST, log_root_ST, posterior_ST / root_ST, log_total_T


# ----------------------------------------------------------------------------------------------
# sampling


def _split_counts(left_NAT, right_NBT, counts_NT, parent_size, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per node holding c picks: a ~ left[a] right[c - a] (inverse CDF); returns (a, c - a).

    right[c - a] for every a is the correlation of one-hot(c) with `right` (the down-sweep's
    own operation): no per-token gather.
    """
    A, B = left_NAT.shape[1], right_NBT.shape[1]
    counts_S1 = torch.arange(parent_size, device=counts_NT.device)[None, :, None]
    onehot_NST = (counts_S1 == counts_NT[:, None, :]).to(left_NAT.dtype)
    mass_NAT = torch.zeros_like(left_NAT)
    _correlate_into(mass_NAT, onehot_NST, right_NBT)
    cdf_NAT = mass_NAT.mul_(left_NAT).cumsum(dim=1)
    u_NT = torch.rand(counts_NT.shape, generator=generator, device=counts_NT.device, dtype=cdf_NAT.dtype)
    left_NT = (cdf_NAT <= (u_NT * cdf_NAT[:, -1])[:, None, :]).sum(dim=1)
    left_NT = torch.minimum(torch.maximum(left_NT, counts_NT - (B - 1)), counts_NT.clamp(max=A - 1))
    return left_NT, counts_NT - left_NT


def _sample_root_counts(posterior_ST, k_min, k_max, generator) -> torch.Tensor:
    T = posterior_ST.shape[1]
    if k_min == k_max:
        return torch.full((1, T), k_max, dtype=torch.long, device=posterior_ST.device)
    cdf_TS = posterior_ST.t().cumsum(dim=1)
    u_T = torch.rand(T, generator=generator, device=cdf_TS.device, dtype=cdf_TS.dtype)
    counts_T = (u_T[:, None] * cdf_TS[:, -1:] >= cdf_TS[:, :-1]).sum(dim=1)
    return counts_T.clamp(k_min, k_max)[None, :]


def _sample(levels, posterior_ST, k_min, k_max, generator) -> torch.Tensor:
    """Exact sample: per-leaf counts (0/1) as [P, T] long."""
    counts_NT = _sample_root_counts(posterior_ST, k_min, k_max, generator)
    for depth in range(len(levels) - 2, -1, -1):
        nodes_NST = levels[depth]
        half = nodes_NST.shape[0] // 2
        left_NT, right_NT = _split_counts(nodes_NST[:half], nodes_NST[half:], counts_NT,
                                          levels[depth + 1].shape[1], generator)
        counts_NT = torch.cat([left_NT, right_NT], dim=0)
    return counts_NT


# ----------------------------------------------------------------------------------------------
# the autograd function


def _leaves(logits_TE: torch.Tensor, k_max: int):
    """(weights [P, T] padded with zeros, clamped tilted logits [T, E], free [T, E], tilt [T],
    clamped excess [T]) from detached fp64 logits."""
    T, E = logits_TE.shape
    x_TE = logits_TE.detach().to(_WORK)
    tilt_T = torch.topk(x_TE, k_max, dim=1).values[:, -1] if k_max > 0 else x_TE.amax(dim=1)
    shifted_TE = x_TE - tilt_T[:, None]
    radius = clamp_radius(E, k_max)
    clamped_TE = shifted_TE.clamp(-radius, radius)
    free_TE = (shifted_TE > -radius) & (shifted_TE < radius)
    excess_T = (shifted_TE - radius).clamp_min(0).sum(dim=1)
    weight_PT = x_TE.new_zeros((1 << tree_depth(E), T))
    weight_PT[:E] = clamped_TE.t().exp()
    return weight_PT, clamped_TE, free_TE, tilt_T, excess_T


def _chunk_size(device: torch.device) -> int:
    # CPU: chunks whose tables (~450 doubles per token for E=64, k=8) stay in L2 and are reused by
    # the allocator (fresh multi-MB buffers cost page faults that dominate). GPU: one launch set.
    return 1 << 30 if device.type == "cuda" else _CPU_CHUNK


def _forward_chunk(logits_TE, k_min, k_max, sample, generator):
    E = logits_TE.shape[1]
    weight_PT, clamped_TE, free_TE, tilt_T, excess_T = _leaves(logits_TE, k_max)
    levels = _up(_leaf_table(weight_PT, k_max), k_max)
    posterior_ST, log_root_ST, root_outside_ST, log_total_T = _root_posterior(levels[-1][0], tilt_T, k_min, k_max)
    outside = _down(levels, root_outside_ST[None])
    if k_max >= 1:
        mu_TE = (weight_PT * outside[0][:, 1])[:E].t()
    else:
        mu_TE = torch.zeros_like(clamped_TE)
    log_z_T = log_total_T + excess_T
    # H = E[-log p(z)] = sum_c P(c) log root[c] + H(count) - mu . clamped: the tilt cancels, and
    # so does the clamp's excess (clamped-high experts have mu = 1)
    count_entropy_T = -(posterior_ST * posterior_ST.clamp_min(1e-300).log()).sum(dim=0)
    entropy_T = ((posterior_ST * log_root_ST).sum(dim=0) + count_entropy_T
                 - (mu_TE * clamped_TE).sum(dim=1)).clamp_min(0)
    mask_TE = _sample(levels, posterior_ST, k_min, k_max, generator)[:E].t().bool() if sample else None
    tables = (weight_PT, free_TE, levels, outside, root_outside_ST)
    return mu_TE, mask_TE, log_z_T, entropy_T, tables


def _hessian_vector(tables, v_TE: torch.Tensor) -> torch.Tensor:
    """Cov(z) v (masked to unclamped logits) as the tangent of mu along v: w_dot = w v, pushed
    through both sweeps."""
    weight_PT, free_TE, levels, outside, root_outside_ST = tables
    E = free_TE.shape[1]
    weight_dot_PT = torch.zeros_like(weight_PT)
    weight_dot_PT[:E] = v_TE.t()
    weight_dot_PT *= weight_PT
    leaf_dot_PST = torch.zeros_like(levels[0])
    leaf_dot_PST[:, 1] = weight_dot_PT
    dots = _up_tangent(levels, leaf_dot_PST)
    shift_T = (root_outside_ST * dots[-1][0]).sum(dim=0)
    outside_dots = _down_tangent(levels, outside, dots, (-root_outside_ST * shift_T)[None])
    mu_dot_PT = weight_dot_PT * outside[0][:, 1] + weight_PT * outside_dots[0][:, 1]
    return mu_dot_PT[:E].t() * free_TE


def _use_native(logits_TE: torch.Tensor, k_max: int) -> bool:
    """The fused CPU kernel (`probmoe_native`) for CPU logits, the torch tree otherwise."""
    wanted = probmoe_native.choice()
    if logits_TE.device.type != "cpu":
        if wanted == "native":
            raise UserError(f"{probmoe_native.ENV}=native is a CPU kernel but the logits are on "
                            f"{logits_TE.device.type}; unset it (CUDA runs the torch tree)")
        return False
    if wanted == "torch" or k_max < 1:  # k_max = 0 (only the empty subset) stays with the torch tree
        return False
    if probmoe_native.available():
        return True
    if wanted == "native":
        raise UserError(f"{probmoe_native.ENV}=native but the ProbMoE CPU kernel could not be built "
                        f"({probmoe_native.failure()}); install a C compiler or unset it")
    return False


def _seed(generator: torch.Generator | None) -> int:
    """A 62-bit kernel seed from the torch generator (CPU, so no device synchronisation)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


class _Tree(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits_TE, k_min, k_max, sample, generator):
        T, E = logits_TE.shape
        ctx.set_materialize_grads(False)  # unused outputs (log Z, often) cost no zero-filled gradients
        ctx.native = _use_native(logits_TE, k_max)
        ctx.k_min, ctx.k_max = k_min, k_max
        ctx.input_dtype = logits_TE.dtype
        out_dtype = _compute_dtype(logits_TE)
        with torch.no_grad():
            if ctx.native:
                x_TE = logits_TE.detach().to(_WORK).contiguous()
                mu_TE, mask_TE, log_z_T, entropy_T, ctx.tilt_T = probmoe_native.forward(
                    x_TE, k_min, k_max, clamp_radius(E, k_max), _seed(generator) if sample else None)
                ctx.logits_TE = x_TE
            else:
                chunk = _chunk_size(logits_TE.device)
                results, ctx.tables = [], []
                for start in range(0, T, chunk):
                    *outputs, tables = _forward_chunk(logits_TE[start:start + chunk], k_min, k_max, sample,
                                                      generator)
                    results.append(outputs)
                    ctx.tables.append(tables)
                ctx.chunk = chunk
                mu_TE, log_z_T, entropy_T = (torch.cat([r[i] for r in results]) for i in (0, 2, 3))
                mask_TE = torch.cat([r[1] for r in results]) if sample else None
            if mask_TE is None:
                mask_TE = torch.zeros((0, E), dtype=torch.bool, device=logits_TE.device)
        ctx.mu_TE = mu_TE
        entropy_T = entropy_T.to(out_dtype)
        ctx.mark_non_differentiable(mask_TE, entropy_T)
        return mu_TE.to(out_dtype), mask_TE, log_z_T.to(out_dtype), entropy_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mu_TE, _grad_mask, grad_log_z_T, _grad_entropy):
        mu_TE = ctx.mu_TE
        grad_TE = None
        if grad_mu_TE is not None and ctx.k_max >= 1:
            grad_mu_TE = grad_mu_TE.to(_WORK)
            if ctx.native:
                grad_TE = probmoe_native.covariance_vector(ctx.logits_TE, ctx.tilt_T, grad_mu_TE, ctx.k_min,
                                                           ctx.k_max, clamp_radius(mu_TE.shape[1], ctx.k_max))
            else:
                grad_TE = torch.cat([_hessian_vector(tables, grad_mu_TE[index * ctx.chunk:(index + 1) * ctx.chunk])
                                     for index, tables in enumerate(ctx.tables)])
        if grad_log_z_T is not None:
            from_log_z_TE = grad_log_z_T.to(_WORK)[:, None] * mu_TE
            grad_TE = from_log_z_TE if grad_TE is None else grad_TE.add_(from_log_z_TE)
        if grad_TE is None:
            return None, None, None, None, None
        return grad_TE.to(ctx.input_dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------
# public


def route(logits_TE: torch.Tensor, k_min: int, k_max: int, sample: bool = True,
          generator: torch.Generator | None = None) -> TreeRouting:
    """Marginals, one exact sample (if `sample`), log Z and entropy from one pass of the tree."""
    _check_logits(logits_TE)
    _check_range(logits_TE.shape[1], k_min, k_max)
    return TreeRouting(*_Tree.apply(logits_TE, k_min, k_max, sample, generator))


def marginals(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Exact mu_i = P(z_i = 1 | k_min <= |z| <= k_max): [T, E], differentiable (backward Cov(z) v)."""
    return route(logits_TE, k_min, k_max, sample=False).mu_TE


def log_normaliser(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """log Z per token [T]; differentiable, its gradient is mu."""
    return route(logits_TE, k_min, k_max, sample=False).log_z_T


def sample_subsets(logits_TE: torch.Tensor, k_min: int, k_max: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples z ~ p(z | k_min <= |z| <= k_max): bool [T, E]."""
    with torch.no_grad():
        return route(logits_TE, k_min, k_max, sample=True, generator=generator).mask_TE


def subset_entropy(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Entropy (nats) of the subset distribution per token [T]."""
    with torch.no_grad():
        return route(logits_TE, k_min, k_max, sample=False).entropy_T
