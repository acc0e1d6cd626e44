"""Behaviour of the Grouter network: shapes, context, padding, positions, routing rule."""

from __future__ import annotations

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.gating import select_experts

from tests.grouter.grouter_fixtures import VOCAB, random_ids, tiny_grouter

torch.set_num_threads(1)
ENCODERS = ["mha", "residual_linear"]


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_shapes_and_dtypes(encoder, dtype, torch_dtype):
    model = tiny_grouter(encoder=encoder, dtype=dtype)
    ids_BS = random_ids(3, 11)
    mask_BS = torch.ones(3, 11, dtype=torch.bool)
    hidden_BSH = model.hidden_states(ids_BS, mask_BS)
    logits_BSE = model.logits(ids_BS, mask_BS)
    indices_BSK, weights_BSK = model.route(ids_BS, mask_BS)
    assert hidden_BSH.shape == (3, 11, 32) and hidden_BSH.dtype == torch_dtype
    assert logits_BSE.shape == (3, 11, 12) and logits_BSE.dtype == torch.float32
    assert indices_BSK.shape == (3, 11, 3) and indices_BSK.dtype == torch.int64
    assert weights_BSK.shape == (3, 11, 3) and weights_BSK.dtype == torch.float32
    assert model.expert_bias.dtype == torch.float32 and not model.expert_bias.any()
    assert torch.isfinite(logits_BSE).all()


@pytest.mark.parametrize("causal", [True, False])
def test_mha_attention_sees_the_past_and_only_the_bidirectional_one_the_future(causal):
    model = tiny_grouter(encoder="mha", causal=causal)
    ids_BS = random_ids(1, 10)
    later_BS, earlier_BS = ids_BS.clone(), ids_BS.clone()
    later_BS[0, -1] = (later_BS[0, -1] + 1) % VOCAB
    earlier_BS[0, 0] = (earlier_BS[0, 0] + 1) % VOCAB
    with torch.no_grad():
        before_BSE, later_BSE, earlier_BSE = (model.logits(ids_BS), model.logits(later_BS),
                                              model.logits(earlier_BS))
    assert torch.equal(before_BSE[0, 0], later_BSE[0, 0]) == causal
    assert not torch.allclose(before_BSE[0, -1], earlier_BSE[0, -1], atol=1e-6)


def test_residual_linear_scores_each_token_alone():
    model = tiny_grouter(encoder="residual_linear")
    ids_BS = random_ids(1, 10)
    changed_BS = ids_BS.clone()
    changed_BS[0, -1] = (changed_BS[0, -1] + 1) % VOCAB
    with torch.no_grad():
        before_BSE, after_BSE = model.logits(ids_BS), model.logits(changed_BS)
    assert torch.equal(before_BSE[0, :-1], after_BSE[0, :-1])
    assert not torch.equal(before_BSE[0, -1], after_BSE[0, -1])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padded_tokens_do_not_change_real_tokens(encoder):
    model = tiny_grouter(encoder=encoder)
    ids_BS = random_ids(2, 12)
    mask_BS = torch.ones(2, 12, dtype=torch.bool)
    mask_BS[0, 7:] = False
    other_padding_BS = ids_BS.clone()
    other_padding_BS[0, 7:] = (other_padding_BS[0, 7:] + 5) % VOCAB
    with torch.no_grad():
        first_BSE = model.logits(ids_BS, mask_BS)
        second_BSE = model.logits(other_padding_BS, mask_BS)
        unpadded_BSE = model.logits(ids_BS[:1, :7])
    assert torch.equal(first_BSE[0, :7], second_BSE[0, :7])
    assert torch.allclose(first_BSE[0, :7], unpadded_BSE[0], atol=1e-5, rtol=0)
    assert torch.equal(first_BSE[1], second_BSE[1])


