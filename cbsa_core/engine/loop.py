"""The training and evaluation loops shared by the classification and ViT fine-tuning tracks.

Release semantics (docs/authors-release.md §1.1.5–1.1.6): autocast around forward + loss only, ``GradScaler`` for fp16,
no clipping unless asked (item 14), no gradient accumulation, evaluation in fp32 (item 16). Additions: no device
value is read between progress lines (:mod:`.step_stats`), a non-finite loss stops the run at the next progress
line, an evaluation with non-finite outputs stops instead of scoring them (:mod:`.finite`), and every reported
metric is summed over all ranks (the release did not all-reduce train top-1).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .amp import autocast_context, check_precision
from .finite import NonFiniteLossError, NonFiniteOutputError, count_non_finite_rows
from .distributed import (DistInfo, all_reduce_sum, broadcast_buffers, collective_device, get_rank,
                          get_world_size, is_dist_initialized, unwrap_model)
from .meters import MetricLogger, accuracy
from .step_stats import MAX_WINDOW, StepRecord, StepWindow

__all__ = ["NonFiniteLossError", "NonFiniteOutputError", "default_unpack_batch", "train_one_epoch",
           "evaluate_classifier"]

_LOG = logging.getLogger(__name__)


def default_unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a ``(x, y, ...)`` tuple/list or an ``{"image"/"im", "target"/"segmentation"}`` dict."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("im"))
        y = batch.get("target", batch.get("segmentation"))
        if x is not None and y is not None:
            return x, y
    raise TypeError(f"cannot unpack a batch of type {type(batch).__name__}; pass unpack_batch=")


def _is_classification(output: torch.Tensor, target: torch.Tensor) -> bool:
    return output.ndim == 2 and target.ndim == 1 and not target.is_floating_point()


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    optimizer: torch.optim.Optimizer, *, epoch: int, device: torch.device | str,
                    scaler: torch.amp.GradScaler | None = None, precision: str = "fp32",
                    clip_grad: float | None = None, scheduler_per_iter: Any | None = None, print_freq: int = 50,
                    log_fn: Callable[[dict, int], None] | None = None, dist_info: DistInfo | None = None,
                    max_steps: int | None = None, compute_accuracy: bool = True, epochs: int | None = None,
                    checkpoint_path: str | os.PathLike | None = None,
                    unpack_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = default_unpack_batch) -> dict:
    """Train for one pass over ``loader`` (or ``max_steps`` steps) and return epoch metrics summed over ranks.

    Per step: forward + loss under autocast -> the loss, batch size and top-1 count queued on the device
    (:class:`~cbsa_core.engine.step_stats.StepWindow`) -> at a progress step (every ``print_freq`` steps, and the
    last), ONE host read of the queued steps (all-reduced over ranks, so every rank stops together) and the
    non-finite check -> ``zero_grad(set_to_none=True)`` -> backward (scaled when ``scaler`` is enabled) -> optional
    grad-norm clipping (after unscaling) -> optimizer step -> ``scheduler_per_iter.step()`` if given (segmentation;
    per-epoch schedules are stepped by the caller) -> the progress line.

    Nothing else reads a device value during the epoch, so the host never waits for the GPU between progress
    lines. (torch's ``GradScaler.step``, used for fp16, reads its inf/NaN flag at every step: bf16 needs no scaler.)
    A non-finite loss raises :class:`NonFiniteLossError` at the first check after it, before that step's backward,
    naming the step where it first appeared and the steps that check covered; the step-0 check means a run whose
    first loss is already bad changes no weight.

    ``log_fn(metrics, global_step)`` is called at each progress line (e.g. TensorBoard) with the step's loss and
    top-1 averaged over all ranks. ``checkpoint_path`` (the run's last checkpoint) is only named in the
    :class:`NonFiniteLossError` message, which says whether it exists.

    Returns ``{"loss", "top1" (percent, or None), "lr" (of the last step), "images_per_sec" (all ranks),
    "num_images", "steps", "epoch_time"}``.
    """
    precision = check_precision(precision)
    device = torch.device(device)
    use_scaler = scaler is not None and scaler.is_enabled()
    if precision == "fp16" and not use_scaler:
        _LOG.warning("fp16 training without an enabled GradScaler: small gradients may underflow")
    main = dist_info.is_main if dist_info is not None else get_rank() == 0
    # Every rank runs this loop, so the process group (not dist_info) decides whether to reduce.
    distributed = is_dist_initialized() and get_world_size() > 1

    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    header = f"Epoch [{epoch}/{epochs}]" if epochs is not None else f"Epoch [{epoch}]"
    progress = MetricLogger(total, header=header, print_freq=print_freq, enabled=main)
    window = StepWindow(min(progress.print_freq, total or progress.print_freq, MAX_WINDOW), device, distributed)
    sums = {"loss": 0.0, "images": 0.0, "correct": 0.0, "acc_images": 0.0}

    def check() -> list[StepRecord]:
        """Read the queued steps; raise at the first non-finite loss; add them to the epoch sums."""
        records = window.read()
        for r in records:
            if not r.finite:
                value = r.local_loss if not math.isfinite(r.local_loss) else r.mean_loss
                raise NonFiniteLossError(epoch, r.step, value, checkpoint_path,
                                         checked=(records[0].step, records[-1].step))
        for r in records:
            sums["loss"] += r.loss_sum
            sums["images"] += r.images
            if r.has_accuracy:
                sums["correct"] += r.correct
                sums["acc_images"] += r.images
        return records

    model.train()
    lr = optimizer.param_groups[0]["lr"]
    steps = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images, target = unpack_batch(batch)
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        bs = images.shape[0]
        lr = optimizer.param_groups[0]["lr"]

        with autocast_context(device, precision):
            output = model(images)
            loss = criterion(output, target)

        correct = None
        if compute_accuracy and _is_classification(output, target):
            (correct,) = accuracy(output.detach(), target, topk=(1,))
        window.record(step, loss, bs, correct)
        show = progress.due(step)
        # Checked before this step's backward, so a loss that is bad at a check step never updates the weights.
        records = check() if show or window.full else []

        optimizer.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(loss).backward()
            if clip_grad is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if scheduler_per_iter is not None:
            scheduler_per_iter.step()

        steps = step + 1
        progress.advance(step, bs)
        if show:
            last = records[-1]
            values: dict[str, float] = {"loss": last.mean_loss}
            progress.set_meter("loss", last.mean_loss, sums["loss"], int(sums["images"]))
            if last.has_accuracy and last.images:
                values["acc1"] = 100.0 * last.correct / last.images
                progress.set_meter("acc1", values["acc1"], 100.0 * sums["correct"], int(sums["acc_images"]))
            values["lr"] = lr
            progress.set_meter("lr", lr, lr, 1)
            line = progress.emit(step)
            if line is not None and log_fn is not None:
                per_epoch = total if total is not None else 0
                log_fn(values, epoch * per_epoch + step)
    check()  # steps left unread (a loader without len())

    elapsed = time.perf_counter() - start
    g_images = sums["images"]
    return {
        "loss": sums["loss"] / g_images if g_images else float("nan"),
        "top1": 100.0 * sums["correct"] / sums["acc_images"] if sums["acc_images"] else None,
        "lr": float(lr),
        "images_per_sec": g_images / elapsed if elapsed > 0 else float("nan"),
        "num_images": int(g_images),
        "steps": steps,
        "epoch_time": elapsed,
    }


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable,
                        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                        device: torch.device | str, dist_info: DistInfo | None = None, precision: str = "fp32",
                        topk: Sequence[int] = (1, 5), print_freq: int | None = None,
                        unpack_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = default_unpack_batch,
                        sync_buffers: bool = True) -> dict:
    """Top-1/top-5 accuracy (percent) and mean loss over exactly the images of ``loader`` on all ranks.

    Per-batch sums (correct counts, ``loss * batch``) are all-reduced once at the end, so with a
    :class:`~cbsa_core.engine.distributed.ShardedEvalSampler` the result covers every image exactly once. The
    unwrapped model is evaluated, so shards of unequal length cannot stall a DDP collective. ``criterion`` must
    average over the batch (the release's label-smoothing CE does). fp32 by default, as the release.

    In a distributed run, ``sync_buffers`` first gives every rank rank 0's buffers (:func:`broadcast_buffers`), so
    the metric describes the weights rank 0 saves even when BatchNorm statistics drifted apart (no SyncBatchNorm
    under gloo). That is a collective: call this on every rank.

    Raises :class:`NonFiniteOutputError` (on every rank: the count is summed first) when any image's logits hold a
    NaN/inf, or when the mean loss is not finite: the argmax of NaN logits is class 0, a made-up accuracy.

    The sums stay on the device until the end (one host read), except at the printed progress lines.
    """
    precision = check_precision(precision)
    device = torch.device(device)
    distributed = is_dist_initialized() and get_world_size() > 1
    if sync_buffers and distributed:
        broadcast_buffers(model)
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    main = dist_info.is_main if dist_info is not None else get_rank() == 0
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    progress = MetricLogger(total, header="Test", print_freq=print_freq or 10**9, enabled=main and bool(print_freq))
    sums = torch.zeros(3 + len(topk), dtype=torch.float64, device=device)  # loss_sum, n, non-finite, correct@k...
    for step, batch in enumerate(loader):
        images, target = unpack_batch(batch)
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast_context(device, precision):
            output = net(images)
        output = output.float()
        loss = criterion(output, target)
        bs = images.shape[0]
        counts = accuracy(output, target, topk=topk)
        sums[0] += loss.double() * bs
        sums[1] += bs
        sums[2] += count_non_finite_rows(output)
        for i, c in enumerate(counts):
            sums[3 + i] += c
        progress.advance(step, bs)
        if progress.enabled and progress.due(step):  # read only for a printed line
            last, total_loss, seen = torch.stack([loss.detach().double(), sums[0], sums[1]]).tolist()
            progress.set_meter("loss", last, total_loss, int(seen))
            progress.emit(step)
    net.train(was_training)

    if distributed:
        sums = all_reduce_sum(sums.to(collective_device()))
    values = sums.tolist()  # the one read of the evaluation
    n = int(values[1])
    if n == 0:
        raise ValueError("evaluate_classifier saw no images (empty validation set?)")
    result = {"loss": values[0] / n, "num_images": n}
    bad = int(values[2])
    if bad or not math.isfinite(result["loss"]):
        raise NonFiniteOutputError("evaluation", bad, n, loss=result["loss"])
    for i, k in enumerate(topk):
        result[f"top{k}"] = 100.0 * values[3 + i] / n
    return result
