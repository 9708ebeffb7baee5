"""ImageNet-style ``ImageFolder`` datasets and the release's "naive" augmentation (docs/authors-release.md §1.1.4).

Layout: ``<root>/<split>/<class>/<image>`` for both splits (the val set must be sorted into class folders); the
class index is the position of the folder name in sorted order, so train and val must have the same folders.

Unreadable images (truncated, corrupt, not an image): ``bad_images="fail"`` (default) raises a
:class:`DatasetError` naming the file. ``"skip"`` logs the file, counts it (``dataset.skipped_count``, shared with
DataLoader workers) and returns the next readable sample instead. Substituting keeps every batch full and every
rank's step count equal, without a pre-scan that would decode all 1.28M ImageNet files; the neighbour is almost
always of the same class, since samples are sorted by class. Substitution counts the neighbour twice, so use
``"fail"`` when a validation number must be exact.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BAD_IMAGE_POLICIES",
    "DatasetError",
    "CheckedImageFolder",
    "classification_transforms",
    "build_imagefolder",
]

_LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGE_POLICIES = ("fail", "skip")

# What PIL raises for unreadable files: OSError (truncated, UnidentifiedImageError), SyntaxError (broken headers
# of some formats), ValueError, and DecompressionBombError (huge dimensions, not an OSError subclass).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """The dataset on disk is missing, empty, inconsistent or holds an unreadable image."""


def classification_transforms(train_size: int = 224, eval_resize: int = 256, eval_crop: int = 224,
                              mean: Sequence[float] = IMAGENET_MEAN,
                              std: Sequence[float] = IMAGENET_STD) -> tuple[Callable, Callable]:
    """``(train_tf, eval_tf)``: RandomResizedCrop (scale 0.08–1, bilinear) + flip, and short-side Resize +
    CenterCrop; both end in ToTensor + Normalize. Nothing else: no RandAug, mixup or erasing (release)."""
    normalize = T.Normalize(mean=list(mean), std=list(std))
    train_tf = T.Compose([T.RandomResizedCrop(train_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(eval_resize), T.CenterCrop(eval_crop), T.ToTensor(), normalize])
    return train_tf, eval_tf


class _SkipCounter:
    """A counter in shared memory, so that DataLoader worker processes add to the count the main process reads.

    The value is a lock-free ``RawValue`` (shared memory travels to fork and spawn workers alike) guarded by a lock
    where the lock can travel too: a lock made in the default fork context cannot be sent to spawn-context workers,
    which then add without it (a lost count needs two workers skipping at the same instant). Pickled outside process
    start-up (deepcopy, broadcast), a copy holding the current count is made instead of failing.
    """

    def __init__(self, start: int = 0) -> None:
        self._value = multiprocessing.RawValue("q", start)
        self._lock: Any = multiprocessing.Lock()

    def increment(self) -> None:
        if self._lock is None:
            self._value.value += 1
            return
        with self._lock:
            self._value.value += 1

    @property
    def value(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict:
        if multiprocessing.context.get_spawning_popen() is None:
            return {"count": self.value}
        # (private flag of multiprocessing.synchronize.SemLock; absent means the lock can travel)
        lock = None if getattr(self._lock, "_is_fork_ctx", False) else self._lock
        return {"shared": self._value, "lock": lock}

    def __setstate__(self, state: dict) -> None:
        if "shared" in state:
            self._value, self._lock = state["shared"], state["lock"]
        else:
            self.__init__(state["count"])


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # forces the full decode, so truncation surfaces here


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` with an explicit policy for unreadable images (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, bad_images: str = "fail") -> None:
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        # allow_empty: an empty class folder is reported by build_imagefolder as a warning, not a crash.
        super().__init__(os.fspath(root), transform=transform, allow_empty=True)
        self.bad_images = bad_images
        self._skipped = _SkipCounter()

    @property
    def skipped_count(self) -> int:
        """Images replaced so far under ``bad_images="skip"`` (summed over this process and its loader workers)."""
        return self._skipped.value

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for offset in range(n):
            path, target = self.samples[(index + offset) % n]
            try:
                img = _load_rgb(path)
            except _DECODE_ERRORS as e:
                if self.bad_images == "fail":
                    raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e} "
                                       f"(pass bad_images='skip' to replace unreadable images)") from e
                self._skipped.increment()
                _LOG.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise DatasetError(f"no readable image in {self.root}")


def _class_folders(split_dir: Path) -> list[str]:
    try:
        classes, _ = find_classes(os.fspath(split_dir))
    except FileNotFoundError:
        raise DatasetError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>") from None
    return classes


def _names(xs: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(xs[:limit])
    return shown + (f", ... ({len(xs) - limit} more)" if len(xs) > limit else "")


def build_imagefolder(root: str | os.PathLike, split_dirs: Sequence[str] = ("train", "val"),
                      train_tf: Callable | None = None, eval_tf: Callable | None = None, *,
                      bad_images: str = "fail") -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """``(train_ds, val_ds)`` from ``<root>/<split_dirs[0]>`` and ``<root>/<split_dirs[1]>``.

    ``train_tf``/``eval_tf`` default to :func:`classification_transforms` at 224. Raises :class:`DatasetError`,
    naming the path, for a missing root or split folder, a split without images, and train/val class folders
    that differ (the differences are listed).
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    if len(split_dirs) != 2:
        raise ValueError(f"split_dirs must name (train, val), got {split_dirs!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found (or not a directory): {root}")
    dirs = [root / s for s in split_dirs]
    for d in dirs:
        if not d.is_dir():
            raise DatasetError(f"missing split folder {d}: expected the layout {root}/{{{','.join(split_dirs)}}}"
                               f"/<class>/<image> (the val images must be sorted into class folders too)")
    train_classes, val_classes = (_class_folders(d) for d in dirs)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(
            f"class folders of {dirs[0]} and {dirs[1]} differ, so class indices would not match: "
            f"only in {split_dirs[0]} ({len(only_train)}): {_names(only_train) or '-'}; "
            f"only in {split_dirs[1]} ({len(only_val)}): {_names(only_val) or '-'}"
        )
    if train_tf is None or eval_tf is None:
        default_train, default_eval = classification_transforms()
        train_tf = default_train if train_tf is None else train_tf
        eval_tf = default_eval if eval_tf is None else eval_tf
    datasets = []
    for d, tf in zip(dirs, (train_tf, eval_tf)):
        ds = CheckedImageFolder(d, transform=tf, bad_images=bad_images)
        if len(ds) == 0:
            raise DatasetError(f"split folder {d} has {len(ds.classes)} class folder(s) but no image files")
        present = {t for _, t in ds.samples}
        empty = [c for i, c in enumerate(ds.classes) if i not in present]
        if empty:
            _LOG.warning("%s: %d class folder(s) without images: %s", d, len(empty), _names(empty))
        datasets.append(ds)
    return datasets[0], datasets[1]
