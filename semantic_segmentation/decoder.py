"""Segmentation decoders: one mask-transformer skeleton with pluggable token mixing, and Segmenter's linear head.

Every mask decoder runs the skeleton :meth:`MaskDecoder.forward` (the paper's CBT decoder;
docs/authors-release.md §4.1):

    x      = proj_dec(x)                                  Segmenter only: encoder width -> decoder width
    P, C   = mix(x, cls_emb, (h, w))                       the part that differs between the decoders
    P, C   = P · proj_patch, C · proj_classes              Segmenter only
    masks  = mask_norm((P / ‖P‖) (C / ‖C‖)ᵀ)               cosine masks, LayerNorm over the K classes
                                                          (B, h·w, K) -> (B, K, h, w)

The mixing of each decoder, as released:

* :class:`MaskTransformer` (CBT, CBT†, DEPICT-SA, ToST): class embeddings appended after the patches,
  ``n_layers × [x + Attn(LN(x))]`` with no MLP, then ``decoder_norm``; the attention is pluggable: CBSA
  (CBT; CBT† projects back with the basis), DEPICT's tied MSSA (:mod:`.depict_attention`), or TSSA (ToST).
* :class:`SegmenterMaskTransformer` (rstrudel/segmenter ``MaskTransformer``): the same joint sequence through
  ViT blocks (MHSA + MLP, drop path), then ``decoder_norm``.
* :class:`DepictCAMaskTransformer` (DEPICT-CA): ``P = snorm(snet(patches))`` (self-attention over the patches
  only), ``C = cnorm(cnet(P, query=cls_emb))`` (class embeddings as queries; each cnet layer normalises P,
  not the queries, as DEPICT's ``PreNorm`` does).

:class:`LinearDecoder` is Segmenter's ``DecoderLinear``: masks = a Linear over each patch token.

Parameter names are each release's (``cls_emb``, ``net.layers.{j}.{norm,fn.*}``, ``blocks.{j}.*``,
``proj_dec``, ``proj_patch``, ``proj_classes``, ``snet``, ``cnet``, ``snorm``, ``cnorm``, ``decoder_norm``,
``mask_norm``, ``head``), so their ``decoder.*`` weights load unchanged. Init follows the releases: Linears
trunc_normal(0.02) with zero bias, LayerNorms (1, 0), class embeddings trunc_normal(0.02); raw parameters
keep their own init (CBSA step sizes randn, item 42; DEPICT ``proj`` D^-1/2·randn and ``step_size`` randn;
Segmenter ``proj_patch``/``proj_classes`` D^-1/2·randn; TSSA ``temp`` ones). Unlike the CBT release
(items 31-34) class count, widths, heads, representative grid and a non-square token grid are parameters.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from cbsa_core.layers import CBSA, TSSA, check_rep_grid
from cbsa_core.models.cbt import PreNorm

from .depict_attention import DepictAttention
from .encoder import segmenter_block

__all__ = ["MASK_ATTENTIONS", "ResidualAttentionStack", "MaskDecoder", "MaskTransformer", "SegmenterMaskTransformer",
           "DepictCAMaskTransformer", "LinearDecoder"]

# The attentions a MaskTransformer can stack, and the decoder name each gives.
MASK_ATTENTIONS = {"cbsa": "mask_transformer", "depict": "depict_sa", "tssa": "tssa"}

Grid = Tuple[int, int]


def _grid(grid_size: Sequence[int]) -> Grid:
    return int(grid_size[0]), int(grid_size[1])


def _check_patch_tokens(decoder: nn.Module, x: torch.Tensor, grid: Grid, width: int) -> None:
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{type(decoder).__name__}: expected patch tokens (B, N, {width}), got {tuple(x.shape)}")
    if x.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{type(decoder).__name__}: grid_size={grid} needs {grid[0] * grid[1]} patch tokens, "
                         f"got {x.shape[1]}")


def _init_like_release(module: nn.Module) -> None:
    """Segmenter's ``init_weights``, which CBSA and DEPICT reuse: Linear trunc_normal(0.02) + zero bias, LN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResidualAttentionStack(nn.Module):
    """Pre-norm residual attention layers without a channel mixer (DEPICT's decoder ``Transformer``).

    ``forward(x (B, T, D), grid_size)``: ``x = Attn_j(LN_j(x)) + x`` for every layer. With ``query`` (B, M, D)
    the layers update the queries instead: ``q = Attn_j(LN_j(x), query=q) + q`` (DEPICT-CA's cnet).
    """

    def __init__(self, dim: int, attentions: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([PreNorm(dim, attn) for attn in attentions])

    def forward(self, x: torch.Tensor, grid_size: Optional[Grid] = None,
                query: Optional[torch.Tensor] = None) -> torch.Tensor:
        if query is None:
            for layer in self.layers:
                x = layer(x, grid_size=grid_size) + x
            return x
        for layer in self.layers:
            query = layer(x, grid_size=grid_size, query=query) + query
        return query

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Optional[Grid] = None,
                       query: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Per layer, its attention's ``attention_map`` on the tokens that layer sees."""
        maps = []
        for layer in self.layers:
            normed = layer.norm(x)
            if query is None:
                maps.append(layer.fn.attention_map(normed, grid_size))
                x = layer.fn(normed, grid_size=grid_size) + x
            else:
                maps.append(layer.fn.attention_map(normed, grid_size, query=query))
                query = layer.fn(normed, grid_size=grid_size, query=query) + query
        return maps


class MaskDecoder(nn.Module):
    """The mask-transformer skeleton: ``forward(patch tokens (B, h·w, d_encoder), grid_size=(h, w))`` ->
    masks (B, n_cls, h, w). Subclasses build their mixing modules, implement :meth:`mix`, and call
    :meth:`_init_weights` last.

    Args:
        n_cls: number of classes K.
        d_model: decoder width D.
        d_encoder: when given, a ``proj_dec`` Linear maps encoder tokens of this width to D (Segmenter);
            otherwise the encoder width is D.
        class_projections: Segmenter's ``proj_patch``/``proj_classes`` (D, D) before the cosine masks.
    """

    name = ""  # the decoder's name in decoders.DECODERS

    def __init__(self, n_cls: int, d_model: int, *, d_encoder: Optional[int] = None,
                 class_projections: bool = False) -> None:
        super().__init__()
        if n_cls < 1 or d_model < 1:
            raise ValueError(f"{type(self).__name__}: n_cls and d_model must be >= 1, got {n_cls}, {d_model}")
        self.n_cls, self.d_model = int(n_cls), int(d_model)
        self.d_encoder = self.d_model if d_encoder is None else int(d_encoder)
        self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, d_model))
        self.proj_dec = nn.Linear(self.d_encoder, d_model) if d_encoder is not None else None
        if class_projections:
            self.proj_patch = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
            self.proj_classes = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        else:
            self.proj_patch = self.proj_classes = None
        self.mask_norm = nn.LayerNorm(n_cls)

    def _init_weights(self) -> None:
        _init_like_release(self)
        trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> Set[str]:
        return {"cls_emb"}

    @property
    def attention_layers(self) -> List[nn.Module]:
        """The modules whose parameters are "the decoder's attention layers" (paper Fig. 8 middle, right)."""
        raise NotImplementedError

    def class_embeddings(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.cls_emb.expand(batch, -1, -1).to(dtype)

    def mix(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder-width patch tokens (B, h·w, D) -> patch features (B, h·w, D) and class features (B, K, D)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        grid = _grid(grid_size)
        _check_patch_tokens(self, x, grid, self.d_encoder)
        if self.proj_dec is not None:
            x = self.proj_dec(x)
        patches, classes = self.mix(x, grid)
        if self.proj_patch is not None:
            patches = patches @ self.proj_patch
            classes = classes @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h·w, K)
        # (B, h, w, K) viewed as (B, K, h, w): channels-last with a true batch stride, whose bilinear upsampling
        # takes torch's channels-last kernel at every batch size (a transpose-reshape view had a batch stride of K
        # and ran the generic kernel at batch 1: 371 vs 76 ms for 150 classes, 32² -> 512², 1 CPU thread).
        return masks.unflatten(1, tuple(grid)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Sequence[int]) -> List[torch.Tensor]:
        """The attention matrices of the decoder's layers (see each subclass)."""
        raise NotImplementedError


class MaskTransformer(MaskDecoder):
    """Attention-only decoder over [patches, class embeddings]: CBT (the release's decoder), CBT†, DEPICT-SA
    and ToST, by ``attention``.

    Args:
        n_cls: number of classes K (ADE20K: 150).
        d_model: token width D (the encoder's; there is no ``proj_dec``, item 41).
        attention: ``cbsa`` (CBT), ``depict`` (DEPICT-SA) or ``tssa`` (ToST).
        n_layers, n_heads, dim_head: the stack (CBT and DEPICT release: 3 layers, 3 heads × 100; TSSA's head
            width is D / n_heads).
        rep_grid: CBSA's pooled representative grid (release: 10×10, m = 100).
        tied_output: CBT† (CBSA projects back with the basis, no ``to_out``).
        dropout: DEPICT's dropout on the attention weights (release: 0).
    """

    def __init__(self, n_cls: int, d_model: int, *, attention: str = "cbsa", n_layers: int = 3, n_heads: int = 3,
                 dim_head: int = 100, rep_grid: Tuple[int, int] = (10, 10), tied_output: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__(n_cls, d_model)
        if attention not in MASK_ATTENTIONS:
            raise ValueError(f"MaskTransformer: unknown attention {attention!r}; valid: {', '.join(MASK_ATTENTIONS)}")
        self.attention, self.name = attention, MASK_ATTENTIONS[attention]
        self.n_layers, self.n_heads, self.dim_head = int(n_layers), int(n_heads), int(dim_head)
        self.rep_grid = check_rep_grid(rep_grid, layer="MaskTransformer")
        self.tied_output = bool(tied_output)

        def make() -> nn.Module:
            if attention == "cbsa":
                return CBSA(d_model, n_heads, dim_head, rep_grid=self.rep_grid, num_prefix_tokens=0,
                            num_suffix_tokens=n_cls, tied_output=tied_output)
            if attention == "depict":
                return DepictAttention(d_model, n_heads, dim_head, dropout)
            return TSSA(d_model, n_heads)

        self.net = ResidualAttentionStack(d_model, [make() for _ in range(n_layers)])
        self.decoder_norm = nn.LayerNorm(d_model)
        self._init_weights()

    def no_weight_decay(self) -> Set[str]:
        names = super().no_weight_decay()
        if self.attention == "tssa":  # ToST's temperatures, as TSSA.no_weight_decay
            names |= {f"net.layers.{j}.fn.temp" for j in range(self.n_layers)}
        return names

    @property
    def attention_layers(self) -> List[nn.Module]:
        return [layer.fn for layer in self.net.layers]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.class_embeddings(x.shape[0], x.dtype)], dim=1)

    def mix(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.decoder_norm(self.net(self._tokens(x), grid))
        return x[:, :-self.n_cls], x[:, -self.n_cls:]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Sequence[int]) -> List[torch.Tensor]:
        """Per layer over all h·w + K tokens, (B, H, T, T): CBSA's estimate AᵀA (item 36), DEPICT's softmax
        attention, TSSA's softmax over heads of w wᵀ."""
        grid = _grid(grid_size)
        _check_patch_tokens(self, x, grid, self.d_encoder)
        return self.net.attention_maps(self._tokens(x), grid)


