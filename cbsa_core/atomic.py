"""The one atomic file writer: checkpoints, run configs, ``eval.json``, score files and the scripts' outputs.

Every file is written to a temporary file in the destination folder, flushed and fsynced, given the permissions an
ordinary ``open()`` would give it, then renamed over the destination (``os.replace``, atomic on POSIX). A reader, or
a crash, therefore sees either the previous file or the complete new one. When the write fails (an exception, a
``KeyboardInterrupt``) the temporary file is removed. Only ``kill -9`` or a power cut can orphan one; those carry this
writer's own name pattern, ``.<name>.<8 characters>.tmp``, and :func:`remove_stale_temporaries` deletes them when a run
starts in the folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Mapping

__all__ = [
    "TEMPORARY_NAME",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_yaml",
    "atomic_torch_save",
    "remove_stale_temporaries",
    "deferred_signals",
]

# tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") draws 8 characters from [a-z0-9_]; nothing else in a run folder
# is named like this, so the pattern identifies this writer's orphans (and those of the previous atomic_save).
TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _file_mode() -> int:
    """``0o666`` less the process umask: what ``open(path, "w")`` creates (``mkstemp`` creates ``0o600``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    """What the handler ``handler`` would have done with ``signum``."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # SIG_DFL (or a handler set outside Python): the default action
        signal.raise_signal(signum)


@contextlib.contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM during the block and deliver the first one to its previous handler after it; a second
    signal is delivered at once (the user insists). Outside the main thread, where Python cannot install
    handlers, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    pending: List[tuple] = []

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def hold(signum: int, frame: Any) -> None:
        if pending:
            restore()
            _deliver(previous[signum], signum, frame)
            return
        pending.append((signum, frame))

    for s in signums:
        signal.signal(s, hold)
    try:
        yield
    finally:
        restore()
        if pending:
            signum, frame = pending[0]
            _deliver(previous[signum], signum, frame)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a binary temporary file beside ``path``, then rename it over ``path``.

    The destination folder is created if needed. On any failure the temporary file is removed, the previous
    ``path`` is left as it was and the exception propagates. SIGINT/SIGTERM wait for the write to finish
    (:func:`deferred_signals`). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_signals():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Strict JSON (``allow_nan=False``): a NaN or infinity raises ``ValueError`` before anything is written, so the
    file is always readable by any JSON parser (Python's default would write the non-standard token ``NaN``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, data: Mapping[str, Any], *, sort_keys: bool = False) -> Path:
    """``yaml.safe_dump`` of a mapping (insertion order unless ``sort_keys``)."""
    import yaml  # only the YAML writers need it

    return atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=sort_keys))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str | os.PathLike) -> List[Path]:
    """Delete the temporary files this writer left in ``folder`` when a process was killed mid-write; returns them.

    Only names matching :data:`TEMPORARY_NAME` are touched. Call it when a run starts in the folder (the output
    folder rule makes the run its only writer); a missing folder has nothing to clean.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if TEMPORARY_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed
