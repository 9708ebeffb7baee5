#!/usr/bin/env python
"""Export a checkpoint as a hub-format folder (config.json, model.safetensors, README.md) that loads exactly.

    python scripts/export_pretrained.py --checkpoint cbt_small_best.pth.tar --out hub/cbt_small.authors_in1k
    python scripts/export_pretrained.py --checkpoint runs/demo/model_best.pth.tar --out hub/cbt_tiny_digits
    python scripts/export_pretrained.py --checkpoint weights.safetensors --arch cbt_tiny --set depth=6 --out DIR
    python scripts/export_pretrained.py --checkpoint log/cbt_small/checkpoint.pth --out hub/cbt_small_ade20k

Classification (the CBT family and every other model this project registers with timm) becomes timm's own
hub folder: ``config.json`` in timm's format (``architecture``, ``num_classes``, ``num_features``,
``pretrained_cfg``, ``model_args`` = every constructor setting that differs from the registered default, e.g.
``legacy_token_layout: true`` for the authors' release) and ``model.safetensors``, written by
``timm.models.save_for_hf``. ``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds it, and
``timm.create_model('hf-hub:USER/REPO', pretrained=True)`` once the folder is pushed (``import cbsa_core`` first: it
registers the architectures with timm).

Segmentation checkpoints (this project's, and the Segmenter-format ``checkpoint.pth`` + ``variant.yml`` of CBSA,
Segmenter and DEPICT) become the folder ``semantic_segmentation.save_pretrained`` writes, read back by
``semantic_segmentation.load_model(DIR)``.

What the checkpoint is, is read from the file: this project's files record their ``arch`` and model config;
the authors' classification wrapper records ``arch`` (``Ours_small``, ...) and implies the legacy token layout;
timm ``train.py`` files record the model name in their ``args``; segmentation files are whatever
``semantic_segmentation.load_model`` reads. A bare state dict or ``.safetensors`` file needs ``--arch`` (and, for
a model other than the registered configuration, its constructor settings through ``--set``); the class count
and input channels are read from the weights. A hub folder written by this script is accepted as input too.

Before anything is written to DIR, the folder is written to a staging folder beside it and reloaded the way a
user would (``local-dir:`` / ``load_model``); its logits on a fixed random batch must match those of the source
loaded through this project's loader within 1e-5 (the maximum difference is printed and put in the model card).
Then each file is renamed into DIR (one atomic rename per file). The model card (README.md, with Hugging Face
front matter) gives the architecture, the source file and its SHA-256, parameters, paper-convention GFLOPs,
the token layout and why, the evaluation preprocessing, the numbers the papers report for release files (named
with their source, and marked as reported, not measured here), the license and how to load it.

Exit status: 0 exported; 1 bad input or refused (a missing or unreadable file, an unknown arch, weights that fit
no arch as built, DIR not empty without --overwrite, the reloaded folder's logits differ); 2 usage error (bad or
conflicting flags, e.g. a bare state dict without --arch, --set for a file that records its config).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import model_entrypoint, save_for_hf
from timm.models._input import get_model_input_config

import cbsa_core  # noqa: F401  (registers this project's architectures with timm)
from cbsa_core.atomic import atomic_write_text
from cbsa_core.engine.cli import run_cli
from cbsa_core.checkpoint import (CheckpointError, CheckpointMismatchError, checkpoint_kind, extract_state_dict,
                                  read_checkpoint, resolve_token_layout)
from cbsa_core.flops import PAPER_CLASSIFICATION, analytic_flops, count_parameters, measured_flops
from cbsa_core.models import recorded_model_config
from cbsa_core.registry import ALIASES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_overrides  # noqa: E402

__all__ = ["main", "cli", "export", "ExportResult", "UsageError", "BadInput", "Refusal", "TOLERANCE", "VERIFY_SEED",
           "CLASSIFICATION_REPORTED", "SEGMENTATION_REPORTED", "classification_reported", "segmentation_reported",
           "exportable_archs"]


TOLERANCE = 1e-5        # max |logit difference| between the source and the reloaded folder
VERIFY_SEED = 0         # the fixed random batch: torch.Generator().manual_seed(VERIFY_SEED), standard normal
CARD_NAME, HUB_CONFIG, HUB_WEIGHTS = "README.md", "config.json", "model.safetensors"
PAPER = "Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few"
CITATION = """@inproceedings{wen2025cbsa,
  title     = {Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few},
  author    = {Wen, Qishuai and Huang, Zhiyuan and Li, Chun-Guang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  note      = {arXiv:2509.16875}
}"""
CITATION_SECTION = ["## Citation", "```bibtex", CITATION, "```", ""]   # the last lines of every model card
TOKEN_LAYOUT_WHY = ("the release's CBSA pools `tokens[:, :-1]` (it assumes [CLS] is last: [CLS] is pooled and the "
                    "last patch is dropped; docs/authors-release.md item 2), the corrected layout pools the patch "
                    "tokens")


class UsageError(Exception):
    """Flags that do not go together, or a flag this file needs: exit status 2."""


class BadInput(Exception):
    """A checkpoint that is not there, or an arch name nothing registers: exit status 1."""


class Refusal(Exception):
    """Input that cannot be exported faithfully, or an output that would lose data: exit status 1."""


# ---------------------------------------------------------------------------------------------------------------
# The numbers the papers and the releases report. They are printed in the model card as reported (with their
# source), never as measured here. Keyed by the canonical timm name (classification) and by
# (decoder family, backbone) for ADE20K segmentation (150 classes).
# ---------------------------------------------------------------------------------------------------------------
_IN1K = "ImageNet-1K val top-1 (%), 224², one centre crop"
_TABLE3 = "the CBSA paper (arXiv:2509.16875), Table 3, and the authors' README model zoo (github.com/QishuaiWen/CBSA)"
_TABLE4 = ("the CBSA paper, Table 4 (the same framework: conv stem + ISTA, only the attention differs; the "
           "authors released no weights for it)")
_CRATE = "the CBSA paper, Table 3, citing the CRATE paper (github.com/Ma-Lab-Berkeley/CRATE)"
CLASSIFICATION_REPORTED: Dict[str, Tuple[str, str, str]] = {
    "cbt_tiny": ("63.2", _IN1K, _TABLE3), "cbt_small": ("71.4", _IN1K, _TABLE3),
    "cbt_base": ("73.4", _IN1K, _TABLE3), "cbt_large": ("74.4", _IN1K, _TABLE3),
    "mssa_tiny": ("64.7", _IN1K, _TABLE4), "mssa_small": ("72.1", _IN1K, _TABLE4),
    "tssa_tiny": ("61.2", _IN1K, _TABLE4), "tssa_small": ("68.5", _IN1K, _TABLE4),
    "agent_tiny": ("63.8", _IN1K, _TABLE4), "agent_small": ("71.8", _IN1K, _TABLE4),
    "crate_original_base": ("70.8", _IN1K, _CRATE), "crate_original_large": ("71.3", _IN1K, _CRATE),
}

_ADE = "ADE20K val mIoU (%)"
_CBT_README = "single-scale; the authors' README model zoo (github.com/QishuaiWen/CBSA) and the paper's Fig. 8 (left)"
_FIG8 = "digitised from the CBSA paper's Fig. 8 (left), good to about ±0.3"
_SEGMENTER = "single-scale / multi-scale; Segmenter's README model zoo (github.com/rstrudel/segmenter)"
_DEPICT = (_FIG8 + "; DEPICT's README (github.com/QishuaiWen/DEPICT) shows them only as that plot, and the paper "
           "does not say whether it plots DEPICT-SA or DEPICT-CA (SA is DEPICT's default)")
_VIT = {size: f"vit_{size}_patch16_384" for size in ("tiny", "small", "base", "large")}
SEGMENTATION_REPORTED: Dict[Tuple[str, str], Tuple[str, str]] = {
    **{("cbt", _VIT[s]): (v, _CBT_README) for s, v in zip(_VIT, ("39.1", "45.8", "49.3", "53.3"))},
    **{("cbt_dagger", _VIT[s]): (v, _FIG8) for s, v in zip(_VIT, ("≈39.0", "≈46.0", "≈48.7", "≈52.0"))},
    **{("depict", _VIT[s]): (v, _DEPICT) for s, v in zip(_VIT, ("≈39.4", "≈46.8", "≈49.4", "≈52.9"))},
    **{("segmenter_mask_transformer", _VIT[s]): (v, _SEGMENTER)
       for s, v in zip(_VIT, ("38.1 / 38.8", "45.3 / 46.9", "48.5 / 50.0", "51.8 / 53.6 (640² crops)"))},
    ("segmenter_mask_transformer", "deit_base_distilled_patch16_384"): ("48.7 / 50.1", _SEGMENTER),
    ("linear", "vit_base_patch8_384"): ("49.5 / 50.5", _SEGMENTER),
    ("linear", "deit_base_distilled_patch16_384"): ("47.1 / 48.1", _SEGMENTER),
}
# Whose weights a Segmenter-format file of each decoder is, by the codebase that trains it (all MIT).
_SEGMENTATION_ORIGIN = {
    "cbt": ("the CBSA authors", "https://github.com/QishuaiWen/CBSA"),
    "cbt_dagger": ("the CBSA authors", "https://github.com/QishuaiWen/CBSA"),
    "tssa": ("whoever trained it with the CBSA code (the ToST decoder has no public release)",
             "https://github.com/QishuaiWen/CBSA"),
    "segmenter_mask_transformer": ("Segmenter's authors", "https://github.com/rstrudel/segmenter"),
    "linear": ("Segmenter's authors", "https://github.com/rstrudel/segmenter"),
    "depict": ("DEPICT's authors", "https://github.com/QishuaiWen/DEPICT"),
}
_SEGMENTATION_LABEL = {
    "cbt": "the CBT decoder (CBSA layers, no MLP)", "cbt_dagger": "the CBT† decoder (CBSA with the tied output)",
    "segmenter_mask_transformer": "Segmenter's mask-transformer decoder", "linear": "Segmenter's linear decoder",
    "tssa": "the ToST decoder (TSSA layers in the CBT decoder's skeleton)",
}

_KIND_TEXT = {
    "cbsa": "this project's checkpoint (format, arch, model_config, state_dict)",
    "authors_classification": "the authors' release wrapper {'epoch', 'arch', 'state_dict', 'best_acc1', ...}",
    "authors_segmentation": "a Segmenter-format release file {'model', 'n_cls', ...} with variant.yml beside it",
    "wrapped_state_dict": "another trainer's wrapper (e.g. timm train.py) around the weights",
    "state_dict": "a bare state dict",
    "hub_folder": "a hub-format folder (config.json + model.safetensors)",
}


# ---------------------------------------------------------------------------------------------------------------
# Source detection
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What ``--checkpoint`` holds. ``ckpt`` is the whole file as read (None for folders)."""

    path: Path
    task: str                                   # "classification" or "segmentation"
    kind: str                                   # a checkpoint_kind, or "hub_folder"
    ckpt: Optional[Dict[str, Any]] = None
    arch: Optional[str] = None                  # canonical timm name (classification)
    recorded_arch: Optional[str] = None         # the name the file gives, e.g. Ours_small
    sha256: str = ""
    weights_file: Optional[Path] = None         # the file hashed (model.safetensors for folders)


def exportable_archs() -> List[str]:
    """Every timm architecture this project registers (the CBT family and any other ``cbsa_core`` module)."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("cbsa_core"))


def _canonical_arch(name: str, what: str) -> str:
    canonical = ALIASES.get(name, name)
    if not timm.is_model(canonical) or not model_entrypoint(canonical).__module__.startswith("cbsa_core"):
        aliases = ", ".join(sorted(ALIASES))
        raise BadInput(f"{what}: unknown arch {name!r}; exportable: {', '.join(exportable_archs())} (or the "
                         f"authors' names {aliases}). Adaptation-track ViTs (finetune_vit) have no timm entrypoint of "
                         f"their own and are not exported here")
    return canonical


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _timm_train_model_name(ckpt: Mapping[str, Any]) -> Optional[str]:
    """The model name timm's train.py records in its ``args`` (an argparse.Namespace), if any."""
    args = ckpt.get("args")
    name = getattr(args, "model", None) if args is not None else None
    return name if isinstance(name, str) else None


def detect_source(path: Path, arch: Optional[str]) -> Source:
    """Classify ``--checkpoint``: the task, the file kind and (classification) the canonical arch."""
    if not path.exists():
        raise BadInput(f"--checkpoint {path}: no such file or folder")
    if path.is_dir():
        return _detect_folder(path, arch)
    ckpt = read_checkpoint(path)
    try:
        kind = checkpoint_kind(ckpt)
    except CheckpointError as e:
        raise Refusal(f"--checkpoint {path}: {e}") from e
    source = Source(path=path, task="classification", kind=kind, ckpt=ckpt, sha256=sha256_of(path),
                    weights_file=path)
    if kind == "authors_segmentation" or (kind == "cbsa" and ckpt.get("arch") == "segmenter"):
        if arch is not None:
            raise UsageError(f"--arch {arch}: {path} is a segmentation checkpoint, whose file gives the model; "
                             f"leave --arch out")
        source.task = "segmentation"
        return source
    recorded = ckpt.get("arch") if kind in ("cbsa", "authors_classification") else None
    if kind == "wrapped_state_dict":   # timm train.py: 'arch' is the class name, args.model the registered one
        recorded = _timm_train_model_name(ckpt)
        if recorded is not None and ALIASES.get(recorded, recorded) not in exportable_archs():
            recorded = None
    if recorded is not None and not isinstance(recorded, str):
        recorded = None
    if arch is None and recorded is None:
        raise UsageError(f"--checkpoint {path} is {_KIND_TEXT[kind]} and records no arch: give --arch (one of "
                         f"{', '.join(exportable_archs())})")
    if arch is not None and recorded is not None and \
            _canonical_arch(arch, "--arch") != _canonical_arch(recorded, f"checkpoint {path}"):
        raise UsageError(f"--arch {arch} disagrees with the arch {recorded!r} recorded in {path}; leave --arch out")
    source.recorded_arch = recorded or arch
    source.arch = _canonical_arch(arch or recorded, "--arch" if arch else f"checkpoint {path}")
    return source


def _detect_folder(path: Path, arch: Optional[str]) -> Source:
    config_path = path / HUB_CONFIG
    if not config_path.is_file():
        raise BadInput(f"--checkpoint {path} is a folder without {HUB_CONFIG}; give a checkpoint file or a folder "
                         f"this script (or save_pretrained / save_for_hf) wrote")
    try:
        doc = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Refusal(f"cannot parse {config_path}: {e}") from e
    weights = path / HUB_WEIGHTS
    source = Source(path=path, task="classification", kind="hub_folder", weights_file=weights,
                    sha256=sha256_of(weights) if weights.is_file() else "")
    if isinstance(doc, dict) and doc.get("arch") == "segmenter":
        source.task = "segmentation"
        return source
    if not isinstance(doc, dict) or not isinstance(doc.get("architecture"), str):
        raise Refusal(f"{config_path} is neither a timm hub config (no 'architecture') nor a segmentation folder's")
    recorded = doc["architecture"]
    if arch is not None and _canonical_arch(arch, "--arch") != _canonical_arch(recorded, str(config_path)):
        raise UsageError(f"--arch {arch} disagrees with the architecture {recorded!r} in {config_path}")
    source.arch = source.recorded_arch = _canonical_arch(recorded, str(config_path))
    return source


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------
def _default_pretrained_cfg(arch: str) -> Dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _inferred_overrides(arch: str, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """What the weights themselves say about the constructor: the class count (classifier rows; none: 0) and
    the input channels (first conv), through the keys the arch's pretrained config names."""
    cfg = _default_pretrained_cfg(arch)
    out: Dict[str, Any] = {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, str):
        head = state_dict.get(classifier + ".weight")
        out["num_classes"] = int(head.shape[0]) if head is not None else 0
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        first = state_dict.get(first_conv + ".weight")
        if first is not None and first.dim() == 4:
            out["in_chans"] = int(first.shape[1])
    return out


def build_classifier_source(source: Source, overrides: Mapping[str, Any],
                            legacy: Optional[bool]) -> nn.Module:
    """The source model as this project's loader builds it (eval mode), from the file's recorded config (this
    project's files) or from the weights' class/channel counts plus ``--set`` overrides."""
    kwargs: Dict[str, Any] = {}
    if legacy is not None:
        kwargs["legacy_token_layout"] = legacy
    if source.kind == "hub_folder":
        if overrides:
            raise UsageError(f"--set: {source.path} is a hub folder, whose config.json gives the model")
        return timm.create_model(f"local-dir:{source.path}", pretrained=True, **kwargs).eval()
    assert source.ckpt is not None and source.arch is not None
    state_dict = extract_state_dict(source.ckpt)
    if source.kind == "cbsa":
        if overrides:
            raise UsageError(f"--set: {source.path} records its model config; --set is for files that do not")
        config = recorded_model_config(source.ckpt.get("model_config") or {})
        config.pop("legacy_token_layout", None)     # the file's record decides, unless the flag overrides it
        kwargs = dict(config, **kwargs)
    else:
        kwargs = dict(_inferred_overrides(source.arch, state_dict), **dict(overrides), **kwargs)
    try:
        model = timm.create_model(source.arch, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(source.path)), **kwargs)
    except CheckpointMismatchError as e:
        hint = "" if source.kind == "cbsa" else \
            ("\n  (pass the constructor settings the file was trained with, e.g. --set depth=6 --set image_size=32)")
        raise Refusal(f"--checkpoint {source.path} does not fit --arch {source.recorded_arch}: {e}{hint}") from e
    except (TypeError, ValueError) as e:
        raise Refusal(f"cannot build {source.arch} for {source.path} with {kwargs}: {e}") from e
    _check_weights_kept(model, state_dict, source)
    return model.eval()


def _check_weights_kept(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Source) -> None:
    """Refuse a load that adapted the weights (a resampled position embedding, a re-initialised classifier, an
    adapted first conv): the folder must hold the file's weights, not a resized copy."""
    have = model.state_dict()
    adapted = [f"{k}: file {tuple(v.shape)} vs model {tuple(have[k].shape)}" for k, v in state_dict.items()
               if k in have and tuple(v.shape) != tuple(have[k].shape)]
    if adapted:
        raise Refusal(f"--checkpoint {source.path}: the model built for {source.arch} adapts the file's weights "
                      f"instead of holding them ({'; '.join(adapted[:4])}); pass the settings the file was trained "
                      f"with through --set (e.g. --set image_size=...)")


def _model_config(model: nn.Module) -> Optional[Dict[str, Any]]:
    config = getattr(model, "model_config", None)
    return dict(config) if isinstance(config, Mapping) else None


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


def _is_drop_rate(key: str) -> bool:
    return key in ("drop_rate", "drop_path_rate", "drop_block_rate") or key.endswith("_drop_rate")


def export_model_args(model: nn.Module, arch: str) -> Dict[str, Any]:
    """Every constructor setting of ``model`` that differs from the registered default of ``arch`` (drop rates,
    which do not change the eval function, excepted; ``num_classes`` always), as JSON-ready values.

    The model's ``model_config`` is compared with that of ``timm.create_model(arch)``; a model without one
    falls back to the arguments timm's factory recorded when it was built."""
    config = _model_config(model)
    if config is None:
        args = {k: v for k, v in getattr(model, "_model_args", {}).items() if not _is_drop_rate(k)}
    else:
        with torch.device("meta"):     # only the default config is needed, not real weights
            default = _model_config(timm.create_model(arch)) or {}
        args = {k: v for k, v in config.items()
                if not _is_drop_rate(k) and (k not in default or not _same(v, default[k]))}
    if "image_size" in args:           # the release's name; timm's is img_size
        args["img_size"] = args.pop("image_size")
    args["num_classes"] = int(getattr(model, "num_classes", args.get("num_classes", 0)))
    return json.loads(json.dumps(args))   # tuples -> lists, as config.json will hold them


@dataclass
class Preprocessing:
    input_size: Tuple[int, int, int]
    crop_pct: float
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    origin: str


def _preprocessing(model: nn.Module, pretrained_cfg: Mapping[str, Any], source: Source) -> Preprocessing:
    """The evaluation preprocessing: the run's own (this project's files record their run config), else the
    arch's pretrained config (the release's evaluation for the CBT family)."""
    channels, height, width = get_model_input_config(model)["input_size"]
    pre = Preprocessing((int(channels), int(height), int(width)), float(pretrained_cfg.get("crop_pct", 1.0)),
                        str(pretrained_cfg.get("interpolation", "bilinear")),
                        tuple(pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
                        tuple(pretrained_cfg.get("std", (0.229, 0.224, 0.225))), "the architecture's pretrained config")
    run = (source.ckpt or {}).get("config") if source.kind == "cbsa" else None
    if isinstance(run, Mapping):
        if run.get("mean") and run.get("std"):
            pre.mean, pre.std = tuple(float(v) for v in run["mean"]), tuple(float(v) for v in run["std"])
        if run.get("dataset") == "digits":       # upsampled whole to input_size, nothing cropped
            pre.crop_pct = 1.0
        elif run.get("input_size") and run.get("eval_resize"):
            pre.crop_pct = float(run["input_size"]) / float(run["eval_resize"])
        pre.origin = f"recorded by the training run (dataset {run.get('dataset', '?')})"
    if len(pre.mean) != pre.input_size[0]:     # e.g. one channel: the mean statistics, as timm's loaders adapt them
        pre.mean, pre.std = (sum(pre.mean) / len(pre.mean),), (sum(pre.std) / len(pre.std),)
    return pre


def _pretrained_cfg_for_export(export: nn.Module, source_cfg: Mapping[str, Any], source: Source, pre: Preprocessing,
                               min_size: Optional[Tuple[int, ...]], default_config: bool) -> Dict[str, Any]:
    """The exported pretrained config: the arch's (a hub folder's own, when re-exporting one) with the evaluation
    preprocessing, the minimum input of this configuration, and a note naming the source file."""
    folder = source.kind == "hub_folder"
    cfg = dict(source_cfg if folder else export.pretrained_cfg)
    release = source.kind == "authors_classification"
    cfg.update(input_size=pre.input_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
               mean=pre.mean, std=pre.std)
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    if min_size is not None:
        cfg["min_input_size"] = min_size
    elif not default_config:
        cfg.pop("min_input_size", None)    # the registered minimum is for the default configuration only
    if not folder and not (release and str(cfg.get("tag") or "").startswith("authors")):
        cfg["tag"] = None                  # the registry's tag names the authors' weights, not these
    note = (f"Exported by scripts/export_pretrained.py from {source.path.name} (sha256 {source.sha256}), "
            f"{_KIND_TEXT[source.kind]}.")
    cfg["notes"] = (tuple(cfg.get("notes") or ()) if folder else ()) + (note,)
    return cfg


def _min_input_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The smallest input of this configuration, where the model's module says (``min_input_size(config)``)."""
    fn = getattr(sys.modules.get(type(model).__module__), "min_input_size", None)
    config = _model_config(model)
    if callable(fn) and config is not None:
        return tuple(int(v) for v in fn(config))
    return None


def _classification_gflops(model: nn.Module, size: Tuple[int, int, int]) -> Tuple[float, str]:
    """Paper-convention GFLOPs (analytic), or FlopCounterMode's count where no formula covers the model."""
    try:
        return analytic_flops(model, size[1:])["total"] / 1e9, (
            "paper convention: 2 × multiply-accumulates of the matrix products and convolutions, counted "
            "analytically by `cbsa_core.flops.analytic_flops`, with ISTA as two d×d products as the paper counts it")
    except (TypeError, AttributeError):
        return measured_flops(model, size[1:], in_chans=size[0]) / 1e9, (
            "2 × multiply-accumulates as torch's FlopCounterMode counts them on one forward, "
            "`cbsa_core.flops.measured_flops`: no analytic paper-convention formula covers this model")


def _imagenet_labels() -> Dict[str, Any]:
    """ImageNet-1K class names in the order torchvision's ImageFolder gives the release's train folder (sorted
    synsets), with their descriptions."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return dict(label_names=list(info.label_names()), label_descriptions=info.label_descriptions(as_dict=True))


def _logits_difference(reference: nn.Module, candidate: nn.Module, shape: Sequence[int]) -> Tuple[float, bool]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(VERIFY_SEED))
    with torch.no_grad():
        want, got = reference.eval()(x), candidate.eval()(x)
    if want.shape != got.shape:
        return math.inf, False
    diff = (want - got).abs().max().item() if want.numel() else 0.0
    return (diff if math.isfinite(diff) else math.inf), torch.equal(want, got)


@dataclass
class ExportResult:
    """What was exported, as the card and stdout report it."""

    out: Path
    task: str
    arch: str
    max_abs_diff: float
    bit_identical: bool
    batch_shape: Tuple[int, ...]
    files: List[str] = field(default_factory=list)
    model_args: Dict[str, Any] = field(default_factory=dict)
    legacy_token_layout: Optional[bool] = None


def _token_layout_text(model: nn.Module, source: Source, legacy_flag: Optional[bool]) -> Tuple[Optional[bool], str]:
    config = _model_config(model) or {}
    if "legacy_token_layout" not in config:
        return None, "not applicable (the model has no token-layout switch)"
    legacy = bool(config["legacy_token_layout"])
    if source.kind == "hub_folder":
        reason = ("requested explicitly (--legacy-token-layout)" if legacy_flag is not None else
                  "recorded in the folder's config.json (model_args.legacy_token_layout; absent = corrected)")
    else:
        _, reason = resolve_token_layout(source.ckpt, source.kind, legacy_flag)
    pools = any(hasattr(m, "legacy_token_layout") for m in model.modules())
    text = (f"**{'legacy' if legacy else 'corrected'}** ({reason}). The two layouts differ in which tokens the "
            f"representatives are pooled from: {TOKEN_LAYOUT_WHY}. "
            + ("config.json records `legacy_token_layout: true`, so every loader rebuilds the release's pooling."
               if legacy else "config.json records nothing, which every loader reads as the corrected layout.")
            + ("" if pools else " No layer of this model pools a token grid, so both layouts give the same logits."))
    return legacy, text


def export_classifier(source: Source, out: Path, staging: Path, overrides: Mapping[str, Any],
                      legacy: Optional[bool]) -> ExportResult:
    model = build_classifier_source(source, overrides, legacy)
    arch = source.arch
    assert arch is not None
    args = export_model_args(model, arch)
    # The exported model is rebuilt from model_args alone: what config.json says is enough to build it.
    export = timm.create_model(arch, **args).eval()
    try:
        export.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise Refusal(f"{arch}: the constructor settings {args} do not rebuild the loaded model: {e}") from e
    pre = _preprocessing(model, model.pretrained_cfg, source)
    default_config = set(args) <= {"num_classes", "legacy_token_layout"}
    export.pretrained_cfg = _pretrained_cfg_for_export(export, model.pretrained_cfg, source, pre,
                                                       _min_input_size(export), default_config)
    extra: Dict[str, Any] = {}
    if source.kind == "authors_classification" and args["num_classes"] == 1000:
        extra.update(_imagenet_labels())
    save_for_hf(export, str(staging), model_config=extra, safe_serialization=True)

    reloaded = timm.create_model(f"local-dir:{staging}", pretrained=True)
    batch = (2, *pre.input_size)
    diff, identical = _logits_difference(model, reloaded, batch)
    layout, layout_text = _token_layout_text(model, source, legacy)
    result = ExportResult(out=out, task="classification", arch=arch, max_abs_diff=diff, bit_identical=identical,
                          batch_shape=batch, model_args=args, legacy_token_layout=layout)
    _check_verified(result, source)
    config_json = json.loads((staging / HUB_CONFIG).read_text())
    card = classification_card(model, source, result, pre, config_json, layout_text)
    atomic_write_text(staging / CARD_NAME, card)
    return result


def _check_verified(result: ExportResult, source: Source) -> None:
    if not result.max_abs_diff <= TOLERANCE:
        raise Refusal(f"refused: the exported folder's logits differ from {source.path}'s by max "
                      f"{result.max_abs_diff:.3g} (> {TOLERANCE:g}); nothing was written to {result.out}")


# ---------------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------------
def export_segmenter(source: Source, out: Path, staging: Path) -> ExportResult:
    from semantic_segmentation import load_model, save_pretrained

    try:
        model = load_model(source.path)
    except (CheckpointError, ValueError) as e:
        raise Refusal(f"--checkpoint {source.path}: {e}") from e
    save_pretrained(model, staging)
    reloaded = load_model(staging)
    height, width = (int(s) for s in model.model_config["image_size"])
    batch = (1, 3, height, width)
    diff, identical = _logits_difference(model, reloaded, batch)
    label = f"segmenter({model.model_config.get('backbone')}, {model.model_config['decoder']['name']})"
    result = ExportResult(out=out, task="segmentation", arch=label, max_abs_diff=diff, bit_identical=identical,
                          batch_shape=batch)
    _check_verified(result, source)
    atomic_write_text(staging / CARD_NAME, segmentation_card(model, source, result))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------------
def _front_matter(tags: Sequence[str], pipeline: str, library: Optional[str], datasets: Sequence[str]) -> str:
    lines = ["---", "tags:"] + [f"- {t}" for t in tags] + [f"pipeline_tag: {pipeline}"]
    if library:
        lines.append(f"library_name: {library}")
    lines.append("license: mit")
    if datasets:
        lines += ["datasets:"] + [f"- {d}" for d in datasets]
    return "\n".join(lines + ["---", ""])


def _verification_text(result: ExportResult, how: str) -> str:
    shape = "×".join(str(s) for s in result.batch_shape)
    exact = ("bit-identical (`torch.equal`)" if result.bit_identical
             else f"within the {TOLERANCE:g} tolerance, not bit-identical")
    return (f"Before this folder was written, it was reloaded with {how} and run on a fixed random batch ({shape}, "
            f"standard normal from `torch.Generator().manual_seed({VERIFY_SEED})`) next to the source file loaded "
            f"through this project's loader: max |Δlogit| = {result.max_abs_diff:.3g}, {exact}.")


def _settings_lines(config: Mapping[str, Any], changed: Sequence[str]) -> List[str]:
    return [f"  - `{k}`: `{json.dumps(v) if not isinstance(v, str) else v}`"
            + (" (differs from the registered default)" if k in changed else "")
            for k, v in config.items() if not _is_drop_rate(k)]


def _recorded_metric_line(source: Source) -> Optional[str]:
    ckpt = source.ckpt or {}
    if source.kind == "authors_classification" and ckpt.get("best_acc1") is not None:
        value = float(ckpt["best_acc1"])
        return (f"The file itself records `best_acc1` = {value:.2f} (the best validation top-1 of the authors' run, "
                f"epoch {ckpt.get('epoch', '?')}, as their script logged it; not measured here).")
    if source.kind == "cbsa" and ckpt.get("best_metric") is not None:
        what = "mIoU" if source.task == "segmentation" else "top-1"
        return (f"The training run recorded a best validation {what} of {float(ckpt['best_metric']):.2f} "
                f"(epoch {ckpt.get('epoch', '?')}; recorded by the run on its own validation set, not measured "
                f"here).")
    return None


def _reported_text(reported: Optional[Tuple[str, ...]], source: Source, label: str, condition: str) -> str:
    """The 'Reported results' paragraph: release files get the published number with its source; this project's
    files get none (their own recorded metric instead); files of unknown origin get it with that caveat."""
    recorded = _recorded_metric_line(source)
    if source.kind == "cbsa":
        text = "No reported number: these weights were trained with this project, not released by the papers' authors."
    elif reported is None:
        text = f"No reported number for this configuration ({condition})."
    else:
        value, metric, origin = reported if len(reported) == 3 else (reported[0], label, reported[1])
        number = f"**{value}** {metric}, as reported by {origin}"
        if source.kind in ("authors_classification", "authors_segmentation"):
            text = (f"{number}. These are the published numbers of the released weights of this configuration; this "
                    f"file is in the release's format. **Reported, not measured here.**")
        else:
            text = (f"This file records no provenance. If it holds the released weights of this configuration, "
                    f"{number}. **Reported, not measured here.**")
    return text + ("\n\n" + recorded if recorded else "")


def classification_reported(arch: str, model_args: Mapping[str, Any]) -> Optional[Tuple[str, str, str]]:
    """(value, metric, source) the papers report for ``arch``, only for its registered configuration (no constructor
    setting but the token layout differs from the default; 1000 classes, hence also 224², 3 channels)."""
    standard = set(model_args) <= {"num_classes", "legacy_token_layout"} and model_args.get("num_classes") == 1000
    return CLASSIFICATION_REPORTED.get(arch) if standard else None


def classification_card(model: nn.Module, source: Source, result: ExportResult, pre: Preprocessing,
                        config_json: Mapping[str, Any], layout_text: str) -> str:
    arch = result.arch
    params = count_parameters(model)
    gflops, convention = _classification_gflops(model, pre.input_size)
    release = source.kind == "authors_classification"
    cfg = config_json.get("pretrained_cfg", {})
    origin_url = cfg.get("origin_url") or "https://github.com/QishuaiWen/CBSA"
    reported = classification_reported(arch, result.model_args)
    condition = ("the papers report numbers only for the registered configurations at 224² with 1000 classes"
                 if arch in CLASSIFICATION_REPORTED else f"no paper reports {arch}")
    paper = PAPER_CLASSIFICATION.get(arch) if reported is not None else None
    paper_cost = (f"; the paper's Table 3 lists {paper[0]} M", f"; the paper's Table 3 lists {paper[1]} G") \
        if paper else ("", "")
    config = _model_config(model) or dict(result.model_args)
    resize = int(math.floor(pre.input_size[1] / pre.crop_pct))
    alias = f" (the authors' `{source.recorded_arch}`)" if source.recorded_arch not in (None, arch) else ""
    lines = [
        _front_matter(["image-classification", "timm", "cbsa", "white-box-transformer"], "image-classification",
                      "timm", ["imagenet-1k"] if release and result.model_args.get("num_classes") == 1000 else []),
        f"# Model card for {arch}" + (" (the authors' release)" if release else ""),
        "",
        f"A `{arch}`{alias} image classifier from the project that re-implements *{PAPER}* (CBSA, NeurIPS 2025, "
        f"arXiv:2509.16875), converted to timm's hub format.",
        "",
        "## Model details",
        f"- **Architecture:** `{arch}`{alias}; constructor settings:",
        *_settings_lines(config, [("image_size" if k == "img_size" else k) for k in result.model_args
                                  if k != "num_classes"]),
        f"- **Source file:** `{source.path.name}` ({_KIND_TEXT[source.kind]}), SHA-256 `{source.sha256}`",
        f"- **Parameters:** {params:,} ({params / 1e6:.2f} M)" + paper_cost[0],
        f"- **GFLOPs:** {gflops:.3g} for one {pre.input_size[0]}×{pre.input_size[1]}×{pre.input_size[2]} image "
        f"({convention})" + paper_cost[1],
        f"- **Token layout:** {layout_text}",
        f"- **Evaluation preprocessing** ({pre.origin}): resize the short side to {resize} "
        f"({pre.interpolation}), centre-crop {pre.input_size[1]}×{pre.input_size[2]} (crop_pct {pre.crop_pct:.4g}), "
        f"normalise with mean {list(pre.mean)}, std {list(pre.std)}. "
        "`timm.data.resolve_data_config(model=model)` returns it.",
        f"- **Classes:** {result.model_args.get('num_classes')}"
        + (" (ImageNet-1K synsets in sorted order, as ImageFolder gives them; names in config.json `label_names`)"
           if "label_names" in config_json else ""),
        "",
        "## Reported results",
        _reported_text(reported, source, "", condition),
        "",
        "## Verification",
        _verification_text(result, "`timm.create_model('local-dir:…', pretrained=True)`"),
        "",
        "## License",
        (f"MIT. The weights are the authors' release ({origin_url}, license "
         f"{cfg.get('license', 'mit')}); this folder only changes their format." if release else
         "MIT (this project). Weights trained with this project's code are published under MIT with this folder."
         if source.kind == "cbsa" else
         f"MIT for this project's code. The file records no provenance: its weights are licensed by whoever trained "
         f"them (the architecture's origin: {origin_url}, {cfg.get('license', 'mit')})."),
        "",
        "## How to load",
        "```python",
        "import timm",
        "import cbsa_core  # registers the architecture with timm",
        "",
        "model = timm.create_model('local-dir:/path/to/this/folder', pretrained=True).eval()",
        "# after `huggingface-cli upload USER/REPO /path/to/this/folder`:",
        "model = timm.create_model('hf-hub:USER/REPO', pretrained=True).eval()",
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
        "```",
        "",
        *CITATION_SECTION,
    ]
    return "\n".join(lines)


def _backbone_size(backbone: str) -> Optional[str]:
    for size in ("tiny", "small", "base", "large"):
        if f"_{size}_" in f"_{backbone}_":
            return size[0].upper()
    return None


def _segmentation_family(decoder: Mapping[str, Any]) -> str:
    name = str(decoder.get("name"))
    if name == "mask_transformer":
        return "cbt_dagger" if decoder.get("tied_output") else "cbt"
    return "depict" if name.startswith("depict") else name


def segmentation_reported(config: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(value, source) reported for a segmentation model config: its decoder family on a released backbone, with
    the encoder of that backbone's table row and ADE20K's 150 classes; None otherwise."""
    from semantic_segmentation.encoder import BACKBONES

    backbone = str(config.get("backbone") or "")
    row = BACKBONES.get(backbone)
    if row is None or int(config.get("n_cls", 0)) != 150:
        return None
    encoder = dict(d_model=config.get("d_model"), n_heads=config.get("n_heads"), n_layers=config.get("n_layers"),
                   patch_size=config.get("patch_size"), distilled=bool(config.get("distilled", False)))
    if any(encoder[k] != (bool(row.get(k, False)) if k == "distilled" else row[k]) for k in encoder):
        return None
    return SEGMENTATION_REPORTED.get((_segmentation_family(config["decoder"]), backbone))


def segmentation_card(model: nn.Module, source: Source, result: ExportResult) -> str:
    from semantic_segmentation.decoders import DECODER_SUMMARIES
    from semantic_segmentation.flops import PAPER_DECODER_GFLOPS, decoder_flops
    from semantic_segmentation.pretrained import inference_settings
    from semantic_segmentation.transforms import NORMALIZATION

    config = model.model_config
    decoder = config["decoder"]
    name, family = str(decoder["name"]), _segmentation_family(decoder)
    backbone = str(config.get("backbone") or "")
    height, width = (int(s) for s in config["image_size"])
    patch = int(config["patch_size"])
    grid = (height // patch, width // patch)
    gflops = decoder_flops(model.decoder, grid)["total"] / 1e9
    size = _backbone_size(backbone)
    paper_gflops = PAPER_DECODER_GFLOPS.get((family if family != "depict" else "depict_sa", size or ""))
    params, decoder_params = count_parameters(model), count_parameters(model.decoder)
    release = source.kind == "authors_segmentation"
    reported = segmentation_reported(config)
    condition = ("the releases report ADE20K (150 classes) numbers for their published backbones only"
                 if family != "tssa" else "the ToST decoder has no release")
    infer = inference_settings(model)
    mean, std = NORMALIZATION[str(config.get("normalization", "vit"))]
    who, url = _SEGMENTATION_ORIGIN.get(family, ("their authors", ""))
    label = _SEGMENTATION_LABEL.get(family) or DECODER_SUMMARIES.get(name, name)
    cbsa = any(hasattr(m, "legacy_token_layout") for m in model.decoder.modules())
    lines = [
        _front_matter(["image-segmentation", "semantic-segmentation", "segmenter", "cbsa"], "image-segmentation",
                      None, ["ade20k"] if int(config["n_cls"]) == 150 and release else []),
        f"# Model card for Segmenter ({backbone}) with {label.split(' (')[0]}",
        "",
        f"A semantic segmentation model, Segmenter's ViT encoder with {label}, from the project that re-implements "
        f"*{PAPER}* (CBSA, NeurIPS 2025, arXiv:2509.16875), in the folder format "
        "`semantic_segmentation.load_model(DIR)` reads.",
        "",
        "## Model details",
        "- **Configuration** (config.json):",
        *_settings_lines({k: v for k, v in config.items()}, []),
        f"- **Source file:** `{source.path.name}` ({_KIND_TEXT[source.kind]}), SHA-256 `{source.sha256}`",
        f"- **Parameters:** {params:,} ({params / 1e6:.2f} M), of which the decoder {decoder_params:,}",
        f"- **Decoder GFLOPs:** {gflops:.3g} at {height}×{width} (a {grid[0]}×{grid[1]} patch grid, "
        f"{int(config['n_cls'])} classes; paper convention of Fig. 8: decoder only, 2 × multiply-accumulates of the "
        "matrix products, counted analytically by `semantic_segmentation.flops.decoder_flops`)"
        + (f"; the paper's Fig. 8 plots {paper_gflops} G for the released {size} model" if paper_gflops and reported
           else ""),
        "- **Token layout:** "
        + ("not applicable: the decoder's CBSA layers take no prefix token ([CLS] is dropped before decoding), so the "
           "release's layout and the corrected one pool the same grid." if cbsa else
           "not applicable (no CBSA layer)."),
        f"- **Evaluation** (config.json `inference`, what `eval.py` uses): rescale the short side to "
        f"{infer['im_size']}, sliding window {infer['window_size']}² with stride {infer['window_stride']}, inputs "
        f"scaled to [0, 255] and normalised with mean {list(mean)}, std {list(std)} (`{config.get('normalization')}`).",
        "",
        "## Reported results",
        _reported_text(reported, source, _ADE, condition),
        "",
        "## Verification",
        _verification_text(result, "`semantic_segmentation.load_model(…)`"),
        "",
        "## License",
        (f"MIT. The weights come from {who} ({url}, MIT license); this folder only changes their format."
         if release else
         "MIT (this project). Weights trained with this project's code are published under MIT with this folder."
         if source.kind == "cbsa" else
         "MIT for this project's code; the weights are licensed by whoever trained them."),
        "",
        "## How to load",
        "```python",
        "from semantic_segmentation import load_model",
        "",
        "model = load_model('/path/to/this/folder')      # eval mode; logits (B, n_cls, H, W)",
        "# after `huggingface-cli upload USER/REPO /path/to/this/folder`:",
        "from huggingface_hub import snapshot_download",
        "model = load_model(snapshot_download('USER/REPO'))",
        "```",
        "",
        *CITATION_SECTION,
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------------
def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise Refusal(f"--out {out} exists and is not a folder; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Refusal(f"--out {out} exists and is not empty; pass --overwrite to replace the exported files in it")


def _publish(staging: Path, out: Path) -> List[str]:
    """Rename each staged file into ``out`` (atomic per file), weights before the config that points at them."""
    out.mkdir(parents=True, exist_ok=True)
    order = {HUB_WEIGHTS: 0, HUB_CONFIG: 1, CARD_NAME: 2}
    names = sorted((p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda n: (order.get(n, 3), n))
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(staging / name, 0o666 & ~umask)   # temporary files are created 0600; give ordinary permissions
        os.replace(staging / name, out / name)
    return names


def export(checkpoint: Path, out: Path, *, arch: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
           legacy_token_layout: Optional[bool] = None, overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` to ``out`` (see the module docstring). Raises :class:`UsageError`, :class:`BadInput`
    or :class:`Refusal` (or :class:`~cbsa_core.checkpoint.CheckpointError` for an unreadable file) with one message
    naming the file or flag at fault."""
    out = Path(out)
    _check_out_dir(out, overwrite)
    source = detect_source(Path(checkpoint), arch)
    if source.task == "segmentation" and (overrides or legacy_token_layout is not None):
        flag = "--set" if overrides else "--legacy-token-layout"
        raise UsageError(f"{flag}: {checkpoint} is a segmentation checkpoint; its file gives the model (and its "
                         "decoder has no token-layout switch)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if source.task == "segmentation":
            result = export_segmenter(source, out, staging)
        else:
            result = export_classifier(source, out, staging, dict(overrides or {}), legacy_token_layout)
        _check_out_dir(out, overwrite)     # nothing appeared meanwhile
        result.files = _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    summary, _, details = (__doc__ or "").partition("\n\n")
    p = argparse.ArgumentParser(prog="export_pretrained.py", description=summary, epilog=details, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="F",
                   help="the weights: this project's checkpoint, the authors' release file, a timm train.py "
                        "checkpoint, a bare state dict or .safetensors (with --arch), a segmentation checkpoint "
                        "(variant.yml beside the released ones), or a hub folder")
    p.add_argument("--arch", default=None, metavar="A",
                   help="registered model name (canonical or the authors' alias, e.g. cbt_small or Ours_small); "
                        "needed only for files that record none")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if needed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor setting of a file that records no model config, e.g. --set depth=6 --set "
                        "rep_grid=[4,4] (repeatable; the class count and input channels are read from the weights)")
    p.add_argument("--legacy-token-layout", dest="legacy_token_layout", action=argparse.BooleanOptionalAction,
                   default=None, help="force the release's (or the corrected) token layout; default: the file's "
                                      "own record (the authors' release formats are legacy, everything else corrected)")
    p.add_argument("--overwrite", action="store_true", help="replace the exported files in a non-empty --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ExportResult:
    """Parse ``argv``, export, print the verification. Errors go to :func:`cli` (the engine's exit codes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides: Dict[str, Any] = {}
        if args.overrides:
            try:
                overrides = parse_overrides(args.overrides)
            except ValueError as e:
                raise UsageError(str(e)) from e
        result = export(Path(args.checkpoint), Path(args.out), arch=args.arch, overrides=overrides,
                        legacy_token_layout=args.legacy_token_layout, overwrite=args.overwrite)
    except UsageError as e:
        parser.error(str(e))  # usage line + message, exit status 2, like any bad flag
    exact = "bit-identical" if result.bit_identical else "within tolerance"
    print(f"exported {result.task} {result.arch} from {args.checkpoint} to {result.out}: {', '.join(result.files)}")
    if result.task == "classification":
        print(f"model_args: {json.dumps(result.model_args)}")
    print(f"verified: max |logit difference| = {result.max_abs_diff:.3g} ({exact}) on a "
          f"{'x'.join(map(str, result.batch_shape))} random batch")
    return result


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status through the engine's one error-to-exit-code function: bad flags 2; a missing or unreadable file,
    an unknown arch or an export that would not be faithful 1, in one ``error:`` line."""
    return run_cli(main, argv, refusals=(BadInput, Refusal))


if __name__ == "__main__":
    sys.exit(cli())
