"""Analytic FLOPs of plain and converted ViTs in the paper's convention (see docs/REPRODUCING.md).

FLOPs = 2 × multiply-accumulates of the matmuls and convolutions; softmax, pooling, norms, biases and
GELU are not counted. Per block, with N tokens (1 + h·w), width d, attention width I = H·p (= d for the
timm ViTs), m representatives and MLP width r·d:

    mhsa        4·N·d·I + 2·N²·I           q, k, v and output projections; QKᵀ and AV
    linear      4·N·d·I + 2·N·p·I          φ(k)ᵀv and φ(q)(φ(k)ᵀv), p×p per head
    cbsa_star   4·N·d·I + 3·N·m·I + 2·m²·I extraction (Q0Kᵀ, AV), broadcast AᵀC, contraction (QQᵀ, ·Q)
                (broadcast='softmax' costs 4·N·m·I: X_q Q0ᵀ and the product with C)
    cbsa_vee    4·N·d·I + 4·N·m·I          extraction (Q0Kᵀ, AV) and the released softmax broadcast
                                           (X_q Q0ᵀ, then the product with Q_delta)
    mlp         2·N·d·r·d                  (8·N·d² for r = 4)

plus the patch embedding h·w·(C·P²)·d and the classifier d·classes. With I = d, mhsa, linear and cbsa_star are
the per-layer formulas that the paper's FLOPs-versus-N curves fit (values read off the plots of Fig. 2 and of the
authors' README, digitised); cbsa_vee is counted as the released operator actually runs (the CBSA^∨ points of the
paper's Fig. 9 sit closer to 4·N·d² + 2·N·m·d, see ``scripts/vit_flops.py``). ``linear`` leaves out its
normaliser φ(q)·mean φ(k) (N·I more), as the paper does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch.nn as nn
from timm.layers import Attention as TimmAttention

from .attention import CBSAStarAttention, CBSAVeeAttention, ConvertedAttention, ReLULinearAttention

__all__ = ["VARIANTS", "ViTShape", "VIT_SHAPES", "PAPER_FIG9", "attention_macs", "vit_flops", "model_flops"]

VARIANTS = ("mhsa", "linear", "cbsa_star", "cbsa_vee")


@dataclass(frozen=True)
class ViTShape:
    """What the FLOPs of a ViT depend on."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_chans: int = 3

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


VIT_SHAPES = {
    "tiny": ViTShape(192, 12, 3), "small": ViTShape(384, 12, 6),
    "base": ViTShape(768, 12, 12), "large": ViTShape(1024, 24, 16),
}

# Paper Fig. 9, values read off the figure (digitised): total GFLOPs per (image size, model size) and variant.
PAPER_FIG9: Dict[Tuple[int, str], Dict[str, float]] = {
    (224, "tiny"): dict(mhsa=2.5, linear=2.0, cbsa_star=2.3, cbsa_vee=2.3),
    (224, "small"): dict(mhsa=9.1, linear=8.6, cbsa_star=8.9, cbsa_vee=8.7),
    (224, "base"): dict(mhsa=34.9, linear=33.9, cbsa_star=34.2, cbsa_vee=34.0),
    (224, "large"): dict(mhsa=121.9, linear=119.4, cbsa_star=120.6, cbsa_vee=120.2),
    (384, "tiny"): dict(mhsa=9.4, linear=6.6, cbsa_star=6.8, cbsa_vee=6.7),
    (384, "small"): dict(mhsa=30.8, linear=26.3, cbsa_star=25.9, cbsa_vee=25.7),
    (384, "base"): dict(mhsa=110.6, linear=99.6, cbsa_star=100.1, cbsa_vee=99.9),
    (384, "large"): dict(mhsa=380.0, linear=351.5, cbsa_star=353.5, cbsa_vee=353.2),
}


def attention_macs(variant: str, num_tokens: int, dim: int, heads: int, head_dim: int, num_reps: int = 64,
                   broadcast: str = "transpose") -> int:
    """Multiply-accumulates of one attention layer of ``variant`` on ``num_tokens`` tokens."""
    n, i, m = num_tokens, heads * head_dim, num_reps
    proj = 4 * n * dim * i
    if variant == "mhsa":
        return proj + 2 * n * n * i
    if variant == "linear":
        return proj + 2 * n * head_dim * i
    if variant == "cbsa_star":
        return proj + (3 if broadcast == "transpose" else 4) * n * m * i + 2 * m * m * i
    if variant == "cbsa_vee":
        return proj + 4 * n * m * i
    raise ValueError(f"unknown attention variant {variant!r}; valid: {', '.join(VARIANTS)}")


def _totals(stem: int, attn: int, mlp: int, head: int) -> Dict[str, float]:
    return dict(total=2.0 * (stem + attn + mlp + head), patch_embed=2.0 * stem, attention=2.0 * attn,
                mlp=2.0 * mlp, head=2.0 * head)


def vit_flops(shape: ViTShape, image_size: Union[int, Tuple[int, int]], variant: str,
              num_reps: int = 64) -> Dict[str, float]:
    """Paper-convention FLOPs of one image through a ViT of ``shape`` whose blocks all use ``variant``."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid = (h // shape.patch_size) * (w // shape.patch_size)
    n, d = 1 + grid, shape.embed_dim
    stem = grid * shape.in_chans * shape.patch_size ** 2 * d
    attn = shape.depth * attention_macs(variant, n, d, shape.num_heads, shape.head_dim, num_reps)
    mlp = shape.depth * 2 * n * d * int(d * shape.mlp_ratio)
    return _totals(stem, attn, mlp, d * shape.num_classes)


def _block_attention_macs(attn: nn.Module, n: int, dim: int) -> int:
    heads, head_dim = attn.num_heads, attn.head_dim
    if type(attn) is TimmAttention:
        return attention_macs("mhsa", n, dim, heads, head_dim)
    if isinstance(attn, ReLULinearAttention):
        return attention_macs("linear", n, dim, heads, head_dim)
    if isinstance(attn, (CBSAStarAttention, CBSAVeeAttention)):
        m = attn.rep_grid[0] * attn.rep_grid[1]
        return attention_macs(attn.kind, n, dim, heads, head_dim, m, getattr(attn, "broadcast", "transpose"))
    kind = attn.kind if isinstance(attn, ConvertedAttention) else type(attn).__name__
    raise TypeError(f"no FLOPs formula for {kind} attention")


def model_flops(model: nn.Module, image_size: Union[int, Tuple[int, int]]) -> Dict[str, float]:
    """Paper-convention FLOPs of a (converted or plain) timm ``VisionTransformer`` for one image.

    Reads each block's attention, so partially converted models are counted block by block.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    pe = model.patch_embed
    gh, gw = pe.dynamic_feat_size((h, w))
    n, d = model.num_prefix_tokens + gh * gw, model.embed_dim
    conv = pe.proj
    stem = gh * gw * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    attn = sum(_block_attention_macs(blk.attn, n, d) for blk in model.blocks)
    mlp = sum(n * (blk.mlp.fc1.in_features * blk.mlp.fc1.out_features
                   + blk.mlp.fc2.in_features * blk.mlp.fc2.out_features) for blk in model.blocks)
    head = model.head.in_features * model.head.out_features if isinstance(model.head, nn.Linear) else 0
    return _totals(stem, attn, mlp, head)
