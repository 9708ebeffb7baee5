"""Segmenter's ViT encoder (docs/authors-release.md §4.1), built on timm's ``VisionTransformer``.

Segmenter's own ViT and timm's share every parameter name (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``head``), so a timm model with Segmenter's settings loads the authors' ``encoder.*`` weights unchanged.
Two settings differ from timm's defaults and are taken from Segmenter:

* LayerNorm eps 1e-5 (``nn.LayerNorm`` default) instead of timm's 1e-6;
* the position embedding is resized to other grids **bilinearly** (Segmenter's ``resize_pos_embed``),
  not bicubically.

The DeiT "distilled" backbones add Segmenter's ``dist_token`` after ``cls_token`` (position embedding for
both), and ``head_dist``. :func:`segmenter_block` is the same pre-norm MHSA + MLP block with Segmenter's
settings, for Segmenter's decoder (which uses its encoder's ``Block`` class).

Pretrained weights come from a local file only (nothing downloads): a timm/Google ``.npz`` (loaded with
timm's ``_load_weights``, which resizes ``pos_embed`` bilinearly to the crop grid, as timm 0.4.12 did for
Segmenter), or a ``.safetensors`` / ``.pth`` state dict (timm names, optionally under ``encoder.`` or
``module.``).
"""
from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer, _load_weights

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint, strip_prefix
from cbsa_core.layers import resample_pos_embed

__all__ = ["BACKBONES", "PRETRAINED_WEIGHTS", "SegmenterViT", "create_encoder", "load_pretrained_encoder",
           "pretrained_weights_hint", "segmenter_block", "SEGMENTER_NORM"]

_LOG = logging.getLogger(__name__)

# The backbone table of the release's config.yml (docs/authors-release.md §4.4). ``normalization`` picks the
# input statistics of the data pipeline (transforms.NORMALIZATION).
BACKBONES: Dict[str, Dict[str, object]] = {
    "vit_tiny_patch16_384": dict(d_model=192, n_heads=3, n_layers=12, patch_size=16, normalization="vit"),
    "vit_small_patch16_384": dict(d_model=384, n_heads=6, n_layers=12, patch_size=16, normalization="vit"),
    "vit_base_patch16_384": dict(d_model=768, n_heads=12, n_layers=12, patch_size=16, normalization="vit"),
    "vit_large_patch16_384": dict(d_model=1024, n_heads=16, n_layers=24, patch_size=16, normalization="vit"),
    "vit_base_patch8_384": dict(d_model=768, n_heads=12, n_layers=12, patch_size=8, normalization="vit"),
    "deit_tiny_patch16_224": dict(d_model=192, n_heads=3, n_layers=12, patch_size=16, normalization="deit"),
    "deit_small_patch16_224": dict(d_model=384, n_heads=6, n_layers=12, patch_size=16, normalization="deit"),
    "deit_base_patch16_224": dict(d_model=768, n_heads=12, n_layers=12, patch_size=16, normalization="deit"),
    # Segmenter's config.yml: the distilled DeiT backbones of its Seg-B-dagger models.
    "deit_tiny_distilled_patch16_224": dict(d_model=192, n_heads=3, n_layers=12, patch_size=16,
                                            normalization="deit", distilled=True),
    "deit_small_distilled_patch16_224": dict(d_model=384, n_heads=6, n_layers=12, patch_size=16,
                                             normalization="deit", distilled=True),
    "deit_base_distilled_patch16_224": dict(d_model=768, n_heads=12, n_layers=12, patch_size=16,
                                            normalization="deit", distilled=True),
    "deit_base_distilled_patch16_384": dict(d_model=768, n_heads=12, n_layers=12, patch_size=16,
                                            normalization="deit", distilled=True),
}

# Segmenter's LayerNorm: torch's default eps 1e-5 (timm's ViT uses 1e-6).
SEGMENTER_NORM = partial(nn.LayerNorm, eps=1e-5)


