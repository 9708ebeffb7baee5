"""The NaN/Inf policy of every run: what stops it, and what its message says was kept.

* Training loss: kept on the device and checked at every progress line, before that step's backward
  (:func:`cbsa_core.engine.loop.train_one_epoch`, :mod:`cbsa_core.engine.step_stats`): the run stops at the first
  check after the loss went non-finite, and the message names that step and the steps the check covered. Reading
  the loss at every step would make the host wait for the GPU at every step.
* Validation / evaluation outputs: the evaluators count the images whose outputs are not finite and raise
  :class:`NonFiniteOutputError` (after summing the count over all ranks, so every rank stops together). The
  argmax of NaN logits is class 0, so such a model would otherwise get a made-up accuracy.
* Validation loss and parameters: checked by :func:`cbsa_core.engine.runner.fit` after each epoch, before any
  checkpoint of that epoch is written. A model whose parameters went non-finite is never saved
  (:func:`cbsa_core.engine.training_state.save_training_checkpoint` refuses it too).

Every error says which file really is kept: :func:`kept_checkpoint_note` looks at the disk instead of assuming.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

__all__ = [
    "NonFiniteError",
    "NonFiniteLossError",
    "NonFiniteOutputError",
    "NonFiniteParametersError",
    "kept_checkpoint_note",
    "non_finite_parameters",
    "count_non_finite_rows",
    "is_finite_number",
]


def kept_checkpoint_note(checkpoint: str | os.PathLike | None) -> str:
    """What the run leaves behind, checked on disk: the checkpoint at ``checkpoint`` when it exists, or that none
    was written. ``None``: the caller writes no checkpoint at all."""
    if checkpoint is None:
        return "no checkpoint is written or overwritten"
    path = Path(checkpoint)
    if path.is_file():
        return f"the last good checkpoint is kept at {path}"
    return f"no checkpoint was written (there is none at {path})"


class NonFiniteError(RuntimeError):
    """A NaN or infinity stopped the run. ``problem`` says what and where; ``kept`` what is left on disk.

    ``event`` names the record written to the run's log.
    """

    event = "non_finite"

    def __init__(self, problem: str, kept: Optional[str] = None) -> None:
        self.problem = problem
        self.kept = kept
        super().__init__(problem if kept is None else f"{problem}; {kept}")

    def with_kept(self, kept: str) -> "NonFiniteError":
        """The same error with ``kept`` as its note on what is left on disk."""
        self.kept = kept
        self.args = (f"{self.problem}; {kept}",)
        return self


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN/inf at ``step`` of ``epoch``.

    The loss is read from the device once per print interval: ``checked`` = ``(first, last)`` are the steps that
    check covered. It is raised before the backward of step ``last``: when ``step == last`` (a loss that went bad at
    a check step, e.g. the first step of an epoch) the parameters are those of the previous step; otherwise steps
    ``step .. last - 1`` were applied with the bad loss. Either way nothing of this epoch is saved: resume from the
    last checkpoint."""

    event = "non_finite_loss"

    def __init__(self, epoch: int, step: int, value: float, checkpoint: str | os.PathLike | None = None,
                 checked: Optional[tuple[int, int]] = None) -> None:
        self.epoch = epoch
        self.step = step
        self.value = value
        self.checkpoint = checkpoint
        self.checked = (step, step) if checked is None else (int(checked[0]), int(checked[1]))
        first, last = self.checked
        where = f"step {step}" if first == last else f"step {step} (found when steps {first}-{last} were checked)"
        super().__init__(f"loss is {value} at epoch {epoch}, {where}: stopping", kept_checkpoint_note(checkpoint))


class NonFiniteOutputError(NonFiniteError):
    """An evaluation produced NaN/inf outputs for ``count`` of ``total`` images (or a non-finite loss)."""

    event = "non_finite_outputs"

    def __init__(self, what: str, count: int, total: int, kept: Optional[str] = None,
                 loss: Optional[float] = None) -> None:
        self.what, self.count, self.total, self.loss = what, int(count), int(total), loss
        detail = f"{count} of {total} images got non-finite outputs" if count else f"the loss is {loss}"
        super().__init__(f"{what}: {detail}, so its metrics would be meaningless", kept)


class NonFiniteParametersError(NonFiniteError):
    """Parameters or buffers of the model are NaN/inf after a training epoch."""

    event = "non_finite_parameters"

    def __init__(self, epoch: int, names: Iterable[str], kept: Optional[str] = None) -> None:
        self.epoch = epoch
        self.names = list(names)
        shown = ", ".join(self.names[:5]) + (f" and {len(self.names) - 5} more" if len(self.names) > 5 else "")
        super().__init__(f"after epoch {epoch} the model holds NaN/inf values ({shown}): stopping without saving it",
                         kept)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold a NaN or infinity.

    One host read per device for the whole model (not one per tensor)."""
    named = [(name, t) for name, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point()]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(named)
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1].detach()).all() for i in indices]).tolist()
        for i, ok in zip(indices, flags):
            finite[i] = bool(ok)
    return [name for (name, _), ok in zip(named, finite) if not ok]


def count_non_finite_rows(output: torch.Tensor) -> torch.Tensor:
    """How many samples (rows along dim 0) of ``output`` hold any NaN/inf, as a 0-d int64 tensor on its device."""
    if output.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=output.device)
    bad = ~torch.isfinite(output.detach().reshape(output.shape[0], -1))
    return bad.any(dim=1).sum()


def is_finite_number(value: object) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
