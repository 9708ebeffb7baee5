"""Segmenter = ViT encoder + a segmentation decoder, its config, and loading every supported file.

``Segmenter.forward(im (B, 3, H, W)) -> logits (B, n_cls, H, W)`` as in the release (docs/authors-release.md
§4.1): pad to a multiple of the patch size, encode (after the final LN), drop [CLS] (and [DIST]), decode on the
(h, w) grid, upsample bilinearly to the padded size, unpad. The decoder is any of :mod:`.decoders`.

``load_model(path)`` reads

* this project's checkpoints (the config is embedded; training checkpoints too);
* a pretrained folder (``config.json`` + ``model.safetensors``, :mod:`.pretrained`);
* the released Segmenter-style files of CBSA (CBT, CBT†), Segmenter (mask transformer, linear) and DEPICT
  (SA, CA): ``{'model', 'optimizer', 'n_cls', 'lr_scheduler', 'epoch'}`` with ``variant.yml`` beside
  (§1.3.5); the decoder is recognised by its keys (:mod:`.release_checkpoints`).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cbsa_core.checkpoint import (CheckpointError, CheckpointMismatchError, check_state_dict, checkpoint_kind,
                                  extract_state_dict, read_checkpoint)

from .decoders import DECODERS, build_decoder, check_decoder_fits_crop, check_rep_grid, resolve_decoder_config
from .encoder import BACKBONES, SegmenterViT, create_encoder, load_pretrained_encoder
from .pretrained import read_pretrained_folder
from .release_checkpoints import config_from_release_checkpoint, read_variant

__all__ = ["ARCH", "UNUSED_ENCODER_MODULES", "Segmenter",
           "default_model_config", "check_rep_grid", "create_segmenter", "load_model",
           "read_variant", "pad_to_patch", "config_from_release_checkpoint", "config_from_authors_checkpoint",
           "resolve_model_config"]

_LOG = logging.getLogger(__name__)

ARCH = "segmenter"

# The CBT decoder of the release (docs/authors-release.md §2.2, config.yml `decoder.mask_transformer`).
DEFAULT_DECODER: Dict[str, Any] = dict(name="mask_transformer", **DECODERS["mask_transformer"])

# The released readers handle CBT files as before; the name is kept for callers of the CBT-only version.
config_from_authors_checkpoint = config_from_release_checkpoint


def pad_to_patch(im: torch.Tensor, patch_size: int, fill_value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``patch_size`` (Segmenter's ``padding``)."""
    h, w = im.shape[-2:]
    pad_h, pad_w = (-h) % patch_size, (-w) % patch_size
    if pad_h == 0 and pad_w == 0:
        return im
    return F.pad(im, (0, pad_w, 0, pad_h), value=fill_value)


# The encoder's ImageNet classifier heads: forward never uses them (the decoder reads the tokens after the final LN).
UNUSED_ENCODER_MODULES = ("head", "head_dist")


