"""Learning-rate schedules of the release, as picklable ``LambdaLR`` factors.

Callable *objects* (not lambdas) are used on purpose: ``LambdaLR.state_dict()`` stores an object's ``__dict__``
(plain numbers here, so it survives ``torch.load(weights_only=True)``) and ``load_state_dict`` restores it. A
resumed run therefore keeps the schedule it started with, warm-up included; the release swapped in a pure cosine on
``--resume``, so a resume inside the warm-up made the LR jump (docs/authors-release.md item 13).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLambda", "PolynomialLambda", "build_lambda_scheduler"]


class WarmupCosineLambda:
    """Per-epoch factor ``min((e+1)/(warmup+eps), 0.5*(1+cos(pi*e/epochs)))`` for 0-based epoch ``e``.

    This is the release's exact formula (§1.1.5): step the ``LambdaLR`` once per epoch, after validation. Its peak
    is below 1 (0.961 at e=19 for warmup 20 / 150 epochs; 0.922 at e=9 for 10 / 50); that is intended (item 13).
    ``eps=1e-8`` is the classification release; the ViT track's release divides by 10 exactly (pass ``eps=0``).
    """

    def __init__(self, warmup_epochs: int, epochs: int, eps: float = 1e-8) -> None:
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = int(warmup_epochs)
        self.epochs = int(epochs)
        self.eps = float(eps)

    def __call__(self, epoch: int) -> float:
        denom = self.warmup_epochs + self.eps
        warm = (epoch + 1) / denom if denom > 0 else math.inf
        return min(warm, 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs)))

    def __repr__(self) -> str:
        return f"WarmupCosineLambda(warmup_epochs={self.warmup_epochs}, epochs={self.epochs}, eps={self.eps})"


class PolynomialLambda:
    """Per-iteration factor giving ``lr_t = (base_lr - min_lr) * (1 - t/max_iters)**power + min_lr``.

    ``t`` is the number of optimizer updates done, so the first iteration uses ``base_lr``; for ``t >= max_iters``
    the LR stays at ``min_lr`` (segmentation, §1.3.4). ``base_lr`` must be the optimizer's LR, since ``LambdaLR``
    multiplies the factor by it.
    """

    def __init__(self, base_lr: float, max_iters: int, power: float = 0.9, min_lr: float = 1e-5) -> None:
        if base_lr <= 0:
            raise ValueError(f"base_lr must be positive, got {base_lr}")
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        if min_lr < 0 or min_lr > base_lr:
            raise ValueError(f"min_lr must lie in [0, base_lr={base_lr}], got {min_lr}")
        self.base_lr = float(base_lr)
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)

    def __call__(self, t: int) -> float:
        t = min(max(t, 0), self.max_iters)
        lr = (self.base_lr - self.min_lr) * (1.0 - t / self.max_iters) ** self.power + self.min_lr
        return lr / self.base_lr

    def __repr__(self) -> str:
        return (f"PolynomialLambda(base_lr={self.base_lr}, max_iters={self.max_iters}, power={self.power}, "
                f"min_lr={self.min_lr})")


def build_lambda_scheduler(optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> LambdaLR:
    """``LambdaLR(optimizer, fn)``; the optimizer's LR becomes ``base_lr * fn(0)`` immediately."""
    return LambdaLR(optimizer, lr_lambda=fn)
