"""Which checkpoint tensors a model needs to run up to one MoE layer's router.

Needed: the token embedding, every tensor of the decoder layers before the chosen one, and in the
chosen layer everything except its MoE block, of which only the router is kept (the experts and
shared experts sit after the router). Not needed: later layers, the final norm, the LM head, and
legacy per-layer `rotary_emb.inv_freq` buffers (the model recomputes those).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from megatron_grouter.offline.sources.hf_families import MoEFamily

# Checkpoints saved from a *ForCausalLM carry a "model." prefix; ones saved from the bare model do not.
_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EMBEDDING_KEY = re.compile(r"^(?:model\.)?embed_tokens\.")


def _needed_in_chosen_layer(suffix: str, family: MoEFamily) -> bool:
    block, _, rest = suffix.partition(".")
    if block not in family.checkpoint_block_names:
        return True  # attention, norms
    return rest.split(".", 1)[0] in family.router_checkpoint_names


def needed_checkpoint_keys(keys: Iterable[str], moe_layer: int, family: MoEFamily) -> list[str]:
    """The subset of checkpoint `keys` needed to compute the router logits of `moe_layer`."""
    needed = []
    for key in keys:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if _EMBEDDING_KEY.match(key):
            needed.append(key)
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        if layer < moe_layer or (layer == moe_layer and _needed_in_chosen_layer(suffix, family)):
            needed.append(key)
    return needed


def layer_of_key(key: str) -> int | None:
    """Decoder-layer index a checkpoint key belongs to, or None for non-layer tensors."""
    match = _LAYER_KEY.match(key)
    return int(match.group(1)) if match else None
