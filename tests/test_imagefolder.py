"""Tests of cbsa_core.data.imagefolder: layout validation, bad-image policies, the release's transforms."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cbsa_core.data.imagefolder import (
    DatasetError,
    build_imagefolder,
    classification_transforms,
)

SMALL = dict(train_size=16, eval_resize=20, eval_crop=16)


def _write_image(path: Path, seed: int, size=(32, 24), fmt="JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def _make_tree(root: Path, classes=("cat", "dog"), per_class=3, splits=("train", "val")) -> Path:
    seed = 0
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _write_image(root / split / c / f"{i}.jpg", seed)
                seed += 1
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_valid_tree_and_class_indices(tmp_path):
    root = _make_tree(tmp_path / "data")
    train_tf, eval_tf = classification_transforms(**SMALL)
    train, val = build_imagefolder(root, train_tf=train_tf, eval_tf=eval_tf)
    assert len(train) == 6 and len(val) == 6
    assert train.classes == val.classes == ["cat", "dog"]
    x, y = val[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert train.skipped_count == 0


def test_default_transforms_are_the_release_ones():
    train_tf, eval_tf = classification_transforms()
    img = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert train_tf(img).shape == (3, 224, 224) and eval_tf(img).shape == (3, 224, 224)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train_tf.transforms[0].scale == (0.08, 1.0)
    assert [type(t).__name__ for t in eval_tf.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert eval_tf.transforms[0].size == 256 and eval_tf.transforms[-1].mean == [0.485, 0.456, 0.406]


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        build_imagefolder(missing)
    assert issubclass(DatasetError, ValueError)


def test_missing_val_split(tmp_path):
    root = _make_tree(tmp_path / "data", splits=("train",))
    with pytest.raises(DatasetError, match=r"missing split folder .*" + re.escape(str(root / "val"))):
        build_imagefolder(root)


def test_empty_train_split(tmp_path):
    root = _make_tree(tmp_path / "data", splits=("val",))
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
    with pytest.raises(DatasetError, match=re.escape(str(root / "train")) + ".*no image files"):
        build_imagefolder(root)
    # No class folders at all.
    root2 = _make_tree(tmp_path / "data2", splits=("val",))
    (root2 / "train").mkdir()
    with pytest.raises(DatasetError, match="no class folders in " + re.escape(str(root2 / "train"))):
        build_imagefolder(root2)


def test_class_mismatch_lists_differences(tmp_path):
    root = tmp_path / "data"
    _make_tree(root, classes=("a", "b", "c"), per_class=1, splits=("train",))
    _make_tree(root, classes=("a", "b", "d", "e"), per_class=1, splits=("val",))
    with pytest.raises(DatasetError) as info:
        build_imagefolder(root)
    msg = str(info.value)
    assert "only in train (1): c" in msg and "only in val (2): d, e" in msg


def test_truncated_image_fail_names_path(tmp_path):
    root = _make_tree(tmp_path / "data")
    bad = root / "train" / "cat" / "1.jpg"
    _truncate(bad)
    train, _ = build_imagefolder(root, train_tf=classification_transforms(**SMALL)[1],
                                 eval_tf=classification_transforms(**SMALL)[1])
    idx = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + ".*bad_images='skip'"):
        train[idx]
    train[idx + 1]  # the other images still load


def test_truncated_image_skip_returns_next_and_counts(tmp_path):
    root = _make_tree(tmp_path / "data")
    bad = root / "train" / "cat" / "1.jpg"
    _truncate(bad)
    (root / "train" / "dog" / "junk.png").write_bytes(b"not an image at all")
    eval_tf = classification_transforms(**SMALL)[1]
    train, _ = build_imagefolder(root, train_tf=eval_tf, eval_tf=eval_tf, bad_images="skip")
    paths = [p for p, _ in train.samples]
    idx = paths.index(str(bad))
    x, y = train[idx]
    x_next, y_next = train[idx + 1]
    assert torch.equal(x, x_next) and y == y_next == train.samples[idx + 1][1]
    assert train.skipped_count == 1

    # Across DataLoader workers the count is shared; the junk file is the last sample, so it wraps to index 0.
    start = train.skipped_count
    loader = DataLoader(train, batch_size=2, num_workers=2)
    n = sum(b[0].shape[0] for b in loader)
    assert n == len(train) == 7
    assert train.skipped_count - start == 2
    assert copy.deepcopy(train).skipped_count == train.skipped_count  # picklable outside worker start-up

    with pytest.raises(ValueError, match="fail, skip|'fail', 'skip'"):
        build_imagefolder(root, bad_images="ignore")
