"""Segmenter = ViT encoder + CBT mask-transformer decoder, its config, and checkpoint loading.

``Segmenter.forward(im (B, 3, H, W)) -> logits (B, n_cls, H, W)`` as in the release (official-code.md §4.1):
pad to a multiple of the patch size, encode (after the final LN), drop [CLS], decode on the (h, w) grid,
upsample bilinearly to the padded size, unpad.

``load_model(path)`` reads either this project's checkpoints (config embedded) or the authors' files
(``{'model', 'optimizer', 'n_cls', 'lr_scheduler', 'epoch'}`` with ``variant.yml`` beside, §1.3.5).
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from cbsa_core.checkpoint import (CheckpointError, CheckpointMismatchError, check_state_dict, checkpoint_kind,
                                  extract_state_dict, read_checkpoint)

from .decoder import MaskTransformer
from .encoder import BACKBONES, SegmenterViT, create_encoder, load_pretrained_encoder

__all__ = ["ARCH", "Segmenter", "default_model_config", "check_rep_grid", "create_segmenter", "load_model",
           "read_variant", "pad_to_patch", "config_from_authors_checkpoint"]

_LOG = logging.getLogger(__name__)

ARCH = "segmenter"

# The release's decoder (official-code.md §2.2, config.yml `decoder.mask_transformer`).
DEFAULT_DECODER: Dict[str, Any] = dict(name="mask_transformer", n_layers=3, n_heads=3, dim_head=100,
                                       rep_grid=[10, 10], tied_output=False)


def pad_to_patch(im: torch.Tensor, patch_size: int, fill_value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``patch_size`` (Segmenter's ``padding``)."""
    h, w = im.shape[-2:]
    pad_h, pad_w = (-h) % patch_size, (-w) % patch_size
    if pad_h == 0 and pad_w == 0:
        return im
    return F.pad(im, (0, pad_w, 0, pad_h), value=fill_value)


