"""Swap the attention of a pretrained timm ViT for a CBSA-style operator (the paper's ViT adaptation, Fig. 9).

The ViT block (LN -> attention -> residual, LN -> MLP -> residual) and every weight are kept; only the
attention computation of the chosen blocks changes. The release replaced every block (its
``layer_idx <= 100`` gate, docs/authors-release.md item 26); ``layers`` selects a subset for hybrids.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence, Tuple

import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer

from cbsa_core.layers import check_rep_grid

from .attention import (ATTENTION_MODULES, BROADCAST_CHOICES, ConvertedAttention, PooledRepresentativeAttention,
                        TokenGrid)

__all__ = ["convert_vit", "set_legacy_token_layout", "ATTENTION_CHOICES", "token_grid_of"]

_LOG = logging.getLogger(__name__)

# 'mhsa' keeps timm's softmax attention: the fine-tuned-ViT rows of Fig. 9.
ATTENTION_CHOICES = ("cbsa_vee", "cbsa_star", "linear", "mhsa")


def token_grid_of(model: VisionTransformer) -> TokenGrid:
    """The :class:`TokenGrid` hook of ``model.patch_embed``, registered on first use."""
    patch_embed = model.patch_embed
    for hook in patch_embed._forward_pre_hooks.values():
        if isinstance(hook, TokenGrid):
            return hook
    if not (hasattr(patch_embed, "patch_size") and hasattr(patch_embed, "dynamic_feat_size")):
        raise TypeError(f"convert_vit needs a timm PatchEmbed, got {type(patch_embed).__name__}")
    grid = TokenGrid()
    patch_embed.register_forward_pre_hook(grid)
    return grid


def _resolve_layers(layers: Optional[Iterable[int]], depth: int) -> Tuple[int, ...]:
    if layers is None:
        return tuple(range(depth))
    resolved = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
            raise ValueError(f"layers must be block indices in [0, {depth}), got {i!r}")
        if i in resolved:
            raise ValueError(f"block index {i} listed twice in layers={list(layers)}")
        resolved.append(i)
    return tuple(sorted(resolved))


def convert_vit(model: VisionTransformer, attention: str = "cbsa_vee", *, rep_grid: Sequence[int] = (8, 8),
                layers: Optional[Iterable[int]] = None, legacy_token_layout: bool = False,
                broadcast: str = "transpose") -> VisionTransformer:
    """Replace ``model.blocks[i].attn`` for every listed block (all by default) in place; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` whose blocks use ``timm.layers.Attention``.
        attention: ``cbsa_vee`` (the released CBSA^∨), ``cbsa_star`` (CBSA*), ``linear`` (ReLU-kernel linear
            attention) or ``mhsa`` (keep timm's attention; nothing is replaced).
        rep_grid: grid (rh, rw) of pooled representatives, m = rh·rw (64 as released).
        layers: block indices to convert; None converts all of them.
        legacy_token_layout: pool the first h·w tokens like the release's ``X_q[:, :-1]``
            (docs/authors-release.md items 2 and 28) instead of exactly the patch tokens.
        broadcast: CBSA* only: ``transpose`` (Aᵀ, as in CBSA) or ``softmax`` (the release's broadcast).

    The new modules reuse the ``qkv``/``proj`` (and norm/dropout) submodules, so parameters, their count and
    the state-dict keys are unchanged. The token grid comes from the patch embedding at call time.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"convert_vit expects a timm VisionTransformer, got {type(model).__name__}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTION_CHOICES)}")
    if broadcast not in BROADCAST_CHOICES:
        raise ValueError(f"unknown broadcast {broadcast!r}; valid: {', '.join(BROADCAST_CHOICES)}")
    if broadcast != "transpose" and attention != "cbsa_star":
        raise ValueError(f"broadcast={broadcast!r} only applies to attention='cbsa_star', not {attention!r}")
    if not isinstance(model.patch_drop, nn.Identity):
        # Dropped patches leave holes in the grid that the pooled representatives are computed on.
        raise ValueError("convert_vit: the model uses patch dropout (patch_drop_rate > 0), which breaks the "
                         "token grid; build it with patch_drop_rate=0")
    depth = len(model.blocks)
    indices = _resolve_layers(layers, depth)
    rep_grid = check_rep_grid(rep_grid)
    for i in indices:
        attn = getattr(model.blocks[i], "attn", None)
        if isinstance(attn, ConvertedAttention):
            raise ValueError(f"block {i} already uses {attn.kind} attention; convert a fresh timm model")
        if type(attn) is not TimmAttention:
            raise TypeError(f"block {i} has a {type(attn).__name__} attention; convert_vit supports "
                            f"timm.layers.Attention only")

    if attention != "mhsa":
        grid = token_grid_of(model)
        cls = ATTENTION_MODULES[attention]
        kwargs = dict(num_prefix_tokens=model.num_prefix_tokens)
        if attention != "linear":
            kwargs.update(rep_grid=rep_grid, legacy_token_layout=legacy_token_layout)
        if attention == "cbsa_star":
            kwargs.update(broadcast=broadcast)
        for i in indices:
            model.blocks[i].attn = cls(model.blocks[i].attn, grid, **kwargs)
    # Recorded so checkpoints and logs can say what the weights were trained with.
    model.vit_adaptation = dict(attention=attention, layers=list(indices), rep_grid=list(rep_grid),
                                legacy_token_layout=bool(legacy_token_layout), broadcast=broadcast)
    _LOG.info("converted %d of %d blocks to %s attention", len(indices) if attention != "mhsa" else 0, depth,
              attention)
    return model


def set_legacy_token_layout(model: nn.Module, enabled: bool) -> int:
    """Switch the release's ``X_q[:, :-1]`` pooling on or off in every converted block; returns how many.

    Needed when the authors' fine-tuned weights are loaded into a model converted with the default layout.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, PooledRepresentativeAttention):
            module.legacy_token_layout = bool(enabled)
            count += 1
    if isinstance(getattr(model, "vit_adaptation", None), dict):
        model.vit_adaptation["legacy_token_layout"] = bool(enabled)
    return count
