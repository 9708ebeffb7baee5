"""Multi-head Subspace Self-Attention, CRATE's attention (docs/authors-release.md §2.4).

Softmax attention with q = k = v tied to one projection W_U (paper Eq. 9):
    Z_p = x W_U (B,H,T,p);  out = merge_heads(softmax(Z_p Z_pᵀ/√p) Z_p) W_out + b.
Quadratic in T; CBSA with representatives = all tokens reduces to it (paper Sec. 3.3).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MSSA"]


class MSSA(nn.Module):
    """CRATE attention. ``forward(x (B,T,dim), grid_size=None) -> (B,T,dim)``; the grid is unused."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        self.dim, self.heads, self.dim_head, self.inner_dim = dim, heads, dim_head, inner
        self.scale = dim_head ** -0.5
        self.qkv = nn.Linear(dim, inner, bias=False)
        # Always present, also when heads == 1 and dim_head == dim (item 21), for key compatibility.
        self.to_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None, return_attn: bool = False):
        w = self._heads(x)
        b, _, t, _ = w.shape
        if return_attn:
            attn = torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)
            out = torch.matmul(attn, w)
        else:
            out = F.scaled_dot_product_attention(w, w, w, scale=self.scale)
        out = self.to_out(out.transpose(1, 2).reshape(b, t, self.inner_dim))
        return (out, attn) if return_attn else out

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        w = self._heads(x)
        return torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)
