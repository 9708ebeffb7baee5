"""The per-epoch driver of all three tracks: :func:`fit`, its loaders and its evaluator callback.

One epoch, in the order that makes ``--resume`` bit-exact (see :mod:`.training_state`) and that never saves or scores
a non-finite model (see :mod:`.finite`)::

    seed_everything(epoch_seed(seed, epoch, rank))      augmentation stream = f(seed, epoch, rank) only
    train_sampler.set_epoch(epoch), dataset.set_epoch   data order and augmentation = f(seed, epoch) only
    train_one_epoch(...)                                NaN/Inf loss -> NonFiniteLossError at the next check
    evaluator(model)        (every eval_freq epochs)    non-finite outputs or loss -> NonFiniteOutputError
    scheduler.step()        (per-epoch schedules)       the release's per-epoch LambdaLR
    parameters checked finite                           otherwise NonFiniteParametersError, nothing saved
    one progress line printed                           results first, then the files
    save last (and best) checkpoint atomically          rank 0 only
    log record, TensorBoard scalars

Any stop (NaN/Inf, SIGINT, SIGTERM) writes an event record to the run's log naming the checkpoint that really is
kept, and leaves the files of the last completed epoch as they were.

Loader workers are not persistent: fresh workers draw their seeds from the just reseeded global RNG when each
epoch's iterator is created, so a resumed run's crops match an uninterrupted run's. Persistent workers would keep
the seeds of the epoch the run (or the resume) started with.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_write_yaml
from .cli import RunInterrupted
from .distributed import DistInfo, ShardedEvalSampler, epoch_seed, seed_everything, unwrap_model
from .finite import (NonFiniteError, NonFiniteOutputError, NonFiniteParametersError, is_finite_number,
                     kept_checkpoint_note, non_finite_parameters)
from .logging import JsonlLogger, TensorBoardLogger, to_jsonable
from .loop import evaluate_classifier, train_one_epoch
from .meters import format_eta
from .run_dir import OutputDir
from .training_state import make_train_sampler, save_training_checkpoint

__all__ = ["LAST_CHECKPOINT", "BEST_CHECKPOINT", "LOG_JSONL", "RUN_CONFIG", "RunFiles", "Evaluator",
           "classifier_evaluator", "make_train_loader", "make_eval_loader", "fit"]

_LOG = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint.pth.tar"
BEST_CHECKPOINT = "model_best.pth.tar"
LOG_JSONL = "log.jsonl"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class RunFiles:
    """The names of a run's files in its output folder (the classification and ViT tracks' by default).

    ``best`` is None for a track that keeps no best checkpoint (segmentation, as released).
    """

    checkpoint: str = LAST_CHECKPOINT
    best: Optional[str] = BEST_CHECKPOINT
    log: str = LOG_JSONL
    config: str = RUN_CONFIG
    tensorboard: str = "tensorboard"

    @property
    def run_markers(self) -> Tuple[str, ...]:
        """The files whose presence means a folder holds a run: its checkpoints (a run stopped before its first
        checkpoint leaves only logs, which the restarted run appends to)."""
        return tuple(n for n in (self.checkpoint, self.best) if n)

    @property
    def run_companions(self) -> Tuple[str, ...]:
        """The run's other files, removed with its checkpoints when ``--overwrite`` replaces it."""
        return (self.log, self.config, self.tensorboard)


Evaluator = Callable[[nn.Module], Mapping[str, Any]]
"""``evaluator(model) -> metrics``: called on every rank (it may use collectives); the metrics are numbers, and the
one named by ``fit``'s ``best_metric_name`` selects the best checkpoint (higher is better). It raises
:class:`~cbsa_core.engine.finite.NonFiniteOutputError` when the model's outputs are not finite."""


def classifier_evaluator(val_loader: DataLoader, criterion: Callable, dist_info: DistInfo) -> Evaluator:
    """Top-1/top-5 and loss on ``val_loader`` (:func:`~cbsa_core.engine.loop.evaluate_classifier`)."""
    def evaluate(model: nn.Module) -> Mapping[str, Any]:
        return evaluate_classifier(model, val_loader, criterion, device=dist_info.device, dist_info=dist_info)
    return evaluate