def segmenter_block(dim: int, n_heads: int, d_ff: int, dropout: float = 0.0, drop_path: float = 0.0) -> Block:
    """Segmenter's ``Block(dim, heads, mlp_dim, dropout, drop_path)``: pre-norm MHSA (qkv with bias) and a GELU
    MLP of width ``d_ff``, one drop-path rate for both residual branches; ``dropout`` acts on the attention
    weights, after the attention projection and after both MLP layers. Parameter names
    (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are Segmenter's."""
    if d_ff % dim:
        raise ValueError(f"segmenter_block: d_ff={d_ff} must be a multiple of dim={dim}")
    return Block(dim, n_heads, mlp_ratio=d_ff / dim, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                 drop_path=drop_path, norm_layer=SEGMENTER_NORM)

# The ImageNet weights each backbone starts from in the release (timm's default for the name;
# docs/authors-release.md §4.1), as timm 1.x tags. Nothing downloads: ``--pretrained-file`` must point at a
# local copy.
PRETRAINED_WEIGHTS: Dict[str, str] = {
    **{f"vit_{s}_patch16_384": f"vit_{s}_patch16_384.augreg_in21k_ft_in1k" for s in ("tiny", "small", "base", "large")},
    **{f"deit_{s}_patch16_224": f"deit_{s}_patch16_224.fb_in1k" for s in ("tiny", "small", "base")},
    **{f"deit_{s}_distilled_patch16_224": f"deit_{s}_distilled_patch16_224.fb_in1k" for s in ("tiny", "small", "base")},
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384.fb_in1k",
}


def pretrained_weights_hint(backbone: str) -> str:
    """What ``--pretrained-file`` must hold for ``backbone`` (for error messages)."""
    formats = ".npz, .safetensors, or a .pth state dict with timm names"
    if backbone in PRETRAINED_WEIGHTS:
        return f"a local copy of timm's {PRETRAINED_WEIGHTS[backbone]} weights ({formats})"
    return f"a local file of ImageNet weights for the {backbone!r} encoder ({formats})"


class SegmenterViT(VisionTransformer):
    """timm ViT with Segmenter's forward: ``forward(im (B, 3, H, W)) -> (B, P + h·w, D)`` after the final LN,
    P = 1 ([CLS]) or 2 ([CLS], [DIST] for ``distilled``).

    H and W must be multiples of the patch size (``Segmenter`` pads); the position embedding, stored for
    the crop grid, is resized bilinearly to any other (h, w).
    """

    def __init__(self, *, image_size: Tuple[int, int], patch_size: int, d_model: int, n_layers: int, n_heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path_rate: float = 0.0,
                 num_classes: int = 1000, distilled: bool = False) -> None:
        super().__init__(
            img_size=tuple(image_size), patch_size=patch_size, num_classes=num_classes, embed_dim=d_model,
            depth=n_layers, num_heads=n_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            # Segmenter's ``dropout`` acts after the position embedding, on the attention weights, after the
            # attention projection and after both MLP layers (timm: pos_drop, attn_drop, proj_drop, mlp.drop1/2).
            # Its ViT has no dropout before the (unused) head, hence drop_rate 0.
            drop_rate=0.0, pos_drop_rate=dropout, attn_drop_rate=dropout, proj_drop_rate=dropout,
            drop_path_rate=drop_path_rate, norm_layer=SEGMENTER_NORM,
        )
        self.d_model = d_model
        self.patch_size = patch_size
        self.n_layers = n_layers
        self.distilled = int(bool(distilled))  # Segmenter's flag: 1 + distilled prefix tokens
        if distilled:
            # Segmenter's distilled ViT: [CLS], [DIST], patches, with a position embedding for each.
            self.num_prefix_tokens = 2
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, d_model))
            self.head_dist = nn.Linear(d_model, num_classes)
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.dist_token, std=0.02)

    @property
    def crop_grid(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, im: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, _, h, w = im.shape
        ps = self.patch_size
        if h % ps or w % ps:
            raise ValueError(f"SegmenterViT: input {h}x{w} is not a multiple of the patch size {ps}; pad it first")
        x = self.patch_embed.proj(im).flatten(2).transpose(1, 2)  # (B, h·w, D)
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        x = torch.cat([t.expand(b, -1, -1).to(x.dtype) for t in prefix] + [x], dim=1)
        pos = resample_pos_embed(self.pos_embed, (h // ps, w // ps), self.crop_grid,
                                 num_prefix_tokens=self.num_prefix_tokens, mode="bilinear")
        x = self.pos_drop(x + pos.to(x.dtype))
        x = self.blocks(x)
        return self.norm(x)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"} | ({"dist_token"} if self.distilled else set())


def create_encoder(backbone: str, image_size: Tuple[int, int], *, drop_path_rate: float = 0.0,
                   dropout: float = 0.0, **overrides) -> SegmenterViT:
    """Build a named backbone for a crop size; ``overrides`` (d_model, n_heads, n_layers, patch_size,
    distilled) give any other width/depth (e.g. tiny test encoders)."""
    if backbone not in BACKBONES and not {"d_model", "n_heads", "n_layers"} <= set(overrides):
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)} "
                         "(or pass d_model, n_heads and n_layers)")
    cfg = dict(BACKBONES.get(backbone, dict(patch_size=16)))
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return SegmenterViT(image_size=tuple(image_size), patch_size=int(cfg["patch_size"]),
                        d_model=int(cfg["d_model"]), n_layers=int(cfg["n_layers"]), n_heads=int(cfg["n_heads"]),
                        dropout=dropout, drop_path_rate=drop_path_rate, distilled=bool(cfg.get("distilled", False)))


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    ckpt = read_checkpoint(path)
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = dict(ckpt[key])
            break
    return dict(ckpt)


