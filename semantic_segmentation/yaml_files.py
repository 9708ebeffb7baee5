"""Atomic YAML output of the track (``variant.yml`` of a run, ``scores_{ss|ms}.yml`` of an evaluation)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from cbsa_core.atomic import atomic_write_yaml

__all__ = ["write_yaml_atomic"]


def write_yaml_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` with ``yaml.safe_dump`` (keys in insertion order) through the project's one atomic writer
    (:mod:`cbsa_core.atomic`), so a reader never sees a half-written file. Returns the path."""
    return atomic_write_yaml(path, data, sort_keys=False)
