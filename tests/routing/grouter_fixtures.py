"""A small corpus and a small random Grouter over the default corpus's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_grouter.data.default_corpus import prepare_corpus
from megatron_grouter.data.tokenizer import load_tokenizer
from megatron_grouter.grouter.checkpoint import save_grouter
from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.network import Grouter

NUM_EXPERTS, TOPK, WINDOW = 8, 2, 64


def small_corpus(stdlib_data: dict, out_dir: Path, documents: int = 40) -> dict:
    """The first `documents` stdlib files, tokenised with the default corpus's tokenizer."""
    paths = prepare_corpus("stdlib", str(out_dir), tokenizer=stdlib_data["tokenizer"],
                           max_documents=documents, progress=False)
    return {"prefix": str(paths.prefix), "tokenizer": stdlib_data["tokenizer"], "out_dir": str(out_dir)}


def random_grouter(tokenizer_path: str, out_dir: Path, seed: int = 0, num_experts: int = NUM_EXPERTS,
                   causal: bool = True) -> Path:
    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    grouter = Grouter(GrouterConfig(vocab_size=tokenizer.vocab_size, num_experts=num_experts, topk=TOPK,
                                    hidden_size=32, num_layers=1, num_heads=4, max_seq_length=WINDOW,
                                    causal=causal))
    with torch.no_grad():  # decisive routing, as a distilled Grouter's
        grouter.score.weight.mul_(50)
    save_grouter(grouter, out_dir, provenance={"source_model": "random (test)"},
                 tokenizer_fingerprint=tokenizer.fingerprint())
    return out_dir


def predispatched_corpus(stdlib_data: dict, root: Path, documents: int = 40) -> dict:
    """A small corpus, a random Grouter over it and its routing cache (mg-predispatch)."""
    from megatron_grouter.offline.predispatch import predispatch
    from tests.offline.distill_runs import compose_tool

    data = small_corpus(stdlib_data, root / "corpus", documents=documents)
    grouter = random_grouter(data["tokenizer"], root / "grouter")
    cache = root / "cache"
    stats = predispatch(compose_tool("predispatch", [
        f"grouter={grouter}", f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
        f"cache={cache}", "chunk_windows=16"]))
    return {"data": data, "grouter": grouter, "cache": cache, "stats": stats, "root": root}