class SegmenterMaskTransformer(MaskDecoder):
    """Segmenter's mask transformer (rstrudel/segmenter ``segm/model/decoder.py``).

    Args:
        n_cls: number of classes K.
        d_encoder: encoder width (input of ``proj_dec``).
        d_model: decoder width (Segmenter's factory: the encoder width).
        n_layers: ViT blocks (config.yml: 2).
        n_heads: MHSA heads (factory: d_model // 64).
        d_ff: MLP width (factory: 4·d_model).
        dropout: on the attention weights, after the attention projection and after both MLP layers (0.1).
        drop_path_rate: stochastic depth rising linearly from 0 over the blocks (0.0).
    """

    name = "segmenter_mask_transformer"

    def __init__(self, n_cls: int, d_encoder: int, *, d_model: int, n_layers: int = 2, n_heads: int,
                 d_ff: int, dropout: float = 0.1, drop_path_rate: float = 0.0) -> None:
        super().__init__(n_cls, d_model, d_encoder=d_encoder, class_projections=True)
        self.n_layers, self.n_heads, self.d_ff = int(n_layers), int(n_heads), int(d_ff)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, n_layers)]
        self.blocks = nn.ModuleList([segmenter_block(d_model, n_heads, d_ff, dropout, r) for r in rates])
        self.decoder_norm = nn.LayerNorm(d_model)
        self._init_weights()

    @property
    def attention_layers(self) -> List[nn.Module]:
        return [blk.attn for blk in self.blocks]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.class_embeddings(x.shape[0], x.dtype)], dim=1)

    def mix(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return x[:, :-self.n_cls], x[:, -self.n_cls:]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Sequence[int]) -> List[torch.Tensor]:
        """Per block, softmax(q kᵀ/√p) over all h·w + K tokens: (B, H, T, T) (Segmenter's ``get_attention_map``)."""
        grid = _grid(grid_size)
        _check_patch_tokens(self, x, grid, self.d_encoder)
        x = self._tokens(self.proj_dec(x))
        maps = []
        for blk in self.blocks:
            attn = blk.attn
            b, t, _ = x.shape
            qkv = attn.qkv(blk.norm1(x)).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            maps.append(torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * attn.scale, dim=-1))
            x = blk(x)
        return maps


