"""A tokenizer and indexed dataset small enough to make in a second (no stdlib corpus needed)."""

from __future__ import annotations

from pathlib import Path

SNIPPETS = ["def add(a, b):\n    return a + b\n", "Grüße, 世界 — naïve café ☕", "class Foo:\n    pass\n",
            "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]


def tiny_dataset(directory: Path, documents: int = 40, vocab_size: int = 400) -> dict:
    """{prefix, tokenizer, out_dir} of `documents` short documents with a byte-level BPE."""
    from megatron_grouter.data.corpus import Document
    from megatron_grouter.data.indexed import write_indexed_dataset
    from megatron_grouter.data.tokenizer import train_byte_level_bpe

    directory = Path(directory)
    texts = [f"# document {index}\n" + SNIPPETS[index % len(SNIPPETS)] * (3 + index % 7)
             for index in range(documents)]
    tokenizer = train_byte_level_bpe(texts, vocab_size=vocab_size, out_dir=directory / "tokenizer")
    prefix = str(directory / "tiny_text_document")
    write_indexed_dataset((Document(str(index), text) for index, text in enumerate(texts)), tokenizer,
                          prefix, progress=False)
    return {"prefix": prefix, "tokenizer": str(directory / "tokenizer"), "out_dir": str(directory)}


# A model that builds and takes a step in about a second on one core.
TINY_MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
              "model.ffn_hidden_size=64", "model.num_experts=4", "model.moe_ffn_hidden_size=32",
              "model.topk=2", "train.seq_length=32", "train.micro_batch_size=2",
              "train.global_batch_size=2", "train.eval_iters=1", "train.log_interval=1",
              "train.warmup_steps=0", "data.split='80,10,10'"]
