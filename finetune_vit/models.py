"""Build the timm ViTs of the adaptation track and load their pretrained weights from a local file.

The release built ``vit_{tiny,small,base,large}_patch16_{224,384}`` with ``pretrained=True``, i.e. timm's
ImageNet-21k "augreg" checkpoints (docs/authors-release.md §3). Here nothing is downloaded: the model is always
created with ``pretrained=False`` and the weights come from a file the user names, in any of timm's
formats:

* ``.npz``: the original JAX/Flax (big_vision / augreg) archives, read by timm's own npz loader;
* ``.safetensors``: the Hugging Face hub files of timm (``model.safetensors``);
* ``.pth`` / ``.pt`` / ``.bin`` / ``.tar``: a torch state dict, optionally wrapped in ``{'state_dict': ...}``
  or ``{'model': ...}`` (this project's checkpoints and the release's ``module.``-prefixed ones included),
  always read with ``weights_only=True``.

A file that does not fit the architecture is refused with the mismatching keys and shapes. Two differences
are tolerated, as in timm's pretrained loading: another input resolution (the position embedding is
resampled) and another number of classes (the classifier is left at its fresh initialisation).

The authors' fine-tuned ViTs (``{'state_dict': {'module.' + key: ...}, 'arch', 'best_acc1', ...}``) were trained
with the release's ``X_q[:, :-1]`` pooling (docs/authors-release.md item 28): :func:`create_vit` switches the legacy
token layout on for them unless told otherwise.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from cbsa_core.checkpoint import (CheckpointError, CheckpointMismatchError, check_state_dict, checkpoint_kind,
                                  decide_token_layout, extract_state_dict, read_checkpoint, recorded_token_layout,
                                  strip_prefix)

from .convert import convert_vit

__all__ = ["VIT_ARCHS", "WEIGHT_SUFFIXES", "create_vit", "load_pretrained_file", "image_size_of"]

_LOG = logging.getLogger(__name__)

VIT_ARCHS = tuple(f"vit_{size}_patch16_{res}" for size in ("tiny", "small", "base", "large") for res in (224, 384))
WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin", ".tar")


def image_size_of(model: VisionTransformer) -> Tuple[int, int]:
    """The training resolution (H, W) of a ViT, refusing one that the patch size does not divide."""
    size = tuple(int(s) for s in model.patch_embed.img_size)
    patch = tuple(int(p) for p in model.patch_embed.patch_size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"image size {size[0]}x{size[1]} is not divisible by the patch size {patch[0]}x{patch[1]}")
    return size


def create_vit(arch: str, *, attention: str = "cbsa_vee", num_classes: Optional[int] = None,
               pretrained_file: Optional[str | os.PathLike] = None, rep_grid: Sequence[int] = (8, 8),
               legacy_token_layout: Optional[bool] = None, layers: Optional[Sequence[int]] = None,
               broadcast: str = "transpose", model_kwargs: Optional[Mapping[str, Any]] = None) -> VisionTransformer:
    """A timm ViT of ``arch`` with weights from ``pretrained_file`` (random when None), then converted.

    ``model_kwargs`` are passed on to ``timm.create_model`` (e.g. ``img_size``, ``depth``, ``embed_dim``,
    ``num_heads``, ``drop_path_rate``, ``dynamic_img_size``) and override the arch's defaults.

    ``legacy_token_layout``: True/False forces the pooling layout; None (default) follows the weights file: on for
    the authors' fine-tuned release files (and this project's checkpoints trained with it), off otherwise.
    """
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(VIT_ARCHS)}")
    kwargs = dict(model_kwargs or {})
    for key in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kwargs:
            raise ValueError(f"model_kwargs may not set {key!r}: pass the weights file as pretrained_file")
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        # pretrained=False: timm never reaches for the network or the HF hub.
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build {arch} with model_kwargs {kwargs}: {e}") from e
    model.arch = arch
    image_size_of(model)
    file_layout = None
    if pretrained_file is None:
        _LOG.info("%s: no pretrained_file, the weights are random (nothing is downloaded)", arch)
    else:
        file_layout = load_pretrained_file(model, pretrained_file)
    legacy = _resolve_token_layout(legacy_token_layout, file_layout, pretrained_file, attention)
    return convert_vit(model, attention, rep_grid=rep_grid, layers=layers, legacy_token_layout=legacy,
                       broadcast=broadcast)


def _resolve_token_layout(requested: Optional[bool], file_layout: Optional[bool], path, attention: str) -> bool:
    """The core rule (:func:`cbsa_core.checkpoint.decide_token_layout`) on the file's record, with this track's
    log lines."""
    pooled = attention in ("cbsa_vee", "cbsa_star")  # the only variants that pool a token grid
    legacy, _ = decide_token_layout(file_layout, requested)
    if requested is None:
        if file_layout and pooled:
            _LOG.info("%s holds the authors' fine-tuned weights (trained with the release's X_q[:, :-1] pooling): "
                      "switching on the legacy token layout (pass --no-legacy-token-layout to keep the corrected "
                      "one)", path)
        return legacy
    if file_layout is not None and bool(requested) != bool(file_layout) and pooled:
        _LOG.warning("%s was trained with legacy_token_layout=%s, but legacy_token_layout=%s was asked for: the "
                     "pooled representatives will differ from the ones the weights were trained with", path,
                     bool(file_layout), bool(requested))
    return legacy


def load_pretrained_file(model: VisionTransformer, path: str | os.PathLike) -> Optional[bool]:
    """Load timm weights from a local ``.npz``, ``.safetensors`` or torch file into ``model`` (in place).

    Returns the token layout the file says its weights were trained with: True for the authors' release files
    (``checkpoint_kind`` ``authors_classification``), this project's recorded ``legacy_token_layout`` for its own
    checkpoints, None for plain timm weights (which carry no converted attention).

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable or of an unknown kind, and
    :class:`cbsa_core.checkpoint.CheckpointMismatchError` when it belongs to another architecture.
    """
    path = Path(path)
    arch = getattr(model, "arch", type(model).__name__)
    if not path.is_file():
        raise CheckpointError(
            f"pretrained weights file not found: {path} (expected timm weights of {arch}: "
            f"{', '.join(WEIGHT_SUFFIXES)}; nothing is downloaded)"
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"pretrained weights file {path}: unknown kind {suffix!r}; "
                              f"expected one of {', '.join(WEIGHT_SUFFIXES)}")
    layout = None
    if suffix == ".npz":
        _load_npz(model, path)
    else:
        layout = _load_state_dict_file(model, path)
    _LOG.info("%s: loaded pretrained weights from %s", arch, path)
    return layout


def _file_token_layout(ckpt: Mapping[str, Any]) -> Optional[bool]:
    """The layout the file records (:func:`cbsa_core.checkpoint.recorded_token_layout`), None for none."""
    try:
        kind = checkpoint_kind(ckpt)
    except CheckpointError:  # a layout the core does not classify: plain weights
        return None
    return recorded_token_layout(ckpt, kind)[0]


def _load_state_dict_file(model: VisionTransformer, path: Path) -> Optional[bool]:
    ckpt = read_checkpoint(path)   # .pth/.pt/.bin and .safetensors, through the core's one safe reader
    layout = _file_token_layout(ckpt)
    try:
        state_dict = extract_state_dict(ckpt)   # any wrapper the core knows, DDP/compile prefixes removed
    except CheckpointError:   # a mapping the core does not classify: its tensors are the weights
        state_dict = strip_prefix({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})
    state_dict = dict(state_dict)
    source = f"pretrained weights file {path}"
    expected = model.state_dict()
    _fit_pos_embed(model, state_dict, source)
    _fit_head(state_dict, expected, source)
    # Everything else must match key for key and shape for shape; the error lists all differences.
    check_state_dict(model, state_dict, strict=True, source=source)
    model.load_state_dict(state_dict, strict=True)
    return layout


def _fit_pos_embed(model: VisionTransformer, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Resample a position embedding of another resolution (same width, square grid) to the model's grid.

    Anything else is left for :func:`check_state_dict` to report along with the other mismatches.
    """
    pos, want = state_dict.get("pos_embed"), model.pos_embed
    if pos is None or want is None or pos.shape == want.shape:
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = int(round(max(pos.shape[1] - prefix, 0) ** 0.5)) if pos.dim() == 3 else 0
    if pos.dim() != 3 or pos.shape[-1] != want.shape[-1] or side == 0 or side * side != pos.shape[1] - prefix:
        return
    new_grid = tuple(model.patch_embed.grid_size)
    state_dict["pos_embed"] = resample_abs_pos_embed(pos, new_size=new_grid, old_size=(side, side),
                                                     num_prefix_tokens=prefix)
    _LOG.warning("%s: position embedding resampled from a %dx%d to a %dx%d grid", source, side, side, *new_grid)


