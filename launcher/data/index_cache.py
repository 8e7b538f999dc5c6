"""Build-once caches of numpy arrays, safe when several processes build the same one at once.

An entry is a folder NAME-<hash of its description>/ holding one .npy per array and
description.json. It is built in a private temporary folder and renamed into place in one
step: a reader sees a complete entry or none, and when two processes race, the loser's
rename fails, it drops its copy and uses the winner's (the contents are equal: builds are
deterministic).
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

DESCRIPTION = "description.json"


def file_stamp(path) -> list[int]:
    """Size and modification time: a rebuilt data file invalidates what was derived from it."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _load(folder: Path, description: dict, names: tuple[str, ...]) -> dict | None:
    try:
        if json.loads((folder / DESCRIPTION).read_text()) != description:
            return None
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
    except (OSError, ValueError):
        return None


def cached_arrays(root, name: str, description: dict, names: tuple[str, ...],
                  build: Callable[[], dict]) -> dict:
    """Arrays `names` from the entry for `description` under `root`, building and storing them if absent.

    Falls back to the freshly built arrays, with a warning, where `root` is not writable.
    """
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root) / f"{name}-{digest}"
    found = _load(folder, description, names)
    if found is not None:
        return found
    arrays = build()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as err:
        logger.warning("cannot cache %s under %s (%s); pass a writable cache_dir to build it once", name, root, err)
        return arrays
    try:
        for key in names:
            np.save(staging / f"{key}.npy", arrays[key])
        (staging / DESCRIPTION).write_text(json.dumps(description, indent=1, sort_keys=True) + "\n")
        if folder.exists() and _load(folder, description, names) is None:
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry: replace it
        os.rename(staging, folder)
    except OSError:
        pass  # another process published the same entry first (or the disk refused): ours is not needed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load(folder, description, names) or arrays
