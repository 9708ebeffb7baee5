"""ADE20K transforms with mmseg 0.14.1 semantics (docs/authors-release.md §4.2), on mmcv-lite image ops.

Images are BGR uint8 (H, W, 3) as ``mmcv.imread`` returns them; label maps are uint8 (H, W) with 255 =
ignore. Randomness comes from an explicit ``numpy.random.Generator`` so every worker and every resumed run
is reproducible. The training pipeline is, in order:

    1. RandomRescale: ratio r ~ U[0.5, 2.0], keep-ratio rescale to fit (2048·r, 512·r) (image bilinear, label nearest)
    2. RandomCrop(crop, cat_max_ratio=0.75): up to 10 re-draws until no class covers ≥ 75 % of the valid pixels
    3. RandomFlip(p=0.5), horizontal
    4. PhotoMetricDistortion: brightness ±32, contrast [0.5, 1.5], saturation [0.5, 1.5], hue ±18, each p = 0.5
    5. Normalize (BGR -> RGB, per-backbone mean/std)
    6. Pad to crop×crop (image 0, label 255)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import mmcv
import numpy as np
import torch

__all__ = ["NORMALIZATION", "IGNORE_INDEX", "reduce_zero_label", "random_rescale", "random_crop", "random_flip",
           "photometric_distortion", "normalize", "pad_to", "TrainTransform", "eval_scale", "rescale_for_test",
           "to_tensor"]

IGNORE_INDEX = 255

# Segmenter's STATS × 255 (segm/data/utils.py): "vit" for the augreg ViTs, "deit" for ImageNet statistics.
NORMALIZATION: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "vit": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    "deit": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K labels: 0 ("other") -> 255 (ignored), k -> k - 1, 255 stays 255 (mmseg's ``reduce_zero_label``)."""
    out = label.astype(np.uint8, copy=True)
    out[out == 0] = 255
    out = out - 1  # uint8: 255 -> 254
    out[out == 254] = IGNORE_INDEX
    return out


def random_rescale(img: np.ndarray, label: np.ndarray, img_scale: Tuple[int, int],
                   ratio_range: Tuple[float, float], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``: scale = (int(W·r), int(H·r))."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    img = mmcv.imrescale(img, scale, interpolation="bilinear")
    label = mmcv.imrescale(label, scale, interpolation="nearest")
    return img, label


def _crop_bbox(shape: Tuple[int, int], crop: Tuple[int, int], rng: np.random.Generator) -> Tuple[int, int, int, int]:
    margin_h, margin_w = max(shape[0] - crop[0], 0), max(shape[1] - crop[1], 0)
    y = int(rng.integers(0, margin_h + 1))
    x = int(rng.integers(0, margin_w + 1))
    return y, y + crop[0], x, x + crop[1]


def random_crop(img: np.ndarray, label: np.ndarray, crop: Tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a window of at most ``crop`` (smaller images stay whole, padding comes later).

    With ``cat_max_ratio < 1`` a window is re-drawn up to 10 times until it holds at least two valid classes
    and none covers ``cat_max_ratio`` of the valid pixels; as in mmseg, after 10 failures the 11th draw is kept.
    """
    bbox = _crop_bbox(label.shape[:2], crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = bbox
            labels, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            bbox = _crop_bbox(label.shape[:2], crop, rng)
    y1, y2, x1, x2 = bbox
    return img[y1:y2, x1:x2, ...], label[y1:y2, x1:x2]


def random_flip(img: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                prob: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    if rng.random() < prob:
        return mmcv.imflip(img, "horizontal"), mmcv.imflip(label, "horizontal")
    return img, label


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on a BGR uint8 image, in its order: brightness; contrast first or last
    (a coin flip); saturation; hue. Each distortion applies with probability 0.5."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0

    def contrast(im: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _convert(im, alpha=rng.uniform(*contrast_range))
        return im

    if not contrast_last:
        img = contrast(img)
    if rng.integers(2):
        hsv = mmcv.bgr2hsv(img)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        img = mmcv.hsv2bgr(hsv)
    if rng.integers(2):
        hsv = mmcv.bgr2hsv(img)
        # numpy's randint(-18, 18) excludes 18, as in mmseg
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = mmcv.hsv2bgr(hsv)
    if contrast_last:
        img = contrast(img)
    return img


def normalize(img: np.ndarray, normalization: str) -> np.ndarray:
    """BGR uint8 -> RGB float32 (x - mean) / std with the backbone's statistics."""
    if normalization not in NORMALIZATION:
        raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[normalization]
    return mmcv.imnormalize(img, np.array(mean, np.float32), np.array(std, np.float32), to_rgb=True)


def pad_to(img: np.ndarray, label: Optional[np.ndarray], size: Tuple[int, int]):
    """Pad bottom/right to at least ``size`` = (h, w): image with 0, label with 255."""
    h, w = img.shape[:2]
    shape = (max(h, size[0]), max(w, size[1]))
    if shape != (h, w):
        img = mmcv.impad(img, shape=shape, pad_val=0)
        if label is not None:
            label = mmcv.impad(label, shape=shape, pad_val=IGNORE_INDEX)
    return img, label


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float32 -> (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class TrainTransform:
    """The training pipeline above: ``(img BGR uint8, label uint8, rng) -> (image (3, c, c), label (c, c) int64)``.

    ``im_size`` is the short side of the base scale; the long side is ``4 · im_size`` (ADE20K: (2048, 512)).
    """

    def __init__(self, crop_size: int = 512, im_size: int = 512, normalization: str = "vit",
                 ratio_range: Tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75) -> None:
        if normalization not in NORMALIZATION:
            raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATION)}")
        self.crop = (int(crop_size), int(crop_size))
        self.img_scale = (4 * int(im_size), int(im_size))
        self.normalization = normalization
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, img: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        img, label = random_rescale(img, label, self.img_scale, self.ratio_range, rng)
        img, label = random_crop(img, label, self.crop, rng, self.cat_max_ratio)
        img, label = random_flip(img, label, rng)
        img = photometric_distortion(img, rng)
        img, label = pad_to(normalize(img, self.normalization), label, self.crop)
        return to_tensor(img), torch.from_numpy(label.astype(np.int64))


def eval_scale(im_size: int, ratio: float = 1.0) -> Tuple[int, int]:
    """mmseg ``MultiScaleFlipAug`` scale for one ratio: (int(4·im_size·r), int(im_size·r))."""
    return int(4 * im_size * ratio), int(im_size * ratio)


def rescale_for_test(img: np.ndarray, im_size: int, ratios: Sequence[float], flip: bool,
                     normalization: str) -> Tuple[List[torch.Tensor], List[bool]]:
    """Evaluation variants of one BGR image: keep-ratio rescale to each ratio's scale (short side
    ``im_size·r``, long side ≤ ``4·im_size·r``), normalise, and, with ``flip``, a flipped copy of each.

    Returns the (3, h, w) tensors and whether each was flipped.
    """
    images, flips = [], []
    for r in ratios:
        scaled = normalize(mmcv.imrescale(img, eval_scale(im_size, r), interpolation="bilinear"), normalization)
        for f in ([False, True] if flip else [False]):
            images.append(to_tensor(mmcv.imflip(scaled, "horizontal") if f else scaled))
            flips.append(f)
    return images, flips
