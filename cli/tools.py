"""`winq bench` and `winq inspect` (registered on winq.cli.main.app when main is imported)."""

from __future__ import annotations

from winq.cli.main import app  # noqa: F401
