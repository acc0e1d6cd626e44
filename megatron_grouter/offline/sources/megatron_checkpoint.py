"""Teacher source: a source MoE we trained with mg-train (a megatron dist checkpoint).

Only the embedding and the decoder layers up to the chosen MoE layer are built and loaded
(dist_checkpointing reads just the requested tensors); the chosen layer runs its attention and
pre-MLP norm, and its router's gating gives the logits. The run's config comes from the
checkpoint's train_state.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_grouter.errors import UserError
from megatron_grouter.training.safe_checkpoint_read import verify_checkpoint_safe
from megatron_grouter.offline.sources.base import TeacherSource, check_token_batch


class _RouterReached(Exception):
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory, or one step directory → a complete step dir."""
    from megatron_grouter.training.checkpoint import find_latest, is_complete

    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise UserError(f"no complete mg-train checkpoint at {path}; point at a run's train.out_dir "
                    "or a checkpoints/step_N directory")


class MegatronCheckpointSource(TeacherSource):
    def __init__(self, checkpoint: str | Path, moe_layer: int | None = None, device: str = "cpu"):
        from megatron_grouter.runtime.distributed import init_distributed
        from megatron_grouter.runtime.seed import set_seed
        from megatron_grouter.training.config import to_train_config
        from megatron_grouter.training.model import build_gpt_model, moe_layer_pattern

        self.path = resolve_checkpoint(checkpoint)
        verify_checkpoint_safe(self.path)  # before anything in it is unpickled
        state = json.loads((self.path / "train_state.json").read_text())
        root = to_train_config(state["config"])
        pattern = moe_layer_pattern(root.model)
        moe_layers = [index for index, is_moe in enumerate(pattern) if is_moe]
        layer = moe_layers[0] if moe_layer is None else moe_layer
        if layer not in moe_layers:
            raise UserError(f"layer {layer} of {self.path} is not an MoE layer; MoE layers are "
                            f"{moe_layers[0]}..{moe_layers[-1]}")
        if root.router.type != "topk":
            raise UserError(f"{self.path} was trained with router.type={root.router.type}; a teacher "
                            "must have a learned (topk) router")
        init_distributed()
        set_seed(root.train.seed)  # megatron's layers fork the model-parallel RNG streams
        truncated = copy.deepcopy(root.model)
        truncated.num_layers = layer + 1
        self.device = torch.device(device)
        model = build_gpt_model(truncated, root.router, root.parallel.__class__(), state["vocab_size"])
        # Keep only what the router needs: no output layer, no experts of the chosen layer.
        wanted = {key: value for key, value in model.sharded_state_dict().items()
                  if not key.startswith("output_layer") and "final_layernorm" not in key
                  and not (key.startswith(f"decoder.layers.{layer}.mlp.experts")
                           or key.startswith(f"decoder.layers.{layer}.mlp.shared_experts"))}
        loaded = dist_checkpointing.load({"model": wanted}, str(self.path))["model"]
        model.load_state_dict(loaded, strict=False)
        self.model = model.to(self.device).eval()
        self.layer = layer
        self.num_experts = root.model.num_experts
        self.topk = root.model.topk
        self.vocab_size = state["vocab_size"]
        self.tokenizer_dir = root.data.tokenizer
        self.description = {"source": "megatron", "checkpoint": str(self.path), "moe_layer": layer,
                            "model": root.model.name, "router": root.router.name,
                            "tokens_seen": state.get("tokens_seen")}

    @torch.no_grad()
    def router_logits(self, input_ids_BS: torch.Tensor,
                      attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        check_token_batch(input_ids_BS, attention_mask_BS, self.vocab_size)
        batch, seq = input_ids_BS.shape
        router = self.model.decoder.layers[self.layer].mlp.router

        def capture(module, args):
            raise _RouterReached(module.gating(args[0]))

        handle = router.register_forward_pre_hook(capture)
        try:
            positions = torch.arange(seq, device=self.device).expand(batch, seq)
            mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=self.device), 1)[None, None]
            self.model(input_ids_BS.to(self.device), positions, mask)
        except _RouterReached as reached:
            logits_SBE = reached.logits.view(seq, batch, -1)
        else:
            raise RuntimeError("the chosen MoE layer's router never ran")
        finally:
            handle.remove()
        return logits_SBE.transpose(0, 1).float().contiguous()
