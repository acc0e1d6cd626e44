"""mg-import-grouter: a checkpoint in the reference implementation's layout routes like the reference.

The reference network's forward is re-implemented below from reading JimmyAwoe/Grouter
(utils_grouter/grouter/general_router.py and structure/{multi_head_attn,general_structure}.py):
embedding; per layer RMSNorm → attention with RoPE applied after regrouping each head's dims from
interleaved pairs to halves, over the whole window (use_encoder zeroes the mask) → residual;
RMSNorm → SwiGLU → residual; final RMSNorm; score Linear; then top-k of the logits in [S, B] token
order and softmax over the chosen logits times scaling_factor.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from megatron_grouter.grouter.checkpoint import load_grouter
from megatron_grouter.offline.import_grouter import main

VOCAB, HIDDEN, HEADS, LAYERS, FFN, EXPERTS, TOPK = 4096, 32, 4, 2, 48, 16, 4
STRUCTURE = {"architectures": ["GrouterMHA"], "hidden_size": HIDDEN, "intermediate_size": FFN,
             "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "num_hidden_layers": LAYERS,
             "rope_theta": 1000000, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
             "vocab_size": VOCAB, "num_labels": EXPERTS, "use_encoder": True, "no_pos_info": False,
             "hidden_act": "silu", "attention_bias": False, "model_type": "grouter"}
ROUTING = {"topk": TOPK, "model_config_path": "structure_config_16.json", "structure_type": "mha",
           "target_num_experts": str(EXPERTS)}


def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator)

    base = "grouter_structure."
    state = {"bias": torch.zeros(EXPERTS),
             f"{base}model.embed_tokens.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=1.0),
             f"{base}model.norm.weight": 1 + rand(HIDDEN),
             f"{base}score.score.weight": rand(EXPERTS, HIDDEN, scale=1.0)}
    for layer in range(LAYERS):
        prefix = f"{base}model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{prefix}self_attn.{name}.weight"] = rand(HIDDEN, HIDDEN)
        state[f"{prefix}mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[f"{prefix}mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[f"{prefix}mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        state[f"{prefix}input_layernorm.weight"] = 1 + rand(HIDDEN)
        state[f"{prefix}post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
    return state


def _rms(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _interleaved_to_halves(x_BNSD):
    batch, heads, seq, dim = x_BNSD.shape
    return x_BNSD.view(batch, heads, seq, dim // 2, 2).transpose(4, 3).reshape(batch, heads, seq, dim)


def _rotate_half(x):
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-second, first), dim=-1)


def reference_logits(state: dict[str, torch.Tensor], ids_BS: torch.Tensor) -> torch.Tensor:
    s = {name.removeprefix("grouter_structure."): tensor for name, tensor in state.items()}
    batch, seq = ids_BS.shape
    head_dim = HIDDEN // HEADS
    inv_freq = 1.0 / (STRUCTURE["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    x = s["model.embed_tokens.embed_tokens.weight"][ids_BS]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        h = _rms(x, s[p + "input_layernorm.weight"])

        def heads(name, h=h, p=p):
            return (h @ s[p + f"self_attn.{name}.weight"].T).view(batch, seq, HEADS, head_dim).transpose(1, 2)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        q, k = _interleaved_to_halves(q), _interleaved_to_halves(k)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)  # no mask: encoder
        x = x + (weights @ v).transpose(1, 2).reshape(batch, seq, HIDDEN) @ s[p + "self_attn.o_proj.weight"].T
        h = _rms(x, s[p + "post_attention_layernorm.weight"])
        gate, up = h @ s[p + "mlp.gate_proj.weight"].T, h @ s[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ s[p + "mlp.down_proj.weight"].T
    return _rms(x, s["model.norm.weight"]) @ s["score.score.weight"].T


def reference_routing(logits_BSE: torch.Tensor, topk: int, scaling: float = 2.5) -> torch.Tensor:
    """Dense gates [S*B, E] as the reference's _process_score_output / _routing produce them."""
    logits_TE = logits_BSE.permute(1, 0, 2).reshape(-1, logits_BSE.shape[-1])
    _, top_TK = torch.topk(logits_TE, k=topk, dim=-1, sorted=False)
    probs_TK = torch.softmax(torch.gather(logits_TE, 1, top_TK), dim=-1) * scaling
    return torch.zeros_like(logits_TE).scatter(1, top_TK, probs_TK)


