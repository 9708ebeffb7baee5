"""Running averages, top-k correct counts and the per-iteration progress line.

Progress is printed on the main rank only (the release printed only on ``gpu 0``). A line reads
``Epoch [3/150] [  50/5005] eta 1:02:03 loss 6.123 (6.400) lr 2.0e-04 img/s 812.3``; epoch and step are 0-based,
like the release's ``ProgressMeter`` and the ``epoch`` stored in checkpoints.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .distributed import all_reduce_sum, collective_device, get_rank

__all__ = ["AverageMeter", "accuracy", "format_eta", "MetricLogger"]


class AverageMeter:
    """Value of the last update and the count-weighted mean of all updates."""

    def __init__(self, name: str = "", fmt: str = ":.4f") -> None:
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float | torch.Tensor, n: int = 1) -> None:
        val = float(val)
        self.val = val
        self.sum += val * n
        self.count += n

    def set(self, val: float, total: float, count: int) -> None:
        """Set the last value and the running ``sum``/``count`` directly (statistics accumulated elsewhere, e.g. on
        the device and read once per print interval)."""
        self.val, self.sum, self.count = float(val), float(total), int(count)

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def all_reduce(self) -> None:
        """Replace ``sum`` and ``count`` by their totals over all ranks (a collective: call it on every rank)."""
        t = all_reduce_sum(torch.tensor([self.sum, float(self.count)], dtype=torch.float64,
                                        device=collective_device()))
        self.sum, self.count = float(t[0]), int(round(float(t[1])))

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(name=self.name, val=self.val,
                                                                              avg=self.avg)


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k: 0-d int64 tensors on the logits'
    device (counts, not percentages, so that they can be summed exactly across batches and ranks).

    A k larger than the number of classes counts every sample. Soft / one-hot targets are reduced by argmax.
    """
    if target.ndim == 2:
        target = target.argmax(dim=1)
    maxk = min(max(topk), output.size(1))
    _, pred = output.topk(maxk, dim=1, largest=True, sorted=True)
    hit = pred.eq(target.reshape(-1, 1))  # (B, maxk): at most one True per row
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (days roll into hours, e.g. ``27:46:40``)."""
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricLogger:
    """Smoothed meters plus an ETA / throughput progress line every ``print_freq`` steps (and at the last step).

    ``update(step, n, **values)`` records one step of ``n`` images (or, without reading device values every step:
    ``advance`` each step, then ``set_meter`` and ``emit`` when ``due``). Meters named ``lr`` print as ``2.0e-04``;
    others as ``last (mean)``. ``img/s`` is this process's rate since the previous line. Use
    :meth:`add_meter` to choose another format.
    """

    LR_FMT = "{val:.1e}"
    DEFAULT_FMT = "{val:.3f} ({avg:.3f})"

    def __init__(self, total_steps: int | None, header: str = "", print_freq: int = 50,
                 enabled: bool | None = None, printer: Callable[[str], None] | None = None) -> None:
        self.total_steps = total_steps
        self.header = header
        self.print_freq = max(int(print_freq), 1)
        self.enabled = (get_rank() == 0) if enabled is None else bool(enabled)
        self.printer = printer or (lambda line: print(line, flush=True))
        self.meters: dict[str, AverageMeter] = {}
        self.formats: dict[str, str] = {}
        self.start = time.perf_counter()
        self._window_start = self.start
        self._window_images = 0
        self.images = 0
        self.steps = 0

    def add_meter(self, name: str, fmt: str = DEFAULT_FMT) -> None:
        self.meters.setdefault(name, AverageMeter(name))
        self.formats[name] = fmt

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0-based) prints a line: every ``print_freq`` steps from the first, and the last."""
        return step % self.print_freq == 0 or (self.total_steps is not None and step + 1 >= self.total_steps)

    def update(self, step: int, n: int = 1, **values: float | torch.Tensor) -> str | None:
        """Record step ``step`` (0-based) of ``n`` images; returns the printed line, if one was due.

        Every value is converted with ``float()``: a tensor on a GPU is read at every step. Loops that keep their
        statistics on the device call :meth:`advance` each step and :meth:`set_meter` + :meth:`emit` when
        :meth:`due` instead."""
        for name, v in values.items():
            self._meter(name).update(v, n)
        self.advance(step, n)
        if self.due(step):
            return self.emit(step)
        return None

    def advance(self, step: int, n: int = 1) -> None:
        """Count step ``step`` of ``n`` images (for the rate and the ETA) without touching the meters."""
        self.images += n
        self._window_images += n
        self.steps = step + 1

    def set_meter(self, name: str, val: float, total: float, count: int) -> None:
        """Set meter ``name`` (created on first use) to last value ``val`` and mean ``total / count``."""
        self._meter(name).set(val, total, count)

    def emit(self, step: int) -> str | None:
        """Print (when enabled) and return the progress line of step ``step``; restarts the rate window."""
        return self._emit(step)

    def _meter(self, name: str) -> AverageMeter:
        if name not in self.meters:
            self.add_meter(name, self.LR_FMT if name == "lr" else self.DEFAULT_FMT)
        return self.meters[name]

    def line(self, step: int) -> str:
        now = time.perf_counter()
        window = max(now - self._window_start, 1e-9)
        rate = self._window_images / window
        parts = [self.header] if self.header else []
        if self.total_steps is not None:
            width = len(str(self.total_steps))
            parts.append(f"[{step:>{width}}/{self.total_steps}]")
            per_step = (now - self.start) / max(step + 1, 1)
            parts.append(f"eta {format_eta(per_step * (self.total_steps - step - 1))}")
        else:
            parts.append(f"[{step}]")
        for name, m in self.meters.items():
            parts.append(f"{name} " + self.formats[name].format(val=m.val, avg=m.avg))
        parts.append(f"img/s {rate:.1f}")
        return " ".join(parts)

    def _emit(self, step: int) -> str | None:
        text = self.line(step)
        self._window_start = time.perf_counter()
        self._window_images = 0
        if self.enabled:
            self.printer(text)
            return text
        return None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
