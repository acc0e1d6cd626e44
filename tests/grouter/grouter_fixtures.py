"""Small Grouters and tokenizer fingerprints shared by the Grouter tests."""

from __future__ import annotations

import torch

from megatron_grouter.grouter import Grouter, GrouterConfig

VOCAB = 97
TOKENIZER = {"vocab_size": VOCAB, "sha256": "ab" * 32}


def tiny_config(**overrides) -> GrouterConfig:
    values = dict(vocab_size=VOCAB, num_experts=12, topk=3, hidden_size=32, num_layers=2, num_heads=4,
                  max_seq_length=64)
    values.update(overrides)
    return GrouterConfig(**values)


def tiny_grouter(seed: int = 0, **overrides) -> Grouter:
    torch.manual_seed(seed)
    return Grouter(tiny_config(**overrides)).eval()


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)
