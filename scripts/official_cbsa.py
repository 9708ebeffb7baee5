"""The authors' classification CBSA forward, re-implemented as released (docs/authors-release.md §2.1).

Used only as the "authors' implementation, measured here the same way" baseline of
``scripts/benchmark_attention.py``. It keeps the release's structure and cost: einops ``rearrange`` head
splits, the 1/√p scale applied to the m×T logits, ``w[:, :-1]`` pooling of a square ``int(sqrt(n))`` grid
(the [CLS] token lands in grid cell (0, 0) and the last patch is never pooled), a hard-coded 8×8 pool,
κ applied to the T×p broadcast, and a separate head merge + ``to_out``.

Parameter names equal ``cbsa_core.CBSA``'s (step_x, step_rep, proj, to_out), so
``OfficialCBSA.load_state_dict(cbsa_core.CBSA(...).state_dict())`` shares weights; with
``legacy_token_layout=True`` the two compute the same function (tests/test_performance.py checks it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

__all__ = ["OfficialCBSA"]


class OfficialCBSA(nn.Module):
    """``forward(x (b, n, D), return_attn=False) -> (b, n, D)`` with n = 1 + g² for a g×g patch grid."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.pool = nn.AdaptiveAvgPool2d((8, 8))
        self.qkv = nn.Identity()
        self.proj = nn.Linear(dim, inner_dim, bias=False)
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        h = w = int(math.sqrt(n))
        x = self.proj(x)
        self.qkv(x)  # hook point; its result is discarded in the release
        rep = self.pool(x[:, :-1, :].reshape(b, h, w, c).permute(0, 3, 1, 2))
        rep = rep.reshape(b, c, 64).permute(0, 2, 1)
        x = rearrange(x, "b n (h d) -> b h n d", h=self.heads)
        rep = rearrange(rep, "b n (h d) -> b h n d", h=self.heads)
        attn = self.attend(torch.matmul(rep, x.transpose(-1, -2)) * self.scale)
        if return_attn:
            return torch.matmul(attn.transpose(-1, -2), attn)
        rep_delta = torch.matmul(attn, x)
        rep = rep + self.step_rep * rep_delta
        rep_attn = self.attend(torch.matmul(rep, rep.transpose(-1, -2)) * self.scale)
        rep = torch.matmul(rep_attn, rep)
        out = torch.matmul(attn.transpose(-1, -2), rep)
        out = self.step_x * out
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out(out)
