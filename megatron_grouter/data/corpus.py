"""Text documents from a corpus: the built-in one (this Python's standard library), or files in
the formats corpora ship in (see corpus_formats.py): text, JSON lines / .json, gzip / zstd / bz2 /
xz compressed, parquet, Arrow, a Hugging Face `datasets` directory; given as one path, a
directory, a glob pattern, or a list of those.

A directory is read whole (every file, or only the suffixes the user names). Nothing is skipped
silently: what was not read, and why (hidden, binary, not a named suffix, another split), is
collected in `CorpusPlan.skipped` and logged as one line, because a corpus that quietly lost
half its files trains without complaint.

Bytes are decoded as UTF-8 with replacement (some stdlib test files are deliberately in other
encodings); the number of replaced characters is counted and reported.
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megatron_grouter.data.corpus_formats import (
    ARROW_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES, SkipFile, Source, detect_compression, first_json_record,
    first_line, head_bytes, hf_dataset_sources, inner_suffix, is_hf_dataset_dir, iter_columnar_records,
    iter_json_records, looks_binary, read_all)
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")

STDLIB = "stdlib"
THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}
GLOB_CHARACTERS = set("*?[")
SHOWN_PER_REASON = 3


@dataclass
class Document:
    """One document: its name (relative path, or file:line for records), text, and how many
    characters of it were undecodable bytes replaced by U+FFFD."""

    name: str
    text: str
    replaced_chars: int = 0


def decode(raw: bytes) -> tuple[str, int]:
    """(UTF-8 text of `raw` with undecodable bytes replaced, number of replacement characters added)."""
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD that was already in the file is not a replacement; count only the new ones.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    return text, max(0, replaced)


def stdlib_files() -> list[Path]:
    """This Python's standard-library .py files (no site-/dist-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Prune third-party packages before descending: they outnumber the stdlib several times.
        subdirectories[:] = [name for name in subdirectories if name not in THIRD_PARTY_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: str(path.relative_to(root)))


@dataclass
class CorpusPlan:
    """What a corpus resolves to: the sources read in order, what was not read and why, and
    files read in another way than their suffix suggests."""

    description: str
    sources: list[Source] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (name, how it was read)

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped))

    def summary(self) -> str:
        """One line: how many sources of which kind, and every skip reason with examples."""
        kinds = Counter(source.kind for source in self.sources)
        line = (f"corpus {self.description}: {len(self.sources)} source(s) read ("
                + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) + ")")
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: " + _by_reason(self.skipped)
        if self.notes:
            line += f"; read differently {len(self.notes)}: " + _by_reason(self.notes)
        return line.replace("\n", "\\n")


