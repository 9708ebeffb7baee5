#!/usr/bin/env python
"""Zero-shot (emergent) segmentation from class-token attention maps (paper Tables 5 and 6, Appendix C).

Every layer's and head's [CLS] map (``attention_maps.class_token_maps``: AᵀA for CBSA, softmax for
MSSA/timm) is turned into three masks and scored by the Jaccard index (IoU) against a PASCAL-VOC-format
folder. The paper gives neither the thresholding nor the head selection; this script uses:

Thresholding (per map, on the patch grid, DINO's cumulative-mass rule):
    negative values are clipped to 0; sorting the patches by value, the foreground is the smallest set of
    highest-valued patches that holds more than ``--mass`` (default 0.6) of the map's total mass (exactly
    DINO: sort ascending, normalise, keep the patches whose cumulative mass exceeds 1 − mass). An all-zero
    map has no foreground. The grid mask is upsampled to the label's resolution by nearest neighbour
    (pixel centres), the background is its complement, and the boundary is the band
    ``dilate(fg, r) AND NOT erode(fg, r)`` with a 3×3 square element applied r = ``--boundary-radius``
    times (default 2, so about 2r = 4 pixels across a straight edge, like VOC's ~5-pixel void band). Pixels
    outside the image count as foreground for the erosion, so the image border is never a boundary.

Targets (VOC labels): 0 = background, 1..254 = foreground (any class), 255 = boundary / void band.
    foreground IoU = J(pred fg, label in 1..254) and background IoU = J(pred bg, label 0), both over the
    pixels not labelled 255 (VOC's ignore convention); boundary IoU = J(pred band, label 255) over all
    pixels. J(P, G) = |P ∧ G| / |P ∨ G|; an empty union gives NaN, skipped in the means.

Aggregation and head selection:
    every score is averaged over the images (per-image Jaccard, then the mean, as in DINO's VOC
    evaluation). Table 6 (per layer): for each layer the head with the highest mean foreground IoU; the
    table reports that head's three scores. Table 5 (best map): the (layer, head) with the highest mean
    foreground IoU over the whole dataset, with its three scores.

Data: ``--voc DIR`` with ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png`` (palette or grey
PNGs holding class indices); ``ImageSets/Segmentation/<split>.txt`` selects the ids when present
(``--split val``), otherwise every label PNG is used. Without ``--voc`` a small synthetic VOC folder with
known foregrounds (scikit-image photos pasted into the horse silhouette and other shapes over bundled
textures) is generated under ``--out/demo_voc`` so that the script runs on bundled data.

Outputs (``--out``): ``table5_best_map.csv``, ``table6_per_layer.csv``, ``per_layer.csv``,
``per_map.csv``, ``zero_shot_segmentation.json``, ``scores_<model>.npz`` (per-image scores, shape
(images, layers, heads, 3)), ``per_layer.png`` and ``examples_<model>.png``.

Example::

    python scripts/zero_shot_segmentation.py --arch Ours_small crate_cbt_small \\
        --checkpoint cbt_small_best.pth.tar crate_cbt_small.pth --voc VOCdevkit/VOC2012 --split val
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_model_args, build_model, load_rgb, model_label, model_specs, output_dir,  # noqa: E402
                     parse_overrides, plt, resize_rgb, run_script, script_parser, write_csv, write_json)
from attention_maps import class_token_maps, model_input  # noqa: E402

__all__ = ["TARGETS", "mass_threshold", "upsample_mask", "boundary_band", "jaccard", "score_masks", "voc_items",
           "read_labels", "write_voc_item", "make_demo_voc", "evaluate_dataset", "summarize", "main"]

TARGETS = ("foreground", "background", "boundary")
VOID = 255


# ---------------------------------------------------------------------------------------------------
# masks and scores
def mass_threshold(attn_map: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """(h, w) map -> bool (h, w): the top patches holding more than ``mass`` of the total (DINO's rule)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    values = np.clip(np.asarray(attn_map, dtype=np.float64), 0.0, None).ravel()
    total = values.sum()
    keep = np.zeros(values.shape, dtype=bool)
    if total <= 0:
        return keep.reshape(np.shape(attn_map))
    order = np.argsort(values, kind="stable")  # ascending
    cumulative = np.cumsum(values[order]) / total
    keep[order] = cumulative > 1.0 - mass
    return keep.reshape(np.shape(attn_map))


def upsample_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling by pixel centres: (h, w) -> (H, W)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def boundary_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """dilate(mask, r) AND NOT erode(mask, r), 3×3 square element applied r times; the outside of the
    image counts as foreground for the erosion so that the image border is not a boundary."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return np.zeros_like(mask)
    square = np.ones((3, 3), dtype=bool)
    dilated = ndimage.binary_dilation(mask, structure=square, iterations=radius)
    eroded = ndimage.binary_erosion(mask, structure=square, iterations=radius, border_value=1)
    return dilated & ~eroded


def jaccard(pred: np.ndarray, target: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """|P ∧ G| / |P ∨ G| over the ``valid`` pixels (all when None); NaN when the union is empty."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if valid is not None:
        pred, target = pred & valid, target & valid
    union = np.count_nonzero(pred | target)
    if union == 0:
        return float("nan")
    return np.count_nonzero(pred & target) / union


def score_masks(fg_pixels: np.ndarray, labels: np.ndarray, radius: int) -> Tuple[float, float, float]:
    """Foreground, background and boundary IoU of a pixel-level foreground prediction against VOC labels."""
    if fg_pixels.shape != labels.shape:
        raise ValueError(f"prediction {fg_pixels.shape} and labels {labels.shape} differ in size")
    void = labels == VOID
    valid = ~void
    fg_iou = jaccard(fg_pixels, (labels > 0) & valid, valid)
    bg_iou = jaccard(~fg_pixels, labels == 0, valid)
    boundary_iou = jaccard(boundary_band(fg_pixels, radius), void)
    return fg_iou, bg_iou, boundary_iou


# ---------------------------------------------------------------------------------------------------
# VOC-format folders
def voc_palette() -> List[int]:
    """The standard PASCAL VOC colour map (bit-interleaved class index), 256 RGB triplets."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_labels(path: Path) -> np.ndarray:
    """Class-index label image (palette 'P' or greyscale 'L' PNG) -> (H, W) uint8."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"label file {path} has mode {im.mode}; VOC labels are palette (P) or grey (L) PNGs "
                             f"holding class indices")
        return np.array(im, dtype=np.uint8)


