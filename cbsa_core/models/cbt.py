"""Coding-rate Based Transformer (CBT) and its same-framework baselines (official-code.md §2.8).

    x = ConvPatchEmbed(img)                     (B, N, d)
    x = [cls, x] + pos                          (B, 1 + N, d)
    for each layer:
        z = x + Attn(LN(x))                     pre-norm residual around attention
        x = ISTA(LN(z))                         NO residual around ISTA (item 8)
    logits = Linear(LN(x[:, 0]))

Module and parameter names follow the release (``to_patch_embedding``, ``transformer.layers.{i}.{0,1}``,
``mlp_head``) so the authors' state dicts load without renaming.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers import ISTA, CBSA, ConvPatchEmbed, build_attention, resample_pos_embed

__all__ = ["PreNorm", "Transformer", "CBT"]


class PreNorm(nn.Module):
    """``fn(LayerNorm(x), **kwargs)``; the residual is added by the caller."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Transformer(nn.Module):
    """Stack of [PreNorm(attention) with residual, PreNorm(ISTA) without residual] layers."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, attn: Sequence[str],
                 cbsa_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PreNorm(dim, build_attention(attn[i], dim, heads, dim_head, **cbsa_kwargs)),
                PreNorm(dim, ISTA(dim)),
            ])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x, grid_size=grid_size) + x
            x = ff(x)
        return x


class CBT(nn.Module):
    """CBT image classifier. ``forward(img (B, C, H, W)) -> logits (B, num_classes)``.

    Any image size divisible by the patch size works; the position embedding is resampled to the grid.

    Args:
        attn: attention per layer, one name or a list of ``depth`` names (cbsa, cbsa_dagger, agent, mssa, tssa).
        rep_grid: representative grid of the CBSA layers (8×8 → m = 64).
        legacy_token_layout: pool the release's ``tokens[:, :-1]`` (needed for the authors' checkpoints).
    """

    def __init__(self, *, image_size: int = 224, patch_size: int = 16, num_classes: int = 1000, dim: int = 384,
                 depth: int = 12, heads: int = 6, dim_head: Optional[int] = None, in_chans: int = 3,
                 attn: Union[str, Sequence[str]] = "cbsa", rep_grid: Tuple[int, int] = (8, 8),
                 legacy_token_layout: bool = False, pool: str = "cls") -> None:
        super().__init__()
        if pool != "cls":
            raise ValueError("CBT supports pool='cls' only (as released)")
        dim_head = dim // heads if dim_head is None else dim_head
        attn_list = [attn] * depth if isinstance(attn, str) else list(attn)
        if len(attn_list) != depth:
            raise ValueError(f"attn lists {len(attn_list)} layers, depth is {depth}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} does not divide by patch_size {patch_size}")
        self.model_config: Dict[str, Any] = dict(
            image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
            heads=heads, dim_head=dim_head, in_chans=in_chans, attn=attn if isinstance(attn, str) else attn_list,
            rep_grid=tuple(rep_grid), legacy_token_layout=legacy_token_layout,
        )
        self.arch = "CBT"
        self.num_classes = num_classes
        self.num_features = self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.base_grid = (image_size // patch_size, image_size // patch_size)

        self.to_patch_embedding = ConvPatchEmbed(patch_size, in_chans, dim)
        # randn init (std 1), as released (item 11).
        self.pos_embedding = nn.Parameter(torch.randn(1, self.base_grid[0] * self.base_grid[1] + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        cbsa_kwargs = dict(rep_grid=tuple(rep_grid), num_prefix_tokens=1, legacy_token_layout=legacy_token_layout)
        self.transformer = Transformer(dim, depth, heads, dim_head, attn_list, cbsa_kwargs)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim),
                                      nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity())

    # ----------------------------------------------------------------------------------------------
    def set_legacy_token_layout(self, enabled: bool) -> None:
        """Switch every CBSA layer between the release's pooling input and the corrected one."""
        self.model_config["legacy_token_layout"] = bool(enabled)
        for m in self.modules():
            if isinstance(m, CBSA):
                m.legacy_token_layout = bool(enabled)

    @property
    def attention_layers(self) -> List[nn.Module]:
        return [layer[0].fn for layer in self.transformer.layers]

    def no_weight_decay(self):
        return {"pos_embedding", "cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.model_config["num_classes"] = num_classes
        self.mlp_head[1] = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.mlp_head[1]

    # ----------------------------------------------------------------------------------------------
    def embed(self, img: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images -> tokens with [CLS] and position embedding: (B, 1 + h·w, d), (h, w)."""
        x, grid = self.to_patch_embedding(img)
        pos = resample_pos_embed(self.pos_embedding, grid, self.base_grid, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + pos.to(x.dtype), grid

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final tokens (B, 1 + h·w, d), before the head's LayerNorm."""
        x, grid = self.embed(img)
        return self.transformer(x, grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.mlp_head[0](x[:, 0])
        return x if pre_logits else self.mlp_head[1](x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def forward_intermediates(self, img: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Per layer: the layer input, the normalised attention input, the post-attention stream and the
        layer output. Used by the coding-rate and attention-map tools."""
        x, grid = self.embed(img)
        out = []
        for attn, ff in self.transformer.layers:
            normed = attn.norm(x)
            z = attn.fn(normed, grid_size=grid) + x
            y = ff(z)
            out.append(dict(input=x, attn_input=normed, post_attn=z, output=y, grid=torch.tensor(grid)))
            x = y
        return out

    @torch.no_grad()
    def attention_maps(self, img: torch.Tensor) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """Attention estimate per layer ((B, H, T, T) each: AᵀA for CBSA, softmax for MSSA) and the grid."""
        x, grid = self.embed(img)
        maps = []
        for attn, ff in self.transformer.layers:
            normed = attn.norm(x)
            maps.append(attn.fn.attention_map(normed, grid))
            x = ff(attn.fn(normed, grid_size=grid) + x)
        return maps, grid
