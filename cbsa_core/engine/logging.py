"""Run logs: a JSON-lines file, TensorBoard scalars and the ``logging`` module set-up, all main-rank only.

The release appended JSON lines to ``./log.txt`` in the CWD (docs/authors-release.md item 17); here the path is the
caller's choice.
This module shadows nothing: imports are absolute, so ``import logging`` below is the standard library.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import deferred_signals
from .distributed import get_rank

__all__ = ["JsonlLogger", "TensorBoardLogger", "setup_logging", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, paths to str, containers recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    return str(obj)


class JsonlLogger:
    """Append one JSON object per line to ``path``, flushed at each write; a no-op off the main rank.

    ``enabled=None`` means "rank 0 only". NaN/inf are written as JSON's de-facto ``NaN``/``Infinity`` tokens, which
    Python's ``json`` and pandas read back.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool | None = None) -> None:
        self.path = Path(path)
        self.enabled = (get_rank() == 0) if enabled is None else bool(enabled)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(to_jsonable(record), allow_nan=True)
        # Opening per write keeps nothing buffered across a crash; epoch-level logs make this cheap. A signal waits
        # for the line to be complete, so the log never ends in half a record.
        with deferred_signals(), open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    __call__ = log


class TensorBoardLogger:
    """``SummaryWriter`` wrapper; every method is a no-op when disabled or off the main rank."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = bool(enabled) and get_rank() == 0
        self._writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard; only when used

            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        if self._writer is None:
            return
        value = float(value)
        if math.isfinite(value):
            self._writer.add_scalar(tag, value, step)

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """One scalar per numeric entry, tagged ``prefix + key``; non-numeric entries are skipped."""
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) or (
                    isinstance(v, torch.Tensor) and v.numel() == 1):
                self.scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _EngineStderrHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` adds, recognised by its class. It writes to whatever ``sys.stderr`` is at
    emit time, so a replaced ``sys.stderr`` (pytest's capture, a notebook) never leaves it holding a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it: always follow sys.stderr
        pass


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Handler:
    """Log to stderr from the root logger: ``level`` on rank 0, WARNING on the other ranks (so warnings still show).

    Idempotent and polite: one handler of its own is added on the first call and only re-configured afterwards
    (entry points called twice in one process, e.g. by tests, print each line once), and handlers installed by
    others (pytest's log capture, an application's) are left in place. Returns the engine's handler.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _EngineStderrHandler)), None)
    if handler is None:
        handler = _EngineStderrHandler()
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return handler
