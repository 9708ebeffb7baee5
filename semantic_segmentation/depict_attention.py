"""DEPICT's decoder attention (QishuaiWen/DEPICT ``model/dec_blocks.py``; docs/authors-release.md §4.6).

MSSA with the projection tied in and out, as a raw parameter, and one scalar step size:

    U    = proj                                   (I, D) parameter, I = H·p, init D^-1/2 · randn
    W    = heads(x Uᵀ)                            (B, H, N, p)   keys and values
    Q    = W, or heads(query Uᵀ) (cross-attention: class embeddings as queries)   (B, H, M, p)
    out  = step_size · merge_heads(softmax(Q Wᵀ / √p) W) U      (B, M, D)

There is no ``to_out`` and no bias. The release passes ``proj`` through ``ortho(proj, ..., operation=None)``,
which returns it unchanged; the orthogonal perturbations it can apply were experiments, not part of the
released model. ``dropout`` acts on the attention weights (the release's ``nn.Dropout`` after the softmax).
Parameter names (``proj``, ``step_size``) are the release's, so DEPICT's ``decoder.*`` weights load unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DepictAttention"]


class DepictAttention(nn.Module):
    """``forward(x (B, N, D), grid_size=None, query=None) -> (B, N or M, D)``; the grid is unused."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if heads <= 0 or dim_head <= 0:
            raise ValueError(f"DepictAttention: heads and dim_head must be positive, got {heads}, {dim_head}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head ** -0.5
        self.dropout = float(dropout)
        self.proj = nn.Parameter(dim ** -0.5 * torch.randn(self.inner_dim, dim))
        self.step_size = nn.Parameter(torch.randn(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, dropout={self.dropout}"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> projected (B, H, N, p)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"DepictAttention: expected tokens (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        return F.linear(x, self.proj).view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None,
                query: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self._heads(x)
        q = w if query is None else self._heads(query)
        out = F.scaled_dot_product_attention(q, w, w, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        b, _, m, _ = out.shape
        out = out.transpose(1, 2).reshape(b, m, self.inner_dim) @ self.proj
        return self.step_size * out

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None,
                      query: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(Q Wᵀ / √p) per head: (B, H, M, N)."""
        w = self._heads(x)
        q = w if query is None else self._heads(query)
        return torch.softmax(torch.matmul(q, w.transpose(-1, -2)) * self.scale, dim=-1)
