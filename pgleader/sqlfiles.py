"""Where the sql/ directory is, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

__all__ = ["sql_dir"]


def sql_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):  # wheel, then checkout
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"pgleader: no sql/ directory next to {here}")