def _fit_head(state_dict: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Keep the model's fresh classifier when the file's has another number of classes (same width)."""
    if "head.weight" not in expected:  # a model built with num_classes=0 has no classifier
        state_dict.pop("head.weight", None)
        state_dict.pop("head.bias", None)
        return
    weight, want = state_dict.get("head.weight"), expected["head.weight"]
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != want.shape[1] or weight.shape == want.shape):
        return
    found = "no classifier" if weight is None else f"a {weight.shape[0]}-class classifier"
    _LOG.warning("%s has %s; the model's %d-class head keeps its fresh initialisation", source, found, want.shape[0])
    state_dict["head.weight"] = want
    state_dict["head.bias"] = expected["head.bias"]


_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _npz_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """``{array name: shape}`` of an ``.npz`` archive, from each member's ``.npy`` header only.

    Only the first bytes of every member are decompressed, instead of the whole (multi-GB) arrays. A file that is
    not a zip archive, or is truncated (its central directory is at the end), raises :class:`CheckpointError`.
    """
    fmt = np.lib.format
    shapes: Dict[str, Tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = fmt.read_magic(member)
                    if version == (1, 0):
                        shape, _, _ = fmt.read_array_header_1_0(member)
                    else:  # 2.0, and 3.0 (the same header, utf-8 field names; plain float arrays read alike)
                        shape, _, _ = fmt.read_array_header_2_0(member)
                shapes[info.filename[:-len(".npy")]] = tuple(int(d) for d in shape)
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot read pretrained weights file {path}: not a readable numpy .npz archive "
                              f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
    return shapes


def _load_npz(model: VisionTransformer, path: Path) -> None:
    """timm's JAX/Flax loader, after checking the archive's shapes against the model.

    timm's loader would silently resample a different patch size and ignore surplus blocks, so width,
    patch size, depth, heads and MLP width are compared first (from the array headers, see :func:`_npz_shapes`).
    """
    source = f"pretrained weights file {path}"
    shapes = _npz_shapes(path)
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in shapes), None)
    if prefix is None:
        raise CheckpointError(f"{source} is not a JAX/Flax ViT checkpoint (no 'embedding/kernel' array)")
    embed_dim = model.embed_dim
    patch = tuple(model.patch_embed.patch_size)
    problems = []
    kernel = shapes[f"{prefix}embedding/kernel"]  # (ph, pw, C, D)
    if kernel[:2] != patch or kernel[-1] != embed_dim:
        problems.append(f"patch embedding {kernel} vs model patch {patch} x width {embed_dim}")
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"
    if stacked in shapes:
        depth = shapes[stacked][0]
    else:
        found = {int(m.group(1)) for k in shapes
                 if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))}
        depth = len(found)
    if depth != len(model.blocks):
        problems.append(f"{depth} encoder blocks vs model depth {len(model.blocks)}")
    query = next((shapes[k] for k in shapes if k.startswith(f"{prefix}Transformer/encoderblock")
                  and k.endswith("query/kernel")), None)
    attn = model.blocks[0].attn
    if query is not None and tuple(query[-2:]) != (attn.num_heads, attn.head_dim):
        problems.append(f"query kernel {query} vs model heads {attn.num_heads} x head dim {attn.head_dim}")
    dense = next((shapes[k] for k in shapes if k.startswith(f"{prefix}Transformer/encoderblock")
                  and k.endswith("Dense_0/kernel")), None)
    hidden = model.blocks[0].mlp.fc1.out_features
    if dense is not None and dense[-1] != hidden:
        problems.append(f"MLP kernel {dense} vs model MLP width {hidden}")
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise CheckpointMismatchError(f"{source} does not match model '{arch}': " + "; ".join(problems)
                                      + " (is it a checkpoint of another architecture?)")
    head = shapes.get(f"{prefix}head/bias")
    if head is not None and head[-1] != model.num_classes:
        _LOG.warning("%s has a %d-class classifier; the model's %d-class head keeps its fresh initialisation",
                     source, head[-1], model.num_classes)
    try:
        model.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise CheckpointError(f"{source}: timm's npz loader failed: {type(e).__name__}: {e}") from e
