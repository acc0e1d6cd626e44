"""The Grouter network: G(X) = W_s · Enc_N(Emb(X)), a standalone router that reads token ids.

embedding → N encoder blocks → final RMSNorm → `score` Linear(hidden, num_experts).
The score layer and the selection bias `expert_bias` are kept in fp32 whatever the model dtype:
they are small, they are what folding and tuning rewrite, and routing decisions should not hinge
on bf16 rounding of logits. `expert_bias` is a persistent buffer (saved with the checkpoint); it
is zero until bias-mode tuning writes it, and only affects which experts are selected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.encoders import build_encoder_blocks
from megatron_grouter.grouter.gating import select_experts

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INIT_STD = 0.02


class Grouter(nn.Module):
    def __init__(self, config: GrouterConfig):
        super().__init__()
        self.config = config
        dtype = TORCH_DTYPES[config.dtype]
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.blocks = build_encoder_blocks(config, dtype)
        self.final_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.score = nn.Linear(config.hidden_size, config.num_experts, bias=config.score_bias,
                               dtype=torch.float32)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # False where the caller checked the ids on the host (routing/windows.py): the check of
        # device ids reads them back to the host (a sync per call)
        self.check_token_ids = True
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # GPT-style: N(0, 0.02) everywhere, residual-branch outputs scaled down by depth.
        residual_std = INIT_STD / math.sqrt(2 * max(1, self.config.num_layers))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_output = name.endswith(("attention.out", "mlp.down"))
                module.weight.normal_(0.0, residual_std if is_residual_output else INIT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    @property
    def expert_groups(self) -> torch.Tensor | None:
        """Group of each expert [E] (two-level routing of an expanded Grouter), or None."""
        if self.config.expert_groups is None:
            return None
        return torch.tensor(self.config.expert_groups, dtype=torch.long, device=self.score.weight.device)

    def _check_inputs(self, input_ids_BS: torch.Tensor,
                      attention_mask_BS: torch.Tensor | None) -> torch.Tensor | None:
        if input_ids_BS.dim() != 2 or input_ids_BS.dtype.is_floating_point:
            raise UserError(f"Grouter input_ids must be integer [batch, seq], got {input_ids_BS.dtype} "
                            f"{tuple(input_ids_BS.shape)}")
        seq = input_ids_BS.shape[1]
        if seq > self.config.max_seq_length:
            raise UserError(f"sequence of {seq} tokens exceeds the Grouter's max_seq_length="
                            f"{self.config.max_seq_length}; route it in windows of at most that length")
        if self.check_token_ids and input_ids_BS.numel():
            low, high = torch.stack((input_ids_BS.min(), input_ids_BS.max())).tolist()  # one sync
            if low < 0 or high >= self.config.vocab_size:
                raise UserError(f"token ids range over [{low}, {high}] but the Grouter's vocab_size is "
                                f"{self.config.vocab_size}; tokenize with the Grouter's tokenizer")
        if attention_mask_BS is None:
            return None
        if attention_mask_BS.shape != input_ids_BS.shape:
            raise UserError(f"attention_mask shape {tuple(attention_mask_BS.shape)} differs from "
                            f"input_ids shape {tuple(input_ids_BS.shape)}; pass one flag per token")
        valid_BS = attention_mask_BS.to(device=input_ids_BS.device, dtype=torch.bool)
        # A window with no real token would attend to nothing (NaN); let it attend to everything.
        empty_B1 = ~valid_BS.any(dim=-1, keepdim=True)
        return (valid_BS | empty_B1)[:, None, None, :]

    def hidden_states(self, input_ids_BS: torch.Tensor,
                      attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, S, H] in the model dtype (True in the mask = real token)."""
        key_mask_B11S = self._check_inputs(input_ids_BS, attention_mask_BS)
        x_BSH = self.embedding(input_ids_BS)
        for block in self.blocks:
            x_BSH = block(x_BSH, key_mask_B11S)
        return self.final_norm(x_BSH)

    def logits(self, input_ids_BS: torch.Tensor,
               attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Expert logits [B, S, E] in fp32 (padded positions get finite, meaningless values)."""
        return self.score(self.hidden_states(input_ids_BS, attention_mask_BS).float())

    def forward(self, input_ids_BS: torch.Tensor,
                attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(input_ids_BS, attention_mask_BS)

    def route(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None,
              expert_bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [B, S, k] (int64) and gate weights [B, S, k] (fp32).

        Experts are chosen by top-k of logits + selection bias (`expert_bias_E`, else the
        module's `expert_bias`), by group first if the config has expert groups; weights come
        from the raw logits (see gating.select_experts).
        """
        logits_BSE = self.logits(input_ids_BS, attention_mask_BS)
        bias_E = self.expert_bias if expert_bias_E is None else expert_bias_E
        return select_experts(logits_BSE, self.config.topk, self.config.score_function,
                              self.config.scaling_factor, bias_E, self.expert_groups)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


def count_parameters(config: GrouterConfig) -> dict[str, int]:
    """Parameter counts by part, from the config alone (no model is built)."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    mlp_block = hidden + 3 * hidden * ffn
    attention_block = hidden + 4 * hidden * hidden
    per_block = mlp_block + (attention_block if config.encoder == "mha" else 0)
    counts = {
        "embedding": config.vocab_size * hidden,
        "encoder": config.num_layers * per_block,
        "final_norm": hidden,
        "score": hidden * config.num_experts + (config.num_experts if config.score_bias else 0),
    }
    counts["total"] = sum(counts.values())
    return counts
