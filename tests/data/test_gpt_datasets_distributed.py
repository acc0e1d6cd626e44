"""GPTDatasets in a 2-process gloo group: rank 0 builds the index cache, rank 1 loads it, and
both ranks (and a process without torch.distributed) see identical samples."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_grouter.data.corpus import iter_documents
from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.indexed import write_indexed_dataset
from megatron_grouter.data.tokenizer import load_tokenizer, train_byte_level_bpe
from tests.data.small_corpus import many_documents, write_text_directory

SEQ_LENGTH = 24
NUM_SAMPLES = (60, 12, 0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def all_samples(prefix: str, tokenizer_dir: str, cache_dir: str) -> dict[str, torch.Tensor]:
    """Every train and valid sample's tokens, labels and loss mask, stacked."""
    train, valid, _ = build_gpt_datasets(prefix, load_tokenizer(tokenizer_dir), seq_length=SEQ_LENGTH,
                                         seed=11, split="85,15,0", num_samples=NUM_SAMPLES,
                                         cache_dir=cache_dir)
    result = {}
    for name, dataset in (("train", train), ("valid", valid)):
        samples = [dataset[index] for index in range(len(dataset))]
        for field in ("tokens", "labels", "loss_mask"):
            result[f"{name}.{field}"] = torch.stack([sample[field] for sample in samples])
    return result


def build_on_rank(rank: int, port: int, prefix: str, tokenizer_dir: str, cache_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        samples = all_samples(prefix, tokenizer_dir, cache_dir)
        torch.save(samples, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_build_identical_datasets(tmp_path):
    texts = many_documents(60)
    tokenizer = train_byte_level_bpe(texts, vocab_size=300, out_dir=tmp_path / "tokenizer")
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(iter_documents(str(write_text_directory(tmp_path / "text", texts))), tokenizer,
                          prefix, progress=False)
    cache_dir = tmp_path / "cache"
    # fork: the ranks inherit the imported megatron-core (importing it again costs ~10 s per rank).
    mp.start_processes(build_on_rank, args=(free_port(), prefix, str(tokenizer.path.parent), str(cache_dir),
                                            str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["train.tokens"].shape[0] >= NUM_SAMPLES[0] and rank0["train.tokens"].shape[1] == SEQ_LENGTH
    assert rank0["valid.tokens"].shape[0] >= NUM_SAMPLES[1]
    assert torch.equal(rank0["train.tokens"][:, 1:], rank0["train.labels"][:, :-1])
    # One index cache per split, written once (by rank 0) and read by rank 1.
    assert len(list(Path(cache_dir).glob("*-GPTDataset-train-sample_index.npy"))) == 1
    single_process = all_samples(prefix, str(tokenizer.path.parent), str(cache_dir))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        assert torch.equal(value, single_process[key]), key