@pytest.mark.parametrize("causal", [True, False])
def test_mask_changes_mha_logits_and_all_padding_row_stays_finite(causal):
    model = tiny_grouter(encoder="mha", causal=causal)
    ids_BS = random_ids(2, 8)
    mask_BS = torch.ones(2, 8, dtype=torch.bool)
    mask_BS[0, 4:] = False
    mask_BS[1, :] = False
    with torch.no_grad():
        masked_BSE = model.logits(ids_BS, mask_BS)
        full_BSE = model.logits(ids_BS)
        indices_BSK, weights_BSK = model.route(ids_BS, mask_BS)
    # Causal: masking tokens 4.. hides only what tokens 0..3 never saw.
    assert torch.allclose(masked_BSE[0, :4], full_BSE[0, :4], atol=1e-6) == causal
    assert torch.isfinite(masked_BSE).all() and torch.isfinite(weights_BSK).all()
    assert ((indices_BSK >= 0) & (indices_BSK < 12)).all()


def test_without_positions_bidirectional_mha_is_permutation_equivariant():
    model = tiny_grouter(encoder="mha", use_positions=False, causal=False)
    ids_BS = random_ids(1, 9)
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_BSE = model.logits(ids_BS)
        permuted_BSE = model.logits(ids_BS[:, permutation])
    assert torch.allclose(permuted_BSE, logits_BSE[:, permutation], atol=1e-5, rtol=0)


def test_with_positions_token_order_matters():
    model = tiny_grouter(encoder="mha", use_positions=True)
    ids_BS = random_ids(1, 9)
    reversed_order = torch.arange(8, -1, -1)
    with torch.no_grad():
        logits_BSE = model.logits(ids_BS)
        reversed_BSE = model.logits(ids_BS[:, reversed_order])
    assert not torch.allclose(reversed_BSE, logits_BSE[:, reversed_order], atol=1e-4)


@pytest.mark.parametrize("scaling_factor", [1.0, 2.5])
def test_softmax_route_is_topk_of_logits_with_renormalised_weights(scaling_factor):
    model = tiny_grouter(scaling_factor=scaling_factor)
    ids_BS = random_ids(2, 10)
    with torch.no_grad():
        logits_BSE = model.logits(ids_BS)
        indices_BSK, weights_BSK = model.route(ids_BS)
    chosen_BSK = logits_BSE.gather(-1, indices_BSK)
    kth_largest_BS1 = logits_BSE.sort(dim=-1, descending=True).values[..., 2:3]
    assert (chosen_BSK >= kth_largest_BS1).all()
    assert torch.equal(indices_BSK.sort(-1).values, logits_BSE.topk(3).indices.sort(-1).values)
    expected_BSK = torch.exp(chosen_BSK) / torch.exp(chosen_BSK).sum(-1, keepdim=True) * scaling_factor
    assert torch.allclose(weights_BSK, expected_BSK, atol=1e-6)
    assert torch.allclose(weights_BSK.sum(-1), torch.full((2, 10), scaling_factor), atol=1e-6)