class Segmenter(nn.Module):
    """Encoder-decoder segmentation model. ``forward(im (B, 3, H, W)) -> logits (B, n_cls, H, W)``."""

    arch = ARCH

    def __init__(self, encoder: SegmenterViT, decoder: MaskTransformer, model_config: Mapping[str, Any]) -> None:
        super().__init__()
        if encoder.d_model != decoder.d_model:
            raise ValueError(f"encoder width {encoder.d_model} != decoder width {decoder.d_model} (no proj_dec)")
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = decoder.n_cls
        self.patch_size = encoder.patch_size
        self.model_config: Dict[str, Any] = copy.deepcopy(dict(model_config))

    def no_weight_decay(self):
        return ({f"encoder.{n}" for n in self.encoder.no_weight_decay()}
                | {f"decoder.{n}" for n in self.decoder.no_weight_decay()})

    def _features(self, im: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Padded image (B, 3, H, W) -> patch tokens (B, h·w, D) after the final LN, and (h, w)."""
        x = self.encoder(im)[:, 1 + self.encoder.distilled:]
        return x, (im.shape[-2] // self.patch_size, im.shape[-1] // self.patch_size)

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        if im.dim() != 4:
            raise ValueError(f"Segmenter: expected images (B, C, H, W), got {tuple(im.shape)}")
        h0, w0 = im.shape[-2:]
        im = pad_to_patch(im, self.patch_size)
        x, grid = self._features(im)
        masks = self.decoder(x, grid)
        masks = F.interpolate(masks, size=im.shape[-2:], mode="bilinear", align_corners=False)
        return masks[:, :, :h0, :w0]

    @torch.no_grad()
    def decoder_attention_maps(self, im: torch.Tensor) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """Decoder CBSA attention estimates AᵀA per layer ((B, H, h·w + n_cls, h·w + n_cls)) and the grid."""
        x, grid = self._features(pad_to_patch(im, self.patch_size))
        return self.decoder.attention_maps(x, grid), grid


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
def default_model_config(backbone: str = "vit_small_patch16_384", *, n_cls: int = 150, crop_size: int = 512,
                         drop_path_rate: float = 0.1, dropout: float = 0.0,
                         decoder: Optional[Mapping[str, Any]] = None, **encoder_overrides: Any) -> Dict[str, Any]:
    """The full constructor config: the backbone's row of the release's table plus the decoder settings."""
    if backbone not in BACKBONES and not {"d_model", "n_heads", "n_layers"} <= set(encoder_overrides):
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    enc = dict(BACKBONES.get(backbone, dict(patch_size=16, normalization="vit")))
    enc.update({k: v for k, v in encoder_overrides.items() if v is not None})
    dec = dict(DEFAULT_DECODER)
    dec.update({k: v for k, v in (decoder or {}).items() if v is not None})
    dec["rep_grid"] = [int(r) for r in dec["rep_grid"]]
    return dict(backbone=backbone, image_size=[int(crop_size), int(crop_size)], patch_size=int(enc["patch_size"]),
                d_model=int(enc["d_model"]), n_heads=int(enc["n_heads"]), n_layers=int(enc["n_layers"]),
                normalization=str(enc.get("normalization", "vit")), dropout=float(dropout),
                drop_path_rate=float(drop_path_rate), n_cls=int(n_cls), decoder=dec)


def check_rep_grid(crop_size: Sequence[int], patch_size: int, rep_grid: Sequence[int]) -> None:
    """The decoder pools its representatives from the crop's patch grid, which must be at least ``rep_grid``
    (adaptive pooling to a larger grid would only repeat tokens); raises ``ValueError`` otherwise."""
    grid = [int(c) // int(patch_size) for c in crop_size]
    if grid[0] < int(rep_grid[0]) or grid[1] < int(rep_grid[1]):
        raise ValueError(f"crop size {crop_size[0]}x{crop_size[1]} with patch {patch_size} gives a {grid[0]}x{grid[1]} "
                         f"patch grid, smaller than the decoder's representative grid {rep_grid[0]}x{rep_grid[1]}; "
                         "use a larger crop size or a smaller rep_grid")


def create_segmenter(config: Mapping[str, Any], *, pretrained_file: Optional[str | os.PathLike] = None) -> Segmenter:
    """Build a :class:`Segmenter` from a config (see :func:`default_model_config`).

    ``pretrained_file`` loads ImageNet encoder weights from a local file; leave it out when a full
    checkpoint is loaded next (item 39).
    """
    cfg = copy.deepcopy(dict(config))
    dec = dict(DEFAULT_DECODER)
    dec.update(cfg.get("decoder") or {})
    if dec.get("name", "mask_transformer") != "mask_transformer":
        raise ValueError(f"unknown decoder {dec.get('name')!r}; only 'mask_transformer' (the CBT decoder) exists")
    dec["rep_grid"] = [int(r) for r in dec["rep_grid"]]
    cfg["decoder"] = dec
    image_size = cfg["image_size"]
    image_size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(map(int, image_size))
    check_rep_grid(image_size, int(cfg["patch_size"]), dec["rep_grid"])
    encoder = create_encoder(cfg.get("backbone", ""), image_size, drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
                             dropout=float(cfg.get("dropout", 0.0)), d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                             n_layers=cfg["n_layers"], patch_size=cfg["patch_size"])
    if pretrained_file:
        load_pretrained_encoder(encoder, pretrained_file)
    decoder = MaskTransformer(int(cfg["n_cls"]), int(cfg["d_model"]), n_layers=int(dec["n_layers"]),
                              n_heads=int(dec["n_heads"]), dim_head=int(dec["dim_head"]),
                              rep_grid=tuple(dec["rep_grid"]), tied_output=bool(dec["tied_output"]))
    return Segmenter(encoder, decoder, cfg)


# --------------------------------------------------------------------------------------------------
# The authors' checkpoints
# --------------------------------------------------------------------------------------------------
class _VariantLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads the ``!!python/tuple`` tags ``yaml.dump`` writes for tuples
    (Segmenter stores ``image_size`` as a tuple)."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))


def read_variant(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a Segmenter ``variant.yml`` (safely)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"variant file not found: {path} (the authors' segmentation checkpoints need the "
                              "variant.yml written beside them)")
    try:
        with open(path) as f:
            variant = yaml.load(f, Loader=_VariantLoader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise CheckpointError(f"{path} has no 'net_kwargs' mapping; is it a Segmenter variant.yml?")
    return variant


_LAYER_KEY = re.compile(r"^decoder\.net\.layers\.(\d+)\.fn\.proj\.weight$")


def config_from_authors_checkpoint(state_dict: Mapping[str, torch.Tensor], n_cls: int, variant: Mapping[str, Any],
                                   source: str, variant_source: Optional[str] = None) -> Dict[str, Any]:
    """Model config of an authors' checkpoint: encoder depth/width and decoder layers/heads from the variant,
    decoder head width and output tying from the weights' shapes (item 37). Any disagreement raises
    :class:`CheckpointMismatchError` naming ``source`` (and ``variant_source``, the variant file, when the
    variant itself lacks a setting)."""
    net = dict(variant["net_kwargs"])
    dec_v = dict(net.get("decoder") or {})
    problems: List[str] = []
    # The encoder's head count cannot be read from the weights (qkv is D x 3D for any split), so the variant
    # must give it; its depth is required too, to cross-check the weights.
    absent = [k for k in ("n_layers", "n_heads") if net.get(k) is None]
    if absent:
        raise CheckpointMismatchError(
            f"{variant_source or 'the variant.yml'} (beside {source}) has no "
            f"{' or '.join('net_kwargs.' + k for k in absent)}; the encoder cannot be built without them")

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointMismatchError(f"{source}: key {key!r} is missing; not a Segmenter/CBT checkpoint")
        return state_dict[key]

    d_model = int(net.get("d_model", need("encoder.cls_token").shape[-1]))
    n_layers = int(net["n_layers"])
    n_heads = int(net["n_heads"])
    patch_size = int(net.get("patch_size", 16))
    image_size = net.get("image_size", (512, 512))
    image_size = [int(image_size), int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    if need("encoder.cls_token").shape[-1] != d_model:
        problems.append(f"encoder width: variant d_model={d_model}, "
                        f"encoder.cls_token {tuple(need('encoder.cls_token').shape)}")
    enc_layers = {int(m.group(1)) for k in state_dict for m in [re.match(r"^encoder\.blocks\.(\d+)\.", k)] if m}
    if len(enc_layers) != n_layers:
        problems.append(f"encoder depth: variant n_layers={n_layers}, checkpoint has {len(enc_layers)} blocks")
    n_pos = need("encoder.pos_embed").shape[1] - 1
    if n_pos != (image_size[0] // patch_size) * (image_size[1] // patch_size):
        problems.append(f"encoder grid: variant image_size={image_size} / patch {patch_size} gives "
                        f"{(image_size[0] // patch_size) * (image_size[1] // patch_size)} positions, "
                        f"encoder.pos_embed has {n_pos}")
    if tuple(need("decoder.cls_emb").shape) != (1, n_cls, d_model):
        problems.append(f"decoder.cls_emb {tuple(need('decoder.cls_emb').shape)} vs n_cls={n_cls}, d_model={d_model}")

    dec_layers = sorted(int(m.group(1)) for k in state_dict for m in [_LAYER_KEY.match(k)] if m)
    if not dec_layers:
        raise CheckpointMismatchError(f"{source}: no decoder.net.layers.*.fn.proj.weight keys; not a CBT decoder")
    want_layers = int(dec_v.get("n_layers", len(dec_layers)))
    if len(dec_layers) != want_layers:
        problems.append(f"decoder depth: variant n_layers={want_layers}, checkpoint has {len(dec_layers)} layers")
    heads = int(need("decoder.net.layers.0.fn.step_x").shape[0])
    want_heads = int(dec_v.get("n_heads", heads))
    if heads != want_heads:
        problems.append(f"decoder heads: variant n_heads={want_heads}, decoder.net.layers.0.fn.step_x has {heads}")
    inner = int(need("decoder.net.layers.0.fn.proj.weight").shape[0])
    if inner % heads:
        problems.append(f"decoder inner width {inner} does not divide by {heads} heads")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match its variant.yml:\n  " + "\n  ".join(problems))
    tied = "decoder.net.layers.0.fn.to_out.weight" not in state_dict
    decoder = dict(name="mask_transformer", n_layers=len(dec_layers), n_heads=heads, dim_head=inner // heads,
                   rep_grid=[int(r) for r in dec_v.get("rep_grid", DEFAULT_DECODER["rep_grid"])], tied_output=tied)
    backbone = str(net.get("backbone", ""))
    normalization = net.get("normalization") or BACKBONES.get(backbone, {}).get("normalization", "vit")
    return dict(backbone=backbone, image_size=image_size, patch_size=patch_size, d_model=d_model, n_heads=n_heads,
                n_layers=n_layers, normalization=str(normalization), dropout=0.0, drop_path_rate=0.0,
                n_cls=int(n_cls), decoder=decoder)


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Segmenter:
    """An eval-mode :class:`Segmenter` from a checkpoint file.

    * This project's files: the embedded ``model_config`` (training checkpoints too).
    * The authors' files: the ``variant.yml`` beside the checkpoint plus the weights' shapes.

    The encoder is built without pretrained weights: the checkpoint overwrites all of them (item 39).
    ``model.variant`` holds the training/inference settings that came with the file (may be empty).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location=map_location)
    kind = checkpoint_kind(ckpt)
    state_dict = extract_state_dict(ckpt)
    if kind == "cbsa":
        if ckpt.get("arch") != ARCH:
            raise CheckpointMismatchError(f"checkpoint {path} holds arch {ckpt.get('arch')!r}, not a {ARCH!r} model")
        config = ckpt["model_config"]
        variant = dict(ckpt.get("variant") or {})
    elif kind == "authors_segmentation":
        variant_path = path.parent / "variant.yml"
        variant = read_variant(variant_path)
        config = config_from_authors_checkpoint(state_dict, int(ckpt["n_cls"]), variant,
                                                source=f"checkpoint {path}", variant_source=str(variant_path))
    else:
        raise CheckpointError(f"checkpoint {path} is a {kind} file, not a segmentation checkpoint "
                              "(expected this project's format or the authors' {'model', 'n_cls', ...})")
    model = create_segmenter(config)
    check_state_dict(model, state_dict, source=f"checkpoint {path}")
    model.load_state_dict(state_dict)
    model.variant = variant
    return model.eval()
