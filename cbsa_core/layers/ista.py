"""ISTA block of CRATE (docs/authors-release.md §2.6), the only channel mixer of CBT.

    out = ReLU( x + η (x W − x Wᵀ W) − η λ ),   η = λ = 0.1 fixed (not parameters, item 9).

Since x + η(x W − x Wᵀ W) = x + x U with U = η (W − Wᵀ W), the block is computed as ONE (T×d)·(d×d) GEMM
with the d×d update matrix formed per call: T·d² + d³ multiply-adds instead of 3·T·d², used whenever that is
cheaper (d < 2·rows). The result equals the release's three-product form up to float rounding.

The identity stays out of the matrix: I + U has entries near 1, and rounding it to bf16 (8 mantissa bits)
would discard most of the small update η(W − WᵀW); measured on CBT-S under CPU bf16 autocast, that made the
block's forward error 3× the three-product form's. Without autocast, ``addmm`` accumulates the GEMM onto x, so
the residual costs no extra pass; under autocast the bf16 product is added to the fp32 input.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ISTA"]


class ISTA(nn.Module):
    """``forward(x (..., dim)) -> (..., dim)``. Parameter ``weight`` is the dictionary D (dim × dim)."""

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size = step_size
        self.lambd = lambd

    def extra_repr(self) -> str:
        return f"dim={self.dim}, step_size={self.step_size}, lambd={self.lambd}"

    def update_matrix(self) -> torch.Tensor:
        """U = η (W − Wᵀ W), so that the block is ReLU(x + x U − η λ)."""
        w = self.weight
        return torch.addmm(w, w.t(), w, beta=self.step_size, alpha=-self.step_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.dim
        if self.dim >= 2 * rows:  # forming U (d³) would cost more than the two products it saves (2·rows·d²)
            return self.forward_reference(x)
        u = self.update_matrix()
        flat = x.reshape(-1, self.dim)
        if torch.is_autocast_enabled(x.device.type):
            out = flat + torch.matmul(flat, u)      # the low-precision product, added to the full-precision input
        else:
            out = torch.addmm(flat, flat, u.to(x.dtype))   # x + x U, accumulated by the GEMM itself
        # The shift and the ReLU run in place on that output (no backward needs it): no extra (rows, d) tensors.
        return F.relu(out.sub_(self.step_size * self.lambd), inplace=True).view(x.shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The release's three-product form, kept for verification."""
        x1 = F.linear(x, self.weight)
        grad_1 = F.linear(x1, self.weight.t())
        grad_2 = F.linear(x, self.weight.t())
        return F.relu(x + self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd)


