"""Lion (Chen et al. 2023) with multi-tensor (``torch._foreach_*``) updates, bit-exact with lion-pytorch 0.2.5.

The release trains with ``lion_pytorch.Lion``, which updates one parameter at a time: eight tensor ops per
parameter and step, 1,104 ops for CBT-S's 138 tensors (1,242 on the first step, which also creates the state),
each a kernel launch on a GPU. Here every parameter group takes seven multi-tensor ops per device and dtype,
whatever its size (``scripts/gpu_check.py`` times both on a GPU).

The update is lion-pytorch's ``update_fn``, op for op and in the same order, so the result is the same bits
(checked on CPU in fp32 by the tests)::

    p       <- p * (1 - lr * wd)                                   # decoupled weight decay (skipped if wd == 0)
    update  <- sign(exp_avg * beta1 + grad * (1 - beta1))
    p       <- p + update * (-lr)
    exp_avg <- exp_avg * beta2 + grad * (1 - beta2)

(lion-pytorch's own ``lion_pytorch.foreach.Lion`` uses ``lerp``, which rounds differently, so it is not used.)
Multiplying by ``1 - lr * wd = 1`` is exact, so skipping it for ``wd == 0`` changes no bit. On CUDA the
multi-tensor kernels may fuse ``a + alpha * b`` differently from the per-tensor kernels; ``scripts/gpu_check.py``
measures the difference there.

State and hyperparameters match lion-pytorch's exactly: the groups hold ``lr``, ``betas`` and ``weight_decay``
only, and each parameter's state is ``{"exp_avg": tensor}``, so optimizer states saved by runs trained with
lion-pytorch load here (and the other way round) and the run continues bit for bit. ``decoupled_weight_decay``
divides the weight decay by the initial learning rate, as lion-pytorch does.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim.optimizer import Optimizer

__all__ = ["Lion"]


class Lion(Optimizer):
    """Lion with lion-pytorch's hyperparameters, update rule and state layout.

    Args:
        params: parameters or parameter groups (dicts with ``params`` and optional ``lr``, ``betas``,
            ``weight_decay``).
        lr: learning rate (> 0).
        betas: ``(beta1, beta2)``: the interpolation of the update direction and of the momentum, each in [0, 1].
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay``.
        decoupled_weight_decay: divide ``weight_decay`` by the initial ``lr`` (lion-pytorch's option).
        foreach: multi-tensor updates (default); ``False`` runs the same ops one parameter at a time.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, foreach: bool = True) -> None:
        if not lr > 0.0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be two numbers in [0, 1], got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        # Kept out of the groups so that state_dict() has lion-pytorch's layout exactly.
        self._init_lr = lr
        self.decoupled_wd = bool(decoupled_weight_decay)
        self.foreach = bool(foreach)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if self.decoupled_wd:
                wd /= self._init_lr
            buckets: Dict[Tuple[torch.device, torch.dtype], List[List[torch.Tensor]]] = defaultdict(
                lambda: [[], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                params, grads, exp_avgs = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            for params, grads, exp_avgs in buckets.values():
                if self.foreach:
                    _foreach_update(params, grads, exp_avgs, lr, wd, beta1, beta2)
                else:
                    for p, g, m in zip(params, grads, exp_avgs):
                        _single_update(p, g, m, lr, wd, beta1, beta2)
        return loss


def _foreach_update(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                    lr: float, wd: float, beta1: float, beta2: float) -> None:
    """Seven multi-tensor ops for the whole list (six without weight decay)."""
    if wd != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


def _single_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float, wd: float, beta1: float,
                   beta2: float) -> None:
    """The same ops for one tensor (lion-pytorch's ``update_fn``)."""
    if wd != 0.0:
        p.mul_(1.0 - lr * wd)
    update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
