#!/usr/bin/env python
"""Export a CBT classifier or a Segmenter/CBT segmentation model to ONNX, checked against eager with onnxruntime.

    python scripts/export_onnx.py --checkpoint runs/cbt_s/checkpoint_best.pth.tar --out cbt_small.onnx
    python scripts/export_onnx.py --checkpoint CKPT/CBT/cbt_small_best.pth.tar --arch Ours_small --out cbt_small.onnx
    python scripts/export_onnx.py --checkpoint log/CBT-Small/checkpoint.pth --out segmenter.onnx --image-size 512 512

What is read: this project's classification files (the recorded arch and model_config rebuild the exact model;
--arch is optional), the authors' release files (--arch defaults to the authors' name they record; their legacy
token layout is switched on by the loader), other weight files with --arch (corrected layout
unless --legacy-token-layout), and segmentation checkpoints through semantic_segmentation.load_model (this
project's files, or the authors' files with their variant.yml beside them).

The graph is captured with torch.export (non-strict) with a dynamic batch dimension and translated by
torch.onnx's dynamo exporter; the file has one input `images` (batch, C, H, W) float32 and one output
`logits`: (batch, num_classes) for a classifier, (batch, n_cls, H, W) for a segmentation model.

The image size is fixed at export (--image-size H W, default: the classifier's training size or the
segmentation model's crop). The token grid (H/patch, W/patch) decides the bins of the adaptive average pooling
that forms CBSA's representatives and the resampling of the position embedding, so one file serves one size;
export once per size you need (sliding-window segmentation runs every window at the crop size). A classifier's
size must be a multiple of its patch size; a segmentation model pads to the next multiple, as in eager. Either
way the token grid must be at least the representative grid of every CBSA layer.

After export, onnxruntime (CPU) runs a random batch of 2 and the largest absolute difference from the eager
model is printed; above --tolerance (default 1e-4) the file is not written and the script exits with status 1.
The file is written atomically (a temporary file in the destination folder, then a rename).

The file's metadata_props record: task, arch, image_size, input/output layout, the normalization mean and std
and the pixel range they apply to ([0, 1] for classifiers; [0, 255] for segmentation, as in Segmenter), the
token layout, the model_config, the source checkpoint, its format and SHA-256, and the exporter's versions.

Not offered: the TorchScript exporter (dynamo=False) fails on CBSA ("Unsupported: ONNX export of operator
adaptive_avg_pool2d, output size that are not factor of input size", e.g. the 14x14 grid of a 224 image pooled
to 8x8 representatives).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import cbsa_core
from cbsa_core.atomic import atomic_write_bytes
from cbsa_core.checkpoint import CheckpointError, checkpoint_kind, read_checkpoint
from cbsa_core.layers import CBSA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_MEAN, IMAGENET_STD, build_model, parse_overrides, script_parser  # noqa: E402

__all__ = ["ExportError", "ExportSource", "ExportResult", "model_source", "load_for_export", "check_image_size",
           "export_model", "export_checkpoint", "onnx_vs_eager", "verify_onnx", "read_metadata", "main"]

_LOG = logging.getLogger("export_onnx")

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_TOLERANCE = 1e-4
VERIFY_BATCH = 2


class ExportError(ValueError):
    """The model, the image size or the exported file is not acceptable; the message says which and why."""


@dataclass
class ExportSource:
    """An eval-mode model with what its ONNX file records about it.

    ``image_size`` is the default export size (H, W); ``mean``/``std`` normalise inputs whose pixels lie in
    ``input_range``; ``token_layout`` is ``corrected`` or ``legacy`` (the release's ``tokens[:, :-1]`` pooling).
    """

    model: nn.Module
    task: str
    arch: str
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    input_range: str
    token_layout: str
    checkpoint: Optional[str] = None
    checkpoint_format: Optional[str] = None


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    image_size: Tuple[int, int]
    metadata: Dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# models
def _task(model: nn.Module) -> str:
    if isinstance(model, cbsa_core.CBT):
        return "classification"
    if getattr(model, "arch", None) == "segmenter" and hasattr(model, "encoder") and hasattr(model, "decoder"):
        return "segmentation"
    raise ExportError(f"cannot export a {type(model).__name__}: only CBT classifiers (cbsa_core.CBT) and "
                      "Segmenter models (semantic_segmentation.Segmenter) are supported")


def _token_layout(model: nn.Module) -> str:
    legacy = any(m.legacy_token_layout for m in model.modules() if isinstance(m, CBSA))
    return "legacy" if legacy else "corrected"


def _in_chans(model: nn.Module) -> int:
    return int(getattr(model, "model_config", {}).get("in_chans", 3))


def _image_size(size: Any) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def model_source(model: nn.Module) -> ExportSource:
    """What an ONNX file records about ``model`` when nothing but the model is known: its arch, config size,
    token layout, and the input statistics of its family (ImageNet's for classifiers, the backbone's for
    Segmenter)."""
    task = _task(model)
    cfg = model.model_config
    if task == "classification":
        return ExportSource(model=model, task=task, arch=str(model.arch), image_size=_image_size(cfg["image_size"]),
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, input_range="[0, 1]",
                            token_layout=_token_layout(model))
    # Imported here: the segmentation track has its own dependencies (mmcv), which classifiers do not need.
    from semantic_segmentation.transforms import NORMALIZATION

    mean, std = NORMALIZATION[cfg["normalization"]]
    return ExportSource(model=model, task=task, arch=f"segmenter:{cfg.get('backbone') or 'vit'}+mask_transformer",
                        image_size=_image_size(cfg["image_size"]), mean=tuple(mean), std=tuple(std),
                        input_range="[0, 255]", token_layout=_token_layout(model))


def load_for_export(checkpoint: str | os.PathLike, *, arch: Optional[str] = None,
                    legacy_token_layout: Optional[bool] = None,
                    overrides: Optional[Mapping[str, Any]] = None) -> ExportSource:
    """Build the eval-mode model of any checkpoint this project reads, with what its ONNX file records.

    * this project's classification files: the recorded arch and ``model_config`` (``arch`` may be omitted and
      must agree when given; ``overrides`` are refused: the file's config is the model);
    * the authors' classification files (``arch`` defaults to the one they record) and other weight files:
      ``arch`` (+ constructor ``overrides``);
    * segmentation checkpoints (this project's ``segmenter`` files, the authors' with ``variant.yml``):
      :func:`semantic_segmentation.load_model`.

    ``legacy_token_layout`` overrides the layout the loader infers (classifiers only). Mean and std are the
    ones recorded by this project's training runs, else ImageNet's.
    """
    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    overrides = dict(overrides or {})
    if kind == "authors_segmentation" or (kind == "cbsa" and ckpt.get("arch") == "segmenter"):
        ignored = [flag for flag, given in (("--arch", arch not in (None, "segmenter")),
                                            ("--legacy-token-layout", legacy_token_layout is not None),
                                            ("--set", bool(overrides))) if given]
        if ignored:
            raise ExportError(f"checkpoint {path} is a segmentation model, built from its own config: "
                              f"{', '.join(ignored)} do(es) not apply to it")
        del ckpt
        from semantic_segmentation import load_model

        return dataclasses.replace(model_source(load_model(path)), checkpoint=str(path), checkpoint_format=kind)

    if kind == "cbsa" and overrides:
        raise ExportError(f"checkpoint {path} records its model_config, which defines the model; --set only "
                          "applies to files without one (the authors' release, bare state dicts)")
    if kind == "authors_classification" and arch is None and isinstance(ckpt.get("arch"), str):
        arch = ckpt["arch"]  # the release records its --arch (e.g. Ours_small)
    if kind != "cbsa" and legacy_token_layout is not None:
        overrides["legacy_token_layout"] = bool(legacy_token_layout)
    model = build_model(arch, str(path), overrides)
    if kind == "cbsa" and legacy_token_layout is not None:
        # This project's files record their layout; an explicit request still wins, as in load_checkpoint.
        _LOG.info("%s: %s token layout (requested explicitly)", path, "legacy" if legacy_token_layout else "corrected")
        model.set_legacy_token_layout(bool(legacy_token_layout))
    source = dataclasses.replace(model_source(model), checkpoint=str(path), checkpoint_format=kind)
    run_config = dict(ckpt.get("config") or {}) if kind == "cbsa" else {}
    if run_config.get("mean") and run_config.get("std"):  # the statistics the training run normalised with
        source.mean = tuple(float(v) for v in run_config["mean"])
        source.std = tuple(float(v) for v in run_config["std"])
    return source


def check_image_size(model: nn.Module, image_size: Sequence[int]) -> Tuple[int, int]:
    """Validate an export size (H, W) for ``model``; returns it as a tuple of ints.

    Classifiers need multiples of the patch size; segmentation models pad to them (as in eager). The token
    grid must be at least every CBSA layer's representative grid.
    """
    task = _task(model)
    if len(image_size) != 2:
        raise ExportError(f"--image-size takes H W (two numbers), got {list(image_size)}")
    h, w = int(image_size[0]), int(image_size[1])
    patch = int(model.patch_size)
    if h <= 0 or w <= 0:
        raise ExportError(f"--image-size {h} {w}: both sides must be positive")
    if task == "classification" and (h % patch or w % patch):
        below = (max(patch, h // patch * patch), max(patch, w // patch * patch))
        raise ExportError(f"--image-size {h} {w} does not divide by the classifier's patch size {patch}; "
                          f"use multiples of {patch} (e.g. {below[0]} {below[1]})")
    grid = (-(-h // patch), -(-w // patch))
    for rep in sorted({tuple(m.rep_grid) for m in model.modules() if isinstance(m, CBSA)}):
        if grid[0] < rep[0] or grid[1] < rep[1]:
            raise ExportError(f"--image-size {h} {w} gives a {grid[0]}x{grid[1]} token grid (patch {patch}), smaller "
                              f"than the {rep[0]}x{rep[1]} representative grid of the model's CBSA layers; use at "
                              f"least {rep[0] * patch} {rep[1] * patch}")
    return h, w


def _metadata(source: ExportSource, image_size: Tuple[int, int]) -> Dict[str, str]:
    model = source.model
    if source.task == "classification":
        num_classes = int(model.model_config["num_classes"])
        output = f"{OUTPUT_NAME} ({BATCH_DIM}, {num_classes}): class logits"
    else:
        output = f"{OUTPUT_NAME} ({BATCH_DIM}, {model.n_cls}, {image_size[0]}, {image_size[1]}): per-pixel class logits"
    meta = {
        "task": source.task,
        "arch": source.arch,
        "image_size": json.dumps(list(image_size)),
        "input": f"{INPUT_NAME} ({BATCH_DIM}, {_in_chans(model)}, {image_size[0]}, {image_size[1]}) float32, RGB, "
                 f"pixels in {source.input_range} normalised as (x - mean) / std",
        "output": output,
        "dynamic_axes": f"{BATCH_DIM} (dim 0 of {INPUT_NAME} and {OUTPUT_NAME}); the image size is fixed",
        "normalization_mean": json.dumps(list(source.mean)),
        "normalization_std": json.dumps(list(source.std)),
        "input_range": source.input_range,
        "token_layout": source.token_layout,
        "model_config": json.dumps(getattr(model, "model_config", {}), sort_keys=True, default=list),
        "exporter": f"torch {torch.__version__} torch.export + torch.onnx (dynamo); cbsa {cbsa_core.__version__}",
    }
    if source.checkpoint is not None:
        meta["source_checkpoint"] = source.checkpoint
        meta["source_checkpoint_format"] = str(source.checkpoint_format)
        meta["source_checkpoint_sha256"] = _sha256(source.checkpoint)
    return meta


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# export and verification
def _random_images(batch: int, channels: int, image_size: Tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *image_size, generator=gen)


def _capture(model: nn.Module, example: torch.Tensor):
    """ONNX program of ``model`` with a dynamic batch dimension, names and dims as documented."""
    batch = torch.export.Dim(BATCH_DIM, min=1)
    with torch.no_grad():
        # The graph is captured here rather than by torch.onnx.export(model, ...): the ONNX exporter traces
        # with backed_size_oblivious=True, under which ISTA's choice between its fused and its three-product
        # form (a function of batch x tokens vs the width) becomes a guard such as `batch > 96/65` on narrow
        # models at small sizes (the digits demo's CBT at 32x32), and torch's constraint solver fails on the
        # fraction ("Expected op to be '==', got <"). Both forms compute the same function, and plain
        # torch.export keeps the batch free from 1 up.
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        return torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 verbose=False)


def _name_batch_dim(proto, input_name: str) -> None:
    """Rename the exporter's batch symbol (``s45``, ...) to ``batch`` wherever a shape mentions it."""
    dims = next(v for v in proto.graph.input if v.name == input_name).type.tensor_type.shape.dim
    symbol = dims[0].dim_param
    if not symbol:
        raise ExportError("the exported graph has a fixed batch size; expected a dynamic first dimension")
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(BATCH_DIM, dim.dim_param)


def onnx_vs_eager(path: str | os.PathLike | bytes, model: nn.Module, images: torch.Tensor, threads: int = 1) -> float:
    """Largest absolute difference between onnxruntime's (CPU) output for ``images`` and the eager model's;
    ``path`` is an ONNX file or its serialized bytes.

    A shape mismatch or a non-finite output raises :class:`ExportError`.
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    model_file = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: images.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(images).numpy()
    if got.shape != want.shape:
        raise ExportError(f"{path}: onnxruntime output shape {got.shape} != eager {want.shape} for input "
                          f"{tuple(images.shape)}")
    if not np.isfinite(got).all():
        raise ExportError(f"{path}: onnxruntime output has non-finite values for input {tuple(images.shape)}")
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def verify_onnx(path: str | os.PathLike | bytes, model: nn.Module, image_size: Tuple[int, int], *,
                tolerance: float = DEFAULT_TOLERANCE, batch: int = VERIFY_BATCH, seed: int = 0) -> float:
    """Run a random batch through onnxruntime and the eager model; return the max abs difference, or raise
    :class:`ExportError` (one line) when it exceeds ``tolerance``."""
    images = _random_images(batch, _in_chans(model), image_size, seed)
    diff = onnx_vs_eager(path, model, images)
    if not diff <= tolerance:
        raise ExportError(f"onnxruntime output differs from eager by {diff:.3g} (max abs, random batch of {batch}), "
                          f"over --tolerance {tolerance:g}")
    return diff


def export_model(model: nn.Module, out: str | os.PathLike, *, image_size: Optional[Sequence[int]] = None,
                 metadata: Optional[Mapping[str, str]] = None, tolerance: float = DEFAULT_TOLERANCE,
                 source: Optional[ExportSource] = None) -> ExportResult:
    """Export ``model`` (a CBT classifier or a Segmenter, put in eval mode) to ``out`` with a dynamic batch.

    The model runs on (batch, C, H, W) images of the fixed ``image_size`` (default: the model's own); the
    file is verified with onnxruntime against eager (batch 2) before it replaces ``out``. ``source`` fills
    the standard metadata_props (default: :func:`model_source`); ``metadata`` adds or replaces entries.
    """
    if not tolerance >= 0:
        raise ExportError(f"--tolerance must be >= 0, got {tolerance}")
    model = model.eval()
    source = source or model_source(model)
    size = check_image_size(model, image_size if image_size is not None else source.image_size)
    meta = _metadata(source, size)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = _capture(model, _random_images(VERIFY_BATCH, _in_chans(model), size, seed=1))
    proto = onnx_program.model_proto
    _name_batch_dim(proto, INPUT_NAME)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value

    data = proto.SerializeToString()
    diff = verify_onnx(data, model, size, tolerance=tolerance)   # verified before anything is written
    atomic_write_bytes(out, data)
    return ExportResult(path=out, max_abs_diff=diff, image_size=size, metadata=meta)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, arch: Optional[str] = None,
                      image_size: Optional[Sequence[int]] = None, legacy_token_layout: Optional[bool] = None,
                      overrides: Optional[Mapping[str, Any]] = None,
                      tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """:func:`load_for_export` then :func:`export_model`."""
    source = load_for_export(checkpoint, arch=arch, legacy_token_layout=legacy_token_layout, overrides=overrides)
    return export_model(source.model, out, image_size=image_size, tolerance=tolerance, source=source)


def read_metadata(path: str | os.PathLike) -> Dict[str, str]:
    """The metadata_props of an ONNX file as a dict (without loading its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


# ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="local checkpoint file (classification or segmentation)")
    parser.add_argument("--arch", default=None,
                        help="registered classifier name (cbsa_core.list_models()); needed for files that record "
                             "none (bare state dicts, other trainers' files)")
    parser.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
    parser.add_argument("--image-size", nargs="+", type=int, default=None, metavar="N",
                        help="H W (or one number for a square) fixed in the graph; default: the classifier's "
                             "training size or the segmentation model's crop")
    parser.add_argument("--legacy-token-layout", action=argparse.BooleanOptionalAction, default=None,
                        help="override the token layout the loader infers from the file (classifiers; only for a "
                             "file whose origin the loader cannot tell)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="classifier constructor override for files that record no model_config, e.g. "
                             "--set image_size=384 (repeatable)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |onnxruntime - eager| on a random batch of 2 (default %(default)g)")
    args = parser.parse_args(argv)
    if args.image_size is not None and len(args.image_size) == 1:
        args.image_size = args.image_size * 2
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: prints the written file and the measured difference; bad input ends with one
    ``error: ...`` message on stderr and exit status 1."""
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(n) for n in ("cbsa_core", "semantic_segmentation", "export_onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # the loaders' INFO lines say which token layout was chosen and why
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        result = export_checkpoint(args.checkpoint, args.out, arch=args.arch, image_size=args.image_size,
                                   legacy_token_layout=args.legacy_token_layout,
                                   overrides=parse_overrides(args.overrides), tolerance=args.tolerance)
    except (ExportError, CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        message = " ".join(str(e).split()) if isinstance(e, ExportError) else str(e)
        print(f"error: {message}; nothing was written to {args.out}", file=sys.stderr, flush=True)
        return 1
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    meta = result.metadata
    print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB): {meta['task']} {meta['arch']}, "
          f"image size {result.image_size[0]}x{result.image_size[1]}, dynamic batch, token layout "
          f"{meta['token_layout']}; max |onnxruntime - eager| = {result.max_abs_diff:.3g} on a random batch of "
          f"{VERIFY_BATCH} (tolerance {args.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