@pytest.fixture()
def reference_files(tmp_path):
    state = reference_state_dict()
    torch.save(state, tmp_path / "grouter_ft_16.pth")
    (tmp_path / "structure_config_16.json").write_text(json.dumps(STRUCTURE))
    (tmp_path / "config_16.json").write_text(json.dumps(ROUTING))
    return tmp_path, state


def _import(tmp_path, stdlib_data, checkpoint, out="ours", extra=()):
    return main([str(checkpoint), str(tmp_path / out), "--tokenizer", stdlib_data["tokenizer"],
                 "--structure-config", str(tmp_path / "structure_config_16.json"),
                 "--grouter-config", str(tmp_path / "config_16.json"), *extra])


def test_imported_grouter_routes_like_the_reference(reference_files, stdlib_data):
    tmp_path, state = reference_files
    assert _import(tmp_path, stdlib_data, tmp_path / "grouter_ft_16.pth") == 0
    grouter, info = load_grouter(tmp_path / "ours", expected_num_experts=EXPERTS)
    assert (grouter.config.topk, grouter.config.scaling_factor, grouter.config.num_layers) == (TOPK, 2.5, LAYERS)
    assert info.provenance["imported_from"]["format"] == "JimmyAwoe/Grouter"

    ids_BS = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    expected_BSE = reference_logits(state, ids_BS)
    with torch.no_grad():
        ours_BSE = grouter.logits(ids_BS)
        indices_BSK, weights_BSK = grouter.route(ids_BS)
    assert expected_BSE.std() > 0.5
    torch.testing.assert_close(ours_BSE, expected_BSE, rtol=1e-4, atol=1e-4)
    ours_TE = torch.zeros(3, 40, EXPERTS).scatter(-1, indices_BSK, weights_BSK).transpose(0, 1).reshape(-1, EXPERTS)
    expected_TE = reference_routing(expected_BSE, TOPK)
    assert torch.equal(ours_TE > 0, expected_TE > 0)  # same experts for every token
    torch.testing.assert_close(ours_TE, expected_TE, rtol=1e-4, atol=1e-4)


def test_distillation_checkpoint_and_bias_file(reference_files, stdlib_data):
    tmp_path, state = reference_files
    torch.save({"step": 10, "args": {"lr": 1e-3}, "loss_list": [0.5], "grouter_states": {1: state},
                "optimizer_states": {}, "scheduler_states": {}}, tmp_path / "checkpoint_step_10.pt")
    bias = torch.linspace(-1, 1, EXPERTS)
    torch.save(bias, tmp_path / "checkpoint_step_5_bias.pt")
    assert _import(tmp_path, stdlib_data, tmp_path / "checkpoint_step_10.pt", "from_pt",
                   ["--bias-file", str(tmp_path / "checkpoint_step_5_bias.pt")]) == 0
    grouter, _ = load_grouter(tmp_path / "from_pt")
    assert torch.equal(grouter.expert_bias, bias)


class Payload:
    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def test_bad_inputs_are_refused_in_one_line_and_code_never_runs(reference_files, stdlib_data, capsys):
    tmp_path, state = reference_files
    marker = tmp_path / "marker"
    torch.save({**state, "evil": Payload(marker)}, tmp_path / "evil.pth")
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real ...
    assert marker.exists()
    marker.unlink()
    assert _import(tmp_path, stdlib_data, tmp_path / "evil.pth", "evil") == 2
    assert not marker.exists()  # ... and never ran

    causal = {**STRUCTURE, "use_encoder": False}
    (tmp_path / "structure_config_16.json").write_text(json.dumps(causal))
    assert _import(tmp_path, stdlib_data, tmp_path / "grouter_ft_16.pth", "causal") == 2
    (tmp_path / "structure_config_16.json").write_text(json.dumps({**STRUCTURE, "num_labels": 32}))
    assert _import(tmp_path, stdlib_data, tmp_path / "grouter_ft_16.pth", "labels") == 2
    (tmp_path / "structure_config_16.json").write_text(json.dumps(STRUCTURE))
    assert _import(tmp_path, stdlib_data, tmp_path / "missing.pth", "missing") == 2
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert _import(tmp_path, stdlib_data, tmp_path / "other.pth", "other") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors), errors
    assert "use_encoder=false" in errors[1]
