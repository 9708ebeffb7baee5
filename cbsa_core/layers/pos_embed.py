"""Resampling learned position embeddings to another token grid (any h ≠ w)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ["resample_pos_embed"]


@register_notrace_function  # torch.fx: the grids are Python ints that choose the output shape
def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                       num_prefix_tokens: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """(1, P + H0·W0, C) -> (1, P + h·w, C). Prefix embeddings are kept; the grid part is interpolated
    with an explicit output ``size`` (not a scale factor, which rounds wrongly: dinov2 #378), so
    rectangular grids come out exactly (dino #8)."""
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid entries, expected "
                         f"{old_grid[0]}x{old_grid[1]}")
    c = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    # Half precision is upcast for the interpolation kernel; float32/float64 keep their precision.
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    grid = F.interpolate(work, size=new_grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c)
    return torch.cat([prefix, grid], dim=1)
