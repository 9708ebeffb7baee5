"""Segmentation metrics from a confusion matrix (mmseg ``mean_iou`` semantics, docs/authors-release.md §4.3).

Per-class intersections and unions are summed over the whole evaluation set before dividing (no per-image
averaging); pixels labelled 255 are ignored. ``IoU_c = I_c / U_c``; classes with ``U_c = 0`` (absent from
both ground truth and prediction) are NaN and left out of the mean. Accuracies are percentages like the IoUs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["confusion_matrix", "metrics_from_confusion"]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_cls: int, ignore_index: int = 255) -> torch.Tensor:
    """(n_cls, n_cls) int64 counts, rows = ground truth, columns = prediction.

    ``pred`` and ``label`` are integer maps of the same shape; pixels with ``label == ignore_index`` are skipped.
    A ground-truth value outside [0, n_cls) that is not ``ignore_index`` is an error.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= n_cls):
        bad = torch.unique(label[(label < 0) | (label >= n_cls)])[:10].tolist()
        raise ValueError(f"label values {bad} are outside [0, {n_cls}) and are not the ignore index {ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n_cls):
        raise ValueError(f"predictions outside [0, {n_cls})")
    return torch.bincount(label * n_cls + pred, minlength=n_cls * n_cls).reshape(n_cls, n_cls)


def metrics_from_confusion(cm: torch.Tensor | np.ndarray,
                           class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mIoU, pixel accuracy and mean accuracy (percent) plus per-class IoU/accuracy from a confusion matrix.

    Returns ``mean_iou``, ``pixel_accuracy``, ``mean_accuracy`` (floats, NaN-free unless nothing was labelled),
    ``per_class_iou`` and ``per_class_accuracy`` (lists, NaN for classes without pixels), and ``class_names``.
    """
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    intersect = np.diag(cm)
    area_label = cm.sum(axis=1)
    area_pred = cm.sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union  # NaN where union == 0
        acc = intersect / area_label  # NaN where the class has no ground-truth pixel
    total = area_label.sum()

    def nanmean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) * 100 if np.isfinite(x).any() else float("nan")

    names: List[str] = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return dict(
        mean_iou=nanmean(iou),
        pixel_accuracy=float(intersect.sum() / total) * 100 if total else float("nan"),
        mean_accuracy=nanmean(acc),
        per_class_iou=[float(v) * 100 for v in iou],
        per_class_accuracy=[float(v) * 100 for v in acc],
        class_names=names,
    )
