"""Document-aligned windows: the unit in which the Grouter routes a corpus.

Each document of the indexed dataset is cut into windows of `window` tokens starting at its first
token; the Grouter sees one window at a time. Routing of a token therefore depends only on its
document and position — not on how GPTDataset packs samples — so the online Grouter and the
offline routing cache give bit-identical routing for any sequence length or sample order.
Causality: a causal Grouter routes token t from the tokens of its window up to t. A window may
start before the training sample that holds t (the sample was cut mid-document): those tokens are
the document's past, which a causal LM may use; nothing after t is read. A bidirectional Grouter
reads the whole window, later tokens included (see GrouterConfig.causal). Gate weights are rounded to bfloat16 in both paths (the cache's format).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_grouter.data.sample_tokens import PAD
from megatron_grouter.errors import UserError


class DocumentWindows:
    """Maps global token positions of an indexed dataset to (window start, index in window)."""

    def __init__(self, indexed_dataset, window: int):
        index = indexed_dataset.index
        self.window = window
        self.item_size = index.dtype_size
        self.starts_D = (np.asarray(index.sequence_pointers, dtype=np.int64) // self.item_size)
        self.lengths_D = np.asarray(index.sequence_lengths, dtype=np.int64)
        self.tokens = np.memmap(indexed_dataset.path_prefix + ".bin", dtype=index.dtype, mode="r")
        self.num_tokens = int(self.tokens.shape[0])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each position: its window's start position, the window's length, index within it."""
        document = np.searchsorted(self.starts_D, positions, side="right") - 1
        offset = positions - self.starts_D[document]
        window_start = self.starts_D[document] + (offset // self.window) * self.window
        document_end = self.starts_D[document] + self.lengths_D[document]
        window_length = np.minimum(self.window, document_end - window_start)
        return window_start, window_length, offset % self.window

    def all_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Start positions and lengths of every window of the corpus, in file order."""
        counts = -(-self.lengths_D // self.window)
        document = np.repeat(np.arange(len(self.starts_D)), counts)
        first = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum())) - np.repeat(first, counts)
        starts = self.starts_D[document] + within * self.window
        lengths = np.minimum(self.window, self.starts_D[document] + self.lengths_D[document] - starts)
        return starts, lengths


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array → device without blocking the host (page-locked on CUDA)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def route_windows(grouter, windows: DocumentWindows, starts: np.ndarray, lengths: np.ndarray,
                  device: torch.device, to_host: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Route windows: [n, window, k] expert ids (int64) and bf16-rounded weights (float32), on the
    host, or left on `device` (`to_host=False`: no device→host sync)."""
    count, width = len(starts), windows.window
    tokens_NW = np.zeros((count, width), dtype=np.int64)
    mask_NW = np.zeros((count, width), dtype=bool)
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        tokens_NW[row, :length] = windows.tokens[start:start + length]
        mask_NW[row, :length] = True
    high = int(tokens_NW.max(initial=0))
    if high >= grouter.config.vocab_size:  # checked on the host, before the upload
        raise UserError(f"token ids reach {high} but the Grouter's vocab_size is {grouter.config.vocab_size}; "
                        "tokenize with the Grouter's tokenizer")
    checks, grouter.check_token_ids = grouter.check_token_ids, False
    try:
        indices_NWK, weights_NWK = grouter.route(_to_device(tokens_NW, device), _to_device(mask_NW, device))
    finally:
        grouter.check_token_ids = checks
    indices_NWK, weights_NWK = indices_NWK.long(), weights_NWK.to(torch.bfloat16).float()
    return (indices_NWK.cpu(), weights_NWK.cpu()) if to_host else (indices_NWK, weights_NWK)


class OnlineGrouterRouting:
    """Routes the windows that a micro-batch's tokens lie in, then gathers the tokens' rows."""

    def __init__(self, grouter, windows: DocumentWindows, device: torch.device):
        self.grouter = grouter
        self.windows = windows
        self.device = device

    def route_positions(self, positions_BS: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flat = positions_BS.reshape(-1)
        valid = flat != PAD
        window_start, window_length, within = self.windows.locate(np.where(valid, flat, 0))
        unique_starts, inverse = np.unique(window_start, return_inverse=True)
        lengths = np.zeros(len(unique_starts), dtype=np.int64)
        lengths[inverse] = window_length
        # the tokens' rows stay on the device: the routing goes to the layers from there
        indices_NWK, weights_NWK = route_windows(self.grouter, self.windows, unique_starts, lengths,
                                                 self.device, to_host=False)
        inverse_t, within_t = _to_device(inverse, self.device), _to_device(within, self.device)
        indices_TK, weights_TK = indices_NWK[inverse_t, within_t], weights_NWK[inverse_t, within_t]
        shape = (*positions_BS.shape, indices_TK.shape[-1])
        return indices_TK.reshape(shape), weights_TK.reshape(shape)
