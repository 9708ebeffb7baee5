"""Checkpoint I/O: atomic writes, safe reads, the authors' release formats, strict loading.

These on-disk layouts are recognised:

* ``cbsa``: this project's own files. A dict with ``format == "cbsa"``, ``format_version``,
  ``arch``, ``model_config`` and ``state_dict`` (plus optional training state).
* ``authors_classification``: the official release (docs/authors-release.md §1.1.7),
  ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler'}`` with ``module.``-prefixed keys.
  The original CRATE's ``main.py`` (Ma-Lab-Berkeley/CRATE) writes the same wrapper; its files record CRATE's
  own arch names (``CRATE_tiny`` ... ``CRATE_large``, which clash with the release's), so for them the arch is
  decided by the key layout (:func:`check_patch_embedding`), and its attention keys are mapped to this
  project's (:func:`map_original_crate_keys`).
* ``authors_segmentation``: the official Segmenter-style files (§1.3.5),
  ``{'model', 'optimizer', 'n_cls', 'lr_scheduler', 'epoch'}`` with a ``variant.yml`` beside them.
* ``wrapped_state_dict``: another trainer's wrapper around the weights (``state_dict``, ``model`` or
  ``state_dict_ema``, e.g. timm's ``train.py``), without the release's ``best_acc1``.
* ``state_dict``: a bare mapping of names to tensors (``torch.save(model.state_dict())``, or a
  ``.safetensors`` file).

Which token layout a file's weights were trained with is decided in one place, :func:`resolve_token_layout`:
only the release's own formats imply the legacy layout; every other file without a layout record is loaded
in the corrected layout, and every loader takes an explicit override.

Every read uses ``torch.load(weights_only=True)`` (or safetensors): checkpoints are untrusted input.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMismatchError",
    "atomic_save",
    "read_checkpoint",
    "checkpoint_kind",
    "recorded_token_layout",
    "decide_token_layout",
    "resolve_token_layout",
    "apply_token_layout",
    "check_arch",
    "check_patch_embedding",
    "patch_embedding_layout",
    "original_crate_variant",
    "map_original_crate_keys",
    "extract_state_dict",
    "strip_prefix",
    "make_checkpoint",
    "save_model_checkpoint",
    "check_state_dict",
    "load_checkpoint",
]

_LOG = logging.getLogger(__name__)

FORMAT_NAME = "cbsa"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is loaded into."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the destination folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX file systems. The writer is
    :func:`cbsa_core.atomic.atomic_torch_save`, the one every file of a run goes through (it removes its temporary
    file on failure, and runs clean up the ones a killed process left).
    """
    from .atomic import atomic_torch_save

    return atomic_torch_save(obj, path)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file safely (``weights_only=True``) and return it as a dict.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, or holds
    something other than a dict of tensors and plain values.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path, map_location)
    try:
        # timm's train.py stores its argparse.Namespace beside the weights: a plain container, safe to rebuild.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files (KeyError for text, BadZipFile, ...)
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): the file is truncated, corrupt, or not a "
            f"PyTorch checkpoint that loads with weights_only=True. Original error: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return dict(obj)


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict:
    """A ``.safetensors`` file as a bare state dict (its string metadata is not weights and is dropped)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        return dict(load_file(str(path), device=device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read safetensors file {path} ({path.stat().st_size} bytes): truncated, "
                              f"corrupt, or not a safetensors file. Original error: {type(e).__name__}: {e}") from e


# Keys under which other trainers store the weights, in the order they are looked up.
_WRAPPED_WEIGHT_KEYS = ("state_dict", "model", "state_dict_ema")


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """Classify a loaded checkpoint: ``cbsa``, ``authors_classification``, ``authors_segmentation``,
    ``wrapped_state_dict`` or ``state_dict`` (see the module docstring)."""
    if ckpt.get("format") == FORMAT_NAME:
        return "cbsa"
    # The release's main.py (PyTorch's ImageNet example, like CRATE's) always saves best_acc1 beside the weights.
    if isinstance(ckpt.get("state_dict"), Mapping) and "best_acc1" in ckpt:
        return "authors_classification"
    if "model" in ckpt and isinstance(ckpt["model"], Mapping) and "n_cls" in ckpt:
        return "authors_segmentation"
    if any(isinstance(ckpt.get(k), Mapping) for k in _WRAPPED_WEIGHT_KEYS):
        return "wrapped_state_dict"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "state_dict"
    raise CheckpointError(
        "unrecognised checkpoint layout; top-level keys are " + ", ".join(sorted(map(str, ckpt))[:12])
    )


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> "OrderedDict[str, torch.Tensor]":
    """Remove a DataParallel/DDP (or other) prefix from every key that carries it."""
    n = len(prefix)
    return OrderedDict((k[n:] if k.startswith(prefix) else k, v) for k, v in state_dict.items())


def extract_state_dict(ckpt: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """The model weights of any recognised layout, with the ``module.`` (DDP) and ``_orig_mod.``
    (``torch.compile``) prefixes removed, in either order."""
    kind = checkpoint_kind(ckpt)
    if kind in ("cbsa", "authors_classification"):
        sd = ckpt["state_dict"]
    elif kind == "authors_segmentation":
        sd = ckpt["model"]
    elif kind == "wrapped_state_dict":
        sd = next(ckpt[k] for k in _WRAPPED_WEIGHT_KEYS if isinstance(ckpt.get(k), Mapping))
    else:
        sd = ckpt
    return strip_prefix(strip_prefix(strip_prefix(sd, "_orig_mod."), "module."), "_orig_mod.")


def make_checkpoint(model_state: Mapping[str, torch.Tensor], *, arch: str, model_config: Mapping[str, Any],
                    **extra: Any) -> dict:
    """Assemble a checkpoint dict in this project's format (format name, version, arch, config)."""
    ckpt = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model_config": dict(model_config),
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in model_state.items()),
    }
    ckpt.update(extra)
    return ckpt


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel (what is saved and evaluated)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def save_model_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model``'s weights and its constructor config atomically in this project's format.

    The model must expose ``arch`` and ``model_config`` (all registry models do).
    """
    model = unwrap_model(model)
    arch = getattr(model, "arch", None) or type(model).__name__
    config = getattr(model, "model_config", {})
    return atomic_save(make_checkpoint(model.state_dict(), arch=arch, model_config=config, **extra), path)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                     source: str = "checkpoint", ignore: Collection[str] = ()) -> None:
    """Raise :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.

    With ``strict=False`` only shape mismatches are fatal (a partial load is then explicit, never silent).
    Keys in ``ignore`` are not compared (a loader adapts them, e.g. a re-initialised classifier).
    """
    expected = {k: v for k, v in unwrap_model(model).state_dict().items() if k not in ignore}
    state_dict = {k: v for k, v in state_dict.items() if k not in ignore}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es):\n    " + "\n    ".join(shapes[:40]))
    if strict and missing:
        problems.append(f"{len(missing)} key(s) missing from the {source}:\n    " + "\n    ".join(missing[:40]))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the {source}:\n    " + "\n    ".join(unexpected[:40]))
    if problems:
        arch = getattr(unwrap_model(model), "arch", type(unwrap_model(model)).__name__)
        raise CheckpointMismatchError(
            f"{source} does not match model '{arch}':\n  " + "\n  ".join(problems)
            + "\n  (is it a checkpoint of another arch, or built with other overrides?)"
        )


# model_config entries that change what a model computes without changing its parameter shapes.
_BEHAVIOUR_KEYS = ("attn", "rep_grid", "dim_head", "patch_size", "in_chans", "global_pool", "patch_embed")


def check_arch(path, ckpt: Mapping[str, Any], kind: str, target: nn.Module, *,
               adaptable: Tuple[str, ...] = (), state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Refuse a checkpoint saved from another registered arch (aliases are the same arch), or, for this
    project's files, built with another behaviour-changing config or a newer format.

    ``adaptable``: config keys a loader adapts itself (``in_chans`` for pretrained weights), not compared.
    ``state_dict``: the weights already extracted from ``ckpt`` (extracted here when not given).
    """
    from .models.cbt import recorded_model_config  # lazy: the models import this module
    from .registry import ALIASES, MODEL_CONFIGS

    def canonical(name):
        return ALIASES.get(name, name)

    if kind == "cbsa" and int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}, newer than this "
                              f"library's {FORMAT_VERSION}; upgrade cbsa_core to read it")
    model_arch, saved_arch = getattr(target, "arch", None), ckpt.get("arch")
    state_dict = extract_state_dict(ckpt) if state_dict is None else state_dict
    check_patch_embedding(f"checkpoint {path}", state_dict, target, saved_arch)
    # CRATE's main.py records CRATE's own names, two of which mean other models here: its files were checked by
    # their key layout just above, not by that string.
    crate_file = kind == "authors_classification" and patch_embedding_layout(state_dict) == "linear"
    # Only registered names are compared: a CBT built by hand (arch "CBT") is checked by shapes and config.
    if kind in ("cbsa", "authors_classification") and isinstance(saved_arch, str) and not crate_file \
            and canonical(model_arch) in MODEL_CONFIGS and canonical(saved_arch) != canonical(model_arch):
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved from arch '{saved_arch}', but the model is '{model_arch}'")
    if kind == "cbsa":
        # The record in today's terms (recorded_model_config: e.g. the unused rep_grid older MSSA/TSSA files carry).
        saved_cfg = recorded_model_config(ckpt.get("model_config") or {})
        model_cfg = getattr(target, "model_config", {})
        diffs = [f"{k}: checkpoint {saved_cfg[k]!r} vs model {model_cfg[k]!r}" for k in _BEHAVIOUR_KEYS
                 if k not in adaptable and k in saved_cfg and k in model_cfg
                 and _normalise(saved_cfg[k]) != _normalise(model_cfg[k])]
        if diffs:
            raise CheckpointMismatchError(f"checkpoint {path} was built with another model config:\n    "
                                          + "\n    ".join(diffs))


