"""Atomic file writes shared by every checkpoint the compressors keep."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_atomically(target: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a sibling temporary file, then rename it onto ``target``: a reader sees the
    old file or the complete new one, never a partial write."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomically(target: Path, data: Any) -> None:
    """``data`` as JSON in ``target``, replaced atomically."""
    replace_atomically(target, lambda f: Path(f).write_text(json.dumps(data)))
