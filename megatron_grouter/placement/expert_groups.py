"""Initial expert groups: N equal-size groups of experts that should share an EP partition.

Two constructions:
- `affinity_cluster_groups` (paper §3.4.2, Appendix J): cluster the samples' affinity vectors
  (k-means++ to ~100 clusters, then agglomerative down to N), then assign experts to the N
  cluster means by a Hungarian matching on a cost matrix whose columns repeat each partition
  E/N times, so every group gets exactly E/N experts.
- `coactivation_groups`: token-level co-activation P_ij (#tokens whose top-k holds both i and j)
  and a balanced graph partition that maximises the co-activation kept inside groups: greedy
  growth from the strongest expert, then Kernighan-Lin style pair swaps.
Groups are returned as `expert_to_group` [E] with every group of size E/N.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering, KMeans

from megatron_grouter.errors import UserError
from megatron_grouter.placement.affinity import informative_sample_mask
from megatron_grouter.placement.routing_input import check_partitioning


def match_experts_to_partitions(preference_NE: np.ndarray) -> np.ndarray:
    """Equal-size groups maximising Σ preference[group(e), e] (Hungarian on repeated columns)."""
    num_partitions, num_experts = preference_NE.shape
    per_group = check_partitioning(num_experts, num_partitions)
    cost_EC = -np.repeat(preference_NE.T.astype(np.float64), per_group, axis=1)
    rows, cols = linear_sum_assignment(cost_EC)
    expert_to_group = np.empty(num_experts, dtype=np.int64)
    expert_to_group[rows] = cols // per_group
    return expert_to_group


def cluster_affinities(
    phi_SE: np.ndarray,
    num_partitions: int,
    num_clusters: int = 100,
    seed: int = 0,
    max_samples: int = 200_000,
) -> np.ndarray:
    """Cluster-mean affinity of N final clusters [N, E]: k-means++ then agglomerative (ward)."""
    rng = np.random.default_rng(seed)
    if phi_SE.shape[0] > max_samples:
        phi_SE = phi_SE[np.sort(rng.choice(phi_SE.shape[0], max_samples, replace=False))]
    num_clusters = max(num_partitions, min(num_clusters, phi_SE.shape[0] // 8))
    if phi_SE.shape[0] < num_clusters:
        raise UserError(
            f"only {phi_SE.shape[0]} informative samples for {num_partitions} partitions; "
            "raise the entropy threshold or give more samples"
        )
    kmeans = KMeans(n_clusters=num_clusters, init="k-means++", n_init=1, random_state=seed).fit(phi_SE)
    members_C = np.bincount(kmeans.labels_, minlength=num_clusters)
    live = members_C > 0
    centroids_CE, members_C = kmeans.cluster_centers_[live], members_C[live]
    if centroids_CE.shape[0] == num_partitions:
        final_C = np.arange(num_partitions)
    else:
        final_C = AgglomerativeClustering(n_clusters=num_partitions, linkage="ward").fit_predict(centroids_CE)
    weighted_NE = np.zeros((num_partitions, phi_SE.shape[1]))
    np.add.at(weighted_NE, final_C, centroids_CE * members_C[:, None])
    sizes_N = np.bincount(final_C, weights=members_C, minlength=num_partitions)
    return weighted_NE / sizes_N[:, None]


def affinity_cluster_groups(
    phi_SE: np.ndarray,
    num_partitions: int,
    entropy_threshold: float = 0.98,
    num_clusters: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """The paper's expert groups: drop near-uniform samples, cluster, Hungarian-match experts."""
    keep = informative_sample_mask(phi_SE, entropy_threshold)
    mean_NE = cluster_affinities(phi_SE[keep], num_partitions, num_clusters, seed)
    return match_experts_to_partitions(mean_NE)


def coactivation_matrix(topk_SLK: np.ndarray, num_experts: int, chunk_samples: int = 2048) -> np.ndarray:
    """P [E, E]: number of tokens whose top-k contains both experts (diagonal: tokens per expert)."""
    k = topk_SLK.shape[2]
    first, second = np.triu_indices(k, 1)
    coact_EE = np.zeros(num_experts * num_experts, dtype=np.int64)
    for start in range(0, topk_SLK.shape[0], chunk_samples):
        flat_TK = topk_SLK[start : start + chunk_samples].reshape(-1, k).astype(np.int64)
        coact_EE += np.bincount((flat_TK[:, first] * num_experts + flat_TK[:, second]).ravel(),
                                minlength=num_experts * num_experts)
        coact_EE += np.bincount(flat_TK.ravel() * (num_experts + 1), minlength=num_experts * num_experts)
    coact_EE = coact_EE.reshape(num_experts, num_experts)
    diagonal = np.diag(coact_EE).copy()
    coact_EE = coact_EE + coact_EE.T
    np.fill_diagonal(coact_EE, diagonal)
    return coact_EE


def _grow_groups(weight_EE: np.ndarray, num_groups: int) -> np.ndarray:
    """Greedy: seed each group with the free expert of largest total weight, add the best-tied."""
    num_experts = weight_EE.shape[0]
    per_group = num_experts // num_groups
    expert_to_group = np.full(num_experts, -1, dtype=np.int64)
    for group in range(num_groups):
        free = expert_to_group < 0
        strength = np.where(free, weight_EE[:, free].sum(axis=1), -np.inf)
        members = [int(np.argmax(strength))]
        expert_to_group[members[0]] = group
        while len(members) < per_group:
            tie = np.where(expert_to_group < 0, weight_EE[:, members].sum(axis=1), -np.inf)
            best = int(np.argmax(tie))
            expert_to_group[best] = group
            members.append(best)
    return expert_to_group


def refine_balanced_partition(weight_EE: np.ndarray, expert_to_group: np.ndarray, max_swaps: int = 10_000) -> np.ndarray:
    """Pair swaps between groups while they raise the within-group weight (sizes stay equal)."""
    weight_EE = weight_EE.astype(np.float64).copy()
    np.fill_diagonal(weight_EE, 0.0)
    groups = expert_to_group.copy()
    num_groups = int(groups.max()) + 1
    for _ in range(max_swaps):
        onehot_EG = np.eye(num_groups)[groups]
        tie_EG = weight_EE @ onehot_EG
        own_E = tie_EG[np.arange(groups.size), groups]
        # gain of swapping a and b: a joins b's group and b joins a's, minus their own edge twice
        gain_EE = (tie_EG[:, groups] - own_E[:, None]) + (tie_EG[:, groups] - own_E[:, None]).T - 2 * weight_EE
        gain_EE[groups[:, None] == groups[None, :]] = -np.inf
        a, b = np.unravel_index(np.argmax(gain_EE), gain_EE.shape)
        if gain_EE[a, b] <= 1e-9:
            break
        groups[a], groups[b] = groups[b], groups[a]
    return groups


def coactivation_groups(topk_SLK: np.ndarray, num_experts: int, num_partitions: int) -> np.ndarray:
    """Balanced partition of the token co-activation graph into N equal groups."""
    check_partitioning(num_experts, num_partitions)
    coact_EE = coactivation_matrix(topk_SLK, num_experts).astype(np.float64)
    np.fill_diagonal(coact_EE, 0.0)
    return refine_balanced_partition(coact_EE, _grow_groups(coact_EE, num_partitions))
