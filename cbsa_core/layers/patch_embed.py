"""Patch embeddings: the CBSA release's convolutional stem and CRATE's linear patch embedding.

``ConvPatchEmbed`` ("Conv Embed", docs/authors-release.md §2.7): log2(patch) stages of 3×3 stride-2 convolutions
without bias, each followed by BatchNorm, GELU between stages and none after the last. Channels double per
stage and end at ``embed_dim``:
patch 16: in -> d/8 -> d/4 -> d/2 -> d.  patch 8: in -> d/4 -> d/2 -> d.  patch 4: in -> d/2 -> d.
BatchNorm2d and SyncBatchNorm have identical state-dict keys; training scripts convert to SyncBatchNorm
under DDP (docs/authors-release.md item 10).

``LinearPatchEmbed`` (the original CRATE, Ma-Lab-Berkeley/CRATE ``model/crate.py``): each p×p patch is flattened
in (p1 p2 c) order, then LayerNorm(p·p·c) -> Linear(p·p·c -> d) -> LayerNorm(d). Its children are numbered
0-3 as CRATE's ``nn.Sequential`` (0 = the parameter-free flattening), so its state-dict keys are CRATE's
``to_patch_embedding.{1,2,3}.*``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

__all__ = ["ConvPatchEmbed", "LinearPatchEmbed", "PatchFlatten", "PATCH_EMBED_TYPES", "conv3x3_bn",
           "check_patch_size", "check_linear_patch_size", "patch_grid_size", "image_patch_grid",
           "flatten_patches"]

# The patch embeddings a model can be built with (CBT's ``patch_embed`` argument).
PATCH_EMBED_TYPES = ("conv", "linear")


def conv3x3_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch))


def check_patch_size(patch_size: int, embed_dim: int, *, patch_arg: str = "patch_size",
                     dim_arg: str = "embed_dim") -> None:
    """Refuse a patch size the stem cannot build (a power of two >= 4) or a width its stages cannot halve.

    ``patch_arg`` / ``dim_arg`` are the argument names the caller's user sees (e.g. ``dim`` for CBT).
    """
    if not isinstance(patch_size, int) or patch_size < 4 or patch_size & (patch_size - 1):
        raise ValueError(f"{patch_arg} must be a power of two >= 4 (4, 8, 16, 32, ...) for the stride-2 conv stem, "
                         f"got {patch_size!r}")
    halvings = 2 ** (patch_size.bit_length() - 2)   # the first stage has embed_dim / 2^(stages - 1) channels
    if embed_dim <= 0 or embed_dim % halvings:
        raise ValueError(f"{dim_arg}={embed_dim} must be a positive multiple of {halvings} for "
                         f"{patch_arg}={patch_size} (the stem's first stage has {dim_arg}/{halvings} channels)")


def check_linear_patch_size(patch_size: int, *, patch_arg: str = "patch_size") -> None:
    """Refuse a patch size the linear embedding cannot use (any positive int works)."""
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"{patch_arg} must be a positive int for the linear patch embedding, got {patch_size!r}")


def patch_grid_size(height: int, width: int, patch_size: int) -> Tuple[int, int]:
    """(H, W) -> the token grid (H/p, W/p); refuses sizes the patch size does not divide."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} does not divide by the patch size {patch_size}; resize or "
                         f"crop to a multiple of {patch_size}")
    return height // patch_size, width // patch_size


@register_notrace_function  # torch.fx: the grid is Python ints read from the input's shape, not graph values
def image_patch_grid(images: torch.Tensor, patch_size: int, in_chans: int,
                     owner: str = "ConvPatchEmbed") -> Tuple[int, int]:
    """Check a batch of images (B, in_chans, H, W) and return its token grid (H/p, W/p); ``owner`` names the
    module in the error."""
    if images.dim() != 4 or images.shape[1] != in_chans:
        raise ValueError(f"{owner}: expected images (B, {in_chans}, H, W), got {tuple(images.shape)}")
    return patch_grid_size(int(images.shape[-2]), int(images.shape[-1]), patch_size)


class ConvPatchEmbed(nn.Module):
    """``forward(img (B, C, H, W)) -> (tokens (B, H/p·W/p, d), grid (H/p, W/p))``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        check_patch_size(patch_size, embed_dim)
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        stages = patch_size.bit_length() - 1
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        chans = [in_chans] + [embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]
        layers = []
        for i in range(stages):
            if i:
                layers.append(nn.GELU())
            layers.append(conv3x3_bn(chans[i], chans[i + 1]))
        self.proj = nn.Sequential(*layers)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        return patch_grid_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor):
        grid = image_patch_grid(x, self.patch_size, self.in_chans)
        return self.proj(x).flatten(2).transpose(1, 2), grid


@register_notrace_function  # torch.fx: the reshape is sized by Python ints read from the input's shape
def flatten_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p · W/p, p·p·C): patches in row-major grid order, each flattened in (p1 p2 c) order
    (einops ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``, CRATE's ``Rearrange``)."""
    b, c, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(b, c, h, patch_size, w, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, patch_size * patch_size * c)


class PatchFlatten(nn.Module):
    """``forward(img (B, C, H, W)) -> (B, H/p · W/p, p·p·C)``, see :func:`flatten_patches`. No parameters."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, order=(p1 p2 c)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_patches(x, self.patch_size)


class LinearPatchEmbed(nn.Sequential):
    """CRATE's patch embedding. ``forward(img (B, C, H, W)) -> (tokens (B, H/p·W/p, d), grid (H/p, W/p))``.

    ``[0]`` flattens the patches (no parameters), ``[1]`` LayerNorm(p·p·C), ``[2]`` Linear(p·p·C -> d) with bias,
    ``[3]`` LayerNorm(d): default PyTorch initialisation, as CRATE.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        check_linear_patch_size(patch_size)
        if not isinstance(in_chans, int) or in_chans <= 0:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        patch_dim = patch_size * patch_size * in_chans
        super().__init__(PatchFlatten(patch_size), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, embed_dim),
                         nn.LayerNorm(embed_dim))
        self.patch_size, self.in_chans, self.embed_dim, self.patch_dim = patch_size, in_chans, embed_dim, patch_dim

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        return patch_grid_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor):
        grid = image_patch_grid(x, self.patch_size, self.in_chans, owner="LinearPatchEmbed")
        for module in self:
            x = module(x)
        return x, grid
