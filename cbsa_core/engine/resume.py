"""The resume consistency rule of every track: a resumed run continues the run it resumes, or is refused.

A resumed run restores the optimizer, the LR schedule (its length and warm-up live in the scheduler state) and the
RNG, so a setting that differs from the checkpoint's would either be silently overruled by the restored state (the
learning rate and weight decay live in the optimizer state) or make the continuation something that the recorded
config does not describe. Each track lists the settings that must match: seed, schedule length, warm-up,
optimizer, learning rate, weight decay and the model settings its weights depend on. :func:`check_resume_consistency`
compares them with what the checkpoint recorded and refuses the first mismatch with one line that names the flag,
where the current value came from (command line, config file or default) and the value to resume with. Settings
not listed may change on resume (print frequency, workers, stop epoch, ...); the resumed run records the values it
really uses.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional

from ..checkpoint import checkpoint_kind, resolve_token_layout
from .config import ConfigError, setting_source

__all__ = ["ResumeMismatchError", "MustMatch", "check_resume_consistency", "schedule_settings",
           "token_layout_setting"]


class ResumeMismatchError(ConfigError):
    """A setting of the command differs from the one the resumed checkpoint was trained with."""


@dataclass(frozen=True)
class MustMatch:
    """One setting a resumed run must share with its checkpoint.

    Attributes:
        flag: the command-line flag that sets it (``--lr``), named in the message.
        requested: the value the command asks for.
        recorded: the value the checkpoint recorded; ``None`` (not recorded, e.g. an authors' file) is not checked.
        dest: the argparse dest, to tell where ``requested`` came from (defaults to the flag's name).
        what: how the value is described when it is not a plain flag value (e.g. ``"model setting rep_grid"``).
        fix: what to do instead, when "pass FLAG VALUE" is not it.
    """

    flag: str
    requested: Any
    recorded: Any
    dest: Optional[str] = None
    what: Optional[str] = None
    fix: Optional[str] = None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    return str(value)


def check_resume_consistency(checkpoint: str | os.PathLike, settings: Iterable[MustMatch],
                             args: Optional[argparse.Namespace] = None, *,
                             why: str = "a resumed run must continue that run exactly",
                             alternative: str = "start a new run") -> None:
    """Raise :class:`ResumeMismatchError` for the first setting whose requested value differs from the recorded
    one. ``args`` (from :func:`~cbsa_core.engine.config.parse_args_with_config`) tells where each value came from;
    ``why`` and ``alternative`` word the message (an evaluation checks the model settings the same way)."""
    for s in settings:
        if s.recorded is None or _same(s.requested, s.recorded):
            continue
        dest = s.dest or s.flag.lstrip("-").replace("-", "_")
        source = setting_source(args, dest) if args is not None else ""
        where = f" (from {source})" if source else ""
        what = s.what or s.flag
        if s.fix is not None:
            fix = s.fix
        elif source.startswith("--config "):
            fix = f"set {dest}: {_show(s.recorded)} in {source[len('--config '):]} or pass {s.flag} {_show(s.recorded)}"
        else:
            fix = f"pass {s.flag} {_show(s.recorded)}"
        raise ResumeMismatchError(
            f"{what} {_show(s.requested)}{where} differs from {_show(s.recorded)}, which --resume {checkpoint} was "
            f"trained with; {why}: {fix}, or {alternative}")


def schedule_settings(args: argparse.Namespace, saved: Mapping[str, Any]) -> List[MustMatch]:
    """The settings of the per-epoch warm-up/cosine recipe (classification, ViT fine-tuning) that a resume must share:
    ``--seed`` (when given; unset continues with the recorded seed), ``--epochs`` and ``--warmup-epochs`` (read
    from the scheduler state the resume restores, else the recorded config), ``--optimizer``, ``--lr``, ``--wd``."""
    cfg = saved.get("config") or {}
    lambdas = (saved.get("scheduler") or {}).get("lr_lambdas") or [None]
    schedule = lambdas[0] if isinstance(lambdas[0], dict) else {}
    checks = [MustMatch("--seed", args.seed, cfg.get("seed"))] if args.seed is not None else []
    return checks + [
        MustMatch("--epochs", args.epochs, schedule.get("epochs", cfg.get("epochs"))),
        MustMatch("--warmup-epochs", args.warmup_epochs, schedule.get("warmup_epochs", cfg.get("warmup_epochs"))),
        MustMatch("--optimizer", args.optimizer, cfg.get("optimizer")),
        MustMatch("--lr", args.lr, cfg.get("lr")),
        MustMatch("--wd", args.weight_decay, cfg.get("weight_decay"), dest="weight_decay"),
    ]


def token_layout_setting(requested: Optional[bool], saved: Mapping[str, Any]) -> List[MustMatch]:
    """An explicit ``--[no-]legacy-token-layout`` must agree with the layout this project's checkpoint records (its
    weights were trained with it); without the flag, or for files that record none, nothing is checked."""
    if requested is None or checkpoint_kind(saved) != "cbsa":
        return []
    legacy, _ = resolve_token_layout(saved)
    flag = f"--{'' if requested else 'no-'}legacy-token-layout"
    return [MustMatch(flag, requested, legacy, dest="legacy_token_layout", what="legacy_token_layout",
                      fix=f"drop {flag}: the checkpoint records the layout its weights were trained with")]