def voc_items(root: str | Path, split: Optional[str] = "val",
              limit: Optional[int] = None) -> List[Tuple[str, Path, Path]]:
    """(id, image path, label path) of a VOC-format folder."""
    root = Path(root)
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder {root} lacks {folder.name}/ "
                                    f"(expected JPEGImages/ and SegmentationClass/)")
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt" if split else None
    if split_file is not None and split_file.exists():
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in labels.glob("*.png"))
    if not ids:
        raise FileNotFoundError(f"no label PNGs in {labels}")
    items = []
    for i in ids[:limit] if limit else ids:
        label = labels / f"{i}.png"
        candidates = [images / f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png")]
        image = next((c for c in candidates if c.exists()), None)
        if image is None:
            raise FileNotFoundError(f"VOC item {i!r}: no image {candidates[0]}")
        if not label.exists():
            raise FileNotFoundError(f"VOC item {i!r}: no label {label}")
        items.append((i, image, label))
    return items


def write_voc_item(root: str | Path, name: str, rgb: np.ndarray, labels: np.ndarray) -> None:
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
    label_image = Image.fromarray(labels.astype(np.uint8), mode="P")
    label_image.putpalette(voc_palette())
    label_image.save(root / "SegmentationClass" / f"{name}.png")


def make_demo_voc(root: str | Path, size: Tuple[int, int] = (240, 320), radius: int = 2) -> Path:
    """A small VOC-format folder with known foregrounds, from scikit-image's bundled data only.

    Each image pastes a photo crop into a shape (the ``horse`` silhouette, an ellipse, a rectangle) over a
    tinted texture; the labels are the class index inside the shape, 0 outside and 255 on the
    ``boundary_band(shape, radius)`` band, as VOC marks object outlines.
    """
    import skimage.data

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    horse = ~skimage.data.horse()  # the silhouette is False in the sample
    horse = Image.fromarray(horse.astype(np.uint8) * 255).resize((int(w * 0.7), int(h * 0.7)), Image.NEAREST)
    horse = np.asarray(horse) > 127
    pad_h, pad_w = h - horse.shape[0], w - horse.shape[1]
    shapes = {
        "horse": np.pad(horse, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))),
        "ellipse": ((yy - h * 0.55) / (h * 0.3)) ** 2 + ((xx - w * 0.45) / (w * 0.25)) ** 2 <= 1.0,
        "rectangle": (yy >= h // 4) & (yy < 3 * h // 4) & (xx >= w // 3) & (xx < 5 * w // 6),
    }
    plan = [("horse", "chelsea", "grass", (0.5, 0.8, 0.4), 13), ("ellipse", "coffee", "gravel", (0.6, 0.6, 0.9), 5),
            ("rectangle", "astronaut", "brick", (0.9, 0.7, 0.5), 15),
            ("horse", "rocket", "gravel", (0.8, 0.8, 0.8), 13),
            ("ellipse", "chelsea", "brick", (0.5, 0.6, 0.7), 8), ("rectangle", "coffee", "grass", (0.4, 0.7, 0.4), 11)]
    root = Path(root)
    for k, (shape, photo, texture, tint, cls) in enumerate(plan):
        mask = shapes[shape]
        fg = resize_rgb(load_rgb(photo), size).astype(np.float64)
        bg = resize_rgb(load_rgb(texture), size).astype(np.float64) * np.asarray(tint)
        rgb = np.where(mask[..., None], fg, bg).clip(0, 255).astype(np.uint8)
        labels = np.where(mask, cls, 0).astype(np.uint8)
        labels[boundary_band(mask, radius)] = VOID
        write_voc_item(root, f"demo_{k:02d}", rgb, labels)
    return root


