"""Helpers shared by the figure scripts (attention maps, zero-shot segmentation, coding rates,
synthetic compression, robustness): images, models, output files and plots.

Nothing here downloads: images are scikit-image's bundled photos or local files, models are built from
the registry with random weights or loaded from a local checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

import cbsa_core
from cbsa_core.atomic import atomic_write_json, atomic_write_text
from cbsa_core.checkpoint import CheckpointError, checkpoint_kind, read_checkpoint
from cbsa_core.engine.cli import run_cli
from cbsa_core.models import recorded_model_config

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "BUNDLED_RGB", "BUNDLED_GRAY", "load_rgb", "resize_rgb", "fit_size",
    "center_square", "to_tensor", "image_batch", "output_dir", "write_json", "write_csv", "parse_overrides",
    "script_parser", "add_model_args", "add_image_args", "model_specs", "build_model", "model_label", "overlay",
    "finite", "plt", "torch_threads", "run_script",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# scikit-image photos shipped inside the wheel (the others need a download and are never used here).
BUNDLED_RGB = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "colorwheel", "retina")
BUNDLED_GRAY = ("camera", "moon", "coins", "clock", "brick", "grass", "gravel", "page", "text", "cell")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch with ``n`` intra-op threads. Thousands of tiny batched linear-algebra calls
    are an order of magnitude faster on one thread than with a thread pool to wake for each."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plt():
    """pyplot on the headless Agg backend, imported lazily: importing a script stays cheap, and scripts that draw
    nothing (the exporters) run without the ``figures`` extra."""
    import matplotlib

    matplotlib.use("Agg")  # must precede the first pyplot import
    import matplotlib.pyplot as pyplot
    return pyplot


# ---------------------------------------------------------------------------------------------------
# images
def load_rgb(spec: str) -> np.ndarray:
    """A scikit-image sample name (``astronaut``, ``chelsea``, ``coffee``, ...) or an image path ->
    (H, W, 3) uint8. Grayscale images are replicated to three channels, alpha is dropped."""
    path = Path(spec)
    if path.suffix and path.exists():
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    if path.suffix or os.sep in spec:
        raise FileNotFoundError(f"image file not found: {spec}")
    import skimage.data
    if spec not in BUNDLED_RGB + BUNDLED_GRAY + ("cat", "logo"):
        raise ValueError(f"unknown image {spec!r}: give an image path or one of the bundled scikit-image photos "
                         f"{', '.join(BUNDLED_RGB + BUNDLED_GRAY)}")
    arr = np.asarray(getattr(skimage.data, spec)())
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) - arr.min()) / max(float(np.ptp(arr)), 1e-12)).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def fit_size(height: int, width: int, image_size: Sequence[int], multiple: int) -> Tuple[int, int]:
    """Target (H, W): two numbers are taken as is; one number is the short side, the aspect ratio is kept
    and the long side rounded to the nearest multiple of ``multiple``. Both must divide by ``multiple``."""
    if len(image_size) == 2:
        out = (int(image_size[0]), int(image_size[1]))
    elif len(image_size) == 1:
        short = int(image_size[0])
        if height <= width:
            out = (short, max(multiple, int(round(width * short / height / multiple)) * multiple))
        else:
            out = (max(multiple, int(round(height * short / width / multiple)) * multiple), short)
    else:
        raise ValueError(f"--image-size takes one (short side) or two (H W) numbers, got {list(image_size)}")
    if out[0] % multiple or out[1] % multiple or min(out) <= 0:
        raise ValueError(f"--image-size {out[0]}x{out[1]} must be positive multiples of the patch size {multiple}")
    return out


def resize_rgb(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8, bicubic."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC))


def center_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return rgb[top:top + s, left:left + s]


def to_tensor(rgb: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              in_chans: int = 3) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (in_chans, H, W) float32 (``in_chans=1`` takes the luminance)."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    if in_chans == 1:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif in_chans != 3:
        raise ValueError(f"images have 1 or 3 channels; the model wants in_chans={in_chans}")
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def image_batch(names: Sequence[str], size: int, in_chans: int = 3) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """Square batch: each image centre-cropped to a square and resized to ``size``.
    Returns normalised (B, in_chans, size, size) and the resized RGB arrays."""
    rgbs = [resize_rgb(center_square(load_rgb(n)), (size, size)) for n in names]
    return torch.stack([to_tensor(r, in_chans=in_chans) for r in rgbs]), rgbs


# ---------------------------------------------------------------------------------------------------
# output files
def output_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finite(x: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars and arrays become Python values."""
    if isinstance(x, Mapping):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (NaN/inf become null), written atomically (:mod:`cbsa_core.atomic`)."""
    return atomic_write_json(path, finite(obj))


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              fields: Optional[Sequence[str]] = None) -> Path:
    """A CSV table (NaN/inf and None as empty cells), written atomically (:mod:`cbsa_core.atomic`)."""
    fields = list(fields or (rows[0].keys() if rows else []))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in finite(dict(row)).items()})
    return atomic_write_text(path, buffer.getvalue())


def run_script(main) -> int:
    """A figure script's exit status through the engine's one error-to-exit-code function
    (:func:`cbsa_core.engine.cli.run_cli`): bad input (an unknown image or model name, an impossible size, a
    missing or unreadable file) ends with one ``error:`` line and status 1, bad flags with 2, Ctrl-C with 130."""
    return run_cli(main, refusals=(ValueError,))


# ---------------------------------------------------------------------------------------------------
# models
def parse_overrides(items: Optional[Iterable[str]]) -> Dict[str, Any]:
    """``["depth=2", "rep_grid=[2, 2]"]`` -> ``{"depth": 2, "rep_grid": [2, 2]}`` (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def script_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the module docstring's first paragraph and whose epilog is
    the rest, so that ``--help`` documents the choices the paper leaves open."""
    summary, _, details = doc.partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=details, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(parser: argparse.ArgumentParser, *, multiple: bool = False,
                   default_arch: Optional[str] = None) -> None:
    nargs = "*" if multiple else None
    parser.add_argument("--arch", nargs=nargs, default=([default_arch] if multiple and default_arch else default_arch),
                        help="registered model name(s) (cbsa_core.list_models(): cbt_small, Ours_small, mssa_small, "
                             "crate_cbt_small, ...). Optional when a checkpoint of this project names its arch")
    parser.add_argument("--checkpoint", nargs=nargs, default=([] if multiple else None),
                        help="local checkpoint(s): this project's files or the authors' release (paired with --arch "
                             "by position). Without one the model has random weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model constructor override for models built without a checkpoint of this project, "
                             "e.g. --set depth=2 --set rep_grid=[4,4] (repeatable)")


def add_image_args(parser: argparse.ArgumentParser, default: Sequence[str], size_default: Sequence[int]) -> None:
    parser.add_argument("--images", nargs="+", default=list(default),
                        help="bundled scikit-image photo names and/or image paths (default: %(default)s)")
    parser.add_argument("--image-size", nargs="+", type=int, default=list(size_default),
                        help="one number: short side (aspect kept, long side rounded to the patch size); "
                             "two numbers: H W (default: %(default)s)")


def model_specs(archs: Optional[Sequence[str]],
                checkpoints: Optional[Sequence[str]]) -> List[Tuple[Optional[str], Optional[str]]]:
    """Pair ``--arch`` and ``--checkpoint`` lists by position. A list of checkpoints without archs is
    allowed (each must be one of this project's files, which record their arch)."""
    archs = [a for a in (archs or []) if a]
    checkpoints = [c for c in (checkpoints or []) if c]
    if not archs and not checkpoints:
        raise ValueError("give at least one --arch or --checkpoint")
    if checkpoints and archs and len(archs) != len(checkpoints):
        raise ValueError(f"--arch lists {len(archs)} model(s) but --checkpoint lists {len(checkpoints)}; give one "
                         f"checkpoint per arch, or only checkpoints of this project (they record their arch)")
    if not checkpoints:
        return [(a, None) for a in archs]
    if not archs:
        return [(None, c) for c in checkpoints]
    return list(zip(archs, checkpoints))


def build_model(arch: Optional[str], checkpoint: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
                ) -> nn.Module:
    """A registry model in eval mode: random weights, this project's checkpoint (its recorded arch and
    ``model_config`` rebuild the exact model) or an authors' checkpoint (``arch`` required)."""
    overrides = dict(overrides or {})
    if checkpoint is None:
        if arch is None:
            raise ValueError("an --arch is needed for a model without --checkpoint")
        model = cbsa_core.create_model(arch, **overrides)
        return model.eval()
    ckpt = read_checkpoint(checkpoint)
    if checkpoint_kind(ckpt) == "cbsa":
        recorded = ckpt.get("arch")
        if arch is not None and recorded is not None and arch != recorded:
            raise CheckpointError(f"checkpoint {checkpoint} holds arch '{recorded}', but --arch is '{arch}'")
        config = recorded_model_config(ckpt.get("model_config") or {})
        num_classes = int(config.pop("num_classes", 1000))
        model = cbsa_core.create_model(recorded or arch, pretrained=checkpoint, num_classes=num_classes, **config)
    else:
        if arch is None:
            raise ValueError(f"checkpoint {checkpoint} has no arch record (an authors' file): give its --arch "
                             f"(e.g. Ours_small)")
        model = cbsa_core.create_model(arch, pretrained=checkpoint, **overrides)
    return model.eval()


def model_label(arch: Optional[str], checkpoint: Optional[str]) -> str:
    if checkpoint is None:
        return f"{arch} (random)"
    return f"{arch or 'model'}@{Path(checkpoint).name}"


def overlay(ax, rgb: np.ndarray, heat: Optional[np.ndarray], title: str = "", alpha: float = 0.6) -> None:
    """Draw ``heat`` (h, w), scaled to [0, 1] per map, over ``rgb`` (H, W, 3) stretched to the same extent."""
    height, width = rgb.shape[:2]
    ax.imshow(rgb, extent=(0, width, height, 0))
    if heat is not None:
        heat = np.asarray(heat, dtype=np.float64)
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        ax.imshow(heat, extent=(0, width, height, 0), cmap="inferno", alpha=alpha, interpolation="bilinear",
                  vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
