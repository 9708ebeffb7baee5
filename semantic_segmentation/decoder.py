"""CBT mask-transformer decoder (paper §4.2; official-code.md §2.2, §4.1).

    x     = [patches (B, N, D), cls_emb (B, K, D)]          class embeddings appended AFTER the patches
    x     = x + CBSA(LN(x))          × n_layers              no MLP; reps pooled from the h×w patch grid only
    x     = LN(x)                                            decoder_norm
    P, C  = x[:, :N] / ‖·‖, x[:, N:] / ‖·‖                   L2-normalised patch and class features
    masks = LN_K(P Cᵀ)                                       mask_norm over the K classes -> (B, K, h, w)

Parameter names match the release (``cls_emb``, ``net.layers.{j}.norm``, ``net.layers.{j}.fn.{step_x,
step_rep, proj, to_out}``, ``decoder_norm``, ``mask_norm``) so the authors' ``decoder.*`` weights load
unchanged. Unlike the release (items 31-34), the class count, width, head count, representative grid and
the (possibly non-square) token grid are all parameters.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from cbsa_core.layers import CBSA
from cbsa_core.models.cbt import PreNorm

__all__ = ["DecoderTransformer", "MaskTransformer"]


class DecoderTransformer(nn.Module):
    """``n_layers`` pre-norm residual CBSA layers without a channel mixer (DEPICT's "SA" design)."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, dim_head: int, *, n_cls: int,
                 rep_grid: Tuple[int, int], tied_output: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            PreNorm(dim, CBSA(dim, n_heads, dim_head, rep_grid=rep_grid, num_prefix_tokens=0,
                              num_suffix_tokens=n_cls, tied_output=tied_output))
            for _ in range(n_layers)
        ])

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, grid_size=grid_size) + x
        return x


class MaskTransformer(nn.Module):
    """``forward(patch_tokens (B, h·w, D), grid_size=(h, w)) -> masks (B, n_cls, h, w)``.

    Args:
        n_cls: number of classes K (ADE20K: 150).
        d_model: token width D (the encoder's; there is no ``proj_dec``, item 41).
        n_layers, n_heads, dim_head: CBSA stack (release: 3 layers, 3 heads × 100).
        rep_grid: pooled representative grid (release: 10×10, m = 100).
        tied_output: CBT† (project back with the basis, no ``to_out``).
    """

    def __init__(self, n_cls: int, d_model: int, *, n_layers: int = 3, n_heads: int = 3, dim_head: int = 100,
                 rep_grid: Tuple[int, int] = (10, 10), tied_output: bool = False) -> None:
        super().__init__()
        if n_cls < 1:
            raise ValueError(f"MaskTransformer: n_cls must be >= 1, got {n_cls}")
        self.n_cls, self.d_model = n_cls, d_model
        self.n_layers, self.n_heads, self.dim_head = n_layers, n_heads, dim_head
        self.rep_grid = tuple(int(r) for r in rep_grid)
        self.tied_output = tied_output
        self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, d_model))
        self.net = DecoderTransformer(d_model, n_layers, n_heads, dim_head, n_cls=n_cls, rep_grid=self.rep_grid,
                                      tied_output=tied_output)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)
        # Item 42: trunc_normal(0.02) Linears with zero bias, LN (1, 0), trunc_normal(0.02) class embeddings;
        # the CBSA step sizes keep their randn init.
        self.apply(self._init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"cls_emb"}

    @property
    def attention_layers(self) -> List[CBSA]:
        return [layer.fn for layer in self.net.layers]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MaskTransformer: expected patch tokens (B, N, {self.d_model}), got {tuple(x.shape)}")
        return torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        h, w = int(grid_size[0]), int(grid_size[1])
        x = self.decoder_norm(self.net(self._tokens(x), (h, w)))
        patches, classes = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h·w, K)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, h, w)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> List[torch.Tensor]:
        """Per layer, the CBSA attention estimate AᵀA over all h·w + K tokens: (B, H, T, T) each (item 36)."""
        grid = (int(grid_size[0]), int(grid_size[1]))
        x = self._tokens(x)
        maps = []
        for layer in self.net.layers:
            normed = layer.norm(x)
            maps.append(layer.fn.attention_map(normed, grid))
            x = layer.fn(normed, grid_size=grid) + x
        return maps