# ---------------------------------------------------------------------------------------------------
# evaluation
MapFn = Callable[[np.ndarray], np.ndarray]  # RGB (H, W, 3) -> maps (L, heads, h, w)


def evaluate_dataset(items: Sequence[Tuple[str, Path, Path]], map_fn: MapFn, mass: float, radius: int) -> np.ndarray:
    """Scores (images, layers, heads, 3) in the order of :data:`TARGETS`."""
    scores = []
    for name, image_path, label_path in items:
        labels = read_labels(label_path)
        rgb = load_rgb(str(image_path))
        if rgb.shape[:2] != labels.shape:
            raise ValueError(f"{name}: image {rgb.shape[:2]} and label {labels.shape} sizes differ")
        maps = map_fn(rgb)
        per = np.empty(maps.shape[:2] + (3,), dtype=np.float64)
        for li in range(maps.shape[0]):
            for hi in range(maps.shape[1]):
                fg = upsample_mask(mass_threshold(maps[li, hi], mass), labels.shape)
                per[li, hi] = score_masks(fg, labels, radius)
        scores.append(per)
    return np.stack(scores)


def summarize(scores: np.ndarray) -> Dict[str, Any]:
    """Per-map means, the per-layer table (best head by foreground IoU) and the best map."""
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(scores, axis=0) if scores.shape[0] else np.full(scores.shape[1:], np.nan)  # (L, H, 3)
    fg = np.where(np.isnan(mean[..., 0]), -np.inf, mean[..., 0])
    best_heads = fg.argmax(axis=1)
    per_layer = [dict(layer=li + 1, head=int(hi) + 1, **{t: mean[li, hi, k] for k, t in enumerate(TARGETS)})
                 for li, hi in enumerate(best_heads)]
    li, hi = np.unravel_index(int(fg.argmax()), fg.shape)
    best = dict(layer=int(li) + 1, head=int(hi) + 1, **{t: mean[li, hi, k] for k, t in enumerate(TARGETS)})
    per_map = [dict(layer=l + 1, head=h + 1, **{t: mean[l, h, k] for k, t in enumerate(TARGETS)})
               for l in range(mean.shape[0]) for h in range(mean.shape[1])]
    return dict(mean=mean, per_map=per_map, per_layer=per_layer, best_map=best)


