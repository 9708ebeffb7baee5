"""Optimizers of the release: Lion (classification, ViT), AdamW (alternative), SGD (segmentation).

All parameters go into ONE group, so weight decay hits everything (norms, biases, pos/cls, step sizes): the
release never consults ``no_weight_decay()`` (docs/authors-release.md item 15). Lion is this project's multi-tensor
implementation (:mod:`.lion`), bit-exact with the release's lion-pytorch and state-compatible with it; AdamW and SGD
are torch's, whose multi-tensor (``foreach``) path torch already picks on CUDA.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .lion import Lion

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("lion", "adamw", "sgd")


def build_optimizer(name: str, params_or_model: nn.Module | Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float, momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """Build ``lion`` (:class:`~cbsa_core.engine.lion.Lion`, betas 0.9/0.99, ``p *= 1 - lr*wd``), ``adamw``
    (betas 0.9/0.999) or ``sgd``.

    ``momentum``/``nesterov`` apply to SGD only (segmentation: momentum 0.9, Nesterov, wd 0).
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    params = list(params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model)
    if not params:
        raise ValueError("build_optimizer got no parameters")
    if key == "lion":
        return Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