class DepictCAMaskTransformer(MaskDecoder):
    """DEPICT-CA: self-attention over the patches (``snet``), then cross-attention with the class embeddings
    as queries (``cnet``); both are DEPICT's tied MSSA without MLP.

    Args:
        n_cls, d_model: as :class:`MaskTransformer`.
        n_layers, n_heads, dim_head: snet (release: 3 layers, 3 heads × 100).
        cross_layers, cross_dim_head: cnet (release: 3 layers, head width 50, same head count).
        dropout: on the attention weights (release: 0).
    """

    name = "depict_ca"

    def __init__(self, n_cls: int, d_model: int, *, n_layers: int = 3, n_heads: int = 3, dim_head: int = 100,
                 cross_layers: int = 3, cross_dim_head: int = 50, dropout: float = 0.0) -> None:
        super().__init__(n_cls, d_model)
        self.n_layers, self.n_heads, self.dim_head = int(n_layers), int(n_heads), int(dim_head)
        self.cross_layers, self.cross_dim_head = int(cross_layers), int(cross_dim_head)
        self.snet = ResidualAttentionStack(d_model, [DepictAttention(d_model, n_heads, dim_head, dropout)
                                                     for _ in range(n_layers)])
        self.cnet = ResidualAttentionStack(d_model, [DepictAttention(d_model, n_heads, cross_dim_head, dropout)
                                                     for _ in range(cross_layers)])
        self.snorm = nn.LayerNorm(d_model)
        self.cnorm = nn.LayerNorm(d_model)
        self._init_weights()

    @property
    def attention_layers(self) -> List[nn.Module]:
        return [layer.fn for layer in self.snet.layers] + [layer.fn for layer in self.cnet.layers]

    def mix(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        patches = self.snorm(self.snet(x, grid))
        classes = self.cnorm(self.cnet(patches, grid, query=self.class_embeddings(x.shape[0], x.dtype)))
        return patches, classes

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, grid_size: Sequence[int]) -> List[torch.Tensor]:
        """snet layers: (B, H, h·w, h·w) over the patches; then cnet layers: (B, H, K, h·w), classes to patches."""
        grid = _grid(grid_size)
        _check_patch_tokens(self, x, grid, self.d_encoder)
        maps = self.snet.attention_maps(x, grid)
        patches = self.snorm(self.snet(x, grid))
        return maps + self.cnet.attention_maps(patches, grid, query=self.class_embeddings(x.shape[0], x.dtype))


class LinearDecoder(nn.Module):
    """Segmenter's ``DecoderLinear``: ``forward(patch tokens (B, h·w, D), (h, w)) -> head(x)`` as (B, K, h, w)."""

    name = "linear"

    def __init__(self, n_cls: int, d_encoder: int) -> None:
        super().__init__()
        self.n_cls, self.d_encoder = int(n_cls), int(d_encoder)
        self.head = nn.Linear(d_encoder, n_cls)
        _init_like_release(self)

    def no_weight_decay(self) -> Set[str]:
        return set()

    @property
    def attention_layers(self) -> List[nn.Module]:
        return []

    def forward(self, x: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        grid = _grid(grid_size)
        _check_patch_tokens(self, x, grid, self.d_encoder)
        return self.head(x).unflatten(1, tuple(grid)).permute(0, 3, 1, 2)   # channels-last view, as above

    def attention_maps(self, x: torch.Tensor, grid_size: Sequence[int]) -> List[torch.Tensor]:
        raise ValueError("the linear decoder has no attention layers, hence no attention maps")
