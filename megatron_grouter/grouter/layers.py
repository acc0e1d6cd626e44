"""Building blocks of the Grouter encoder: rotary positions, self-attention, SwiGLU.

Attention is causal by default: token t attends to the real tokens <= t of its window, so the
routing of a causal LM's token never depends on later tokens (at generation time they do not
exist). With causal=False it is an *encoder's* (the paper's): every token sees every real token
of its window, before and after it. Padding is excluded through a key mask; padded positions
still produce (meaningless, finite) outputs so that shapes stay [B, S, ...]. Every query may
attend to itself, so no row of the mask is empty (no NaN), whatever the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_cos_sin(seq_length: int, head_dim: int, base: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [S, head_dim] (fp32) for rotate-half RoPE.

    Computed per call rather than cached in a buffer: it is tiny next to attention, and keeps the
    module free of non-checkpointed state (a Grouter can be built on the meta device and filled
    from a checkpoint).
    """
    inv_freq_F = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_SF = torch.outer(torch.arange(seq_length, device=device, dtype=torch.float32), inv_freq_F)
    angles_SD = torch.cat((angles_SF, angles_SF), dim=-1)
    return angles_SD.cos(), angles_SD.sin()


def apply_rotary(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate query/key vectors by their position (computed in fp32, returned in x's dtype)."""
    x = x_BNSD.float()
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos_SD + rotated * sin_SD).to(x_BNSD.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False, dtype=dtype)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        gate_BSF, up_BSF = self.gate_up(x_BSH).chunk(2, dim=-1)
        return self.down(F.silu(gate_BSF) * up_BSF)


def attention_mask(key_mask_B11S: torch.Tensor | None, seq: int, causal: bool,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) [B|1, 1, S, S]: key padding, causal if asked, self always.

    Masked scores are -inf, so they add exact zeros to the softmax and to the weighted sum: with a
    causal mask, changing tokens after t leaves token t's output bit-identical.
    """
    if not causal:
        return key_mask_B11S
    allowed_SS = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if key_mask_B11S is None:
        return allowed_SS[None, None]
    diagonal_SS = torch.eye(seq, dtype=torch.bool, device=device)
    return (key_mask_B11S & allowed_SS) | diagonal_SS


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal or bidirectional, optional RoPE, key padding mask."""

    def __init__(self, hidden_size: int, num_heads: int, use_positions: bool, rope_base: float,
                 dtype: torch.dtype, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.use_positions = use_positions
        self.rope_base = rope_base
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False, dtype=dtype)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x_BSH: torch.Tensor, key_mask_B11S: torch.Tensor | None) -> torch.Tensor:
        batch, seq, hidden = x_BSH.shape
        qkv_BS3ND = self.qkv(x_BSH).view(batch, seq, 3, self.num_heads, self.head_dim)
        q_BNSD, k_BNSD, v_BNSD = qkv_BS3ND.permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_positions:
            cos_SD, sin_SD = rotary_cos_sin(seq, self.head_dim, self.rope_base, x_BSH.device)
            q_BNSD = apply_rotary(q_BNSD, cos_SD, sin_SD)
            k_BNSD = apply_rotary(k_BNSD, cos_SD, sin_SD)
        mask_B1SS = attention_mask(key_mask_B11S, seq, self.causal, x_BSH.device)
        attended_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, attn_mask=mask_B1SS)
        return self.out(attended_BNSD.transpose(1, 2).reshape(batch, seq, hidden))
