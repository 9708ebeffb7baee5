"""Per-step training statistics kept on the device and read by the host once per print interval.

Reading a CUDA tensor's value on the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``) waits
until the GPU has finished everything queued before it, so the CPU stops launching work and the GPU then idles
while the next step is launched. A training step that reads its loss (for the progress line, for the NaN check,
or for an all-reduce decision) therefore runs at the speed of CPU and GPU one after the other instead of
overlapped. :class:`StepWindow` keeps, for each step since the last read, the loss, the batch size and the number of
correct top-1 predictions in one small device buffer (three tiny copy kernels per step, no read), and
:meth:`StepWindow.read` returns them all with ONE host read (and, in a distributed run, one all-reduce). The loop
reads at its progress lines, so a run with ``--print-freq k`` reads once every ``k`` steps; a non-finite loss is
still found, and the exact step named, at the next read, before that step's update and before any checkpoint is
written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .distributed import all_reduce_sum, collective_device

__all__ = ["MAX_WINDOW", "StepRecord", "StepWindow"]

# The most steps held between two reads: a larger print interval reads every MAX_WINDOW steps without printing
# (64 KiB of float64 on the device).
MAX_WINDOW = 4096


@dataclass(frozen=True)
class StepRecord:
    """One step's statistics as read back: ``loss_sum`` and ``images`` are summed over the ranks (``loss_sum`` is
    sum of ``loss * batch``), ``correct`` too (0 when the step computed no accuracy), ``local_loss`` is this rank's
    loss."""

    step: int
    loss_sum: float
    images: float
    correct: float
    local_loss: float
    has_accuracy: bool

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss_sum) and math.isfinite(self.local_loss)


class StepWindow:
    """A device buffer of the statistics of the steps recorded since the last :meth:`read`.

    Args:
        capacity: the most steps held between two reads (the caller reads when :attr:`full`).
        device: where the losses live.
        distributed: sum the statistics over all ranks at each read (a collective: every rank must read at the
            same steps).
    """

    def __init__(self, capacity: int, device: torch.device | str, distributed: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"StepWindow capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.distributed = bool(distributed)
        # rows: loss (this rank's batch mean), batch size, correct top-1 count
        self.buffer = torch.zeros(3, self.capacity, dtype=torch.float64, device=device)
        self._steps: List[int] = []
        self._has_accuracy: List[bool] = []

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    @property
    def first_step(self) -> Optional[int]:
        return self._steps[0] if self._steps else None

    def record(self, step: int, loss: torch.Tensor, batch_size: int, correct: Optional[torch.Tensor] = None) -> None:
        """Queue step ``step``'s ``loss`` (a 0-d tensor, detached here), batch size and correct count; no host read."""
        if self.full:
            raise RuntimeError(f"StepWindow is full ({self.capacity} steps): read it first")
        i = len(self._steps)
        self.buffer[0, i].copy_(loss.detach())
        self.buffer[1, i].fill_(batch_size)
        if correct is not None:
            self.buffer[2, i].copy_(correct)
        self._steps.append(int(step))
        self._has_accuracy.append(correct is not None)

    def read(self) -> List[StepRecord]:
        """The queued steps' statistics (summed over ranks when distributed), with one host read; empties the
        window."""
        n = len(self._steps)
        if n == 0:
            return []
        v = self.buffer[:, :n]
        packed = torch.stack([v[0] * v[1], v[1], v[2], v[0]])
        if self.distributed:
            packed = packed.to(collective_device())
            all_reduce_sum(packed[:3])  # rows are contiguous: reduced in place; the local loss row is kept
        rows = packed.tolist()
        records = [StepRecord(step=s, loss_sum=rows[0][i], images=rows[1][i], correct=rows[2][i],
                              local_loss=rows[3][i], has_accuracy=self._has_accuracy[i])
                   for i, s in enumerate(self._steps)]
        self.buffer.zero_()
        self._steps.clear()
        self._has_accuracy.clear()
        return records