def _by_reason(entries: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in entries:
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{len(names)} {reason} ({', '.join(names[:SHOWN_PER_REASON])}"
                     f"{', …' if len(names) > SHOWN_PER_REASON else ''})" for reason, names in by_reason.items())


def _normalise_suffixes(suffixes: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if suffixes is None:
        return None
    if isinstance(suffixes, str):
        suffixes = [part for part in suffixes.replace(",", " ").split() if part]
    normalised = tuple(suffix.lower() if suffix.startswith(".") else f".{suffix.lower()}" for suffix in suffixes)
    if not normalised:
        raise UserError("the suffix list is empty; name suffixes like .pm,.pl or leave it unset to read every file")
    return normalised


def _classify(path: Path, name: str, text_field: str, strict: bool, plan: CorpusPlan) -> Source:
    """How to read one file. `strict` (a file the user named): a problem is a UserError;
    otherwise (found in a directory) it raises SkipFile with the reason."""
    try:
        compression = detect_compression(path)
        suffix = inner_suffix(path, compression)
        if suffix in PARQUET_SUFFIXES + ARROW_SUFFIXES:
            if compression:
                raise SkipFile(f"{compression}-compressed {suffix} (decompress it first)")
            return Source(path, name, "parquet" if suffix in PARQUET_SUFFIXES else "arrow")
        head = head_bytes(path, compression)
    except SkipFile as reason:
        if strict:
            raise UserError(f"{path} cannot be read: {reason}") from None
        raise
    except OSError as error:
        if strict:
            raise UserError(f"{path} cannot be read ({type(error).__name__}: {error.strerror or error}); "
                            "check its permissions") from None
        raise SkipFile(f"unreadable ({type(error).__name__})") from None
    if suffix in JSON_SUFFIXES:
        try:
            record = first_json_record(first_line(path, compression))  # (the head may cut it short)
        except (OSError, UserError):  # read again (and reported) when the file is read
            record = None
        if strict or (isinstance(record, dict) and text_field in record):
            return Source(path, name, "json", compression)  # the reader names any bad line
        plan.notes.append((name, f"read as plain text (not JSON lines with a {text_field!r} field)"))
        return Source(path, name, "text", compression)
    if looks_binary(head):
        if strict:
            raise UserError(f"{path} looks binary (NUL bytes or mostly undecodable); give text, JSON lines, "
                            "parquet, Arrow or a datasets directory")
        raise SkipFile("binary")
    return Source(path, name, "text", compression)


def _walk(root: Path, text_field: str, suffixes: tuple[str, ...] | None,
          plan: CorpusPlan) -> None:
    found: list[Source] = []
    for directory, subdirectories, names in os.walk(root):
        here = Path(directory)
        relative = here.relative_to(root)
        if here != root and is_hf_dataset_dir(here):
            sources, skipped = hf_dataset_sources(here, str(relative))
            found.extend(sources)
            plan.skipped.extend(skipped)
            subdirectories[:] = []
            continue
        for hidden in sorted(name for name in subdirectories if name.startswith(".")):
            plan.skipped.append((str(relative / hidden) + "/", "hidden directories"))
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for file_name in sorted(names):
            path = here / file_name
            name = str(relative / file_name)
            if file_name.startswith("."):
                plan.skipped.append((name, "hidden files"))
                continue
            if suffixes is not None and not file_name.lower().endswith(suffixes):
                plan.skipped.append((name, f"not one of the named suffixes {','.join(suffixes)}"))
                continue
            if not path.is_file():
                plan.skipped.append((name, "not a regular file (broken link, socket, …)"))
                continue
            try:
                found.append(_classify(path, name, text_field, strict=False, plan=plan))
            except SkipFile as reason:
                plan.skipped.append((name, str(reason)))
    # One order for every machine: by relative path, as the corpus has always been read.
    plan.sources.extend(sorted(found, key=lambda source: source.name))


def _resolve_one(item: str, text_field: str, suffixes: tuple[str, ...] | None, plan: CorpusPlan,
                 several: bool) -> None:
    if item == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        plan.sources.extend(Source(path, str(path.relative_to(root)), "text") for path in stdlib_files())
        return
    path = Path(item).expanduser()
    if not path.exists():
        if GLOB_CHARACTERS & set(item):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise UserError(f"corpus pattern {item} matches no file; check the pattern (quote it so "
                                "the shell does not expand it)")
            for match in matches:
                _resolve_one(match, text_field, suffixes, plan, several=True)
            return
        raise UserError(f"corpus {item} does not exist; give a file (text, .jsonl, .json, .gz, .zst, "
                        ".parquet, .arrow), a directory, a glob pattern or 'stdlib'")
    name = str(path) if several else path.name
    if path.is_dir():
        if is_hf_dataset_dir(path):
            sources, skipped = hf_dataset_sources(path, name)
            plan.sources.extend(sources)
            plan.skipped.extend(skipped)
        else:
            _walk(path, text_field, suffixes, plan)
        return
    plan.sources.append(_classify(path, name, text_field, strict=True, plan=plan))


def resolve_corpus(corpus: str | Sequence[str], text_field: str = "text",
                   suffixes: Sequence[str] | str | None = None) -> CorpusPlan:
    """The sources of `corpus` ('stdlib', a path, a directory, a glob, or a list of those), in
    the order they are read, with what was skipped and why."""
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items:
        raise UserError("no corpus given; name a file, a directory, a glob pattern or 'stdlib'")
    if not text_field:
        raise UserError("the text field name is empty; give the record field that holds the text")
    plan = CorpusPlan(", ".join(str(item) for item in items))
    for item in items:
        _resolve_one(str(item), text_field, _normalise_suffixes(suffixes), plan, several=len(items) > 1)
    return plan


def _source_documents(source: Source, text_field: str) -> Iterator[Document]:
    if source.kind == "text":
        text, replaced = decode(read_all(source.path, source.compression))
        yield Document(source.name, text, replaced)
    elif source.kind == "json":
        for name, text, replaced in iter_json_records(source, text_field):
            yield Document(name, text, replaced)
    else:
        for name, text, replaced in iter_columnar_records(source, text_field):
            yield Document(name, text, replaced)


def iter_documents(corpus: str | Sequence[str] | CorpusPlan, text_field: str = "text",
                   max_documents: int | None = None,
                   suffixes: Sequence[str] | str | None = None) -> Iterator[Document]:
    """Non-empty documents of `corpus` (see `resolve_corpus`, or a plan it made) in a
    deterministic order; records hold their text under `text_field`."""
    if max_documents is not None and max_documents < 1:
        raise UserError(f"max_documents={max_documents}; give a positive number or leave it unset")
    if isinstance(corpus, CorpusPlan):
        plan = corpus
    else:
        plan = resolve_corpus(corpus, text_field, suffixes)
        if plan.skipped or plan.notes:
            log.info("%s", plan.summary())
    produced = empty = 0
    for source in plan.sources:
        for document in _source_documents(source, text_field):
            if max_documents is not None and produced >= max_documents:
                return
            if document.text:
                produced += 1
                yield document
            else:
                empty += 1
    if produced == 0:
        raise UserError((f"corpus {plan.description} has no non-empty documents ({len(plan.sources)} "
                        f"source(s), {empty} empty document(s), {len(plan.skipped)} file(s) skipped"
                        + (f": {_by_reason(plan.skipped)}" if plan.skipped else "")
                        + "); check the path, the text field or the suffixes").replace("\n", "\\n"))
    if empty:
        log.info("corpus %s: %d empty document(s) left out", plan.description, empty)
