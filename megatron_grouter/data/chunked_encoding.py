"""Tokenising with bounded memory: long documents are encoded in pieces, ids kept as int32.

The `tokenizers` backend holds a whole Encoding per text (ids, offsets, token strings, masks:
about a hundred bytes per token), and a Python list of ids costs ~36 bytes per token more. A 50 MB
single-line document then peaks at gigabytes. Here a text longer than PIECE_CHARS is cut into
pieces, each encoded on its own and turned into an int32 array at once, and no more than
BATCH_CHARS of text is in the backend at a time: memory stays a few times the text.

A cut is placed where the byte-level pre-tokenizer splits anyway (before a single space between
two non-space characters: the space starts the next word), so the ids equal those of the whole
text. A piece without such a place (no spaces for PIECE_CHARS) is cut at its length.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 18


def _cut_before(text: str, end: int, start: int) -> int:
    """The largest cut position in (start, end] before which the pre-tokenizer splits anyway."""
    position = end
    while position > start + 1:
        position = text.rfind(" ", start + 1, position)
        if position <= start + 1:
            break
        following = text[position + 1:position + 2]
        if not text[position - 1].isspace() and following and not following.isspace():
            return position
    return end


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `piece_chars` characters, cut at word starts."""
    start = 0
    while len(text) - start > piece_chars:
        cut = _cut_before(text, start + piece_chars, start)
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_arrays(tokenizer, texts: list[str], piece_chars: int = PIECE_CHARS,
                  batch_chars: int = BATCH_CHARS) -> list[np.ndarray]:
    """int32 token ids of each text (no special tokens), encoding at most `batch_chars` of text
    at a time."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    pending: list[tuple[int, str]] = []
    pending_chars = 0

    def flush() -> None:
        nonlocal pending_chars
        if pending:
            encodings = tokenizer.backend.encode_batch([piece for _, piece in pending], add_special_tokens=False)
            for (owner, _), encoding in zip(pending, encodings):
                parts[owner].append(np.asarray(encoding.ids, dtype=np.int32))
            pending.clear()
            pending_chars = 0

    for owner, text in enumerate(texts):
        for piece in text_pieces(text, piece_chars):
            pending.append((owner, piece))
            pending_chars += len(piece)
            if pending_chars >= batch_chars:
                flush()
    flush()
    return [np.concatenate(pieces) if len(pieces) > 1 else
            (pieces[0] if pieces else np.zeros(0, dtype=np.int32)) for pieces in parts]
