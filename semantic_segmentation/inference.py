"""Sliding-window and multi-scale inference, and mIoU over a dataset (docs/authors-release.md §4.3).

For each test-time variant of an image (scale ratio, optional flip), as the release's ``inference()``:

    1. Segmenter's ``resize``: a variant whose short side is below ``window_size`` is upscaled bilinearly so
       its short side equals the window (never downscaled);
    2. square windows of ``window_size`` at anchors ``[a for a in range(0, H, stride) if a < H - ws] + [H - ws]``
       (same along W); a side still shorter than the window is covered by one window of that side's length;
    3. the model runs on the windows in batches of ``window_batch_size``;
    4. logits are averaged where windows overlap, resized bilinearly to the original image size, un-flipped,
       and turned into class probabilities (softmax);

then the probabilities of all variants are averaged and the argmax is the prediction.

Step 1 matters even single-scale: the keep-ratio test rescale caps the long side at ``4·im_size``, so an image with
aspect ratio > 4 comes out with a short side below ``im_size`` and is upscaled here. It also turns the multi-scale
ratios < 1 into blurred copies at ratio 1 (docs/authors-release.md item 38). ``upscale_small=False`` runs every
variant at its own size instead (not the release's numbers).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cbsa_core.engine.amp import autocast_context
from cbsa_core.engine.distributed import (ShardedEvalSampler, all_reduce_sum, collective_device, get_rank,
                                         get_world_size)
from cbsa_core.engine.finite import NonFiniteOutputError

from .data import eval_collate
from .metrics import confusion_matrix, metrics_from_confusion

__all__ = ["window_anchors", "sliding_window_logits", "predict_probabilities", "predict", "confusion_on_shard",
           "evaluate_miou", "MS_RATIOS"]

_LOG = logging.getLogger(__name__)

MS_RATIOS: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def window_anchors(size: int, window: int, stride: int) -> List[int]:
    """Window start positions along one side of length ``size`` (Segmenter's ``sliding_window``)."""
    if stride <= 0 or window <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if size <= window:
        return [0]
    return [a for a in range(0, size, stride) if a < size - window] + [size - window]


@torch.no_grad()
def sliding_window_logits(model: nn.Module, im: torch.Tensor, window_size: int, window_stride: int,
                          window_batch_size: int = 4, precision: str = "fp32") -> torch.Tensor:
    """Logits (n_cls, H, W) of one image (1, 3, H, W) or (3, H, W), averaged over overlapping windows."""
    if im.dim() == 3:
        im = im.unsqueeze(0)
    if im.dim() != 4 or im.shape[0] != 1:
        raise ValueError(f"sliding_window_logits takes one image (1, C, H, W), got {tuple(im.shape)}")
    h, w = im.shape[-2:]
    wh, ww = min(window_size, h), min(window_size, w)
    anchors = [(y, x) for y in window_anchors(h, window_size, window_stride)
               for x in window_anchors(w, window_size, window_stride)]
    logits: Optional[torch.Tensor] = None
    count = torch.zeros((1, h, w), device=im.device)
    for i in range(0, len(anchors), window_batch_size):
        batch_anchors = anchors[i:i + window_batch_size]
        crops = torch.cat([im[:, :, y:y + wh, x:x + ww] for y, x in batch_anchors])
        with autocast_context(im.device, precision):
            out = model(crops)
        out = out.float()
        if logits is None:
            logits = torch.zeros((out.shape[1], h, w), device=im.device)
        for (y, x), o in zip(batch_anchors, out):
            logits[:, y:y + wh, x:x + ww] += o
            count[:, y:y + wh, x:x + ww] += 1
    return logits / count


def _upscale_short_side(im: torch.Tensor, size: int) -> torch.Tensor:
    """Segmenter's ``resize``: (B, C, h, w) -> bilinear upscale (align_corners=False) so the short side is
    ``size`` and the long side ``int(long / short · size)``; returned unchanged when the short side is already
    ``>= size`` (never downscales)."""
    h, w = im.shape[-2:]
    if min(h, w) >= size:
        return im
    if h < w:
        new = (size, int(w / h * size))
    else:
        new = (int(h / w * size), size)
    return F.interpolate(im, new, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: Sequence[torch.Tensor], flips: Sequence[bool],
                          out_size: Tuple[int, int], *, window_size: int, window_stride: int,
                          window_batch_size: int = 4, precision: str = "fp32",
                          upscale_small: bool = True) -> torch.Tensor:
    """Class probabilities (n_cls, H0, W0) averaged over test-time variants.

    ``images`` are (3, h, w) or (1, 3, h, w) tensors, ``flips[i]`` tells whether ``images[i]`` was flipped
    horizontally (its logits are flipped back before the softmax); ``upscale_small``: step 1 of the module doc.
    """
    device = next(model.parameters()).device
    probs: Optional[torch.Tensor] = None
    for im, flip in zip(images, flips):
        im = im.to(device).unsqueeze(0) if im.dim() == 3 else im.to(device)
        if upscale_small:
            im = _upscale_short_side(im, window_size)
        logits = sliding_window_logits(model, im, window_size, window_stride, window_batch_size, precision)
        logits = F.interpolate(logits.unsqueeze(0), tuple(out_size), mode="bilinear", align_corners=False)[0]
        if flip:
            logits = torch.flip(logits, (2,))
        p = torch.softmax(logits, dim=0)
        probs = p if probs is None else probs + p
    return probs / len(images)


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[torch.Tensor], flips: Sequence[bool], out_size: Tuple[int, int],
            **kwargs) -> torch.Tensor:
    """Label map (H0, W0) int64: argmax of :func:`predict_probabilities`."""
    return predict_probabilities(model, images, flips, out_size, **kwargs).argmax(dim=0)


