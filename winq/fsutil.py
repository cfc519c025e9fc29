"""Atomic writes: a file or folder appears complete or not at all (ARCHITECTURE §6).

    with atomic_file("results/bench.json") as tmp:    # write tmp; renamed onto the target on success
        tmp.write_text(...)
    with atomic_dir("runs/winq-gptq") as tmp:         # fill the empty folder tmp; swapped into place on success
        ...
    with temp_dir("runs/winq-gguf/model.gguf") as tmp:  # a scratch folder beside a target, always removed

Every temporary is a hidden sibling of its target (the same file system, so the final rename is
atomic) named `.<target name>.tmp-<pid>-<random>`; a replaced folder is first moved aside as
`.<target name>.old-<pid>-<random>`. An error or interruption inside the block removes the
temporary. A process killed outright (SIGKILL, power loss) cannot clean up, so each of these
helpers first removes the temporaries of its target whose process is no longer alive.
A target whose folder cannot be created (e.g. under /proc) raises OutputError naming it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import WinqError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


class OutputError(WinqError, OSError):
    """An output path that cannot be written (its folder cannot be created, no permission, no space)."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def clean_stale(target) -> list[Path]:
    """Remove the temporaries of `target` left by processes that are no longer alive; returns them."""
    target = Path(target)
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = _TEMP.match(p.name)
        if m is None or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _prepare(target) -> Path:
    """The target as a Path, its folder created, stale temporaries of dead processes removed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {target}: cannot create its folder {target.parent} "
                          f"({e.strerror or e})") from None
    clean_stale(target)
    return target


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def temp_dir(target) -> Iterator[Path]:
    """A fresh, empty hidden folder beside `target`, removed when the block ends, whatever happens."""
    target = _prepare(target)
    tmp = _sibling(target, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write beside {target}: {e.strerror or e}") from None
    try:
        yield tmp
    finally:
        _remove(tmp)


@contextmanager
def atomic_file(target) -> Iterator[Path]:
    """A temporary path beside file `target`; when the block ends without error it is renamed onto
    `target` (replacing it), otherwise removed. The caller writes the temporary path."""
    target = _prepare(target)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        _remove(tmp)


@contextmanager
def atomic_dir(target) -> Iterator[Path]:
    """An empty temporary folder beside folder `target`; when the block ends without error it replaces
    `target` (see swap_into_place), otherwise it is removed."""
    with temp_dir(target) as tmp:
        yield tmp
        swap_into_place(tmp, target)


def swap_into_place(tmp, out) -> Path:
    """Replace folder `out` by the finished folder `tmp`: the old one (if any) is moved aside first, then removed."""
    tmp, out = Path(tmp), Path(out)
    old = _sibling(out, "old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_json(path, error: type[Exception] = WinqError) -> dict:
    """The JSON object in file `path`; `error` naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
