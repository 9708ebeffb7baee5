"""Atomic YAML output of the track (``variant.yml`` of a run, ``scores_{ss|ms}.yml`` of an evaluation)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["write_yaml_atomic"]


def write_yaml_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` with ``yaml.safe_dump`` (keys in insertion order) through a temporary file in the same
    folder and ``os.replace``, so a reader never sees a half-written file. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            yaml.safe_dump(dict(data), f, sort_keys=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
