"""Reading one corpus file in the format it ships in: text, JSON lines (or a JSON array),
parquet, Arrow IPC, and a Hugging Face `datasets` directory (save_to_disk); any of the text and
JSON files may be gzip / zstd / bz2 / xz compressed.

Why sniff instead of trusting the suffix alone: C4 ships `.json.gz` and `.json` that are JSON
lines, and a gzip stream tokenised as text is a garbage dataset that trains without a word. So
compression is recognised by its magic bytes (gzip, zstd, xz) or suffix (bz2), and the format
by the suffix left once the compression suffix is removed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from megatron_grouter.errors import UserError

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd",
                        ".bz2": "bz2", ".xz": "xz"}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))
SNIFF_BYTES = 8192
FIRST_LINE_LIMIT = 1 << 28  # the longest first JSON-lines record read to decide a file's format
ARROW_BATCH_ROWS = 1024
# A file whose first block has a NUL byte, or more than this share of control bytes, is binary.
BINARY_CONTROL_SHARE = 0.1
CONTROL_BYTES = [*range(1, 9), *range(14, 27), *range(28, 32)]  # not \t \n \v \f \r ESC


@dataclass
class Source:
    """One readable unit of a corpus: a file (or an HF dataset directory) and how to read it."""

    path: Path
    name: str  # what documents are named after (relative to the corpus root)
    kind: str  # text | json | parquet | arrow | hf
    compression: str | None = None
    files: tuple[Path, ...] = ()  # kind hf: its arrow shards, in row order


class SkipFile(Exception):
    """A file found in a directory that is not read; the message is the reason (reported)."""


def detect_compression(path: Path) -> str | None:
    """gzip / zstd / xz by magic bytes, bz2 by suffix, else None."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if path.suffix.lower() == ".bz2" and head.startswith(b"BZh"):
        return "bz2"
    return None


