"""Atomic folder writes shared by checkpoints, exports and benchmark baselines (ARCHITECTURE §6)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_into_place(tmp: Path, out: Path) -> Path:
    """Replace folder `out` by the finished folder `tmp`: the old one (if any) is moved aside first, then removed."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
