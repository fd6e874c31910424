"""atomic_write_bytes: the whole content or the old file, never a half-written one, and no temporary file left."""

from __future__ import annotations

import os

import pytest

from pipeline.corpus import atomic_write_bytes, atomic_write_text


def test_writes_and_replaces_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_bytes(path, b"first")
    atomic_write_text(path, "zweite ✓")
    assert path.read_text(encoding="utf-8") == "zweite ✓"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # like any written file, not mkstemp's 0600
    assert os.listdir(path.parent) == ["a.json"]


def test_failed_rename_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(path, b"new")
    assert e.value.filename == str(path) and e.value.errno == 28
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.json"]


def test_interrupt_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "a.json", b"new")
    assert os.listdir(tmp_path) == []