def test_sigmoid_route_weights():
    model = tiny_grouter(score_function="sigmoid", scaling_factor=3.0)
    ids_BS = random_ids(2, 10)
    with torch.no_grad():
        logits_BSE = model.logits(ids_BS)
        indices_BSK, weights_BSK = model.route(ids_BS)
    gates_BSK = torch.sigmoid(logits_BSE.gather(-1, indices_BSK))
    assert torch.allclose(weights_BSK, 3.0 * gates_BSK / gates_BSK.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(weights_BSK.sum(-1), torch.full((2, 10), 3.0), atol=1e-5)


def test_selection_bias_moves_choice_but_not_weights():
    model = tiny_grouter()
    ids_BS = random_ids(2, 10)
    bias_E = torch.zeros(12)
    bias_E[5] = 1e4
    with torch.no_grad():
        logits_BSE = model.logits(ids_BS)
        indices_BSK, weights_BSK = model.route(ids_BS, expert_bias_E=bias_E)
        model.expert_bias.copy_(bias_E)
        buffer_indices_BSK, buffer_weights_BSK = model.route(ids_BS)
    assert (indices_BSK == 5).any(-1).all()
    assert torch.equal(indices_BSK, (logits_BSE + bias_E).topk(3).indices)
    assert torch.allclose(weights_BSK, logits_BSE.gather(-1, indices_BSK).softmax(-1), atol=1e-6)
    assert torch.equal(buffer_indices_BSK, indices_BSK) and torch.equal(buffer_weights_BSK, weights_BSK)


def test_select_experts_refuses_wrong_bias_shape():
    with pytest.raises(UserError, match="shape \\(4,\\)"):
        select_experts(torch.zeros(1, 2, 4), 2, "softmax", 1.0, torch.zeros(5))


def test_bad_inputs_are_refused():
    model = tiny_grouter()
    with pytest.raises(UserError, match="vocab_size is 97"):
        model.logits(torch.tensor([[1, VOCAB]]))
    with pytest.raises(UserError, match="max_seq_length=64"):
        model.logits(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(UserError, match="attention_mask shape"):
        model.logits(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(UserError, match="integer \\[batch, seq\\]"):
        model.logits(torch.zeros(4, dtype=torch.long))


def test_gradients_reach_every_parameter():
    model = tiny_grouter().train()
    logits_BSE = model.logits(random_ids(2, 6))
    logits_BSE.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_expert_groups_route_by_group_mean_then_best_member():
    from megatron_grouter.grouter.gating import expert_probabilities

    torch.manual_seed(0)
    logits_TE = torch.randn(500, 6)
    flat_ids, flat_w = select_experts(logits_TE, 2, "softmax", 1.0)
    singletons = torch.arange(6)
    ids, weights = select_experts(logits_TE, 2, "softmax", 1.0, groups_E=singletons)
    assert torch.equal(ids, flat_ids) and torch.allclose(weights, flat_w)
    # experts 4 and 5 form group 4 (with 0..3 alone): the group is chosen by the mean of its two
    # logits and then its better member takes the token, with the group's gate weight.
    groups_E = torch.tensor([0, 1, 2, 3, 4, 4])
    ids, weights = select_experts(logits_TE, 2, "softmax", 1.0, groups_E=groups_E)
    group_logits_TG = torch.cat([logits_TE[:, :4], logits_TE[:, 4:].mean(1, keepdim=True)], dim=1)
    expected_groups_TK = group_logits_TG.topk(2).indices
    assert torch.equal(groups_E[ids], expected_groups_TK)
    in_group = ids >= 4
    best_member_TK = (4 + logits_TE[:, 4:].argmax(1))[:, None].expand_as(ids)
    assert in_group.any() and torch.equal(ids[in_group], best_member_TK[in_group])
    torch.testing.assert_close(weights, group_logits_TG.gather(1, expected_groups_TK).softmax(-1))
    probabilities = expert_probabilities(logits_TE, groups_E)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(500))
    torch.testing.assert_close(probabilities[:, 4:].sum(-1), group_logits_TG.softmax(-1)[:, 4])


def test_expert_groups_must_cover_every_expert():
    from megatron_grouter.grouter.config import GrouterConfig

    with pytest.raises(UserError, match="expert_groups"):
        GrouterConfig(vocab_size=VOCAB, num_experts=4, topk=1, expert_groups=[0, 1, 3, 3])
    with pytest.raises(UserError, match="groups"):
        GrouterConfig(vocab_size=VOCAB, num_experts=4, topk=3, expert_groups=[0, 0, 1, 1])
    config = GrouterConfig(vocab_size=VOCAB, num_experts=4, topk=2, expert_groups=[0, 0, 1, 2])
    assert config.num_groups == 3 and GrouterConfig.from_dict(config.to_dict()) == config
