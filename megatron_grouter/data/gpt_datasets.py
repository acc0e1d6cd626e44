"""GPTDatasets (train/valid/test) through megatron-core's BlendedMegatronDatasetBuilder.

megatron splits by *document*; each stdlib file is one document, so validation is held out by
file, never by offset inside a file.

Works with and without torch.distributed: when a process group exists, megatron builds the
sample/shuffle index cache on rank 0, waits at a barrier, and the other ranks load it (the cache
directory must be shared by all ranks); every rank returns its own datasets.
"""

from __future__ import annotations

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_grouter.data.indexed import check_dataset_tokenizer
from megatron_grouter.data.tokenizer import Tokenizer
from megatron_grouter.errors import UserError


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """What GPTDataset asks of a tokenizer: vocab size, EOD id, pad id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Part of the hash that names GPTDataset's index cache files.
        self.unique_identifiers = {"class": "megatron_grouter.Tokenizer", **tokenizer.fingerprint()}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self.tokenizer.eod_id

    @property
    def pad(self) -> int:
        return -1  # GPTDataset pads with this id and masks it out of the loss

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # Declared abstract by MegatronTokenizerBase; GPTDataset never calls them.
    @property
    def vocab(self):
        return self.tokenizer.backend.get_vocab()

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are not used for pretraining data")


def _check_request(seq_length: int, split: str, num_samples: tuple[int, int, int]) -> None:
    if seq_length < 1:
        raise UserError(f"seq_length={seq_length}; use a positive sequence length")
    if len(num_samples) != 3 or any(int(count) < 0 for count in num_samples):
        raise UserError(f"num_samples={num_samples}; give three non-negative counts (train, valid, test)")
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise UserError(f"split {split!r} is not like '98,1,1' (train, valid, test weights by document)")


def build_gpt_datasets(prefix: str, tokenizer: Tokenizer, seq_length: int, seed: int, split: str,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None):
    """(train, valid, test) GPTDatasets over the indexed dataset `prefix`; a split with weight 0
    gives None. Documents are assigned to splits whole (see the module docstring). Each sample is
    a dict of tensors: tokens and labels (tokens shifted by one), loss_mask, position_ids.
    `cache_dir` holds megatron's index cache (default: {prefix}/cache)."""
    _check_request(seq_length, split, num_samples)
    check_dataset_tokenizer(prefix, tokenizer)
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=([prefix], None),
                              split=split, path_to_cache=cache_dir,
                              tokenizer=MegatronTokenizerAdapter(tokenizer),
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False,
                              mmap_bin_files=True)
    sizes = [max(0, int(count)) for count in num_samples]
    _check_splits_have_documents(prefix, config)
    # Every rank gets its datasets; megatron's builder writes the index cache on rank 0 first
    # and lets the other ranks load it after a barrier.
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _check_splits_have_documents(prefix: str, config: GPTDatasetConfig) -> None:
    """megatron loops forever building samples from a split without documents; refuse instead."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    documents = len(_IndexReader(prefix + ".idx", multimodal=False).sequence_lengths)
    for name, bounds in zip(("train", "valid", "test"), config.split_matrix):
        if bounds is None:
            continue
        begin, end = bounds
        if int(round(end * documents)) - int(round(begin * documents)) < 1:
            raise UserError(f"data.split={config.split} leaves the {name} split no document of the "
                            f"{documents} in {prefix}; use a larger corpus or a larger {name} share")
