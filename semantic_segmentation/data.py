"""Segmentation datasets: ADE20K as distributed, and a generic folder of images plus a folder of label PNGs.

ADE20K layout (``prepare_ade20k`` / the official zip), found under ``--data-root`` or ``$DATASET``::

    ROOT[/ade20k]/ADEChallengeData2016/images/{training,validation}/*.jpg
    ROOT[/ade20k]/ADEChallengeData2016/annotations/{training,validation}/*.png   0 = other, 1..150 = classes

Its labels go through ``reduce_zero_label`` (0 -> 255 ignored, k -> k - 1). The generic ``folder`` dataset has
the same split layout without the ``ADEChallengeData2016`` level (``ROOT/images/<split>``,
``ROOT/annotations/<split>``) and takes its labels as they are (0..n_cls-1, 255 = ignore).

Items:
    train mode: ``(image (3, crop, crop) float32, label (crop, crop) int64)`` through :class:`TrainTransform`;
    eval mode:  ``dict(images=[(3, h, w), ...], flips=[bool, ...], label=(H0, W0) int64, name=str)``, the
                test-time variants of one image and its label at the original resolution.

Augmentation randomness depends only on ``(seed, epoch, index)`` (call :meth:`set_epoch` before each epoch), so
runs are reproducible for any number of workers or ranks and a resume needs no sampler state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mmcv
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cbsa_core.data.imagefolder import DatasetError

from .transforms import IGNORE_INDEX, NORMALIZATION, TrainTransform, reduce_zero_label, rescale_for_test

__all__ = ["DatasetError", "SegmentationFolder", "ADE20K", "ADE20K_CLASSES", "DATASET_DEFAULTS", "build_dataset",
           "find_ade20k_root", "resolve_data_root", "eval_collate"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# config.yml `dataset.*` of the release (docs/authors-release.md §4.4).
DATASET_DEFAULTS: Dict[str, Dict[str, object]] = {
    "ade20k": dict(epochs=64, eval_freq=2, batch_size=8, learning_rate=1e-3, im_size=512, crop_size=512,
                   window_size=512, window_stride=512, n_cls=150),
    "folder": dict(epochs=64, eval_freq=2, batch_size=8, learning_rate=1e-3, im_size=512, crop_size=512,
                   window_size=512, window_stride=512, n_cls=None),
}

SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)


def _list_files(folder: Path, extensions: Sequence[str]) -> Dict[str, Path]:
    """Files of ``folder`` with one of ``extensions``, by stem; two files sharing a stem are refused (a label
    pairs with its image by stem, so ``a.jpg`` and ``a.png`` would be ambiguous)."""
    files: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() in extensions):
            continue
        if p.stem in files:
            raise DatasetError(f"{files[p.stem]} and {p} share the name {p.stem!r}; images and labels are paired "
                               "by file name without extension, so keep only one of them")
        files[p.stem] = p
    return files


class SegmentationFolder(Dataset):
    """Images in ``image_dir`` paired by file stem with label PNGs in ``label_dir``.

    Args:
        n_cls: number of classes; label values must be < n_cls or 255 (after ``reduce_zero_label``).
        mode: ``"train"`` (random augmentation) or ``"eval"`` (test-time variants, labels at full size).
        reduce_zero_label: ADE20K's 0 -> 255, k -> k - 1.
        crop_size, im_size, normalization: pipeline settings (see :mod:`semantic_segmentation.transforms`).
        test_ratios, test_flip: evaluation variants (single scale: ``(1.0,)``, no flip).
        seed: base of the per-sample augmentation seed.
    """

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, *, n_cls: int,
                 mode: str = "train", reduce_zero_label: bool = False, crop_size: int = 512, im_size: int = 512,
                 normalization: str = "vit", test_ratios: Sequence[float] = (1.0,), test_flip: bool = False,
                 seed: int = 0, class_names: Optional[Sequence[str]] = None) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if normalization not in NORMALIZATION:
            raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATION)}")
        if not 1 <= int(n_cls) <= IGNORE_INDEX:
            raise ValueError(f"n_cls must lie in [1, {IGNORE_INDEX}], got {n_cls}")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for what, folder in (("image", self.image_dir), ("label", self.label_dir)):
            if not folder.is_dir():
                raise DatasetError(f"{what} folder not found: {folder}")
        images = _list_files(self.image_dir, IMAGE_EXTENSIONS)
        labels = _list_files(self.label_dir, (".png",))
        if not images:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        if set(images) != set(labels):
            no_label = sorted(set(images) - set(labels))[:5]
            no_image = sorted(set(labels) - set(images))[:5]
            raise DatasetError(
                f"{self.image_dir} holds {len(images)} images but {self.label_dir} holds {len(labels)} label PNGs "
                f"with other names: images without a label {no_label}, labels without an image {no_image}")
        self.samples: List[Tuple[Path, Path]] = [(images[k], labels[k]) for k in sorted(images)]
        self.n_cls = int(n_cls)
        self.mode = mode
        self.reduce_zero_label = reduce_zero_label
        self.im_size = int(im_size)
        self.normalization = normalization
        self.test_ratios = tuple(float(r) for r in test_ratios)
        self.test_flip = bool(test_flip)
        self.seed = int(seed)
        self.epoch = 0
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(n_cls))
        self.train_transform = TrainTransform(crop_size, im_size, normalization) if mode == "train" else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------------
    def load_label(self, index: int) -> np.ndarray:
        """The label map of sample ``index`` (uint8, after ``reduce_zero_label``), checked for bad values."""
        path = self.samples[index][1]
        try:
            label = mmcv.imread(str(path), flag="unchanged", backend="pillow")
        except Exception as e:  # PIL raises several types for broken files
            raise DatasetError(f"cannot read label {path}: {e}") from e
        if label is None or label.ndim != 2:
            raise DatasetError(f"label {path} must be a single-channel (grey or palette) PNG, got shape "
                               f"{None if label is None else label.shape}")
        if label.dtype != np.uint8:
            if label.max() > 255:
                raise DatasetError(f"label {path} holds values up to {label.max()}; labels must fit in uint8")
            label = label.astype(np.uint8)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        bad = np.unique(label[(label >= self.n_cls) & (label != IGNORE_INDEX)])
        if bad.size:
            raise DatasetError(f"label {path} has values {bad[:10].tolist()} >= n_cls={self.n_cls} that are not "
                               f"the ignore index {IGNORE_INDEX}"
                               + (" (after reduce_zero_label)" if self.reduce_zero_label else ""))
        return label

    def load_image(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        try:
            img = mmcv.imread(str(path), flag="color")  # BGR uint8, as mmseg's LoadImageFromFile
        except Exception as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        if img is None:
            raise DatasetError(f"cannot read image {path}")
        return img

    def load_pair(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        img, label = self.load_image(index), self.load_label(index)
        if img.shape[:2] != label.shape:
            img_path, label_path = self.samples[index]
            raise DatasetError(f"image {img_path} is {img.shape[1]}x{img.shape[0]} but its label {label_path} is "
                               f"{label.shape[1]}x{label.shape[0]}")
        return img, label

    def verify(self, check_values: bool = True) -> None:
        """Check every pair up front: sizes (from the file headers) and, with ``check_values``, label values."""
        for i, (img_path, label_path) in enumerate(self.samples):
            with Image.open(img_path) as a, Image.open(label_path) as b:
                if a.size != b.size:
                    raise DatasetError(f"image {img_path} is {a.size[0]}x{a.size[1]} but its label {label_path} "
                                       f"is {b.size[0]}x{b.size[1]}")
            if check_values:
                self.load_label(i)

    def check_labels(self, indices: Optional[Iterable[int]] = None) -> None:
        """Read the label maps of ``indices`` (all by default) and check their values, without decoding the
        images: training reads its validation labels this way up front, instead of meeting a bad one at the first
        evaluation, after a whole training epoch."""
        for i in range(len(self)) if indices is None else indices:
            self.load_label(int(i))

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int):
        img, label = self.load_pair(index)
        if self.mode == "train":
            return self.train_transform(img, label, self.rng(index))
        images, flips = rescale_for_test(img, self.im_size, self.test_ratios, self.test_flip, self.normalization)
        return dict(images=images, flips=flips, label=torch.from_numpy(label.astype(np.int64)),
                    name=self.samples[index][0].stem)


def resolve_data_root(root: Optional[str | os.PathLike]) -> Path:
    """``root`` or, when unset, ``$DATASET`` (Segmenter's convention); it must be an existing folder."""
    root = root or os.environ.get("DATASET")
    if not root:
        raise DatasetError("no dataset root: pass --data-root or set the DATASET environment variable "
                           "(ADE20K is looked for in ROOT/ADEChallengeData2016 or ROOT/ade20k/ADEChallengeData2016)")
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"dataset root not found: {path} (from --data-root or $DATASET)")
    return path


