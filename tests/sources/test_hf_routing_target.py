"""Teachers whose model does not select the top-k of its raw logits hand out logits that rank the
experts as the model really selects them; which one is used is measured and recorded."""

from __future__ import annotations

import pytest
import torch
from tests.sources.hf_tiny_checkpoints import VOCAB_SIZE, load_full_model, make_tiny_checkpoint

from megatron_grouter.errors import UserError
from megatron_grouter.offline.sources import HFPartialSource
from megatron_grouter.offline.sources.hf_routing_target import topk_agreement

torch.set_num_threads(1)

BIASED = ["deepseek_v3", "glm4_moe", "dots1", "exaone_moe", "ernie4_5_moe"]


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(7))


def _full_selection(model_dir: str, layer_position: int, ids_BS: torch.Tensor) -> torch.Tensor:
    """Expert ids the complete transformers model routes each token to (its own router's output)."""
    full = load_full_model(model_dir)
    moe_blocks = [module for name, module in full.named_modules() if name.endswith(".mlp.gate")]
    chosen: list[torch.Tensor] = []
    handle = moe_blocks[layer_position].register_forward_hook(lambda m, i, out: chosen.append(out[2]))
    with torch.no_grad():
        full(input_ids=ids_BS)
    handle.remove()
    return chosen[0]


@pytest.mark.parametrize("model_type", BIASED)
def test_routed_logits_select_what_the_model_selects(tmp_path, model_type):
    model_dir = make_tiny_checkpoint(model_type, str(tmp_path / model_type), seed=3)
    ids_BS = _ids()
    source = HFPartialSource(model_dir)  # auto
    assert source.description["routing_target"] == "routed"
    assert source.description["raw_topk_agreement"] < 0.99
    selected_TK = _full_selection(model_dir, 0, ids_BS)
    routed_BSE = source.router_logits(ids_BS)
    assert topk_agreement(routed_BSE.reshape(-1, 8), selected_TK) == 1.0
    raw = HFPartialSource(model_dir, routing_target="raw")
    raw_BSE = raw.router_logits(ids_BS)
    assert topk_agreement(raw_BSE.reshape(-1, 8), selected_TK) < 1.0  # raw logits would teach another choice
    assert raw.description["routing_target"] == "raw" and raw.description["routing_target_requested"] == "raw"
    assert torch.isfinite(routed_BSE).all()


def test_deepseek_v2_group_limited_greedy(tmp_path):
    from tests.sources.hf_tiny_checkpoints import tiny_config, randomise_all_tensors
    from transformers import AutoModelForCausalLM

    config = tiny_config("deepseek_v2")
    config.topk_method, config.n_group, config.topk_group = "group_limited_greedy", 4, 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    randomise_all_tensors(model)
    model.save_pretrained(tmp_path / "v2")
    source = HFPartialSource(str(tmp_path / "v2"))
    assert source.description["routing_target"] == "routed"
    ids_BS = _ids()
    selected_TK = _full_selection(str(tmp_path / "v2"), 0, ids_BS)
    assert topk_agreement(source.router_logits(ids_BS).reshape(-1, 8), selected_TK) == 1.0


def test_plain_topk_family_stays_raw_and_unknown_target_is_refused(tmp_path):
    model_dir = make_tiny_checkpoint("qwen2_moe", str(tmp_path / "q"))
    assert HFPartialSource(model_dir).description["routing_target"] == "raw"
    with pytest.raises(UserError, match="routing_target"):
        HFPartialSource(model_dir, routing_target="best")


def test_llama4_multimodal_checkpoint_reads_only_its_text_decoder(tmp_path):
    """Llama-4 Scout/Maverick ship as model_type llama4 (vision + text); the teacher is the text part."""
    from tests.sources.hf_tiny_checkpoints import randomise_all_tensors, tiny_config
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                  image_size=28, patch_size=14, projector_input_dim=32, projector_output_dim=32,
                  vision_output_dim=32, pixel_shuffle_ratio=0.5, rope_theta=10000)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=tiny_config("llama4_text").to_dict(),
                                                        vision_config=vision)).eval()
    randomise_all_tensors(model)
    model.save_pretrained(tmp_path / "scout", max_shard_size="50KB")
    ids_BS = _ids()
    routers = [module for name, module in model.named_modules() if name.endswith("feed_forward.router")]
    captured = []
    handle = routers[-1].register_forward_hook(lambda m, i, out: captured.append(out[1]))
    with torch.no_grad():  # the complete text decoder of the multimodal model
        model.language_model(input_ids=ids_BS)
    handle.remove()

    source = HFPartialSource(str(tmp_path / "scout"), moe_layer=3)
    assert source.description["checkpoint_model_type"] == "llama4"
    assert source.description["moe_layers"] == [1, 3]
    torch.testing.assert_close(source.router_logits(ids_BS).reshape(-1, 8), captured[0].float())
    assert not any("vision" in key or "projector" in key for key in source.keys_read)
