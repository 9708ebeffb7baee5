"""Errors to exit codes, and signals, the same way in every entry point (the three tracks, ``eval.py``, scripts).

=====  ====================================================================================================
code   meaning
=====  ====================================================================================================
0      success
1      a runtime refusal: bad output folder, resume mismatch, missing or bad data, unreadable checkpoint,
       NaN/Inf; printed as one ``error: ...`` line on stderr, no traceback
2      a usage error: a flag or config-file value that argparse (or a parse-time check) refuses
130    interrupted by SIGINT (Ctrl-C)
143    stopped by SIGTERM (a scheduler's ``scancel``, ``kill``)
=====  ====================================================================================================

SIGTERM is turned into :class:`RunInterrupted`, a ``KeyboardInterrupt``, so both signals unwind the same way:
atomic writes remove their temporary file, :func:`cbsa_core.engine.runner.fit` writes an ``interrupted`` record to
the run's log and names the checkpoint to resume from, and the entry point prints one line. Under torchrun every
rank receives the signal (torchrun forwards it) and stops the same way. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Type

from ..checkpoint import CheckpointError
from ..data.imagefolder import DatasetError
from .config import ConfigError
from .finite import NonFiniteError

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "RUNTIME_REFUSALS", "RunInterrupted", "exit_code_of",
           "run_cli", "stop_on_sigterm"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# Errors that mean "the input or the environment is wrong", not "the program is wrong". OSError covers a file that
# disappears, a full disk or a permission problem met while running: messages name the path.
RUNTIME_REFUSALS: Tuple[Type[BaseException], ...] = (ConfigError, DatasetError, CheckpointError, NonFiniteError,
                                                      OSError)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (``signum``); the message says where it stopped and what is kept."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        self.signum = int(signum)
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`RunInterrupted` in the main thread (outside the main thread, where
    Python cannot install handlers, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum, "stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def exit_code_of(error: BaseException, refusals: Tuple[Type[BaseException], ...] = ()) -> Optional[int]:
    """The exit status for ``error``, or None when it is not one the entry points handle (a bug: re-raised)."""
    if isinstance(error, SystemExit):
        code = error.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_REFUSED)
    if isinstance(error, KeyboardInterrupt):
        return 128 + getattr(error, "signum", int(signal.SIGINT))
    if isinstance(error, RUNTIME_REFUSALS + tuple(refusals)):
        return EXIT_REFUSED
    return None


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None, *,
            refusals: Tuple[Type[BaseException], ...] = ()) -> int:
    """Run ``main(argv)`` and turn its outcome into an exit status (module docstring), printing one line on stderr
    for a refusal or an interruption. ``refusals`` adds error types that mean bad input for this entry point (the
    scripts' ``ValueError``)."""
    with stop_on_sigterm():
        try:
            main(argv)
        except SystemExit as e:  # argparse has printed its usage message
            return exit_code_of(e)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", int(signal.SIGINT))
            detail = str(e) or "stopped"
            print(f"interrupted by {signal.Signals(signum).name}: {detail}", file=sys.stderr, flush=True)
            return 128 + signum
        except BaseException as e:  # noqa: BLE001 -- classified below, bugs re-raised with their traceback
            code = exit_code_of(e, refusals)
            if code is None:
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
            return code
    return EXIT_OK