def find_ade20k_root(root: str | os.PathLike) -> Path:
    """``ADEChallengeData2016`` under ``root``, ``root/ade20k`` or ``root`` itself (Segmenter: ``$DATASET/ade20k``)."""
    root = Path(root)
    candidates = [root / "ADEChallengeData2016", root / "ade20k" / "ADEChallengeData2016", root]
    for c in candidates:
        if (c / "images").is_dir() and (c / "annotations").is_dir():
            return c
    raise DatasetError(
        f"ADE20K not found under {root}: expected ADEChallengeData2016/images and ADEChallengeData2016/annotations "
        f"in one of: {', '.join(str(c) for c in candidates)}")


def _split_dirs(base: Path, split: str) -> Tuple[Path, Path]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    sub = SPLITS[split]
    image_dir, label_dir = base / "images" / sub, base / "annotations" / sub
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(f"split folder not found: {folder}")
    return image_dir, label_dir


class ADE20K(SegmentationFolder):
    """ADE20K (ADEChallengeData2016), 150 classes, ``reduce_zero_label``."""

    def __init__(self, root: str | os.PathLike, split: str = "train", **kwargs) -> None:
        kwargs.setdefault("n_cls", 150)
        base = find_ade20k_root(root)
        image_dir, label_dir = _split_dirs(base, split)
        super().__init__(image_dir, label_dir, reduce_zero_label=True,
                         class_names=ADE20K_CLASSES if kwargs["n_cls"] == 150 else None, **kwargs)


def build_dataset(name: str, root: str | os.PathLike, split: str, *, mode: Optional[str] = None,
                  n_cls: Optional[int] = None, reduce_zero_label: Optional[bool] = None,
                  **kwargs) -> SegmentationFolder:
    """``ade20k`` or ``folder`` dataset for a split (``train``/``val``); ``mode`` defaults to train for the
    training split and eval otherwise. Other keyword arguments go to :class:`SegmentationFolder`."""
    mode = mode or ("train" if SPLITS.get(split) == "training" else "eval")
    if name == "ade20k":
        return ADE20K(root, split, mode=mode, n_cls=n_cls or 150, **kwargs)
    if name == "folder":
        if not n_cls:
            raise ValueError("the 'folder' dataset needs the number of classes (--n-cls)")
        image_dir, label_dir = _split_dirs(Path(root), split)
        return SegmentationFolder(image_dir, label_dir, n_cls=n_cls, mode=mode,
                                  reduce_zero_label=bool(reduce_zero_label), **kwargs)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_DEFAULTS)}")


def eval_collate(batch):
    """Evaluation loaders use batch size 1 (images differ in size): unwrap the single item."""
    if len(batch) != 1:
        raise ValueError("evaluation loaders must use batch_size=1")
    return batch[0]