@torch.no_grad()
def confusion_on_shard(model: nn.Module, dataset: Dataset, rank: int, world_size: int, *, window_size: int,
                       window_stride: int, window_batch_size: int = 4, precision: str = "fp32",
                       upscale_small: bool = True, num_workers: int = 0, num_images: Optional[int] = None,
                       log_every: int = 0, count_non_finite: bool = False):
    """Confusion matrix (n_cls, n_cls) over this rank's share of the first ``num_images`` images (all by
    default), and how many images that was. The shares of ranks 0..world_size-1 partition the set.

    With ``count_non_finite`` a third value follows: how many of those images got NaN/inf probabilities (their
    argmax, and so their confusion counts, mean nothing)."""
    n_cls = int(dataset.n_cls)
    device = next(model.parameters()).device
    n_total = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    subset = dataset if n_total == len(dataset) else torch.utils.data.Subset(dataset, range(n_total))
    sampler = ShardedEvalSampler(n_total, rank, world_size)
    loader = DataLoader(subset, batch_size=1, sampler=sampler, num_workers=num_workers, collate_fn=eval_collate)
    cm = torch.zeros((n_cls, n_cls), dtype=torch.int64, device=device)
    seen = non_finite = 0
    start = time.perf_counter()
    for i, item in enumerate(loader):
        label = item["label"].to(device)
        probs = predict_probabilities(model, item["images"], item["flips"], tuple(label.shape),
                                      window_size=window_size, window_stride=window_stride,
                                      window_batch_size=window_batch_size, precision=precision,
                                      upscale_small=upscale_small)
        non_finite += int(not bool(torch.isfinite(probs).all()))
        cm += confusion_matrix(probs.argmax(dim=0), label, n_cls)
        seen += 1
        if log_every and (i + 1) % log_every == 0:
            _LOG.info("eval [%d/%d] %.2fs/img", i + 1, len(sampler), (time.perf_counter() - start) / (i + 1))
    return (cm, seen, non_finite) if count_non_finite else (cm, seen)


@torch.no_grad()
def evaluate_miou(model: nn.Module, dataset: Dataset, *, window_size: int = 512, window_stride: int = 480,
                  window_batch_size: int = 4, precision: str = "fp32", upscale_small: bool = True,
                  num_workers: int = 0, max_images: Optional[int] = None, log_every: int = 0) -> Dict[str, object]:
    """mIoU, pixel accuracy and mean accuracy of ``model`` on an eval-mode dataset.

    ``dataset`` is a :class:`~semantic_segmentation.data.SegmentationFolder` in ``mode="eval"`` (its
    ``test_ratios``/``test_flip`` choose single- or multi-scale). ``upscale_small`` (default: the release's
    behaviour) is step 1 of the module doc. In a distributed run every rank evaluates its
    shard (:class:`ShardedEvalSampler`: no image dropped or duplicated) and the confusion matrices are summed;
    pass the unwrapped model (no DDP collectives in the forward). ``max_images`` evaluates a prefix of the set.

    Returns :func:`metrics_from_confusion`'s dict plus ``confusion`` ((n_cls, n_cls) int64 tensor) and
    ``num_images`` (the total over all ranks). Raises :class:`~cbsa_core.engine.finite.NonFiniteOutputError` on
    every rank when any image got non-finite outputs: the mIoU of such a model would be made up.
    """
    was_training = model.training
    model.eval()
    n_total = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    cm, seen, non_finite = confusion_on_shard(
        model, dataset, get_rank(), get_world_size(), window_size=window_size, window_stride=window_stride,
        window_batch_size=window_batch_size, precision=precision, upscale_small=upscale_small,
        num_workers=num_workers, num_images=n_total, log_every=log_every, count_non_finite=True)
    model.train(was_training)
    # Confusion counts are exact integers, so the sum over ranks equals a single-process evaluation.
    cm = all_reduce_sum(cm.to(collective_device()))
    counts = all_reduce_sum(torch.tensor([seen, non_finite], dtype=torch.int64, device=collective_device()))
    if int(counts[0].item()) != n_total:
        raise RuntimeError(f"evaluated {int(counts[0].item())} images across ranks, expected {n_total}")
    if int(counts[1].item()):
        raise NonFiniteOutputError("mIoU evaluation", int(counts[1].item()), n_total)
    result = metrics_from_confusion(cm, getattr(dataset, "class_names", None))
    result.update(confusion=cm.cpu(), num_images=n_total)
    return result
