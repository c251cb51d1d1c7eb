"""Atomic result files: a reader sees the old file or the complete new one, never a partial write."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    staging = path.with_name(f".tmp_{path.name}")
    staging.write_text(text)
    os.replace(staging, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2))
