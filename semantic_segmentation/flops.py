"""Decoder-only FLOPs of every segmentation decoder (paper Fig. 8 left).

The paper's convention (see docs/REPRODUCING.md): FLOPs = 2 × multiply-accumulates of the matrix products, counted
analytically for one image; norms, softmaxes, pooling and element-wise steps are not counted. With N = h·w patch
tokens, K classes, D the decoder width, I = heads·head width:

    CBSA layer (CBT, CBT†)      2·T·D·I + 3·T·m·I + 2·m²·I     on T = N + K tokens, m representatives
    TSSA layer (ToST)           2·T·D² + T·D
    DEPICT layer (SA)           2·T·D·I + 2·T²·I                (x Uᵀ, (A W) U; Q Wᵀ, A W)
    DEPICT cross layer (CA)     N·D·I + 2·K·D·I + 2·K·N·I       (keys from the N patches, K class queries)
    ViT block (Segmenter)       4·T·D² + 2·T²·D + 2·T·D·d_ff    (qkv + proj, Q Kᵀ and A V, MLP)
    proj_dec (Segmenter)        N·D_enc·D;  proj_patch / proj_classes  N·D² / K·D²
    masks (every mask decoder)  N·K·D;      linear decoder  N·D·K

The CBSA and TSSA terms are ``cbsa_core.flops.attention_macs``. The release's CBT decoder at 512² (N = 1024,
K = 150) costs 1.54 / 2.41 / 4.15 / 5.31 G for T/S/B/L (docs/authors-release.md §4.1).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch.nn as nn

from cbsa_core.flops import attention_macs

from .decoder import DepictCAMaskTransformer, LinearDecoder, MaskDecoder, MaskTransformer, SegmenterMaskTransformer
from .depict_attention import DepictAttention

__all__ = ["decoder_macs", "decoder_flops", "PAPER_DECODER_GFLOPS"]


def _depict_macs(layer: DepictAttention, keys: int, queries: int, cross: bool) -> int:
    d, i = layer.dim, layer.inner_dim
    projections = keys * d * i + (queries * d * i if cross else 0) + queries * i * d
    return projections + 2 * queries * keys * i


def _vit_block_macs(block: nn.Module, tokens: int) -> int:
    d, d_ff = block.mlp.fc1.in_features, block.mlp.fc1.out_features
    return 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * d_ff


def decoder_macs(decoder: nn.Module, grid_size: Sequence[int]) -> Dict[str, int]:
    """Multiply-accumulates of ``decoder`` on an (h, w) patch grid, by part: ``proj_dec``, ``layers`` (the
    attention / transformer stack), ``class_projections``, ``masks`` (or the linear head), and ``total``."""
    n = int(grid_size[0]) * int(grid_size[1])
    parts = dict(proj_dec=0, layers=0, class_projections=0, masks=0)
    if isinstance(decoder, LinearDecoder):
        parts["masks"] = n * decoder.d_encoder * decoder.n_cls
    elif isinstance(decoder, MaskDecoder):
        k, d = decoder.n_cls, decoder.d_model
        t = n + k
        if isinstance(decoder, MaskTransformer):
            for layer in decoder.attention_layers:
                parts["layers"] += (_depict_macs(layer, t, t, cross=False) if isinstance(layer, DepictAttention)
                                    else attention_macs(layer, t))
        elif isinstance(decoder, DepictCAMaskTransformer):
            parts["layers"] = (sum(_depict_macs(layer.fn, n, n, cross=False) for layer in decoder.snet.layers)
                               + sum(_depict_macs(layer.fn, n, k, cross=True) for layer in decoder.cnet.layers))
        elif isinstance(decoder, SegmenterMaskTransformer):
            parts["proj_dec"] = n * decoder.d_encoder * d
            parts["layers"] = sum(_vit_block_macs(blk, t) for blk in decoder.blocks)
            parts["class_projections"] = n * d * d + k * d * d
        else:
            raise TypeError(f"no FLOPs formula for the decoder {type(decoder).__name__}")
        parts["masks"] = n * k * d
    else:
        raise TypeError(f"no FLOPs formula for the decoder {type(decoder).__name__}")
    parts["total"] = sum(parts.values())
    return parts


def decoder_flops(decoder: nn.Module, grid_size: Sequence[int]) -> Dict[str, float]:
    """Paper-convention FLOPs (2 × :func:`decoder_macs`) of ``decoder`` on an (h, w) patch grid, by part."""
    return {k: 2.0 * v for k, v in decoder_macs(decoder, grid_size).items()}


# Fig. 8 left: decoder GFLOPs per (decoder, size). CBT's are the authors' README's exact values, the rest
# read off the figure (digitised); the paper does not say which DEPICT variant it plots (DEPICT-SA is DEPICT's
# default and the README's example). Segmenter-L is the 640² model (Seg-L-Mask/16 is trained at 640).
PAPER_DECODER_GFLOPS = {
    ("cbt", "T"): 1.5, ("cbt", "S"): 2.3, ("cbt", "B"): 7.8, ("cbt", "L"): 22.3,
    ("cbt_dagger", "T"): 1.4, ("cbt_dagger", "S"): 2.2, ("cbt_dagger", "B"): 7.7, ("cbt_dagger", "L"): 22.2,
    ("depict_sa", "T"): 5.0, ("depict_sa", "S"): 6.6, ("depict_sa", "B"): 8.5, ("depict_sa", "L"): 34.8,
    ("segmenter_mask_transformer", "T"): 4.1, ("segmenter_mask_transformer", "S"): 12.5,
    ("segmenter_mask_transformer", "B"): 41.6, ("segmenter_mask_transformer", "L"): 113.0,
}
