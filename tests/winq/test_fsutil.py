"""winq.fsutil: atomic files and folders, stale temporaries of dead processes, unwritable outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from winq.fsutil import OutputError, atomic_dir, atomic_file, clean_stale, swap_into_place, temp_dir


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.json.tmp-") and not target.exists()
        tmp.write_text("1")
    assert target.read_text() == "1" and hidden(target.parent) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("2")
            raise KeyboardInterrupt
    assert target.read_text() == "1" and hidden(target.parent) == []  # the old file, no debris


def test_atomic_dir(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "x").read_text() == "new" and hidden(tmp_path) == []
    with atomic_dir(target) as tmp:
        (tmp / "y").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["y"] and hidden(tmp_path) == []
    with temp_dir(target) as scratch:
        assert scratch.is_dir() and scratch.parent == tmp_path
    assert not scratch.exists()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """What a SIGKILLed export or checkpoint leaves behind goes away on the next write of the same target."""
    pid = dead_pid()
    stale_dir = tmp_path / f".out.tmp-{pid}-abc123"
    (stale_dir / "big").mkdir(parents=True)
    stale_old = tmp_path / f".out.old-{pid}-00ff00"
    stale_old.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-0a0b0c"  # this process: alive, kept
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-123456"  # another target's: not ours to remove
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not stale_dir.exists() and not stale_old.exists() and live.exists() and other.exists()
    assert clean_stale(tmp_path / "other") == [other] and not other.exists()


def test_unwritable_output_is_one_clear_error():
    with pytest.raises(OutputError, match=r"cannot write /proc/winq-test/out.json: cannot create its folder "
                                          r"/proc/winq-test"):
        with atomic_file("/proc/winq-test/out.json"):
            pass
    with pytest.raises(OSError):  # OutputError is an OSError too: callers that catch OSError still do
        with atomic_dir("/proc/winq-test/folder"):
            pass


def test_swap_into_place(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("o")
    assert swap_into_place(tmp_path / "new", tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "f").read_text() == "n" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
