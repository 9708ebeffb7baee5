"""Counting the places where the host waits for a tensor's value: Python-level reads (any device) and CUDA
synchronisations (torch's sync debug mode).

A training step should not read device values between its progress lines (:mod:`.step_stats`). These counters
check it: :class:`HostReadCounter` wraps the ``torch.Tensor`` methods that return a value to Python (it runs on the
CPU, so the tests use it), :class:`CudaSyncCounter` records every synchronising CUDA operation that
``torch.cuda.set_sync_debug_mode("warn")`` reports, including those inside torch (``GradScaler.step``'s
``.item()``, SyncBatchNorm's boolean mask, copies from pageable memory), each with the line of Python that caused
it.
"""
from __future__ import annotations

import collections
import os
import traceback
import warnings
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["HOST_READ_METHODS", "HostReadCounter", "CudaSyncCounter"]

# The Tensor methods that hand a value (or a CPU copy) to Python.
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller(skip_torch: bool = True) -> str:
    """``file:line`` of the innermost frame outside torch, warnings and this module."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = os.path.abspath(frame.filename)
        if path == here or "/warnings.py" in path or (skip_torch and path.startswith(_TORCH_DIR)):
            continue
        shown = os.path.relpath(path)
        return f"{path if shown.startswith('..') else shown}:{frame.lineno}"
    return "?"


class HostReadCounter:
    """Within the block, count the calls of :data:`HOST_READ_METHODS` on any tensor, by method and by the calling
    line (outside torch). Python-level only: a read made inside a C++ op is not seen (use
    :class:`CudaSyncCounter` on a GPU). Not thread-safe: the methods are patched on the class."""

    def __init__(self) -> None:
        self.by_method: collections.Counter = collections.Counter()
        self.by_caller: collections.Counter = collections.Counter()
        self._saved: Dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> "HostReadCounter":
        for name in HOST_READ_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.by_method[name] += 1
            self.by_caller[_caller()] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.by_method.values())


class CudaSyncCounter:
    """Within the block, ``torch.cuda.set_sync_debug_mode("warn")``: count each synchronising CUDA operation by the
    Python line that caused it (the innermost frame outside torch, or inside torch with ``attribute_to_torch``).
    The previous debug mode is restored on exit. torch's debug mode covers ATen operations and copies, not the
    collectives of ``torch.distributed``."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, attribute_to_torch: bool = False) -> None:
        self.by_caller: collections.Counter = collections.Counter()
        self.attribute_to_torch = attribute_to_torch
        self._previous_mode: Optional[int] = None
        self._catcher: Optional[warnings.catch_warnings] = None

    def __enter__(self) -> "CudaSyncCounter":
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("always")
        previous_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 -- warnings' signature
            if self.MESSAGE in str(message):
                self.by_caller[_caller(skip_torch=not self.attribute_to_torch)] += 1
            else:
                previous_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        self._previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode(self._previous_mode if self._previous_mode is not None else 0)
        if self._catcher is not None:
            self._catcher.__exit__(*exc)
            self._catcher = None

    @property
    def total(self) -> int:
        return sum(self.by_caller.values())
