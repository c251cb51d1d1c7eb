"""Result files that never tear: atomic writes (a reader sees the old file or the complete new one) and one
writer per output directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HELD: dict[Path, int] = {}  # directories this process holds, with how many nested holders


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    staging = path.with_name(f".tmp_{path.name}")
    staging.write_text(text)
    os.replace(staging, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2))


@contextlib.contextmanager
def exclusive_dir(path: str | Path) -> Iterator[Path]:
    """Hold ``path`` (created if missing) as its only writer while the block runs: a second process gets a
    ``ValueError`` at once instead of both writing and one model or log being lost. The lock is an advisory
    ``flock`` on the directory itself, so nothing is written into it and a killed holder releases it; nested holds
    in one process are allowed. A directory this call
    created is removed again if the block fails before writing anything into it."""
    path = Path(path).resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{path} is being written by another quantizable process; wait for it to finish or "
                             f"choose another --out") from None
        _HELD[path] = 1
        try:
            yield path
        except BaseException:
            if created and not any(path.iterdir()):
                path.rmdir()
            raise
        finally:
            del _HELD[path]
    finally:
        os.close(fd)  # releases the lock
