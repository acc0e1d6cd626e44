"""megatron's MoELayer as our layer spec builds it: our router, and optionally our dispatcher.

The layer spec (training/model.py) names `PluginMoELayer` as the MoE layer class and our router
in `MoESubmodules.router`; megatron's TransformerLayer constructs it like its own MoELayer. Its
constructor is megatron's, plus one step: with a `dispatcher_builder` it builds our token
dispatcher from the layer's own process groups and experts, in place of the one megatron's
constructor picked from `moe_token_dispatcher_type` (which has no extension point for a
dispatcher class). Nothing is swapped after the model exists, and `check_plugin_layers` fails
the build when a megatron release constructs MoE layers some other way.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grouter.errors import UserError
from megatron_grouter.megatron_compat import default_pg_collection


class PluginMoELayer(MoELayer):
    def __init__(self, *args, dispatcher_builder=None, **kwargs):
        super().__init__(*args, **kwargs)
        if dispatcher_builder is None:
            return
        if self.shared_expert_overlap:
            raise UserError("the planned dispatcher does not overlap shared experts; set "
                            "moe_shared_expert_overlap off or use parallel.dispatcher=alltoall")
        if hasattr(self, "_inference_token_dispatcher"):
            raise UserError("the planned dispatcher is for training; build inference models with "
                            "megatron's dispatchers")
        pg_collection = kwargs.get("pg_collection") or default_pg_collection()
        self.token_dispatcher = dispatcher_builder(self.num_local_experts, self.local_expert_indices,
                                                   config=self.config, pg_collection=pg_collection)


class SeamBroken(RuntimeError):
    """megatron-core built an MoE layer without our router or dispatcher."""


def check_plugin_layers(model: torch.nn.Module | list, dispatcher_class: type | None) -> int:
    """Every MoE layer of `model` is ours, with our router (and our dispatcher when
    `dispatcher_class` is given); returns how many MoE layers there are."""
    from megatron_grouter.megatron_compat import installed_version

    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = [(name, module) for chunk in chunks for name, module in chunk.named_modules()
              if isinstance(module, MoELayer)]
    for name, layer in layers:
        router = type(layer.router)
        problem = (f"is {type(layer).__name__}, not PluginMoELayer" if not isinstance(layer, PluginMoELayer)
                   else f"has router {router.__module__}.{router.__name__}"
                   if not router.__module__.startswith("megatron_grouter.")
                   else f"has dispatcher {type(layer.token_dispatcher).__name__}"
                   if dispatcher_class is not None and not isinstance(layer.token_dispatcher, dispatcher_class)
                   else None)
        if problem:
            raise SeamBroken(f"megatron-core {installed_version()} built MoE layer {name} that {problem}: "
                             "our layer spec did not reach it; this megatron-core builds MoE layers in a way "
                             "megatron-grouter does not know (see megatron_grouter/megatron_compat.py)")
    return len(layers)
