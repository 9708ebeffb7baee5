"""The output folder rule of every run, checked before any work is done.

* The folder must be a folder (or not exist yet) and be writable; a file in its place, or a read-only folder, is
  refused naming the flag, before the data is read or a model built.
* Training: a folder that already holds a run (any of the track's run files) is only replaced with
  ``--overwrite``, which then removes that run's files (checkpoints, logs, config, evaluation results, TensorBoard
  events) when the new run starts, so no stale ``model_best`` is left beside the new run's checkpoint.
* Resume: the run continues in the folder its checkpoint came from, or in a fresh folder (a branch of the run);
  a folder holding another run needs ``--overwrite`` like any fresh run.
* Evaluation: writes only its result file into the folder (replacing an earlier result).

:meth:`OutputDir.claim` (rank 0, when the run starts writing) creates the folder, applies the ``--overwrite``
removal and deletes the temporaries that a process killed mid-write left (:mod:`cbsa_core.atomic`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..atomic import remove_stale_temporaries
from .config import ConfigError

__all__ = ["OutputDirError", "OutputDir", "check_output_dir", "check_output_file"]

_LOG = logging.getLogger(__name__)


class OutputDirError(ConfigError):
    """The output folder cannot be used: not a folder, not writable, or holding another run."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_folder(folder: Path, flag: str, given: Optional[Path] = None) -> None:
    """Refuse ``folder`` when it is a file, lies under a file, or cannot be written (checked by creating and
    removing an anonymous temporary file in it, or in its nearest existing parent when it does not exist yet).
    ``given``: the path the user gave, when it is a file to be written in ``folder``."""
    given = folder if given is None else given
    if folder.exists() and not folder.is_dir():
        if given == folder:
            raise OutputDirError(f"{flag} {folder} is a file, not a folder; pass another {flag}")
        raise OutputDirError(f"{flag} {given} cannot be created: {folder} is a file, not a folder")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputDirError(f"{flag} {given} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = "" if existing == given else f" (it would be created in {existing})"
        raise OutputDirError(f"{flag} {given} is not writable{where}: {e.strerror or e}; pass another {flag}") \
            from None


@dataclass
class OutputDir:
    """A checked output folder. ``replaces`` lists the files and folders of another run that ``--overwrite``
    replaces; they are removed by :meth:`claim`, when the new run starts writing."""

    path: Path
    replaces: Tuple[Path, ...] = ()
    _claimed: bool = field(default=False, repr=False)

    def claim(self) -> List[Path]:
        """Create the folder, remove the replaced run's files and stale temporaries; idempotent. Call it on rank 0
        only, right before the first write. Returns what was removed."""
        if self._claimed:
            return []
        self._claimed = True
        self.path.mkdir(parents=True, exist_ok=True)
        removed = []
        for p in self.replaces:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
                removed.append(p)
        if removed:
            _LOG.info("--overwrite: removed the previous run's %s", ", ".join(str(p) for p in removed))
        stale = remove_stale_temporaries(self.path)
        if stale:
            _LOG.info("removed %d temporary file(s) left by an interrupted write: %s", len(stale),
                      ", ".join(p.name for p in stale))
        return removed + stale


def check_output_dir(path: str | os.PathLike, *, flag: str, run_files: Sequence[str], evaluate: bool = False,
                     resume_from: Optional[str | os.PathLike] = None, overwrite: bool = False,
                     also_replaced: Sequence[str] = (), continue_hint: Optional[str] = None) -> OutputDir:
    """Apply the output folder rule (module docstring) and return the checked folder; raises
    :class:`OutputDirError` with one line naming ``flag`` (and the fix) otherwise.

    Args:
        path: the folder (``--output-dir``, ``--log-dir``).
        flag: the flag that set it, for the messages.
        run_files: file names whose presence means the folder holds a run (its checkpoints, the last one first).
        evaluate: an evaluation, which writes only its result file: only writability is checked.
        resume_from: the checkpoint a training run resumes from.
        overwrite: ``--overwrite`` was given: another run in the folder is replaced.
        also_replaced: more names removed with the run's files under ``--overwrite`` (logs, config, evaluation
            results, ``tensorboard``).
        continue_hint: how to continue the run in the folder, for the message (default ``--resume CHECKPOINT``).
    """
    folder = Path(path)
    _check_writable_folder(folder, flag)
    if evaluate or not folder.is_dir():
        return OutputDir(folder)
    if resume_from is not None and Path(resume_from).resolve().parent == folder.resolve():
        return OutputDir(folder)  # continuing the run in its own folder
    present = [name for name in run_files if (folder / name).exists()]
    if not present:
        return OutputDir(folder)
    if overwrite:
        names = list(dict.fromkeys(list(run_files) + list(also_replaced)))
        return OutputDir(folder, tuple(folder / n for n in names if (folder / n).exists() or (folder / n).is_symlink()))
    continue_hint = continue_hint or f"--resume {folder / run_files[0]}"
    if resume_from is not None:
        raise OutputDirError(
            f"{flag} {folder} holds another run ({', '.join(present)}), but --resume {resume_from} comes from "
            f"{Path(resume_from).parent}: a resumed run writes only into its checkpoint's folder or a fresh one; pass "
            f"{flag} {Path(resume_from).parent}, a new {flag}, or --overwrite to replace that run")
    raise OutputDirError(
        f"{flag} {folder} already holds a run ({', '.join(present)}); continue it with {continue_hint}, "
        f"pick another {flag}, or pass --overwrite to replace it")


def check_output_file(path: str | os.PathLike, *, flag: str) -> Path:
    """A result file about to be written: refused when it is a folder or its folder cannot be written."""
    file = Path(path)
    if file.is_dir():
        raise OutputDirError(f"{flag} {file} is a folder; give the path of the file to write")
    _check_writable_folder(file.parent, flag, given=file)
    return file