def plot_examples(items, map_fn: MapFn, best: Dict[str, Any], mass: float, radius: int, path: Path, title: str,
                  count: int = 4) -> None:
    pyplot = plt()
    items = list(items)[:count]
    fig, axes = pyplot.subplots(len(items), 4, figsize=(9, 2.2 * len(items)), squeeze=False)
    for row, (name, image_path, label_path) in zip(axes, items):
        rgb, labels = load_rgb(str(image_path)), read_labels(label_path)
        amap = map_fn(rgb)[best["layer"] - 1, best["head"] - 1]
        fg = upsample_mask(mass_threshold(amap, mass), labels.shape)
        pred = np.where(fg, 1, 0).astype(np.uint8)
        pred[boundary_band(fg, radius)] = 2
        gt = np.where(labels == VOID, 2, (labels > 0).astype(np.uint8))
        row[0].imshow(rgb)
        row[0].set_title(name, fontsize=8)
        row[1].imshow(amap, cmap="inferno")
        row[1].set_title(f"[CLS] map L{best['layer']} h{best['head']}", fontsize=8)
        row[2].imshow(pred, cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
        row[2].set_title("prediction: bg / fg / boundary", fontsize=8)
        row[3].imshow(gt, cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
        row[3].set_title("ground truth", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def plot_per_layer(tables: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(12, 3.2))
    for label, rows in tables.items():
        layers = [r["layer"] for r in rows]
        for ax, target in zip(axes, TARGETS):
            ax.plot(layers, [r[target] for r in rows], marker="o", label=label)
    for ax, target in zip(axes, TARGETS):
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{target} IoU (best head)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_args(parser, multiple=True)
    parser.add_argument("--voc", default=None, help="VOC-format folder (default: a synthetic one under --out/demo_voc)")
    parser.add_argument("--split", default="val",
                        help="ImageSets/Segmentation/<split>.txt, if present (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--image-size", nargs="+", type=int, default=[448],
                        help="model input: short side (aspect kept) or H W (default: %(default)s)")
    parser.add_argument("--mass", type=float, default=0.6,
                        help="attention mass kept as foreground (default: %(default)s)")
    parser.add_argument("--boundary-radius", type=int, default=2,
                        help="dilation/erosion steps of the predicted boundary band, in label pixels "
                             "(default: %(default)s)")
    parser.add_argument("--out", default="runs/zero_shot_segmentation", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.arch and not args.checkpoint:
        args.arch = ["cbt_small"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = output_dir(args.out)
    voc = args.voc or make_demo_voc(out / "demo_voc", radius=args.boundary_radius)
    items = voc_items(voc, args.split, args.limit)
    overrides = parse_overrides(args.overrides)

    results: Dict[str, Any] = {}
    table5, table6, long_rows, map_rows = [], [], [], []
    for arch, checkpoint in model_specs(args.arch, args.checkpoint):
        model = build_model(arch, checkpoint, overrides)
        label = model_label(arch or model.arch, checkpoint)

        def map_fn(rgb: np.ndarray, model=model) -> np.ndarray:
            img, _ = model_input(model, rgb, args.image_size)
            return class_token_maps(model, img)["maps"][0].numpy()

        scores = evaluate_dataset(items, map_fn, args.mass, args.boundary_radius)
        summary = summarize(scores)
        slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace("@", "_").replace("/", "_")
        np.savez_compressed(out / f"scores_{slug}.npz", scores=scores, images=np.array([i[0] for i in items]),
                            targets=np.array(TARGETS))
        plot_examples(items, map_fn, summary["best_map"], args.mass, args.boundary_radius, out / f"examples_{slug}.png",
                      f"{label}: best map L{summary['best_map']['layer']} h{summary['best_map']['head']}")
        results[label] = dict(per_layer=summary["per_layer"], best_map=summary["best_map"], per_map=summary["per_map"],
                              scores_file=f"scores_{slug}.npz")
        table6.append(dict(model=label, **{f"L{r['layer']}": r["foreground"] for r in summary["per_layer"]}))
        long_rows += [dict(model=label, **r) for r in summary["per_layer"]]
        map_rows += [dict(model=label, **r) for r in summary["per_map"]]
        b = summary["best_map"]
        print(f"{label}: best map L{b['layer']} h{b['head']}: fg {b['foreground']:.3f}, bg {b['background']:.3f}, "
              f"boundary {b['boundary']:.3f} over {len(items)} images")

    for k, target in enumerate(TARGETS):
        table5.append(dict(target=target.capitalize(), **{lbl: r["best_map"][target] for lbl, r in results.items()}))
    table5.append(dict(target="(layer, head)", **{lbl: f"L{r['best_map']['layer']} h{r['best_map']['head']}"
                                                   for lbl, r in results.items()}))
    write_csv(out / "table5_best_map.csv", table5)
    layer_fields = ["model"] + sorted({k for row in table6 for k in row if k != "model"}, key=lambda s: int(s[1:]))
    write_csv(out / "table6_per_layer.csv", table6, layer_fields)
    write_csv(out / "per_layer.csv", long_rows)
    write_csv(out / "per_map.csv", map_rows)
    plot_per_layer({lbl: r["per_layer"] for lbl, r in results.items()}, out / "per_layer.png")
    config = dict(voc=str(voc), split=args.split, images=len(items), image_size=args.image_size, mass=args.mass,
                  boundary_radius=args.boundary_radius,
                  head_selection="per layer: head with the highest mean foreground IoU; best map: (layer, head) "
                                 "with the highest mean foreground IoU")
    write_json(out / "zero_shot_segmentation.json", dict(config=config, models=results))
    return dict(out=out, voc=Path(voc), items=items, results=results)


if __name__ == "__main__":
    sys.exit(run_script(main))
