"""Datasets of the classification track: ImageNet-style folders, the bundled digits, and the transfer sets.

All three kinds yield ``(image tensor (3, S, S), class index)`` and go through the same loaders, loop and
checkpointing in :mod:`image_classification.main`.

* ``imagefolder``: ``<data>/train/<class>/*`` and ``<data>/val/<class>/*`` (docs/authors-release.md §1.1.4), read by
  :func:`cbsa_core.data.imagefolder.build_imagefolder`. Unreadable images follow ``--bad-images``:
  ``fail`` (default) stops with the file's path; ``skip`` substitutes the next readable image and counts it.
* ``digits``: scikit-learn's 1,797 bundled 8×8 handwritten digits, bilinearly upsampled to ``input_size``
  (32 in ``configs/classification/digits.yaml``), grey replicated to RGB, split 80/20 with a fixed seed.
* ``cifar10``, ``cifar100``, ``flowers102``, ``pets``: torchvision's dataset classes on local files, never
  downloaded (paper Table 3 transfer rows). Flowers-102 trains on its train+val splits and is evaluated on test;
  Oxford-IIIT Pets trains on trainval; CIFAR uses its train/test split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import transforms as T

from cbsa_core.data.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, build_imagefolder,
                                        classification_transforms)

__all__ = [
    "DATASETS",
    "TRANSFER_DATASETS",
    "DIGITS_SPLIT_SEED",
    "DatasetError",
    "DigitsDataset",
    "DatasetBundle",
    "digits_arrays",
    "transfer_transforms",
    "build_datasets",
]

TRANSFER_DATASETS = ("cifar10", "cifar100", "flowers102", "pets")
DATASETS = ("imagefolder", "digits") + TRANSFER_DATASETS

# The digits split must not depend on --seed: a different seed would otherwise change the validation set.
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8


@dataclass
class DatasetBundle:
    """What the training script needs from a dataset: both splits, the class count and a printable name."""

    train: Dataset
    val: Dataset
    num_classes: int
    description: str


# ------------------------------------------------------------------------------------------------------- digits
def digits_arrays(size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(uint8 images (N, size, size, 3), int64 labels (N,))``.

    The 8×8 images hold values 0..16; they are scaled to [0, 1], bilinearly upsampled (``align_corners=False``),
    replicated to three channels and quantised to uint8 so that the usual ToTensor/Normalize path applies.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing downloads

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
    return x.numpy(), digits.target.astype(np.int64)


def digits_split(n: int, seed: int = DIGITS_SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed 80/20 split of ``range(n)``: ``(train_indices, val_indices)``, each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(DIGITS_TRAIN_FRACTION * n))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


class DigitsDataset(Dataset):
    """One split of the upsampled digits; items are ``(transform(PIL RGB image), label)``."""

    def __init__(self, split: str, size: int = 32, transform: Optional[Callable] = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"DigitsDataset: split must be 'train' or 'val', got {split!r}")
        images, labels = digits_arrays(size)
        train_idx, val_idx = digits_split(len(labels))
        idx = train_idx if split == "train" else val_idx
        self.images, self.targets = images[idx], labels[idx]
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])  # (S, S, 3) uint8 -> RGB
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


# ---------------------------------------------------------------------------------------------------- transfer
def transfer_transforms(input_size: int, eval_resize: int, mean: Sequence[float], std: Sequence[float],
                        randaugment: Optional[Sequence[int]] = None) -> Tuple[Callable, Callable]:
    """CRATE's fine-tuning augmentation: RandomResizedCrop + flip (+ RandAugment(n, m)); Resize + CenterCrop."""
    normalize = T.Normalize(mean=list(mean), std=list(std))
    train_ops: list = [T.RandomResizedCrop(input_size), T.RandomHorizontalFlip()]
    if randaugment:
        n, m = (int(v) for v in randaugment)
        train_ops.append(T.RandAugment(num_ops=n, magnitude=m))
    train_tf = T.Compose(train_ops + [T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(eval_resize), T.CenterCrop(input_size), T.ToTensor(), normalize])
    return train_tf, eval_tf


# Where torchvision expects each set under --data (the error message names it).
_TRANSFER_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                     "flowers102": "flowers-102", "pets": "oxford-iiit-pet"}


def _build_transfer(name: str, root: Path, train_tf: Callable, eval_tf: Callable) -> DatasetBundle:
    from torchvision import datasets as tvd

    if not root.is_dir():
        raise DatasetError(f"--data {root} is not a directory; {name} is read from {root / _TRANSFER_FOLDERS[name]}"
                           f" (nothing is downloaded: place the torchvision-format files there)")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            train = cls(root, train=True, transform=train_tf, download=False)
            val = cls(root, train=False, transform=eval_tf, download=False)
            num_classes = len(train.classes)
        elif name == "flowers102":
            # The usual transfer protocol: fit on train+val (2 x 1,020 images), report on test (6,149).
            train = ConcatDataset([tvd.Flowers102(root, split=s, transform=train_tf, download=False)
                                   for s in ("train", "val")])
            val = tvd.Flowers102(root, split="test", transform=eval_tf, download=False)
            num_classes = 102
        else:
            train = tvd.OxfordIIITPet(root, split="trainval", target_types="category", transform=train_tf,
                                      download=False)
            val = tvd.OxfordIIITPet(root, split="test", target_types="category", transform=eval_tf,
                                    download=False)
            num_classes = 37
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetError(
            f"{name} not found or incomplete under --data {root}: expected torchvision's files in "
            f"{root / _TRANSFER_FOLDERS[name]} (nothing is downloaded; original error: {e})") from e
    except (OSError, ValueError) as e:  # unreadable split lists / label files
        raise DatasetError(f"cannot read {name} from {root / _TRANSFER_FOLDERS[name]}: {type(e).__name__}: {e}") from e
    if len(train) == 0 or len(val) == 0:
        raise DatasetError(f"{name} under {root / _TRANSFER_FOLDERS[name]} has an empty split "
                           f"(train {len(train)}, eval {len(val)} images)")
    return DatasetBundle(train, val, num_classes, f"{name} ({root})")


# ------------------------------------------------------------------------------------------------------- factory
def build_datasets(dataset: str, data: str | os.PathLike, *, input_size: int = 224, eval_resize: int = 256,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   randaugment: Optional[Sequence[int]] = None, bad_images: str = "fail") -> DatasetBundle:
    """Both splits of ``dataset`` with the track's transforms.

    ``imagefolder``: RandomResizedCrop(input_size) + flip / Resize(eval_resize) + CenterCrop(input_size), the
    release's recipe. ``digits``: no augmentation (flips would turn digits into other symbols), images already at
    ``input_size``. Transfer sets: :func:`transfer_transforms`. Raises :class:`DatasetError` naming the path for a
    missing, empty or inconsistent dataset.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset == "imagefolder":
        train_tf, eval_tf = classification_transforms(train_size=input_size, eval_resize=eval_resize,
                                                      eval_crop=input_size, mean=mean, std=std)
        train, val = build_imagefolder(data, ("train", "val"), train_tf, eval_tf, bad_images=bad_images)
        return DatasetBundle(train, val, len(train.classes), f"imagefolder {data}")
    if dataset == "digits":
        tf = T.Compose([T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])
        train = DigitsDataset("train", input_size, tf)
        val = DigitsDataset("val", input_size, tf)
        return DatasetBundle(train, val, 10, f"scikit-learn digits at {input_size}x{input_size}")
    train_tf, eval_tf = transfer_transforms(input_size, eval_resize, mean, std, randaugment)
    return _build_transfer(dataset, Path(data), train_tf, eval_tf)
