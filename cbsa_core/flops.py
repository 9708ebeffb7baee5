"""FLOPs and parameter accounting.

The paper's convention (see docs/REPRODUCING.md): FLOPs = 2 × multiply-accumulates over matmuls and
convolutions, with
    CBSA / CBSA†   2·T·d·I + 3·T·m·I + 2·m²·I       (projections in and out, extraction ×2, broadcast, contraction ×2)
    agent          2·T·d·I + 3·T·m·I                (no contraction)
    MSSA           2·T·d·I + 2·T²·I
    TSSA           2·T·d² + T·d                     (projections, Π-weighted second moments)
    ISTA           2·T·d²                           (the paper counts two d×d products, item 22)
plus the patch embedding (the convolutional stem, or CRATE's linear one: h·w·(p²·C)·d, its LayerNorms not
counted) and the classifier; T = 1 + h·w tokens. With I = d and m = 64 this gives 1.12 / 4.03 / 15.2 / 47.6 G for
CBT-T/S/B/L against the paper's 1.1 / 4.0 / 15.1 / 47.3 G (docs/authors-release.md item 22).

The paper's CRATE-B/L numbers (12.6 / 43.3 G, cited from CRATE) are close to the same convention without the
patch embedding and the classifier: the transformer layers alone (``layers`` of :func:`analytic_flops`, ISTA as
two d×d products) are 12.585 / 43.476 G, the whole model 12.818 / 43.787 G (``scripts/model_table.py`` prints both).

:func:`measured_flops` counts what actually runs with ``torch.utils.flop_counter.FlopCounterMode``
(fused CPU SDPA counts zero there, so the math backend is forced while counting).
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .layers import CBSA, ISTA, MSSA, TSSA, ConvPatchEmbed
from .layers.patch_embed import LinearPatchEmbed

__all__ = ["attention_macs", "analytic_flops", "measured_flops", "count_parameters", "PAPER_CLASSIFICATION"]

# Paper Table 3: (params in M, GFLOPs) for CBT-T/S/B/L and the original CRATE-B/L (cited there from CRATE).
PAPER_CLASSIFICATION = {
    "cbt_tiny": (1.8, 1.1), "cbt_small": (6.7, 4.0), "cbt_base": (25.7, 15.1), "cbt_large": (83.1, 47.3),
    "crate_original_base": (22.8, 12.6), "crate_original_large": (77.6, 43.3),
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_macs(layer: nn.Module, num_tokens: int) -> int:
    """Paper-convention multiply-accumulates of one attention layer on ``num_tokens`` tokens."""
    t = num_tokens
    if isinstance(layer, CBSA):
        d, i, m = layer.dim, layer.inner_dim, layer.num_representatives
        macs = 2 * t * d * i + 3 * t * m * i
        return macs + (2 * m * m * i if layer.contraction else 0)
    if isinstance(layer, MSSA):
        return 2 * t * layer.dim * layer.inner_dim + 2 * t * t * layer.inner_dim
    if isinstance(layer, TSSA):
        return 2 * t * layer.dim ** 2 + t * layer.dim
    raise TypeError(f"no FLOPs formula for {type(layer).__name__}")


def _stem_macs(stem: nn.Module, size: Tuple[int, int]) -> int:
    """Multiply-accumulates of the patch embedding on one (H, W) image."""
    if isinstance(stem, LinearPatchEmbed):
        grid = stem.grid_size(*size)
        return grid[0] * grid[1] * stem.patch_dim * stem.embed_dim
    if not isinstance(stem, ConvPatchEmbed):
        raise TypeError(f"no FLOPs formula for the patch embedding {type(stem).__name__}")
    h, w = size
    macs = 0
    for mod in stem.proj.modules():
        if isinstance(mod, nn.Conv2d):
            h, w = (h + 1) // 2, (w + 1) // 2
            macs += h * w * mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    return macs


def analytic_flops(model: nn.Module, image_size: Union[int, Tuple[int, int]] = 224) -> Dict[str, float]:
    """Paper-convention FLOPs of a CBT-family model (the original CRATE included) for one image, with a
    breakdown by component: ``stem`` (the patch embedding), ``attention``, ``ista``, ``head``, ``total``, and
    ``layers`` = attention + ista (the transformer layers alone, the scope of the CRATE numbers the paper cites)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    grid = model.to_patch_embedding.grid_size(*size)
    t = 1 + grid[0] * grid[1]
    stem = _stem_macs(model.to_patch_embedding, size)
    attn = sum(attention_macs(layer, t) for layer in model.attention_layers)
    ista = sum(2 * t * m.dim ** 2 for m in model.modules() if isinstance(m, ISTA))
    head = model.embed_dim * model.num_classes
    total = stem + attn + ista + head
    return dict(total=2.0 * total, stem=2.0 * stem, attention=2.0 * attn, ista=2.0 * ista, head=2.0 * head,
                layers=2.0 * (attn + ista))


def measured_flops(model: nn.Module, image_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> float:
    """FLOPs counted by FlopCounterMode for one image (2 per multiply-accumulate, as the paper)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())
