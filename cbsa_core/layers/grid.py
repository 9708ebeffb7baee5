"""Token grids and representative grids: the one place their rules are checked, and the pooling between them.

A token sequence is laid out as P prefix tokens ([CLS], registers), an h×w grid of patch tokens in raster
order, and S suffix tokens (e.g. a mask decoder's class embeddings). Representative-based attention pools
the grid to an rh×rw grid of representatives, which must fit inside it (rh <= h, rw <= w: adaptive pooling
to a larger grid would only repeat tokens).

Every layer, model and track checks ``grid_size`` and ``rep_grid`` through :func:`check_grid_size`,
:func:`check_rep_grid` and :func:`check_token_layout`, so the rules and their messages exist once.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["check_grid_size", "check_rep_grid", "check_token_layout", "adaptive_pool_tokens"]


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an integer if it is one (int, numpy integer, SymInt, 0-d integer tensor), else None.

    bool, float (also integral floats such as 4.0, which usually mean an arithmetic slip upstream), floating
    tensors and anything else are not integers here.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.SymInt):   # torch.compile(dynamic=True) hands integer inputs over as SymInts
        return value
    if isinstance(value, numbers.Integral):   # int, numpy integers
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype is not torch.bool:
        return int(value)
    return None


def _positive_int_pair(value: Any) -> Optional[Tuple[int, int]]:
    """``value`` as (a, b) with a, b positive integers, else None."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        return None
    pair = tuple(_as_int(v) for v in value)
    if any(v is None for v in pair) or pair[0] <= 0 or pair[1] <= 0:
        return None
    return pair


def check_grid_size(grid_size: Any, *, name: str = "grid_size", layer: str = "") -> Tuple[int, int]:
    """The token grid (h, w) as two positive ints; anything else raises ``ValueError`` naming the value.

    ``layer`` prefixes the message (e.g. ``"CBSA"``); ``name`` is what the caller calls the argument.
    """
    pair = _positive_int_pair(grid_size)
    if pair is None:
        prefix = f"{layer}: " if layer else ""
        raise ValueError(f"{prefix}{name} must be a pair of positive ints (h, w), got {grid_size!r}")
    return pair


def check_rep_grid(rep_grid: Any, token_grid: Optional[Any] = None, *, name: str = "rep_grid", layer: str = "",
                   source: Optional[str] = None, remedy: Optional[str] = None) -> Tuple[int, int]:
    """The representative grid (rh, rw) as two positive ints that fit inside ``token_grid`` (when given).

    Raises ``ValueError`` naming the value. For a grid that does not fit, ``source`` says where the token
    grid comes from (e.g. ``"img_size 64 with patch_size 16"``) and ``remedy`` what would fit; without a
    source the message names both grids, prefixed by ``layer``.
    """
    pair = _positive_int_pair(rep_grid)
    prefix = f"{layer}: " if layer else ""
    if pair is None:
        raise ValueError(f"{prefix}{name} must be a pair of positive ints (rh, rw), got {rep_grid!r}")
    if token_grid is None:
        return pair
    h, w = token_grid   # the caller's own (already checked) grid; a zero side is reported as too small below
    if pair[0] <= h and pair[1] <= w:
        return pair
    remedy = remedy or f"a smaller {name} or a larger input"
    if source is None:
        raise ValueError(f"{prefix}representative grid {pair} is larger than the token grid ({h}, {w}); use {remedy}")
    raise ValueError(f"{prefix}{source} gives a {h}x{w} patch grid, smaller than {name} {pair[0]}x{pair[1]}; "
                     f"use {remedy}")


def check_token_layout(num_tokens: int, grid_size: Any, num_prefix: int, num_suffix: int,
                       layer: str = "CBSA") -> Tuple[int, int]:
    """Check ``grid_size`` and refuse one that does not account for every token, naming all the numbers
    involved. Returns the grid as (h, w)."""
    h, w = check_grid_size(grid_size, layer=layer)
    expected = num_prefix + h * w + num_suffix
    if expected != num_tokens:
        raise ValueError(
            f"{layer}: grid_size=({h}, {w}) with {num_prefix} prefix and {num_suffix} suffix tokens needs "
            f"{num_prefix} + {h}*{w} + {num_suffix} = {expected} tokens, but the input has {num_tokens}"
        )
    return h, w


def adaptive_pool_tokens(tokens: torch.Tensor, grid_size: Tuple[int, int], out_size: Tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of grid tokens.

    tokens: (B, h·w, C) in raster order -> (B, rh·rw, C), with exactly the bins of ``nn.AdaptiveAvgPool2d``.
    The grid is viewed channels-last, so no copy of the token tensor is needed.
    """
    b, _, c = tokens.shape
    h, w = grid_size
    grid = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, out_size)  # (B, C, rh, rw)
    return pooled.flatten(2).transpose(1, 2)
