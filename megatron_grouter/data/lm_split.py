"""Which documents of an indexed dataset mg-train's language model trains on.

megatron's GPTDataset builder gives train, valid and test contiguous ranges of the document
(sequence) index in proportion to the split weights (data.split, e.g. "96,2,2"). The offline tools
that learn from the corpus — Grouter distillation and tuning, the hash baseline's token counts —
keep to the train range, so nothing they learn comes from the documents the LM is evaluated on.
The ranges are computed with megatron's own split parsing, so they match the LM's exactly.
"""

from __future__ import annotations

import re

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                    parse_and_normalize_split)

from megatron_grouter.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")


def split_ranges(num_documents: int, split: str) -> dict[str, tuple[int, int]]:
    """{name: (first document, end)} of each split megatron builds from `split` (empty ranges kept)."""
    try:
        if sum(float(part) for part in re.findall(r"[.0-9]+", str(split))) <= 0:
            raise ValueError(split)
        weights = parse_and_normalize_split(str(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        weights = None
    if weights is None or len(weights) != 3 or not all(np.isfinite(weights)):
        raise UserError(f"split {split!r} is not like '96,2,2' (train, valid, test weights by document)")
    ranges = {}
    for name, bounds in zip(SPLIT_NAMES, convert_split_vector_to_split_matrix(weights)):
        if bounds is None:
            ranges[name] = (0, 0)
        else:
            ranges[name] = (int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents)))
    return ranges


def train_documents(num_documents: int, split: str | None) -> np.ndarray:
    """[D] bool: documents in the LM's train split (every document when `split` is None)."""
    keep = np.ones(num_documents, dtype=bool)
    if split is None:
        return keep
    keep[:] = False
    first, end = split_ranges(num_documents, split)["train"]
    keep[first:end] = True
    if not keep.any():
        raise UserError(f"split {split!r} leaves no training documents out of {num_documents}; give the train "
                        "split a weight")
    return keep
