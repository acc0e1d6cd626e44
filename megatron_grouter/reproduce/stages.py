"""Fingerprint-keyed stage directories: a finished stage is skipped, a killed one resumes.

Every stage owns `<out_dir>/stages/<name>/`. Its key is a sha256 over the stage's settings and the
keys of the stages it reads, so a changed setting anywhere upstream changes every key after it.
  key            written when the stage starts: the key its partial files belong to
  done.json      written last (atomically) with the key and the stage's summary
A directory whose key matches and that has done.json is skipped. One whose key matches but lacks
done.json was interrupted: the stage runs again in place, and the tools resume from their own
checkpoints (mg-train, mg-distill, mg-predispatch). A directory with another key is emptied first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_grouter import atomic_files


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-serialisable payload (keys sorted), as hex."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """The stages' JSON (sorted keys, anything else as str), replacing `path` atomically."""
    atomic_files.write_json_atomic(path, payload, sort_keys=True, default=str)


@dataclass
class Stage:
    """One unit of cached work: its directory, settings, and the keys of its inputs."""

    name: str
    directory: Path
    settings: dict
    upstream: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return fingerprint({"stage": self.name, "settings": self.settings, "upstream": self.upstream})

    @property
    def done_file(self) -> Path:
        return self.directory / "done.json"

    def finished(self) -> dict | None:
        """The stored summary when this exact stage already finished, else None."""
        try:
            record = json.loads(self.done_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record.get("summary", {}) if record.get("key") == self.key else None

    def begin(self) -> str:
        """Prepare the directory; returns 'fresh', 'resume' (same key, interrupted) or 'reset'."""
        key_file = self.directory / "key"
        previous = key_file.read_text().strip() if key_file.is_file() else None
        state = "fresh"
        if previous == self.key:
            state = "resume"
        elif self.directory.exists():
            shutil.rmtree(self.directory)
            state = "reset" if previous is not None else "fresh"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.done_file.unlink(missing_ok=True)
        atomic_files.write_text_atomic(key_file, self.key + "\n")
        return state

    def finish(self, summary: dict) -> None:
        write_json_atomic(self.done_file, {"key": self.key, "stage": self.name, "summary": summary})
