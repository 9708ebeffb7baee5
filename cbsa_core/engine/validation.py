"""Settings checked at parse time, so a bad one is a usage error (exit 2) before anything is read or written.

* Value types for ``add_argument(type=...)``: :func:`finite_float`, :func:`non_negative_float`,
  :func:`positive_float`, :func:`positive_int`, :func:`non_negative_int`. They also check config-file values,
  which go through each flag's type (:mod:`.config`). ``float("nan")`` parses, so ``--lr nan`` would otherwise
  reach the optimizer.
* :func:`model_settings_error`: whether a model can be built with the final settings, asked of the model itself
  (the constructor is the single source of truth for impossible sizes), on the meta device: no memory, no
  initialisation cost, nothing downloaded.
* :func:`warn_if_single_class`: a classification dataset with one class trains to a trivial 100 %.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["finite_float", "non_negative_float", "positive_float", "positive_int", "non_negative_int",
           "model_settings_error", "warn_if_single_class"]

_LOG = logging.getLogger(__name__)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def model_settings_error(build: Callable[[], nn.Module],
                         input_shape: Optional[Sequence[int]] = None) -> Optional[str]:
    """The message of the ``ValueError``/``TypeError`` that building the model (``build()``, on the meta device)
    raises, or None when it builds (or cannot be built there: then the run's own build reports any problem).

    With ``input_shape`` (e.g. ``(1, 3, H, W)``) one forward of an empty meta tensor follows, best effort: a
    ``ValueError`` there (a size the layers refuse at run time) is reported too, while any other exception means
    only that an operation has no meta implementation, and the run itself then checks at its first step.
    """
    try:
        with torch.device("meta"):
            model = build()
    except (ValueError, TypeError) as e:
        return str(e)
    except Exception:  # noqa: BLE001 -- the constructor reads a tensor's value (.item()), which meta cannot give
        return None
    if input_shape is None:
        return None
    try:
        with torch.device("meta"), torch.no_grad():
            model.eval()(torch.empty(tuple(int(s) for s in input_shape)))
    except ValueError as e:
        return str(e)
    except Exception:  # noqa: BLE001 -- no meta kernel for some op: not a settings problem
        return None
    return None


def warn_if_single_class(num_classes: int, description: str) -> bool:
    """Log a warning when a classification dataset has fewer than two classes; returns whether it did.

    Every prediction is then the one class: the run "learns" nothing and reports a trivial 100 % top-1.
    """
    if num_classes >= 2:
        return False
    _LOG.warning("%s has %d class: every prediction is that class, so its top-1 of 100 %% is trivial; a "
                 "classification dataset needs at least two class folders", description, num_classes)
    return True
