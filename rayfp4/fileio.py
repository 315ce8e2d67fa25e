"""Files written whole or not at all, and their checksums (imports nothing of rayfp4)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, write: Callable[[Path], None] | str) -> None:
    """Write ``path`` through a temporary sibling renamed into place: a crash or a full disk leaves
    the old file (or none), never a partial one. ``write`` is text, or a function given the
    temporary path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