class Segmenter(nn.Module):
    """Encoder-decoder segmentation model. ``forward(im (B, 3, H, W)) -> logits (B, n_cls, H, W)``.

    The encoder's classifier heads (:data:`UNUSED_ENCODER_MODULES`) are frozen (``requires_grad=False``): they get
    no gradient, so no optimizer holds them and DDP runs without ``find_unused_parameters`` (which the release
    needed for them, docs/authors-release.md §1.3.5). They stay in the state dict, so every checkpoint layout
    loads and saves unchanged."""

    arch = ARCH

    def __init__(self, encoder: SegmenterViT, decoder: nn.Module, model_config: Mapping[str, Any]) -> None:
        super().__init__()
        if encoder.d_model != decoder.d_encoder:
            raise ValueError(f"encoder width {encoder.d_model} != the decoder's input width {decoder.d_encoder}")
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = decoder.n_cls
        self.patch_size = encoder.patch_size
        self.model_config: Dict[str, Any] = copy.deepcopy(dict(model_config))
        for name in UNUSED_ENCODER_MODULES:
            module = getattr(encoder, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def frozen_parameter_names(self) -> List[str]:
        """Names of the parameters that are frozen (never trained): the encoder's unused heads."""
        return [name for name, p in self.named_parameters() if not p.requires_grad]

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
        """The decoder's attention matrices per layer (see its ``attention_maps``; CBT: the CBSA estimates AᵀA,
        (B, H, h·w + n_cls, h·w + n_cls)) and the token grid."""
        x, grid = self._features(pad_to_patch(im, self.patch_size))
        return self.decoder.attention_maps(x, grid), grid


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
def default_model_config(backbone: str = "vit_small_patch16_384", *, n_cls: int = 150, crop_size: int = 512,
                         drop_path_rate: float = 0.1, dropout: float = 0.0,
                         decoder: Optional[Mapping[str, Any]] = None,
                         decoder_setting_names: Optional[Mapping[str, str]] = None,
                         **encoder_overrides: Any) -> Dict[str, Any]:
    """The full constructor config: the backbone's row of the release's table plus the decoder settings.

    ``decoder``: ``{"name": ..., setting: value}`` (default: the CBT decoder); None values take the decoder's
    released defaults (:func:`~semantic_segmentation.decoders.resolve_decoder_config`, whose errors name the
    settings as ``decoder_setting_names`` spells them). ``encoder_overrides``: d_model, n_heads, n_layers,
    patch_size, distilled, normalization. Raises ``ValueError`` for an unknown backbone, a bad decoder setting
    or a crop too small for the decoder.
    """
    if backbone not in BACKBONES and not {"d_model", "n_heads", "n_layers"} <= set(encoder_overrides):
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    enc = dict(BACKBONES.get(backbone, dict(patch_size=16, normalization="vit")))
    enc.update({k: v for k, v in encoder_overrides.items() if v is not None})
    config = dict(backbone=backbone, image_size=[int(crop_size), int(crop_size)], patch_size=int(enc["patch_size"]),
                  d_model=int(enc["d_model"]), n_heads=int(enc["n_heads"]), n_layers=int(enc["n_layers"]),
                  normalization=str(enc.get("normalization", "vit")), dropout=float(dropout),
                  drop_path_rate=float(drop_path_rate), distilled=bool(enc.get("distilled", False)),
                  n_cls=int(n_cls), decoder=dict(decoder or {}))
    return resolve_model_config(config, decoder_setting_names=decoder_setting_names)


def resolve_model_config(config: Mapping[str, Any], *,
                         decoder_setting_names: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """A complete, checked copy of a model config: the decoder's settings resolved (released defaults filled
    in, derived values made explicit), ``distilled`` defaulting to False (configs written before it existed),
    and the crop checked against the decoder. Raises ``ValueError``."""
    cfg = copy.deepcopy(dict(config))
    image_size = cfg["image_size"]
    cfg["image_size"] = [int(image_size)] * 2 if isinstance(image_size, int) else [int(s) for s in image_size]
    cfg.setdefault("distilled", False)
    cfg["decoder"] = resolve_decoder_config(cfg.get("decoder"), int(cfg["d_model"]),
                                            setting_names=decoder_setting_names)
    check_decoder_fits_crop(cfg["decoder"], cfg["image_size"], int(cfg["patch_size"]))
    return cfg


def create_segmenter(config: Mapping[str, Any], *, pretrained_file: Optional[str | os.PathLike] = None) -> Segmenter:
    """Build a :class:`Segmenter` from a config (see :func:`default_model_config`).

    ``pretrained_file`` loads ImageNet encoder weights from a local file; leave it out when a full
    checkpoint is loaded next (item 39).
    """
    cfg = resolve_model_config(config)
    encoder = create_encoder(cfg.get("backbone", ""), tuple(cfg["image_size"]),
                             drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
                             dropout=float(cfg.get("dropout", 0.0)), d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                             n_layers=cfg["n_layers"], patch_size=cfg["patch_size"], distilled=cfg["distilled"])
    if pretrained_file:
        load_pretrained_encoder(encoder, pretrained_file)
    decoder = build_decoder(cfg["decoder"], int(cfg["n_cls"]), int(cfg["d_model"]))
    return Segmenter(encoder, decoder, cfg)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _build_and_load(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str) -> Segmenter:
    try:
        model = create_segmenter(config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(f"{source}: its model config cannot be built: {e}") from e
    check_state_dict(model, state_dict, source=source)
    model.load_state_dict(state_dict)
    return model


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Segmenter:
    """An eval-mode :class:`Segmenter` from a checkpoint file or a pretrained folder.

    * A folder: ``config.json`` + ``model.safetensors`` (:func:`~semantic_segmentation.pretrained.save_pretrained`).
    * This project's files: the embedded ``model_config`` (training checkpoints too).
    * CBSA's, Segmenter's and DEPICT's files: the ``variant.yml`` beside the checkpoint plus the weights'
      keys and shapes; the decoder kind comes from the keys. A file whose decoder keys match none of them, or
      whose weights do not fit, raises :class:`CheckpointMismatchError` naming the file.

    The encoder is built without pretrained weights: the checkpoint overwrites all of them (item 39).
    ``model.variant`` holds the training/inference settings that came with the file (may be empty).
    """
    path = Path(path)
    if path.is_dir():
        config, state_dict, inference = read_pretrained_folder(path)
        model = _build_and_load(config, state_dict, f"pretrained folder {path}")
        model.variant = dict(inference_kwargs=inference)
        return model.to(map_location).eval()
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
        config = config_from_release_checkpoint(state_dict, int(ckpt["n_cls"]), variant,
                                                source=f"checkpoint {path}", variant_source=str(variant_path))
    else:
        raise CheckpointError(f"checkpoint {path} is a {kind} file, not a segmentation checkpoint "
                              "(expected this project's format, a pretrained folder, or a Segmenter-style "
                              "{'model', 'n_cls', ...} file with variant.yml beside it)")
    model = _build_and_load(config, state_dict, f"checkpoint {path}")
    model.variant = variant
    return model.eval()
