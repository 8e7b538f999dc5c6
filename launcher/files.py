"""Small file helpers: atomic writes, so a crash never leaves a half-written file under its final name."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), path)  # not the locale's: Chinese text under LANG=C


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2) + "\n", path)
