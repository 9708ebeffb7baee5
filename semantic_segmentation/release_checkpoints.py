"""Model configs of the released segmentation checkpoints: CBSA's, Segmenter's and DEPICT's.

All three codebases are Segmenter's, so their files share one layout (docs/authors-release.md §1.3.5):
``checkpoint.pth`` = ``{'model': state_dict, 'optimizer', 'n_cls', 'lr_scheduler', 'epoch'}`` (no ``module.``
prefix) with the run's ``variant.yml`` beside it. The variant cannot tell the decoders apart (CBSA and DEPICT
call theirs ``mask_transformer`` too, and DEPICT switches SA/CA by editing code), so the decoder is recognised
by its ``decoder.*`` keys:

=============================  ====================================================================
decoder                        keys
=============================  ====================================================================
``linear``                     ``decoder.head.weight``
``segmenter_mask_transformer`` ``decoder.blocks.{j}.*``, ``decoder.proj_dec.*``, ``decoder.proj_patch``
``depict_ca``                  ``decoder.snet.layers.{j}.fn.proj``, ``decoder.cnet.*``
``depict_sa``                  ``decoder.net.layers.{j}.fn.proj`` and ``.fn.step_size``
``mask_transformer`` (CBT)     ``decoder.net.layers.{j}.fn.proj.weight`` (CBT† without ``.fn.to_out.*``)
``tssa``                       ``decoder.net.layers.{j}.fn.temp`` (ToST attention in the CBT skeleton)
=============================  ====================================================================

Shapes give the widths, layer counts and MLP width; the variant gives what the weights cannot (the encoder's
head count; the decoders' head split, where it is not in the weights) and is cross-checked against them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import yaml

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError

from .decoders import DECODERS
from .encoder import BACKBONES

__all__ = ["read_variant", "detect_release_decoder", "config_from_release_checkpoint"]

StateDict = Mapping[str, torch.Tensor]


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads the ``!!python/tuple`` tags ``yaml.dump`` writes for tuples
    (Segmenter stores ``image_size`` as a tuple)."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))


def read_variant(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a Segmenter ``variant.yml`` (safely)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"variant file not found: {path} (the released segmentation checkpoints need the "
                              "variant.yml written beside them)")
    try:
        with open(path) as f:
            variant = yaml.load(f, Loader=_VariantLoader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise CheckpointError(f"{path} has no 'net_kwargs' mapping; is it a Segmenter variant.yml?")
    return variant


def _layer_count(state_dict: StateDict, pattern: str) -> int:
    """1 + the largest layer index j among the keys matching ``pattern`` (one ``(\\d+)`` group), 0 if none;
    a layer missing in the middle then shows up as missing keys when the weights are checked."""
    regex = re.compile(pattern)
    indices = [int(m.group(1)) for k in state_dict for m in [regex.match(k)] if m]
    return max(indices) + 1 if indices else 0


# (decoder, test on the key set), most specific first.
_SIGNATURES: List[tuple] = [
    ("linear", lambda keys: "decoder.head.weight" in keys),
    ("segmenter_mask_transformer", lambda keys: "decoder.proj_dec.weight" in keys
     or any(k.startswith("decoder.blocks.") for k in keys)),
    ("depict_ca", lambda keys: any(k.startswith(("decoder.snet.", "decoder.cnet.")) for k in keys)),
    ("depict_sa", lambda keys: any(re.match(r"^decoder\.net\.layers\.\d+\.fn\.step_size$", k) for k in keys)),
    ("mask_transformer", lambda keys: any(re.match(r"^decoder\.net\.layers\.\d+\.fn\.proj\.weight$", k)
                                          for k in keys)),
    ("tssa", lambda keys: any(re.match(r"^decoder\.net\.layers\.\d+\.fn\.temp$", k) for k in keys)),
]


def detect_release_decoder(state_dict: StateDict, source: str) -> str:
    """The decoder name whose keys ``state_dict`` holds; ``CheckpointMismatchError`` naming ``source`` if none."""
    keys = set(state_dict)
    for name, matches in _SIGNATURES:
        if matches(keys):
            return name
    found = sorted(k for k in keys if k.startswith("decoder."))
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "") if found else "none"
    raise CheckpointMismatchError(
        f"{source}: no recognisable segmentation decoder. Expected the decoder.* keys of CBT "
        "(decoder.net.layers.J.fn.proj.weight), DEPICT-SA (decoder.net.layers.J.fn.proj + .step_size), DEPICT-CA "
        "(decoder.snet.*, decoder.cnet.*), Segmenter's mask transformer (decoder.blocks.*, decoder.proj_dec.*), "
        "Segmenter's linear decoder (decoder.head.*) or ToST (decoder.net.layers.J.fn.temp); "
        f"the file's decoder keys: {shown}")


class _Reader:
    """Shape look-ups that fail with one error naming the file."""

    def __init__(self, state_dict: StateDict, source: str) -> None:
        self.state_dict, self.source = state_dict, source

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise CheckpointMismatchError(f"{self.source}: key {key!r} is missing; not a complete Segmenter-style "
                                          "segmentation checkpoint")
        return self.state_dict[key]


def _head_split(inner: int, heads: Optional[int], release_dim_head: int, what: str, source: str,
                problems: List[str]) -> tuple:
    """(heads, dim_head) of a projection of ``inner`` rows: heads from the variant, else inner / the release's
    hard-coded head width."""
    if heads is None:
        if inner % release_dim_head:
            raise CheckpointMismatchError(f"{source}: {what} has {inner} rows, not a multiple of the release's head "
                                          f"width {release_dim_head}, and the variant gives no n_heads")
        heads = inner // release_dim_head
    heads = int(heads)
    if heads < 1 or inner % heads:
        problems.append(f"{what} has {inner} rows, which do not split into variant n_heads={heads} heads")
        return heads, 1
    return heads, inner // heads


def _decoder_config(name: str, sd: StateDict, need: _Reader, dec_v: Mapping[str, Any], d_model: int,
                    source: str, problems: List[str]) -> Dict[str, Any]:
    """The decoder settings of a released file, from its weights and its variant's ``decoder`` entry."""
    want_layers = dec_v.get("n_layers")

    def layers(pattern: str, what: str) -> int:
        n = _layer_count(sd, pattern)
        if want_layers is not None and n != int(want_layers):
            problems.append(f"decoder depth: variant n_layers={want_layers}, checkpoint has {n} {what}")
        return n

    if name == "linear":
        return dict(name=name)
    if name == "segmenter_mask_transformer":
        n = layers(r"^decoder\.blocks\.(\d+)\.", "blocks")
        width = int(need("decoder.cls_emb").shape[-1])
        d_in = int(need("decoder.proj_dec.weight").shape[1])
        if d_in != d_model:
            problems.append(f"decoder.proj_dec.weight takes width {d_in}, the encoder has {d_model}")
        # Segmenter's factory always sets n_heads = d_model // 64 (a variant value is overridden there).
        return dict(name=name, n_layers=n, d_model=width, n_heads=max(width // 64, 1),
                    d_ff=int(need("decoder.blocks.0.mlp.fc1.weight").shape[0]),
                    dropout=float(dec_v.get("dropout", DECODERS[name]["dropout"])),
                    drop_path_rate=float(dec_v.get("drop_path_rate", DECODERS[name]["drop_path_rate"])))
    if name == "depict_sa":
        n = layers(r"^decoder\.net\.layers\.(\d+)\.", "layers")
        heads, dim_head = _head_split(int(need("decoder.net.layers.0.fn.proj").shape[0]), dec_v.get("n_heads"),
                                      100, "decoder.net.layers.0.fn.proj", source, problems)
        return dict(name=name, n_layers=n, n_heads=heads, dim_head=dim_head,
                    dropout=float(dec_v.get("dropout", 0.0)))
    if name == "depict_ca":
        n = layers(r"^decoder\.snet\.layers\.(\d+)\.", "snet layers")
        heads, dim_head = _head_split(int(need("decoder.snet.layers.0.fn.proj").shape[0]), dec_v.get("n_heads"),
                                      100, "decoder.snet.layers.0.fn.proj", source, problems)
        _, cross_dim_head = _head_split(int(need("decoder.cnet.layers.0.fn.proj").shape[0]), heads, 50,
                                        "decoder.cnet.layers.0.fn.proj", source, problems)
        return dict(name=name, n_layers=n, n_heads=heads, dim_head=dim_head,
                    cross_layers=_layer_count(sd, r"^decoder\.cnet\.layers\.(\d+)\."),
                    cross_dim_head=cross_dim_head, dropout=float(dec_v.get("dropout", 0.0)))
    if name == "tssa":
        n = layers(r"^decoder\.net\.layers\.(\d+)\.", "layers")
        return dict(name=name, n_layers=n, n_heads=int(need("decoder.net.layers.0.fn.temp").shape[0]))
    # CBT / CBT-dagger (item 37: heads and head width from the shapes, not assumed).
    n = layers(r"^decoder\.net\.layers\.(\d+)\.", "layers")
    heads = int(need("decoder.net.layers.0.fn.step_x").shape[0])
    want_heads = int(dec_v.get("n_heads", heads))
    if heads != want_heads:
        problems.append(f"decoder heads: variant n_heads={want_heads}, decoder.net.layers.0.fn.step_x has {heads}")
    inner = int(need("decoder.net.layers.0.fn.proj.weight").shape[0])
    if inner % heads:
        problems.append(f"decoder inner width {inner} does not divide by {heads} heads")
    return dict(name=name, n_layers=n, n_heads=heads, dim_head=inner // heads,
                rep_grid=[int(r) for r in dec_v.get("rep_grid", DECODERS[name]["rep_grid"])],
                tied_output="decoder.net.layers.0.fn.to_out.weight" not in sd)


def config_from_release_checkpoint(state_dict: StateDict, n_cls: int, variant: Mapping[str, Any], source: str,
                                   variant_source: Optional[str] = None) -> Dict[str, Any]:
    """Model config (as :func:`~semantic_segmentation.model.default_model_config` makes) of a CBSA, Segmenter or
    DEPICT checkpoint: encoder depth/width and heads from the variant, everything else from the weights' shapes,
    cross-checked. Any disagreement raises :class:`CheckpointMismatchError` naming ``source`` (and
    ``variant_source``, the variant file, when the variant itself lacks a setting)."""
    net = dict(variant["net_kwargs"])
    problems: List[str] = []
    # The encoder's head count cannot be read from the weights (qkv is D x 3D for any split), so the variant
    # must give it; its depth is required too, to cross-check the weights.
    absent = [k for k in ("n_layers", "n_heads") if net.get(k) is None]
    if absent:
        raise CheckpointMismatchError(
            f"{variant_source or 'the variant.yml'} (beside {source}) has no "
            f"{' or '.join('net_kwargs.' + k for k in absent)}; the encoder cannot be built without them")
    need = _Reader(state_dict, source)
    decoder_name = detect_release_decoder(state_dict, source)

    d_model = int(net.get("d_model", need("encoder.cls_token").shape[-1]))
    n_layers, n_heads = int(net["n_layers"]), int(net["n_heads"])
    patch_size = int(net.get("patch_size", 16))
    image_size = net.get("image_size", (512, 512))
    image_size = [int(image_size), int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    distilled = "encoder.dist_token" in state_dict
    if bool(net.get("distilled", distilled)) != distilled:
        problems.append(f"encoder: variant distilled={net.get('distilled')}, the checkpoint "
                        f"{'has' if distilled else 'has no'} encoder.dist_token")
    if need("encoder.cls_token").shape[-1] != d_model:
        problems.append(f"encoder width: variant d_model={d_model}, "
                        f"encoder.cls_token {tuple(need('encoder.cls_token').shape)}")
    enc_layers = _layer_count(state_dict, r"^encoder\.blocks\.(\d+)\.")
    if enc_layers != n_layers:
        problems.append(f"encoder depth: variant n_layers={n_layers}, checkpoint has {enc_layers} blocks")
    n_pos = need("encoder.pos_embed").shape[1] - 1 - int(distilled)
    grid = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    if n_pos != grid:
        problems.append(f"encoder grid: variant image_size={image_size} / patch {patch_size} gives {grid} "
                        f"positions, encoder.pos_embed has {n_pos}")

    decoder = _decoder_config(decoder_name, state_dict, need, dict(net.get("decoder") or {}), d_model, source,
                              problems)
    if decoder_name != "linear":
        width = decoder.get("d_model", d_model)
        if tuple(need("decoder.cls_emb").shape) != (1, n_cls, width):
            problems.append(f"decoder.cls_emb {tuple(need('decoder.cls_emb').shape)} vs n_cls={n_cls}, "
                            f"decoder width {width}")
    elif tuple(need("decoder.head.weight").shape) != (n_cls, d_model):
        problems.append(f"decoder.head.weight {tuple(need('decoder.head.weight').shape)} vs n_cls={n_cls}, "
                        f"d_model={d_model}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match its variant.yml:\n  " + "\n  ".join(problems))
    backbone = str(net.get("backbone", ""))
    normalization = net.get("normalization") or BACKBONES.get(backbone, {}).get("normalization", "vit")
    return dict(backbone=backbone, image_size=image_size, patch_size=patch_size, d_model=d_model, n_heads=n_heads,
                n_layers=n_layers, normalization=str(normalization), dropout=0.0, drop_path_rate=0.0,
                distilled=distilled, n_cls=int(n_cls), decoder=decoder)
