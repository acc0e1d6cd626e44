"""Which tokens of the indexed dataset a GPTDataset sample is made of.

GPTDataset packs documents into samples of seq_length+1 tokens through its shuffle, sample and
document indices. Routing that was computed per *document* (the routing cache, and the online
Grouter, which routes document-aligned windows) is looked up here by the global position of each
token in the .bin file — so it stays valid when the sequence length or the sample order changes.
"""

from __future__ import annotations

import numpy as np

PAD = -1  # position of a padding token (no routing: padding is masked out of the loss)


def _indices(gpt_dataset):
    if gpt_dataset.shuffle_index is None:
        gpt_dataset._query_document_sample_shuffle_indices(0)  # loads the memory-mapped indices
    return gpt_dataset.shuffle_index, gpt_dataset.sample_index, gpt_dataset.document_index


def sample_spans(gpt_dataset, index: int) -> list[tuple[int, int, int]]:
    """(sequence id, offset, length) of each document piece of sample `index`, in order."""
    shuffle_index, sample_index, document_index = _indices(gpt_dataset)
    extra = int(gpt_dataset.config.add_extra_token_to_sequence)
    lengths = gpt_dataset.dataset.index.sequence_lengths
    row = shuffle_index[index]
    (first, first_offset), (last, last_offset) = sample_index[row], sample_index[row + 1]
    spans = []
    for position in range(int(first), int(last) + 1):
        sequence = int(document_index[position])
        offset = int(first_offset) if position == first else 0
        end = int(last_offset) + extra if position == last else int(lengths[sequence])
        spans.append((sequence, offset, min(end, int(lengths[sequence])) - offset))
    return spans


def sample_token_positions(gpt_dataset, index: int) -> np.ndarray:
    """Global token positions (element offsets into the .bin) of the seq_length+1 tokens of
    sample `index`; PAD where GPTDataset padded."""
    index_file = gpt_dataset.dataset.index
    item_size = index_file.dtype_size
    pieces = [int(index_file.sequence_pointers[sequence]) // item_size + offset + np.arange(length)
              for sequence, offset, length in sample_spans(gpt_dataset, index) if length > 0]
    positions = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    wanted = gpt_dataset.config.sequence_length + int(gpt_dataset.config.add_extra_token_to_sequence)
    if positions.size < wanted:
        positions = np.concatenate([positions, np.full(wanted - positions.size, PAD)])
    return positions[:wanted].astype(np.int64)


def input_token_positions(gpt_dataset, sample_ids) -> np.ndarray:
    """[B, seq_length] positions of the *input* tokens (tokens = text[:-1]) of several samples."""
    rows = [sample_token_positions(gpt_dataset, int(index)) for index in sample_ids]
    return np.stack(rows)[:, :gpt_dataset.config.sequence_length]
