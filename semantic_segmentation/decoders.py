"""The decoders selectable by name, their released settings, config validation and construction.

A decoder config is a mapping ``{"name": NAME, **settings}``; :func:`resolve_decoder_config` fills the
released defaults, derives what the releases derive (Segmenter: width = encoder width, heads = width // 64,
MLP = 4·width), refuses settings that do not apply to the decoder, and returns explicit values only, so a
saved model never depends on a default changing later.

=============================  ==================================================  =============================
name                           decoder                                              released settings
=============================  ==================================================  =============================
``mask_transformer``           CBT: CBSA layers, no MLP (CBT† with tied_output)      3 layers, 3 × 100, 10×10 reps
``segmenter_mask_transformer`` Segmenter's mask transformer: ViT blocks              2 layers, D // 64 heads,
                               (MHSA + MLP), proj_dec, proj_patch/proj_classes       4D MLP, dropout 0.1
``linear``                     Segmenter's linear decoder                            -
``depict_sa``                  DEPICT-SA: tied MSSA layers, no MLP                   3 layers, 3 × 100
``depict_ca``                  DEPICT-CA: snet over patches + cnet with class        3 + 3 layers, 3 × 100 / 3 × 50
                               queries
``tssa``                       ToST: TSSA layers in the CBT skeleton                 3 layers, 3 heads
=============================  ==================================================  =============================

Sources: CBSA ``config.yml`` + ``decoder.py`` (docs/authors-release.md §4.1, §4.4), rstrudel/segmenter
``segm/config.yml`` + ``segm/model/factory.py``, QishuaiWen/DEPICT ``config.yml`` + ``model/decoder.py``. The
ToST decoder has no release; it takes the CBT decoder's settings.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch.nn as nn

from cbsa_core.layers import check_rep_grid as check_representative_grid

from .decoder import DepictCAMaskTransformer, LinearDecoder, MaskTransformer, SegmenterMaskTransformer

__all__ = ["DECODERS", "DECODER_SUMMARIES", "resolve_decoder_config", "build_decoder", "check_rep_grid",
           "check_decoder_fits_crop"]

# Released settings per decoder; None = derived from the encoder width (see resolve_decoder_config).
DECODERS: Dict[str, Dict[str, Any]] = {
    "mask_transformer": dict(n_layers=3, n_heads=3, dim_head=100, rep_grid=[10, 10], tied_output=False),
    "segmenter_mask_transformer": dict(n_layers=2, d_model=None, n_heads=None, d_ff=None, dropout=0.1,
                                       drop_path_rate=0.0),
    "linear": dict(),
    "depict_sa": dict(n_layers=3, n_heads=3, dim_head=100, dropout=0.0),
    "depict_ca": dict(n_layers=3, n_heads=3, dim_head=100, cross_layers=3, cross_dim_head=50, dropout=0.0),
    "tssa": dict(n_layers=3, n_heads=3),
}

DECODER_SUMMARIES: Dict[str, str] = {
    "mask_transformer": "CBT (CBSA layers, no MLP; --tied-output for CBT-dagger)",
    "segmenter_mask_transformer": "Segmenter's mask transformer (ViT blocks, proj_dec, proj_patch/proj_classes)",
    "linear": "Segmenter's linear decoder",
    "depict_sa": "DEPICT-SA (tied MSSA layers over patches + classes, no MLP)",
    "depict_ca": "DEPICT-CA (tied MSSA over patches, then cross-attention with class queries)",
    "tssa": "ToST (TSSA layers in the CBT decoder's skeleton)",
}

_INT_KEYS = ("n_layers", "n_heads", "dim_head", "d_model", "d_ff", "cross_layers", "cross_dim_head")
_RATE_KEYS = ("dropout", "drop_path_rate")


def resolve_decoder_config(config: Optional[Mapping[str, Any]], d_encoder: int, *,
                           setting_names: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The complete, checked settings of a decoder on an encoder of width ``d_encoder``.

    ``config``: ``{"name": ..., setting: value}`` (name defaults to ``mask_transformer``; None values mean
    "the released default"). ``setting_names`` maps a setting to how the user spelled it (e.g. a CLI flag)
    for the error messages. Raises ``ValueError`` naming the offending setting.
    """
    config = dict(config or {})
    label = lambda key: (setting_names or {}).get(key, f"decoder.{key}")  # noqa: E731
    name = config.pop("name", None) or "mask_transformer"
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    defaults = DECODERS[name]
    given = {k: v for k, v in config.items() if v is not None}
    foreign = [k for k in given if k not in defaults]
    if foreign:
        own = ", ".join(label(k) for k in defaults) or "none"
        raise ValueError(f"{', '.join(label(k) for k in foreign)}: not a setting of the {name} decoder "
                         f"(its settings: {own})")
    out: Dict[str, Any] = dict(defaults)
    out.update(given)
    for key in _INT_KEYS:
        if out.get(key) is not None:
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label(key)} must be an integer >= 1, got {value!r}")
    for key in _RATE_KEYS:
        if key in out:
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{label(key)} must be a number in [0, 1), got {value!r}")
            out[key] = float(value)
    if "rep_grid" in out:
        out["rep_grid"] = list(check_representative_grid(out["rep_grid"], name=label("rep_grid")))
    if "tied_output" in out and not isinstance(out["tied_output"], bool):
        raise ValueError(f"{label('tied_output')} must be true or false, got {out['tied_output']!r}")

    if name == "segmenter_mask_transformer":
        # Segmenter's factory: the decoder is as wide as the encoder, with d_model // 64 heads and a 4x MLP.
        out["d_model"] = out["d_model"] or int(d_encoder)
        if out["n_heads"] is None:
            if out["d_model"] < 64:
                raise ValueError(f"the segmenter_mask_transformer decoder takes d_model // 64 heads, none for "
                                 f"d_model={out['d_model']}; set {label('n_heads')}")
            out["n_heads"] = out["d_model"] // 64
        out["d_ff"] = out["d_ff"] or 4 * out["d_model"]
        if out["d_model"] % out["n_heads"]:
            raise ValueError(f"{label('n_heads')}={out['n_heads']} does not divide the segmenter_mask_transformer "
                             f"width {out['d_model']}")
        if out["d_ff"] % out["d_model"]:
            raise ValueError(f"{label('d_ff')}={out['d_ff']} must be a multiple of the decoder width "
                             f"{out['d_model']}")
    elif name == "tssa" and d_encoder % out["n_heads"]:
        raise ValueError(f"the tssa decoder projects D -> D and splits it into heads: {label('n_heads')}="
                         f"{out['n_heads']} does not divide the width D={d_encoder}; pick a divisor of {d_encoder}")
    return dict(name=name, **out)


