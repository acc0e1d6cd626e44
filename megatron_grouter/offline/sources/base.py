"""The teacher-source interface used by Grouter distillation.

A teacher source turns token ids into the raw router logits of one MoE layer of some source model.
The distillation loop only needs those logits (plus the vocabulary and tokenizer that produced the
ids), so every kind of source (a Hugging Face checkpoint loaded partially, our own Megatron
checkpoints, ...) sits behind this one small interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from megatron_grouter.errors import UserError


class TeacherSource(ABC):
    """Raw router logits of one MoE layer of a source model.

    Attributes every implementation sets:
        num_experts: experts E of the chosen MoE layer (last dimension of the logits).
        topk: experts the source routes each token to.
        vocab_size: token ids must lie in [0, vocab_size).
        tokenizer_dir: directory holding the source's tokenizer (tokenizer.json), or None.
        description: provenance (model path, model type, layer index, score function, ...),
            plain JSON-serialisable values only.
    """

    num_experts: int
    topk: int
    vocab_size: int
    tokenizer_dir: str | None
    description: dict[str, Any]

    @abstractmethod
    def router_logits(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the chosen layer's raw router logits (pre-softmax / pre-sigmoid), float32 [B, S, E].

        Runs under torch.no_grad(). `attention_mask_BS` (1 = real token, 0 = padding) follows the
        Hugging Face convention; None means every position is a real token.
        """


def check_token_batch(
    input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None, vocab_size: int
) -> None:
    """Raise UserError unless the ids are an integer [B, S] batch inside the vocabulary."""
    if not isinstance(input_ids_BS, torch.Tensor) or input_ids_BS.dim() != 2:
        raise UserError("input_ids must be a 2-D [batch, seq] tensor of token ids; add a batch dimension")
    if input_ids_BS.dtype.is_floating_point or input_ids_BS.dtype == torch.bool:
        raise UserError(
            f"input_ids must be an integer tensor, got {input_ids_BS.dtype}; pass token ids, not embeddings"
        )
    if input_ids_BS.numel() == 0:
        raise UserError("input_ids is empty; pass at least one token")
    low, high = int(input_ids_BS.min()), int(input_ids_BS.max())
    if low < 0 or high >= vocab_size:
        raise UserError(
            f"token ids span [{low}, {high}] but the teacher vocabulary is [0, {vocab_size}); "
            "tokenize with the teacher's own tokenizer (tokenizer_dir)"
        )
    if attention_mask_BS is not None and tuple(attention_mask_BS.shape) != tuple(input_ids_BS.shape):
        raise UserError(
            f"attention_mask has shape {tuple(attention_mask_BS.shape)} but input_ids has "
            f"{tuple(input_ids_BS.shape)}; they must match"
        )
