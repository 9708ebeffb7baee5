"""ReLU-kernel linear attention (Katharopoulos et al., 2020), non-causal: the benchmark's linear baseline.

Per head, with the kernel feature map φ(u) = ReLU(u) + 1e-6:

    q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v          one Linear dim -> 3·H·p (timm layout)
    out_h   = φ(q_h) (φ(k_h)ᵀ v_h)  /  (φ(q_h) Σ_t φ(k_h)_t)    (T, p), a row-wise normalised kernel product
    out     = merge_heads(out) W_o + b_o

Four projections (q, k, v, output) against CBSA's two. Linear in T: the p×p summary φ(k_h)ᵀ v_h is
formed first. As in CBSA the output projection is folded into the per-sample summaries,
out = Σ_h (φ(q_h) / den_h) (KV_h W_o,h) + b_o, one (T × I)·(I × dim) GEMM with q left in token-major
layout, so only k and v get a head-major copy.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import fold_heads, matmul_tn

__all__ = ["LinearAttention"]


class LinearAttention(nn.Module):
    """``forward(x (B, T, dim), grid_size=None) -> (B, T, dim)``; the grid is unused.

    Args:
        dim: token width d.
        heads: number of heads H.
        dim_head: head width p (inner width I = H·p).
        qkv_bias: bias on the q/k/v projection (timm's ``Attention(qkv_bias=True)`` convention).
        eps: the constant added to ReLU in φ, which keeps the normaliser positive.

    Parameters: ``qkv`` (Linear dim -> 3·I) and ``proj`` (Linear I -> dim), as timm's ``Attention``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if heads <= 0 or dim_head <= 0:
            raise ValueError(f"LinearAttention: heads and dim_head must be positive, got {heads}, {dim_head}")
        inner = heads * dim_head
        self.dim, self.heads, self.dim_head, self.inner_dim, self.eps = dim, heads, dim_head, inner, eps
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, eps={self.eps}"

    def feature_map(self, u: torch.Tensor) -> torch.Tensor:
        """φ(u) = ReLU(u) + eps, elementwise."""
        return F.relu(u) + self.eps

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"LinearAttention: expected input (B, T, {self.dim}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        h, p, inner = self.heads, self.dim_head, self.inner_dim
        qkv = self.qkv(x)  # (B, T, 3I)
        q = self.feature_map(qkv[..., :inner]).view(b, t, h, p)  # token-major, never copied
        # k and v head-major (B, H, T, p): both token products below then run on contiguous operands.
        kv_in = qkv[..., inner:].view(b, t, 2, h, p).permute(2, 0, 3, 1, 4).contiguous()
        k, v = self.feature_map(kv_in[0]), kv_in[1]
        summary = matmul_tn(k, v)  # Σ_t φ(k_t) v_tᵀ per head: (B, H, p, p)
        k_sum = k.sum(dim=2)  # Σ_t φ(k_t): (B, H, p)
        den = (q * k_sum.unsqueeze(1)).sum(dim=-1, keepdim=True)  # φ(q_t)·Σφ(k): (B, T, H, 1)
        q_normed = (q / den).reshape(b, t, inner)  # (B, T, I)
        folded = fold_heads(summary, self.proj.weight.t())  # KV_h W_o,h stacked: (B, I, dim)
        return torch.baddbmm(self.proj.bias.to(folded.dtype), q_normed.to(folded.dtype), folded)