def build_decoder(config: Mapping[str, Any], n_cls: int, d_encoder: int) -> nn.Module:
    """A decoder from a config (resolved first); ``forward(patch tokens (B, h·w, d_encoder), (h, w))``."""
    cfg = resolve_decoder_config(config, d_encoder)
    name = cfg.pop("name")
    if name == "mask_transformer":
        return MaskTransformer(n_cls, d_encoder, attention="cbsa", **cfg)
    if name == "depict_sa":
        return MaskTransformer(n_cls, d_encoder, attention="depict", **cfg)
    if name == "tssa":
        return MaskTransformer(n_cls, d_encoder, attention="tssa", **cfg)
    if name == "depict_ca":
        return DepictCAMaskTransformer(n_cls, d_encoder, **cfg)
    if name == "segmenter_mask_transformer":
        return SegmenterMaskTransformer(n_cls, d_encoder, **cfg)
    return LinearDecoder(n_cls, d_encoder)


def check_rep_grid(crop_size: Sequence[int], patch_size: int, rep_grid: Sequence[int]) -> None:
    """The CBT decoder pools its representatives from the crop's patch grid, which must be at least ``rep_grid``
    (adaptive pooling to a larger grid would only repeat tokens); raises ``ValueError`` otherwise."""
    grid = [int(c) // int(patch_size) for c in crop_size]
    check_representative_grid(rep_grid, grid, name="the decoder's representative grid",
                              source=f"crop size {crop_size[0]}x{crop_size[1]} with patch {patch_size}",
                              remedy="a larger crop size or a smaller rep_grid")


def check_decoder_fits_crop(config: Mapping[str, Any], crop_size: Sequence[int], patch_size: int) -> None:
    """Refuse a crop too small for the decoder (only the CBT decoder has a constraint: its representative grid)."""
    if "rep_grid" in config:
        check_rep_grid(crop_size, patch_size, config["rep_grid"])

