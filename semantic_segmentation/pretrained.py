"""The segmentation pretrained folder: ``config.json`` + ``model.safetensors``, read by ``load_model(DIR)``.

    DIR/config.json        {"arch": "segmenter", "format_version": 1, <model config>, "inference": {...}}
    DIR/model.safetensors  the model's state dict (the keys of ``Segmenter.state_dict()``, float tensors)

The model config is everything :func:`~semantic_segmentation.model.create_segmenter` needs: ``backbone``,
``image_size`` (the training crop), ``patch_size``, ``d_model``, ``n_heads``, ``n_layers``, ``distilled`` (the
encoder), ``normalization`` (input statistics, ``vit`` or ``deit``), ``dropout``, ``drop_path_rate``, ``n_cls``
and ``decoder`` (``{"name": <decoder kind>, **its settings}``, see :mod:`.decoders`). ``inference`` holds the
evaluation settings ``eval.py`` uses for the model: ``im_size`` (short side of the test scale), ``window_size``
and ``window_stride`` (sliding window).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Tuple

import torch

from cbsa_core.atomic import atomic_write_bytes, atomic_write_json
from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from .model import Segmenter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "REQUIRED_KEYS", "save_pretrained",
           "read_pretrained_folder", "inference_settings"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
ARCH = "segmenter"
REQUIRED_KEYS = ("backbone", "image_size", "patch_size", "d_model", "n_heads", "n_layers", "normalization",
                 "n_cls", "decoder")
_META_KEYS = ("arch", "format_version", "inference")


def inference_settings(model: "Segmenter") -> Dict[str, int]:
    """The evaluation settings ``eval.py`` uses for ``model`` by default: the test scale of the run that came with
    it (``variant.inference_kwargs.im_size``, else its ``dataset_kwargs.image_size``, else the crop), the crop as
    the window, and a stride of window - 32 (the release's ``segm.eval.miou`` default)."""
    variant = getattr(model, "variant", None) or {}
    crop = int(model.model_config["image_size"][0])
    im_size = ((variant.get("inference_kwargs") or {}).get("im_size")
               or (variant.get("dataset_kwargs") or {}).get("image_size") or crop)
    return dict(im_size=int(im_size), window_size=crop, window_stride=max(crop - 32, 1))


def save_pretrained(model: "Segmenter", out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (a loaded :class:`~semantic_segmentation.model.Segmenter`, any decoder) as a pretrained
    folder and return the folder.

    Writes two files into ``out_dir`` (created if needed; other files in it are left alone), each atomically
    (temporary file + rename):

    * ``model.safetensors``: ``model.state_dict()`` (contiguous CPU tensors, metadata ``format: pt``);
    * ``config.json``: ``{"arch": "segmenter", "format_version": 1, **model.model_config, "inference":
      {"im_size", "window_size", "window_stride"}}``, the inference settings from :func:`inference_settings`.

    ``load_model(out_dir)`` rebuilds the model from these two files with identical logits.
    """
    from safetensors.torch import save as safetensors_bytes

    config = getattr(model, "model_config", None)
    if getattr(model, "arch", None) != ARCH or not isinstance(config, dict):
        raise TypeError(f"save_pretrained takes a semantic_segmentation Segmenter, got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS_NAME, safetensors_bytes(state, metadata={"format": "pt", "arch": ARCH}))
    doc = dict(arch=ARCH, format_version=FORMAT_VERSION, **config, inference=inference_settings(model))
    atomic_write_json(out_dir / CONFIG_NAME, doc)
    return out_dir


def read_pretrained_folder(folder: str | os.PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor],
                                                                Dict[str, Any]]:
    """(model config, state dict, inference settings) of a folder :func:`save_pretrained` wrote; every problem
    raises :class:`CheckpointError` naming the file at fault."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is a folder without {CONFIG_NAME}; a pretrained segmentation folder holds "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_pretrained)")
    try:
        doc = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {config_path}: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{config_path} holds a {type(doc).__name__}, expected a JSON object")
    if doc.get("arch") != ARCH:
        raise CheckpointMismatchError(f"{config_path} describes arch {doc.get('arch')!r}, not a {ARCH!r} model")
    if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {doc.get('format_version')!r}; this library reads "
                              f"versions up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    if not weights_path.is_file():
        raise CheckpointError(f"weights file not found: {weights_path}")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {weights_path}: {e}") from e
    config = {k: v for k, v in doc.items() if k not in _META_KEYS}
    return config, state_dict, dict(doc.get("inference") or {})
