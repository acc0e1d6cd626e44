"""The train app's data: preprocess the corpus once (rank 0), then build GPTDatasets everywhere."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_grouter.data.gpt_datasets import build_gpt_datasets
from megatron_grouter.data.indexed import check_dataset_tokenizer
from megatron_grouter.data.integrity import verify_dataset
from megatron_grouter.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grouter.errors import UserError
from megatron_grouter.runtime.distributed import ParallelLayout
from megatron_grouter.training.config import DataConfig, RootConfig
from megatron_grouter.training.model import padded_vocab_size

log = logging.getLogger("megatron_grouter")


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    prefix: str
    train: object
    valid: object
    model_vocab_size: int


def resolve_dataset(data: DataConfig) -> tuple[str, str]:
    """(indexed dataset prefix, tokenizer path), preprocessing the corpus if needed."""
    if data.prefix is not None:
        if data.tokenizer is None:
            raise UserError("data.prefix is set but data.tokenizer is not; point data.tokenizer at "
                            "the tokenizer the dataset was made with")
        return data.prefix, data.tokenizer
    from megatron_grouter.data.default_corpus import prepare_corpus

    paths = prepare_corpus(corpus=data.corpus, out_dir=data.out_dir, vocab_size=data.vocab_size,
                           tokenizer=data.tokenizer, max_documents=data.max_documents,
                           jsonl_key=data.text_field, suffixes=data.suffixes)
    return str(paths.prefix), str(paths.tokenizer_dir)


def prepare_datasets(root: RootConfig, layout: ParallelLayout) -> TrainingData:
    data, train = root.data, root.train
    if layout.is_main:
        prefix, tokenizer_path = resolve_dataset(data)
        # Once, on one rank: a damaged .bin or ids outside the vocabulary stop here, in one line.
        verify_dataset(prefix, load_tokenizer(tokenizer_path))
        shared = [prefix, tokenizer_path]
    else:
        shared = [None, None]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    prefix, tokenizer_path = shared
    # Record what was resolved, so checkpoints (and teachers built from them) know the data.
    data.prefix, data.tokenizer = prefix, tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path)
    check_dataset_tokenizer(prefix, tokenizer)
    if data.eval_split not in ("valid", "test"):
        raise UserError(f"data.eval_split={data.eval_split!r}; use valid (the selection split) or test")
    eval_samples = max(1, train.eval_iters) * train.global_batch_size
    on_test = data.eval_split == "test"
    num_samples = (train.steps * train.global_batch_size, 0 if on_test else eval_samples,
                   eval_samples if on_test else 0)
    train_ds, valid_ds, test_ds = build_gpt_datasets(
        prefix, tokenizer, seq_length=train.seq_length, seed=train.seed, split=data.split,
        num_samples=num_samples, cache_dir=str(Path(data.out_dir) / "index_cache"))
    if on_test:
        if test_ds is None:
            raise UserError(f"data.eval_split=test but data.split={data.split!r} gives the test split no "
                            "documents; give it a weight (e.g. 96,2,2)")
        valid_ds = test_ds  # validation loss is measured on the test documents
    model_vocab = root.model.vocab_size or padded_vocab_size(tokenizer.vocab_size)
    log.info("data: %s (%d train / %d valid samples of %d tokens), tokenizer vocab %d -> model vocab %d",
             prefix, len(train_ds), len(valid_ds), train.seq_length, tokenizer.vocab_size, model_vocab)
    return TrainingData(tokenizer, prefix, train_ds, valid_ds, model_vocab)