def make_train_loader(dataset: Dataset, dist_info: DistInfo, *, batch_size: int, workers: int, seed: int,
                      epoch: int = 0) -> DataLoader:
    """Shuffled training loader whose order depends only on ``(seed, epoch)`` (see :func:`make_train_sampler`).

    ``batch_size`` and ``workers`` are per process. No ``drop_last`` (as released); no persistent workers (see the
    module docstring).
    """
    sampler = make_train_sampler(dataset, dist_info, seed=seed, epoch=epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=dist_info.device.type == "cuda", drop_last=False, persistent_workers=False)


def make_eval_loader(dataset: Dataset, dist_info: DistInfo, *, batch_size: int, workers: int) -> DataLoader:
    """Exact validation loader: every image on exactly one rank, no padding, no dropping
    (:class:`ShardedEvalSampler`)."""
    sampler = ShardedEvalSampler(len(dataset), dist_info.rank, dist_info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=dist_info.device.type == "cuda")


def _format_metrics(metrics: Mapping[str, Any]) -> str:
    shown = []
    for key, value in metrics.items():
        if key == "num_images" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        shown.append(f"{key} {value:.4f}" if key == "loss" else f"{key} {value:.2f}")
    return " ".join(shown)


def fit(model: nn.Module, *, train_loader: DataLoader, criterion: Callable, optimizer, dist_info: DistInfo,
        output_dir: str | os.PathLike | OutputDir, seed: int, epochs: int, arch: str, model_config: Mapping[str, Any],
        config: Mapping[str, Any], val_loader: Optional[DataLoader] = None, evaluator: Optional[Evaluator] = None,
        best_metric_name: str = "top1", eval_freq: int = 1, scheduler=None, scheduler_interval: str = "epoch",
        start_epoch: int = 0, stop_epoch: Optional[int] = None, best_metric: Optional[float] = None,
        scaler=None, precision: str = "fp32", clip_grad: Optional[float] = None, print_freq: int = 50,
        max_steps_per_epoch: Optional[int] = None, tensorboard: bool = True, files: RunFiles = RunFiles(),
        record_extra: Optional[Callable[[int, Mapping[str, Any]], Mapping[str, Any]]] = None,
        start_info: Optional[Mapping[str, Any]] = None,
        checkpoint_extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train epochs ``start_epoch .. min(stop_epoch, epochs) - 1``, evaluating every ``eval_freq`` epochs; returns
    the metrics.

    Args:
        model: the (possibly DDP-wrapped) model, already on ``dist_info.device``.
        train_loader: from :func:`make_train_loader` (its sampler, and its dataset when it has ``set_epoch``, get
            ``set_epoch`` every epoch).
        val_loader / evaluator: the validation: ``evaluator(model) -> metrics`` (:data:`Evaluator`), or a
            classification ``val_loader`` (:func:`classifier_evaluator`). One of the two is required.
        best_metric_name: the metric that selects the best checkpoint (``top1``, ``mean_iou``).
        eval_freq: evaluate after epochs ``e`` with ``e % eval_freq == 0`` and after the schedule's last epoch.
        criterion, optimizer, scaler, precision, clip_grad, print_freq, max_steps_per_epoch: passed to
            :func:`train_one_epoch`.
        scheduler, scheduler_interval: the LR scheduler (its state is in every checkpoint), stepped after each
            validation (``"epoch"``, the release's classification schedule) or after each step (``"iteration"``,
            segmentation's polynomial decay).
        output_dir: an :class:`~cbsa_core.engine.run_dir.OutputDir` checked by
            :func:`~cbsa_core.engine.run_dir.check_output_dir` (or a plain path); it receives ``files``: the last
            checkpoint (every epoch), the best one (when the metric improves and ``files.best`` is set), the JSON-lines
            log, the run config and TensorBoard events. Only rank 0 writes.
        seed: the run's seed; epoch ``e`` on rank ``r`` is reseeded with ``epoch_seed(seed, e, r)``.
        epochs: the schedule's length (printed as ``epoch/epochs``).
        arch, model_config, config: recorded in the checkpoints (``config`` also as the run config file).
        stop_epoch: stop before this epoch without changing the schedule (a job time limit, a test).
        best_metric: best value so far (from a resumed checkpoint), or None.
        record_extra: ``record_extra(epoch, train_metrics)`` after each epoch; its entries join the log record.
        start_info: extra entries for the ``start`` event of the log.
        checkpoint_extra: extra entries of every checkpoint (tensors and plain values).

    Returns ``{"best_metric", "best_<name>", "last_epoch", "epochs_run", "train", "val"}`` (the last epoch's train
    and val metrics; empty when none ran).

    Raises :class:`~cbsa_core.engine.finite.NonFiniteError` (NaN/Inf loss, outputs or parameters) and
    :class:`~cbsa_core.engine.cli.RunInterrupted` (SIGINT/SIGTERM) after logging them: the files of the last
    completed epoch are left as they were, and the message names the checkpoint that is kept.
    """
    if evaluator is None:
        if val_loader is None:
            raise ValueError("fit needs a val_loader or an evaluator")
        evaluator = classifier_evaluator(val_loader, criterion, dist_info)
    if scheduler_interval not in ("epoch", "iteration"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'iteration', got {scheduler_interval!r}")
    if eval_freq < 1:
        raise ValueError(f"eval_freq must be >= 1, got {eval_freq}")
    out = output_dir if isinstance(output_dir, OutputDir) else OutputDir(Path(output_dir))
    out_dir = out.path
    is_main = dist_info.is_main
    end_epoch = epochs if stop_epoch is None else min(stop_epoch, epochs)
    last_path = out_dir / files.checkpoint
    best_path = out_dir / files.best if files.best else None
    if is_main:
        out.claim()
    jsonl = JsonlLogger(out_dir / files.log, enabled=is_main)
    tb = TensorBoardLogger(out_dir / files.tensorboard, enabled=is_main and tensorboard)
    if is_main:
        atomic_write_yaml(out_dir / files.config, to_jsonable(dict(config)), sort_keys=True)
        jsonl.log({"event": "start", "arch": arch, "start_epoch": start_epoch, "epochs": epochs, "seed": seed,
                   "world_size": dist_info.world_size, "precision": precision, **dict(start_info or {})})
        if start_epoch >= end_epoch:
            _LOG.warning("nothing to train: the run starts at epoch %d and stops before epoch %d", start_epoch,
                         end_epoch)
    sampler = getattr(train_loader, "sampler", None)
    dataset = getattr(train_loader, "dataset", None)
    per_iteration = scheduler if scheduler_interval == "iteration" else None

    def log_steps(values: Dict[str, float], step: int) -> None:
        tb.scalars(values, step, prefix="train_step/")

    best = best_metric
    best_key = f"best_{best_metric_name}"
    result: Dict[str, Any] = {"best_metric": best, best_key: best, "last_epoch": None, "epochs_run": 0, "train": {},
                              "val": {}}
    run_start = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, end_epoch):
            seed_everything(epoch_seed(seed, epoch, dist_info.rank))
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            train = train_one_epoch(
                model, train_loader, criterion, optimizer, epoch=epoch, epochs=epochs, device=dist_info.device,
                scaler=scaler, precision=precision, clip_grad=clip_grad, scheduler_per_iter=per_iteration,
                print_freq=print_freq, log_fn=log_steps, dist_info=dist_info, max_steps=max_steps_per_epoch,
                checkpoint_path=last_path)
            val: Dict[str, Any] = {}
            if epoch % eval_freq == 0 or epoch == epochs - 1:
                try:
                    val = dict(evaluator(model))
                except NonFiniteOutputError as e:
                    raise NonFiniteOutputError(f"validation after epoch {epoch}", e.count, e.total,
                                               loss=e.loss) from None
                if "loss" in val and not is_finite_number(val["loss"]):
                    raise NonFiniteOutputError(f"validation after epoch {epoch}", 0, int(val.get("num_images", 0)),
                                               loss=val["loss"])
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            # Identical on every rank (DDP keeps the parameters in sync), so every rank stops together.
            bad = non_finite_parameters(unwrap_model(model))
            if bad:
                raise NonFiniteParametersError(epoch, bad)
            score = val.get(best_metric_name)
            is_best = is_finite_number(score) and (best is None or score > best)
            if is_best:
                best = float(score)
            done = epoch + 1 - start_epoch
            if is_main:  # results first: the line is out before any file is written
                eta = (time.perf_counter() - run_start) / done * (end_epoch - epoch - 1)
                top1 = "" if train.get("top1") is None else f" top1 {train['top1']:.2f}"
                shown_val = f" | val {_format_metrics(val)}" if val else ""
                shown_best = "" if best is None else f" (best {best_metric_name} {best:.2f})"
                print(f"Epoch {epoch}/{epochs}: train loss {train['loss']:.4f}{top1}{shown_val}{shown_best} | "
                      f"lr {train['lr']:.2e} | {train['images_per_sec']:.1f} img/s | "
                      f"epoch {train['epoch_time']:.1f}s | eta {format_eta(eta)}", flush=True)
                state = dict(model=model, arch=arch, model_config=model_config, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, epoch=epoch, best_metric=best, config=config,
                             **dict(checkpoint_extra or {}))
                if best_metric_name == "top1":
                    state["best_acc1"] = best  # the release's key, read by its tools
                save_training_checkpoint(last_path, **state)
                if is_best and best_path is not None:
                    save_training_checkpoint(best_path, **state)
            jsonl.log({"epoch": epoch, "lr": train["lr"], **{f"train_{k}": v for k, v in train.items() if k != "lr"},
                       **{f"val_{k}": v for k, v in val.items()}, best_key: best,
                       **dict(record_extra(epoch, train) if record_extra is not None else {})})
            tb.scalars({"loss": train["loss"], "lr": train["lr"], "images_per_sec": train["images_per_sec"],
                        **({"top1": train["top1"]} if train.get("top1") is not None else {})}, epoch,
                       prefix="train/")
            tb.scalars({k: v for k, v in val.items() if k != "num_images"}, epoch, prefix="val/")
            tb.flush()
            result = {"best_metric": best, best_key: best, "last_epoch": epoch, "epochs_run": done, "train": train,
                      "val": val}
    except NonFiniteError as e:
        e.with_kept(kept_checkpoint_note(last_path))
        checked = getattr(e, "checked", None)
        jsonl.log({"event": e.event, "epoch": getattr(e, "epoch", epoch), "step": getattr(e, "step", None),
                   "checked_steps": None if checked is None else list(checked),
                   "value": getattr(e, "value", None), "message": str(e),
                   "checkpoint": str(last_path) if last_path.is_file() else None})
        raise
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through cbsa_core.engine.cli.stop_on_sigterm
        signum = getattr(e, "signum", int(signal.SIGINT))
        kept = kept_checkpoint_note(last_path)
        resume = f"; continue with --resume {last_path}" if last_path.is_file() else ""
        jsonl.log({"event": "interrupted", "signal": signal.Signals(signum).name, "epoch": epoch,
                   "checkpoint": str(last_path) if last_path.is_file() else None})
        raise RunInterrupted(signum, f"stopped during epoch {epoch}; {kept}{resume}") from None
    finally:
        tb.close()
    if is_main:
        jsonl.log({"event": "end", best_key: best, "elapsed_s": time.perf_counter() - run_start})
        shown = "n/a" if best is None else f"{best:.2f}"
        print(f"Done: best val {best_metric_name} {shown}; checkpoints in {out_dir}", flush=True)
    return result
