"""The per-epoch driver shared by the classification and ViT fine-tuning tracks: :func:`fit` and its loaders.

One epoch, in the order that makes ``--resume`` bit-exact (see :mod:`.training_state`)::

    seed_everything(epoch_seed(seed, epoch, rank))      augmentation stream = f(seed, epoch, rank) only
    train_sampler.set_epoch(epoch)                      data order = f(seed, epoch) only
    train_one_epoch(...)                                NaN/Inf loss -> NonFiniteLossError, nothing saved
    evaluate_classifier(...)                            rank 0's buffers broadcast first, exact sharded count
    scheduler.step()                                    the release's per-epoch LambdaLR
    save last (and best) checkpoint atomically          rank 0 only
    log.jsonl record, TensorBoard scalars, one progress line

Loader workers are not persistent: fresh workers draw their seeds from the just reseeded global RNG when each
epoch's iterator is created, so a resumed run's crops match an uninterrupted run's. Persistent workers would keep
the seeds of the epoch the run (or the resume) started with.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset

from .distributed import DistInfo, ShardedEvalSampler, epoch_seed, seed_everything
from .logging import JsonlLogger, TensorBoardLogger, to_jsonable
from .loop import NonFiniteLossError, evaluate_classifier, train_one_epoch
from .meters import format_eta
from .training_state import make_train_sampler, save_training_checkpoint

__all__ = ["LAST_CHECKPOINT", "BEST_CHECKPOINT", "LOG_JSONL", "RUN_CONFIG", "make_train_loader", "make_eval_loader",
           "fit"]

_LOG = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint.pth.tar"
BEST_CHECKPOINT = "model_best.pth.tar"
LOG_JSONL = "log.jsonl"
RUN_CONFIG = "config.yaml"


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


def _write_run_config(path: Path, config: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_jsonable(dict(config)), sort_keys=True))
    os.replace(tmp, path)


def fit(model: nn.Module, *, train_loader: DataLoader, val_loader: DataLoader,
        criterion: Callable, optimizer, scheduler, dist_info: DistInfo, output_dir: str | os.PathLike,
        seed: int, epochs: int, arch: str, model_config: Mapping[str, Any], config: Mapping[str, Any],
        start_epoch: int = 0, stop_epoch: Optional[int] = None, best_metric: Optional[float] = None,
        scaler=None, precision: str = "fp32", clip_grad: Optional[float] = None, print_freq: int = 50,
        tensorboard: bool = True, record_extra: Optional[Callable[[], Mapping[str, Any]]] = None,
        start_info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train epochs ``start_epoch .. min(stop_epoch, epochs) - 1`` and validate after each; returns the metrics.

    Args:
        model: the (possibly DDP-wrapped) model, already on ``dist_info.device``.
        train_loader: from :func:`make_train_loader` (its sampler gets ``set_epoch`` every epoch).
        val_loader: from :func:`make_eval_loader`; its top-1 picks the best checkpoint.
        criterion, optimizer, scaler, precision, clip_grad, print_freq: passed to :func:`train_one_epoch`.
        scheduler: per-epoch LR scheduler, stepped after validation (its state is in every checkpoint).
        output_dir: receives ``checkpoint.pth.tar`` (every epoch), ``model_best.pth.tar`` (when top-1 improves),
            ``log.jsonl``, ``config.yaml`` and ``tensorboard/``; only rank 0 writes.
        seed: the run's seed; epoch ``e`` on rank ``r`` is reseeded with ``epoch_seed(seed, e, r)``.
        epochs: the schedule's length (printed as ``epoch/epochs``).
        arch, model_config, config: recorded in the checkpoints (``config`` also as ``config.yaml``).
        stop_epoch: stop before this epoch without changing the schedule (a job time limit, a test).
        best_metric: best top-1 so far (from a resumed checkpoint), or None.
        record_extra: called after each epoch; its entries join the epoch's ``log.jsonl`` record.
        start_info: extra entries for the ``start`` event of ``log.jsonl``.

    Returns ``{"best_top1", "last_epoch", "epochs_run", "train", "val"}`` (the last epoch's train and val
    metrics; empty when no epoch ran).

    Raises :class:`NonFiniteLossError` (after logging it) when the loss turns NaN/Inf: the files of the last
    completed epoch are left as they were, and the message names them.
    """
    out_dir = Path(output_dir)
    is_main = dist_info.is_main
    end_epoch = epochs if stop_epoch is None else min(stop_epoch, epochs)
    last_path, best_path = out_dir / LAST_CHECKPOINT, out_dir / BEST_CHECKPOINT
    jsonl = JsonlLogger(out_dir / LOG_JSONL, enabled=is_main)
    tb = TensorBoardLogger(out_dir / "tensorboard", enabled=is_main and tensorboard)
    if is_main:
        _write_run_config(out_dir / RUN_CONFIG, config)
        jsonl.log({"event": "start", "arch": arch, "start_epoch": start_epoch, "epochs": epochs, "seed": seed,
                   "world_size": dist_info.world_size, "precision": precision, **dict(start_info or {})})
        if start_epoch >= end_epoch:
            _LOG.warning("nothing to train: the run starts at epoch %d and stops before epoch %d", start_epoch,
                         end_epoch)
    sampler = getattr(train_loader, "sampler", None)

    def log_steps(values: Dict[str, float], step: int) -> None:
        tb.scalars(values, step, prefix="train_step/")

    best = best_metric
    result: Dict[str, Any] = {"best_top1": best, "last_epoch": None, "epochs_run": 0, "train": {}, "val": {}}
    run_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, end_epoch):
            seed_everything(epoch_seed(seed, epoch, dist_info.rank))
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train = train_one_epoch(
                model, train_loader, criterion, optimizer, epoch=epoch, epochs=epochs, device=dist_info.device,
                scaler=scaler, precision=precision, clip_grad=clip_grad, print_freq=print_freq,
                log_fn=log_steps, dist_info=dist_info, checkpoint_path=last_path if last_path.exists() else None)
            val = evaluate_classifier(model, val_loader, criterion, device=dist_info.device, dist_info=dist_info)
            scheduler.step()
            is_best = best is None or val["top1"] > best
            best = val["top1"] if is_best else best
            if is_main:
                state = dict(model=model, arch=arch, model_config=model_config, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, epoch=epoch, best_metric=best, config=config,
                             best_acc1=best)  # best_acc1: the release's key, read by its tools
                save_training_checkpoint(last_path, **state)
                if is_best:
                    save_training_checkpoint(best_path, **state)
            jsonl.log({"epoch": epoch, "lr": train["lr"], **{f"train_{k}": v for k, v in train.items() if k != "lr"},
                       **{f"val_{k}": v for k, v in val.items()}, "best_top1": best,
                       **dict(record_extra() if record_extra is not None else {})})
            tb.scalars({"loss": train["loss"], "top1": train["top1"] or 0.0, "lr": train["lr"],
                        "images_per_sec": train["images_per_sec"]}, epoch, prefix="train/")
            tb.scalars({k: val[k] for k in ("loss", "top1", "top5") if k in val}, epoch, prefix="val/")
            tb.flush()
            done = epoch + 1 - start_epoch
            if is_main:
                eta = (time.perf_counter() - run_start) / done * (end_epoch - epoch - 1)
                print(f"Epoch {epoch}/{epochs}: train loss {train['loss']:.4f} top1 {train['top1'] or 0.0:.2f} | "
                      f"val loss {val['loss']:.4f} top1 {val['top1']:.2f} top5 {val.get('top5', math.nan):.2f} "
                      f"(best {best:.2f}) | lr {train['lr']:.2e} | {train['images_per_sec']:.1f} img/s | "
                      f"epoch {train['epoch_time']:.1f}s | eta {format_eta(eta)}", flush=True)
            result = {"best_top1": best, "last_epoch": epoch, "epochs_run": done, "train": train, "val": val}
    except NonFiniteLossError as e:
        jsonl.log({"event": "non_finite_loss", "epoch": e.epoch, "step": e.step, "value": e.value,
                   "checkpoint": str(e.checkpoint) if e.checkpoint else None})
        raise
    finally:
        tb.close()
    if is_main:
        jsonl.log({"event": "end", "best_top1": best, "elapsed_s": time.perf_counter() - run_start})
        shown = "n/a" if best is None else f"{best:.2f}%"
        print(f"Done: best val top-1 {shown}; checkpoints in {out_dir}", flush=True)
    return result