def inner_suffix(path: Path, compression: str | None) -> str:
    """The suffix that names the format: 'c4.json.gz' → '.json'."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if compression and suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def open_bytes(path: Path, compression: str | None) -> IO[bytes]:
    """A binary stream of the file's content, decompressed."""
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise SkipFile("zstd-compressed but the zstandard package is missing (pip install zstandard)") from None
    raw = open(path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def _decompression_failed(path: Path, compression: str, error: Exception) -> UserError:
    return UserError(f"{path} is a damaged or truncated {compression} file ({type(error).__name__}: "
                     f"{str(error).splitlines()[0] if str(error) else 'no detail'}); re-download it")


def read_all(path: Path, compression: str | None) -> bytes:
    try:
        with open_bytes(path, compression) as stream:
            return stream.read()
    except DECOMPRESSION_ERRORS as error:
        if compression is None:
            raise
        raise _decompression_failed(path, compression, error) from None


def head_bytes(path: Path, compression: str | None) -> bytes:
    """The first SNIFF_BYTES of the decompressed content."""
    try:
        with open_bytes(path, compression) as stream:
            return stream.read(SNIFF_BYTES)
    except DECOMPRESSION_ERRORS as error:
        if compression is None:
            raise
        raise _decompression_failed(path, compression, error) from None


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or many control bytes. (Undecodable bytes alone are no sign: Latin-1 text.)"""
    if b"\x00" in head:
        return True
    control = sum(head.count(bytes([code])) for code in CONTROL_BYTES)
    return bool(head) and control / len(head) > BINARY_CONTROL_SHARE


def first_line(path: Path, compression: str | None, limit: int = FIRST_LINE_LIMIT) -> bytes:
    """The first non-empty line of the decompressed content, read to its end however long it is
    (a JSON-lines record can be far longer than the sniffed head), up to `limit` bytes."""
    try:
        with open_bytes(path, compression) as stream:
            line = b""
            while len(line) < limit:
                block = stream.readline(min(SNIFF_BYTES * 128, limit - len(line)))
                if not block:
                    break
                line += block
                if line.endswith(b"\n"):
                    if line.strip():
                        break
                    line = b""
            return line
    except DECOMPRESSION_ERRORS as error:
        if compression is None:
            raise
        raise _decompression_failed(path, compression, error) from None


def first_json_record(head: bytes):
    """The first JSON-lines record in `head` (None when the first non-empty line is not JSON)."""
    for line in head.splitlines():
        if line.strip():
            try:
                return json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                return None
    return None


def is_hf_dataset_dir(directory: Path) -> bool:
    """A `datasets` save_to_disk directory: a Dataset (state.json) or a DatasetDict."""
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def hf_dataset_sources(directory: Path, name: str) -> tuple[list[Source], list[tuple[str, str]]]:
    """The Dataset in `directory` (its shards in order), or the 'train' split of a DatasetDict;
    returns (sources, skipped splits with the reason)."""
    dict_file = directory / "dataset_dict.json"
    if dict_file.is_file() and not (directory / "state.json").is_file():
        try:
            splits = list(json.loads(dict_file.read_text())["splits"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{dict_file} is not a datasets DatasetDict index; re-save the dataset") from None
        if "train" not in splits:
            raise UserError(f"{directory} is a DatasetDict without a 'train' split (splits: "
                            f"{', '.join(splits)}); give the split's directory, e.g. {directory / splits[0]}")
        sources, _ = hf_dataset_sources(directory / "train", f"{name}/train" if name else "train")
        skipped = [(f"{name}/{split}" if name else split, "another split than 'train' of a DatasetDict "
                    "(give its directory to read it)") for split in splits if split != "train"]
        return sources, skipped
    state_file = directory / "state.json"
    try:
        files = [entry["filename"] for entry in json.loads(state_file.read_text())["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{state_file} is not a datasets state file (no _data_files); re-save the "
                        "dataset with save_to_disk") from None
    paths = tuple(directory / file for file in files)
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"datasets directory {directory} lists {missing[0]}, which is missing; copy the "
                        "whole directory or re-save it")
    return [Source(directory, name or directory.name, "hf", files=paths)], []


# ---------------------------------------------------------------------------- readers
def iter_json_records(source: Source, text_field: str) -> Iterator[tuple[str, str, int]]:
    """(name, text, replaced characters) of each record of a JSON-lines (or JSON array) file."""
    from megatron_grouter.data.corpus import decode

    try:
        with open_bytes(source.path, source.compression) as stream:
            first = stream.peek(1)[:1] if hasattr(stream, "peek") else b""
            while first in (b" ", b"\n", b"\r", b"\t"):
                stream.read(1)
                first = stream.peek(1)[:1]
            if first == b"[":
                text, replaced = decode(stream.read())
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as error:
                    raise UserError(f"{source.path} is not valid JSON ({error.msg} at line {error.lineno}); "
                                    "fix it or write it as JSON lines") from None
                if not isinstance(records, list):
                    records = [records]
                for number, record in enumerate(records, start=1):
                    name, value = _record_text(source, number, record, text_field)
                    yield name, value, replaced if number == 1 else 0
                return
            for line_number, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                line, replaced = decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{source.path}:{line_number} is not valid JSON ({error.msg}); "
                                    "JSON lines hold one record per line: fix or drop the line") from None
                name, value = _record_text(source, line_number, record, text_field)
                yield name, value, replaced
    except DECOMPRESSION_ERRORS as error:
        if source.compression is None:
            raise
        raise _decompression_failed(source.path, source.compression, error) from None


def _record_text(source: Source, number: int, record, text_field: str) -> tuple[str, str]:
    where = f"{source.path}:{number}"
    if not isinstance(record, dict) or text_field not in record:
        fields = f" (fields: {', '.join(list(record)[:8])})" if isinstance(record, dict) else ""
        raise UserError(f"{where} has no {text_field!r} field{fields}; set the text field "
                        "(--text-field / data.text_field)")
    value = record[text_field]
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where} field {text_field!r} is {type(value).__name__}, not a string; fix the "
                        "record or choose another text field")
    return f"{source.name}:{number}", value


def _text_column(batch, source_path: Path, text_field: str):
    import pyarrow as pa

    names = batch.schema.names
    if text_field not in names:
        raise UserError(f"{source_path} has no column {text_field!r} (columns: {', '.join(names[:8])}); "
                        "set the text field (--text-field / data.text_field)")
    column = batch.column(names.index(text_field))
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or getattr(pa.types, "is_string_view", lambda _: False)(column.type)):
        raise UserError(f"{source_path} column {text_field!r} is {column.type}, not text; choose "
                        "another text field")
    return column


def _iter_arrow_batches(path: Path) -> Iterator:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path} cannot be opened ({error}); check the file") from None
    with source:
        try:
            reader = pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file_reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as error:
                raise UserError(f"{path} is not an Arrow IPC stream or file ({error}); re-export it") from None
            batches = (file_reader.get_batch(index) for index in range(file_reader.num_record_batches))
        yield from batches


def iter_columnar_records(source: Source, text_field: str) -> Iterator[tuple[str, str, int]]:
    """(name, text, 0) of each row of a parquet file, an Arrow file or an HF dataset's shards."""
    import pyarrow as pa

    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(str(source.path))
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{source.path} is not a readable parquet file ({error}); re-download it") from None
        schema_names = parquet.schema_arrow.names
        if text_field not in schema_names:
            raise UserError(f"{source.path} has no column {text_field!r} (columns: "
                            f"{', '.join(schema_names[:8])}); set the text field (--text-field / data.text_field)")
        batches = [parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[text_field])]
    else:
        batches = [_iter_arrow_batches(path) for path in (source.files or (source.path,))]
    row = 0
    for shard in batches:
        try:
            for batch in shard:
                for text in _text_column(batch, source.path, text_field).to_pylist():
                    row += 1
                    yield f"{source.name}:{row}", text or "", 0
        except (pa.ArrowInvalid, OSError) as error:
            raise UserError(f"{source.path} is damaged near row {row + 1} ({error}); re-download it") from None