@torch.no_grad()
def load_pretrained_encoder(encoder: SegmenterViT, path: str | os.PathLike) -> None:
    """Load ImageNet weights from a local file into ``encoder`` and resize ``pos_embed`` to its crop grid.

    ``.npz``: timm's JAX-checkpoint loader. ``.safetensors``/``.pth``/``.pt``/``.bin``: a timm-named state dict
    (a Segmenter checkpoint's ``encoder.*`` part also works). A head whose class count differs is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained encoder file not found: {path} (nothing is downloaded; pass a local "
                                ".npz, .safetensors or .pth file with --pretrained-file)")
    if path.suffix == ".npz":
        try:
            _load_weights(encoder, str(path))
        except KeyError as e:
            raise CheckpointError(f"{path} is not a timm/Google ViT .npz checkpoint (missing entry {e})") from e
        _LOG.info("loaded pretrained encoder from %s", path)
        return
    sd = _read_state_dict(path)
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    sd = dict(strip_prefix(sd))
    if "pos_embed" in sd and sd["pos_embed"].shape != encoder.pos_embed.shape:
        n_prefix = encoder.num_prefix_tokens
        n_old = sd["pos_embed"].shape[1] - n_prefix
        side = int(round(max(n_old, 0) ** 0.5))
        if side * side != n_old:
            raise CheckpointMismatchError(f"{path}: pos_embed of {n_old} grid tokens (after {n_prefix} prefix "
                                          "tokens) is not a square grid")
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], encoder.crop_grid, (side, side),
                                             num_prefix_tokens=n_prefix, mode="bilinear")
    expected = encoder.state_dict()
    for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if k in sd and k in expected and sd[k].shape != expected[k].shape:
            del sd[k]
    missing = [k for k in expected if k not in sd and not k.startswith(("head.", "head_dist."))]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"pretrained encoder file {path} does not fit the encoder (d_model={encoder.d_model}, "
            f"n_layers={encoder.n_layers}): missing {missing[:8]}, unexpected {unexpected[:8]}, shapes {shapes[:8]}")
    encoder.load_state_dict(sd, strict=False)
    _LOG.info("loaded pretrained encoder from %s", path)

