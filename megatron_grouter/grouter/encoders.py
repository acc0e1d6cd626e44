"""The Grouter's encoder stacks, chosen by name (`GrouterConfig.encoder`).

- "mha": pre-norm Transformer blocks — RMSNorm, multi-head attention (RoPE unless positions are
  off), residual; RMSNorm, SwiGLU, residual. Causal attention by default (`GrouterConfig.causal`);
  causal=false is the paper's bidirectional encoder, its best variant, which sees future tokens.
- "residual_linear": the paper's attention-free ablation — RMSNorm, SwiGLU, residual. Each token
  is scored from its own id only, so context never changes its routing: causal by construction
  (the `causal` flag changes nothing here).
Every block takes (x_BSH, key_mask_B11S) so the stack is uniform.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.layers import SelfAttention, SwiGLU


class MHAEncoderBlock(nn.Module):
    def __init__(self, config: GrouterConfig, dtype: torch.dtype):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.attention = SelfAttention(config.hidden_size, config.num_heads, config.use_positions,
                                       config.rope_base, dtype, causal=config.causal)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, dtype)

    def forward(self, x_BSH: torch.Tensor, key_mask_B11S: torch.Tensor | None) -> torch.Tensor:
        x_BSH = x_BSH + self.attention(self.attention_norm(x_BSH), key_mask_B11S)
        return x_BSH + self.mlp(self.mlp_norm(x_BSH))


class ResidualLinearBlock(nn.Module):
    def __init__(self, config: GrouterConfig, dtype: torch.dtype):
        super().__init__()
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, dtype)

    def forward(self, x_BSH: torch.Tensor, key_mask_B11S: torch.Tensor | None) -> torch.Tensor:
        return x_BSH + self.mlp(self.mlp_norm(x_BSH))


ENCODER_BLOCKS: dict[str, type[nn.Module]] = {
    "mha": MHAEncoderBlock,
    "residual_linear": ResidualLinearBlock,
}


def build_encoder_blocks(config: GrouterConfig, dtype: torch.dtype) -> nn.ModuleList:
    """The config's N encoder blocks, in order."""
    block = ENCODER_BLOCKS[config.encoder]
    return nn.ModuleList(block(config, dtype) for _ in range(config.num_layers))