def _normalise(value: Any) -> Any:
    return tuple(_normalise(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------------
# Patch-embedding layouts and the original CRATE's key names
# ------------------------------------------------------------------------------------------------
_LINEAR_EMBED_WEIGHT = "to_patch_embedding.2.weight"   # CRATE: Sequential(Rearrange, LN, Linear, LN)
_CONV_EMBED_PREFIX = "to_patch_embedding.proj."       # the CBSA release's convolutional stem
_LAYER_INDEX = re.compile(r"^transformer\.layers\.(\d+)\.")
_CRATE_TO_OUT = re.compile(r"^(transformer\.layers\.\d+\.0\.fn\.to_out)\.0\.(weight|bias)$")


def patch_embedding_layout(keys: Collection[str]) -> Optional[str]:
    """The patch embedding a state dict (or its keys) was saved from: ``'linear'`` (the original CRATE's
    LayerNorm -> Linear -> LayerNorm, keys ``to_patch_embedding.{1,2,3}.*``), ``'conv'`` (the CBSA release's
    stem, ``to_patch_embedding.proj.*``) or None (neither, e.g. a segmentation model)."""
    if _LINEAR_EMBED_WEIGHT in keys:
        return "linear"
    if any(k.startswith(_CONV_EMBED_PREFIX) for k in keys):
        return "conv"
    return None


def _num_layers(keys: Collection[str]) -> int:
    indices = {int(m.group(1)) for m in map(_LAYER_INDEX.match, keys) if m}
    return max(indices) + 1 if indices else 0


def original_crate_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The ``crate_original_*`` model whose width linear-embedding weights have (CRATE's four sizes have four
    widths, 384 / 576 / 768 / 1024), or None for another layout or width."""
    from .registry import MODEL_CONFIGS  # lazy: the registry imports this module

    weight = state_dict.get(_LINEAR_EMBED_WEIGHT)
    if weight is None or weight.dim() != 2:
        return None
    return next((name for name, cfg in MODEL_CONFIGS.items()
                 if cfg.get("patch_embed") == "linear" and cfg["dim"] == int(weight.shape[0])), None)


def check_patch_embedding(source: str, state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                          saved_arch: Any = None) -> None:
    """Refuse weights saved with the other patch embedding, or of another ``crate_original_*`` size, with one
    :class:`CheckpointMismatchError` that names the model the weights fit.

    * original CRATE weights (linear embedding) into a conv-stem model: e.g. CRATE's own ``CRATE_tiny`` file
      (dim 384) given as ``--arch CRATE_tiny``, which here (as in the CBSA release) is the conv-stem MSSA model
      ``mssa_tiny`` (dim 192); the error names ``crate_original_tiny``;
    * original CRATE weights into a registered ``crate_original_*`` model of another width;
    * conv-stem weights into a linear-embedding model: the error names the file's recorded arch if registered.

    ``source`` names the file in the message; ``saved_arch`` is the arch the file records, if any.
    """
    from .registry import ALIASES, MODEL_CONFIGS  # lazy: the registry imports this module

    model = unwrap_model(model)
    file_layout = patch_embedding_layout(state_dict)
    model_layout = patch_embedding_layout(model.state_dict())
    if file_layout is None or model_layout is None:
        return
    arch = getattr(model, "arch", type(model).__name__)
    canonical = ALIASES.get(arch, arch)
    saved = ALIASES.get(saved_arch, saved_arch) if isinstance(saved_arch, str) else None
    if file_layout == "linear":
        width, depth = int(state_dict[_LINEAR_EMBED_WEIGHT].shape[0]), _num_layers(state_dict)
        fit = original_crate_variant(state_dict)
        what = (f"{source} holds original CRATE weights (CRATE's linear patch embedding, width {width}, {depth} "
                f"layer(s))")
        fix = (f"they fit {fit}: load them with --arch {fit} (create_model('{fit}', pretrained=...))" if fit else
               f"no crate_original_* model has width {width}: build one with dim={width}, depth={depth} and the heads "
               f"it was trained with")
        if model_layout == "conv":
            clash = ""
            if saved in MODEL_CONFIGS and saved != saved_arch and MODEL_CONFIGS[saved].get("patch_embed") != "linear":
                clash = (f"; the file records CRATE's own name '{saved_arch}', which here (as in the CBSA release) "
                         f"names the conv-stem model {saved}")
            aliases = [a for a, c in ALIASES.items() if c == canonical and a != arch]
            named = f"'{arch}'" + (f" ({', '.join(aliases)})" if aliases else "")
            raise CheckpointMismatchError(f"{what}, but the model {named} has the CBSA release's convolutional "
                                          f"stem{clash}. {fix[0].upper()}{fix[1:]}")
        if fit is not None and canonical in MODEL_CONFIGS and canonical != fit:
            raise CheckpointMismatchError(f"{what}, but the model is '{arch}' (width "
                                          f"{MODEL_CONFIGS[canonical]['dim']}); {fix}")
    elif file_layout == "conv" and model_layout == "linear":
        if saved in MODEL_CONFIGS:
            named = f"'{saved_arch}'" + (f" ({saved})" if saved != saved_arch else "")
            fix = f"it was saved from arch {named}: load it with --arch {saved_arch}"
        else:
            fix = "load it into a conv-stem model (cbt_*, mssa_*, tssa_*, agent_*)"
        raise CheckpointMismatchError(
            f"{source} has the CBSA release's convolutional stem (to_patch_embedding.proj.*), but the model '{arch}' "
            f"is an original CRATE model with CRATE's linear patch embedding; {fix}")


def map_original_crate_keys(state_dict: Mapping[str, torch.Tensor],
                            model: Optional[nn.Module] = None) -> "OrderedDict[str, torch.Tensor]":
    """The one key-name mapping between the original CRATE's files and this project's models.

    CRATE's attention stores its output projection in ``to_out = Sequential(Linear, Dropout)``, so its keys are
    ``transformer.layers.{i}.0.fn.to_out.0.{weight,bias}``; this project's MSSA computes the same with a bare
    Linear, ``...to_out.{weight,bias}``: those keys are renamed, every other key passes unchanged. CRATE drops the
    projection altogether (``to_out = Identity``) when heads == 1 and dim_head == dim; given the ``model``, such a
    layer's ``to_out`` gets the identity matrix and a zero bias, which computes the same.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        match = _CRATE_TO_OUT.match(key)
        out[f"{match.group(1)}.{match.group(2)}" if match else key] = value
    if model is not None and patch_embedding_layout(out) == "linear":
        _fill_identity_projections(out, unwrap_model(model))
    return out


def _fill_identity_projections(state_dict: "OrderedDict[str, torch.Tensor]", model: nn.Module) -> None:
    from .layers import MSSA  # lazy: keeps the file formats importable without the layers

    for i in range(_num_layers(state_dict)):
        prefix = f"transformer.layers.{i}.0.fn."
        qkv = state_dict.get(prefix + "qkv.weight")
        if qkv is None or prefix + "to_out.weight" in state_dict or prefix + "to_out.bias" in state_dict:
            continue
        try:
            layer = model.get_submodule(prefix[:-1])
        except AttributeError:
            continue
        if isinstance(layer, MSSA) and layer.heads == 1 and layer.dim_head == layer.dim:
            state_dict[prefix + "to_out.weight"] = torch.eye(layer.dim, dtype=qkv.dtype, device=qkv.device)
            state_dict[prefix + "to_out.bias"] = torch.zeros(layer.dim, dtype=qkv.dtype, device=qkv.device)


# A state-dict key that only the release's CBSA mask-transformer decoder has (its per-head step sizes).
_RELEASE_DECODER_KEY = "decoder.net.layers.0.fn.step_x"


def recorded_token_layout(ckpt: Mapping[str, Any], kind: Optional[str] = None) -> Tuple[Optional[bool], str]:
    """What a checkpoint itself says about its token layout: True/False with the reason, or None when it
    records nothing (then the corrected layout applies unless a loader is told otherwise).

    * this project's files record the layout they were trained with (``model_config.legacy_token_layout``);
    * the release's classification wrapper (``{'epoch', 'arch', 'state_dict', 'best_acc1', ...}``) was trained
      with the legacy layout (its models pool ``tokens[:, :-1]``);
    * the release's Segmenter-format files with its CBSA decoder were too (their decoder has no prefix
      tokens, so both layouts pool the same grid there);
    * a bare state dict, ``.safetensors`` weights or another trainer's wrapper record nothing.
    """
    kind = kind or checkpoint_kind(ckpt)
    if kind == "cbsa":
        saved = (ckpt.get("model_config") or {}).get("legacy_token_layout")
        if saved is None:
            return None, "this project's checkpoint records no layout"
        return bool(saved), "recorded in this project's checkpoint"
    if kind == "authors_classification":
        return True, "the file is in the authors' release format, whose models pool tokens[:, :-1]"
    if kind == "authors_segmentation" and any(k.endswith(_RELEASE_DECODER_KEY) for k in ckpt["model"]):
        return True, "the file is the authors' Segmenter-format release with its CBSA decoder"
    return None, f"a {kind.replace('_', ' ')} file records no layout"


def decide_token_layout(recorded: Optional[bool], requested: Optional[bool] = None,
                        record_reason: str = "recorded in the file") -> Tuple[bool, str]:
    """The one rule every loader follows, on what a file records (:func:`recorded_token_layout`):
    ``requested`` (True/False) wins, the explicit override for the rare ambiguous file; otherwise the file's
    record; a file without one is taken to be in the corrected layout. Returns (legacy, reason for the log)."""
    if requested is not None:
        return bool(requested), "requested explicitly"
    if recorded is None:
        return False, (f"{record_reason}; pass legacy_token_layout=True (--legacy-token-layout) if its weights were "
                       "trained by the authors' code")
    return bool(recorded), record_reason


def resolve_token_layout(ckpt: Mapping[str, Any], kind: Optional[str] = None,
                         requested: Optional[bool] = None) -> Tuple[bool, str]:
    """Whether a checkpoint's weights need the release's legacy token layout, and why (for the log):
    :func:`decide_token_layout` on the checkpoint's :func:`recorded_token_layout`."""
    recorded, reason = recorded_token_layout(ckpt, kind)
    return decide_token_layout(recorded, requested, reason)


def apply_token_layout(model: nn.Module, ckpt: Mapping[str, Any], requested: Optional[bool], source: str,
                       kind: Optional[str] = None) -> Optional[Tuple[bool, str]]:
    """Switch ``model`` to the token layout ``ckpt``'s weights need (:func:`resolve_token_layout`; ``requested``
    overrides it) and log the choice with its reason, naming ``source``. Returns ``(legacy, reason)``, or None for
    a model with no layout to set (no switch, or no layer that pools representatives)."""
    if not hasattr(model, "set_legacy_token_layout"):
        return None
    if not getattr(model, "uses_token_layout", True):
        _LOG.info("%s: no layer pools representatives, so no token layout applies", source)
        return None
    legacy, reason = resolve_token_layout(ckpt, kind, requested)
    _LOG.info("%s: %s token layout (%s)", source, "legacy" if legacy else "corrected", reason)
    model.set_legacy_token_layout(legacy)
    return legacy, reason


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    legacy_token_layout: Optional[bool] = None,
                    checkpoint: Optional[Mapping[str, Any]] = None) -> dict:
    """Load the weights of ``path`` into ``model`` and return the whole checkpoint dict.

    * This project's files: the recorded ``arch`` and behaviour-changing config (attention type,
      representative grid, head width, patch size, input channels) must match the model's.
    * Authors' files: the recorded ``arch`` (if any) must match and ``module.`` is stripped. The original CRATE's
      files (same wrapper, CRATE's own arch names) are matched by their key layout instead
      (:func:`check_patch_embedding`) and their key names mapped (:func:`map_original_crate_keys`).
    * The token layout follows :func:`resolve_token_layout` (``legacy_token_layout`` overrides it) and is
      logged with its reason, on models that have the switch and a layer it applies to.
    * Any missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` listing them. With
      ``strict=False`` missing and unexpected keys are allowed (and logged), but a file that shares no key
      with the model is refused: nothing of it would load.

    ``checkpoint``: the file's contents when the caller has already read them (:func:`read_checkpoint`), so that a
    large file is read once; ``path`` then only names it in messages.
    """
    ckpt = read_checkpoint(path) if checkpoint is None else dict(checkpoint)
    kind = checkpoint_kind(ckpt)
    target = unwrap_model(model)
    state_dict = extract_state_dict(ckpt)
    check_arch(path, ckpt, kind, target, state_dict=state_dict)
    state_dict = map_original_crate_keys(state_dict, target)
    check_state_dict(target, state_dict, strict=strict, source=f"checkpoint {path}")
    if not strict:
        expected = target.state_dict()
        if not any(k in expected for k in state_dict):
            arch = getattr(target, "arch", type(target).__name__)
            raise CheckpointMismatchError(
                f"checkpoint {path} shares no key with model '{arch}': even with strict=False nothing of it would "
                f"load. Its keys begin {', '.join(list(state_dict)[:4]) or '(none)'}; the model's begin "
                f"{', '.join(list(expected)[:4])} (a checkpoint of another model, or one saved under a prefix?)")
        skipped = [k for k in expected if k not in state_dict] + [k for k in state_dict if k not in expected]
        if skipped:
            _LOG.warning("partial load of %s: %d key(s) missing or unexpected: %s", path, len(skipped),
                         ", ".join(skipped[:10]))
    apply_token_layout(target, ckpt, legacy_token_layout, str(path), kind)
    target.load_state_dict(state_dict, strict=strict)
    return ckpt
