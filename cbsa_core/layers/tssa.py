"""Token Statistics Self-Attention, ToST's attention, as released (docs/authors-release.md §2.5, item 20).

    w  = x W (Linear dim -> dim regardless of dim_head, no bias), split into heads (B,H,T,p)
    ŵ  = w L2-normalised over tokens (per feature column)
    Π  = softmax over *heads* of (Σ_p ŵ²) · temp_h                  (B,H,T): group membership
    μ  = (Π / (Σ_T Π + 1e-8)) w²                                    (B,H,1,p): Π-weighted second moments
    out = merge_heads(−(w ⊙ Π) ⊙ 1/(1 + μ)) W_out + b

Linear in T: a data-dependent per-channel rescaling (channel attention, paper Sec. 3.3, Eq. 13).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TSSA"]


class TSSA(nn.Module):
    """ToST attention. ``forward(x (B,T,dim), grid_size=None) -> (B,T,dim)``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TSSA: dim={dim} must divide by heads={heads} (its projection is dim -> dim)")
        self.dim, self.heads = dim, heads
        self.dim_head = dim // heads  # the release ignores dim_head here
        self.temp = nn.Parameter(torch.ones(heads, 1))
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def no_weight_decay(self):
        return {"temp"}

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None, return_attn: bool = False):
        b, t, _ = x.shape
        w = self.qkv(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)  # (B,H,T,p)
        w_sq_norm = F.normalize(w, dim=-2).pow(2).sum(dim=-1)  # (B,H,T)
        pi = torch.softmax(w_sq_norm * self.temp, dim=1)  # over heads
        weights = (pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)).unsqueeze(-2)  # (B,H,1,T)
        moments = torch.matmul(weights, w.pow(2))  # (B,H,1,p)
        out = -(w * pi.unsqueeze(-1)) / (1 + moments)
        out = self.to_out(out.transpose(1, 2).reshape(b, t, self.dim))
        if return_attn:
            return out, self.attention_map(x)
        return out

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The release's ``return_attn``: softmax over heads of w wᵀ, (B,H,T,T)."""
        b, t, _ = x.shape
        w = self.qkv(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        return torch.softmax(torch.matmul(w, w.transpose(-1, -2)), dim=1)
