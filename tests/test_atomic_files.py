"""megatron_grouter.atomic_files on real files: the target holds the old content or the new one,
and a write that fails half-way leaves the old content and no temporary file behind."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from megatron_grouter.atomic_files import (atomic_directory, atomic_path, publish_file, save_npz_atomic,
                                           write_bytes_atomic, write_json_atomic, write_text_atomic)


class Interrupted(Exception):
    pass


def _entries(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_writers_replace_the_target(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    assert write_text_atomic(target, "old\n") == target
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    save_npz_atomic(tmp_path / "x.npz", {"k": 3}, values=np.arange(4))
    with np.load(tmp_path / "x.npz") as loaded:
        assert json.loads(str(loaded["meta"])) == {"k": 3}
        assert loaded["values"].tolist() == [0, 1, 2, 3]
    assert _entries(tmp_path) == ["a.json", "deep", "x.npz"]
    assert _entries(tmp_path / "deep") == ["file.txt"]


def test_new_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "shared.json", "{}\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_failure_mid_write_keeps_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")
    with pytest.raises(Interrupted):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the new")
            raise Interrupted
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["state.json"]


def test_unserialisable_json_leaves_the_target_alone(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert _entries(tmp_path) == ["summary.json"]


def test_npz_failing_half_way_leaves_the_old_file(tmp_path):
    target = tmp_path / "plan.npz"
    save_npz_atomic(target, {"version": 1}, values=np.zeros(3))
    before = target.read_bytes()

    class Unsaveable:
        def __array__(self, *args, **kwargs):
            raise Interrupted

    with pytest.raises(Interrupted):
        save_npz_atomic(target, {"version": 2}, first=np.ones(1000), second=Unsaveable())
    assert target.read_bytes() == before
    assert _entries(tmp_path) == ["plan.npz"]


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "curve.npz") as temporary:
        assert temporary.name.endswith(".npz") and temporary.name.startswith(".")
        np.savez(temporary, a=np.arange(2))  # np.savez would append .npz to another suffix
    assert _entries(tmp_path) == ["curve.npz"]


def test_publish_file_moves_a_finished_file(tmp_path):
    finished = tmp_path / "out.bin.partial"
    finished.write_bytes(b"data")
    publish_file(finished, tmp_path / "out.bin")
    assert _entries(tmp_path) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_directory_publish_replaces_an_old_directory_only_when_complete(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"v1")
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
    assert (target / "weights").read_bytes() == b"v1"

    with pytest.raises(Interrupted):
        with atomic_directory(target) as staging:
            (staging / "weights").write_bytes(b"v2-partial")
            raise Interrupted
    assert (target / "weights").read_bytes() == b"v1"
    assert _entries(tmp_path) == ["checkpoint"]

    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"v2")
    assert _entries(target) == ["weights"]  # the old directory's files are gone with it
    assert (target / "weights").read_bytes() == b"v2"
    assert _entries(tmp_path) == ["checkpoint"]


def test_a_killed_writer_leaves_only_a_hidden_temporary(tmp_path):
    """What a crash (no cleanup at all) can leave: the target intact plus a dot-file beside it."""
    target = tmp_path / "tokenizer.json"
    write_text_atomic(target, "old")
    context = atomic_path(target)
    temporary = context.__enter__()  # the process dies here: __exit__ never runs
    temporary.write_text("new, half")
    assert target.read_text() == "old"
    assert [name for name in _entries(tmp_path) if name != "tokenizer.json"] == [temporary.name]
    assert temporary.name.startswith(".")
    context.__exit__(None, None, None)
    assert target.read_text() == "new, half"
