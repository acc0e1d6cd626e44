"""Leakage: a causal Grouter's routing of token t is a function of tokens <= t of its window.

For every causal variant (MHA, residual_linear, an expanded two-level Grouter, a folded one),
perturbing the tokens after t leaves the expert ids *and* gate weights of tokens <= t
bit-identical, with and without padding; the bidirectional encoder fails the same check (so the
check can fail). Conversions keep the flag.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_grouter.offline.expanding import expand_grouter
from megatron_grouter.offline.folding import fold_grouter, mapping_matrix, random_groups

from tests.grouter.grouter_fixtures import VOCAB, random_ids, tiny_grouter

torch.set_num_threads(1)
SEQ = 24
CUTS = (0, 1, 7, 15, SEQ - 2)


def leaked_cuts(grouter, seed: int = 5) -> list[int]:
    """The cuts t for which perturbing tokens > t changed the routing of some token <= t."""
    ids_BS = random_ids(3, SEQ, seed=seed)
    mask_BS = torch.ones(3, SEQ, dtype=torch.bool)
    mask_BS[2, 18:] = False  # a padded window, like a document's last one
    generator = torch.Generator().manual_seed(seed + 1)
    leaked = []
    with torch.no_grad():
        indices_BSK, weights_BSK = grouter.route(ids_BS, mask_BS)
        for cut in CUTS:
            changed_BS = ids_BS.clone()
            changed_BS[:, cut + 1:] = torch.randint(0, VOCAB, (3, SEQ - cut - 1), generator=generator)
            new_indices_BSK, new_weights_BSK = grouter.route(changed_BS, mask_BS)
            past = slice(0, cut + 1)
            same = (torch.equal(indices_BSK[:, past], new_indices_BSK[:, past])
                    and torch.equal(weights_BSK[:, past], new_weights_BSK[:, past]))
            if not same:
                leaked.append(cut)
    return leaked


def expanded(causal: bool):
    grouter = tiny_grouter(causal=causal)
    with torch.no_grad():
        ids_BS = random_ids(16, SEQ, seed=9)
        hidden_TH = grouter.hidden_states(ids_BS).float().reshape(-1, 32)
        logits_TE = grouter.score(hidden_TH)
    result = expand_grouter(grouter, hidden_TH, logits_TE, num_target=15)
    assert result.grouter.config.expert_groups is not None
    return result.grouter.eval()


def folded(causal: bool):
    grouter = tiny_grouter(causal=causal)
    return fold_grouter(grouter, mapping_matrix(random_groups(12, 6, seed=1), 12)).eval()


VARIANTS = {
    "mha": lambda causal: tiny_grouter(encoder="mha", causal=causal),
    "mha_without_positions": lambda causal: tiny_grouter(encoder="mha", causal=causal, use_positions=False),
    "mha_bfloat16": lambda causal: tiny_grouter(encoder="mha", causal=causal, dtype="bfloat16"),
    "residual_linear": lambda causal: tiny_grouter(encoder="residual_linear", causal=causal),
    "expanded_two_level": expanded,
    "folded": folded,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_grouter_routing_ignores_later_tokens_bit_for_bit(variant):
    grouter = VARIANTS[variant](True)
    assert grouter.config.causal and not grouter.config.sees_future_tokens
    assert leaked_cuts(grouter) == []


@pytest.mark.parametrize("variant", ["mha", "mha_without_positions", "expanded_two_level", "folded"])
def test_bidirectional_grouter_fails_the_same_check(variant):
    grouter = VARIANTS[variant](False)
    assert grouter.config.sees_future_tokens
    assert len(leaked_cuts(grouter)) >= len(CUTS) - 1


def test_residual_linear_is_causal_by_construction_whatever_the_flag():
    grouter = VARIANTS["residual_linear"](False)
    assert not grouter.config.sees_future_tokens and leaked_cuts(grouter) == []


@pytest.mark.parametrize("causal", [True, False])
def test_fold_and_expand_keep_the_flag(causal):
    assert folded(causal).config.causal is causal
    assert expanded(causal).config.causal is causal


def test_causal_routing_of_a_prefix_matches_the_full_window():
    """Generation-time routing (only the prefix exists) equals training-time routing to round-off."""
    grouter = tiny_grouter(causal=True)
    with torch.no_grad():
        grouter.score.weight.mul_(50)  # decisive, as a distilled Grouter
        ids_BS = random_ids(2, SEQ, seed=3)
        full_BSE = grouter.logits(ids_BS)
        for cut in CUTS:
            prefix_BSE = grouter.logits(ids_BS[:, :cut + 1])
            np.testing.assert_allclose(prefix_BSE.numpy(), full_BSE[:, :cut + 1].numpy(), atol=1e-4, rtol=0)
