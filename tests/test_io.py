"""Atomic writes: success replaces the file; a failure mid-write keeps the old file and leaves no temporary."""

import json
import os

import pytest

from attnkit._io import atomic_path, write_json_atomic, write_text_atomic


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    write_text_atomic(path, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_files_get_the_mode_open_would_give_them(tmp_path, umask):
    """``mkstemp`` creates files 0600; an atomic write must not make every output private whatever the umask."""
    import stat

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    from attnkit import _io

    calls = []
    real = _io.fsync_dir
    monkeypatch.setattr(_io, "fsync_dir", lambda p: calls.append(str(p)) or real(p))
    write_text_atomic(tmp_path / "a.txt", "x")
    assert calls == [str(tmp_path)]
