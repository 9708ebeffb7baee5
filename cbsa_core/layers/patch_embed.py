"""Convolutional patch embedding ("Conv Embed", official-code.md §2.7).

log2(patch) stages of 3×3 stride-2 convolutions without bias, each followed by BatchNorm, GELU between
stages and none after the last. Channels double per stage and end at ``embed_dim``:
patch 16: in -> d/8 -> d/4 -> d/2 -> d.  patch 8: in -> d/4 -> d/2 -> d.  patch 4: in -> d/2 -> d.
BatchNorm2d and SyncBatchNorm have identical state-dict keys; training scripts convert to SyncBatchNorm
under DDP (item 10).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["ConvPatchEmbed", "conv3x3_bn"]


def conv3x3_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch))


class ConvPatchEmbed(nn.Module):
    """``forward(img (B, C, H, W)) -> (tokens (B, H/p·W/p, d), grid (H/p, W/p))``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"ConvPatchEmbed: patch_size must be a power of two >= 4, got {patch_size}")
        stages = patch_size.bit_length() - 1
        if embed_dim % (2 ** (stages - 1)):
            raise ValueError(f"ConvPatchEmbed: embed_dim={embed_dim} must divide by {2 ** (stages - 1)} "
                             f"for patch_size={patch_size}")
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        chans = [in_chans] + [embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]
        layers = []
        for i in range(stages):
            if i:
                layers.append(nn.GELU())
            layers.append(conv3x3_bn(chans[i], chans[i + 1]))
        self.proj = nn.Sequential(*layers)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} does not divide by the patch size {p}; resize or "
                             f"crop to a multiple of {p}")
        return height // p, width // p

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"ConvPatchEmbed: expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        return self.proj(x).flatten(2).transpose(1, 2), grid
