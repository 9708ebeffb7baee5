"""Segmentation data, metrics, inference and the training / evaluation entry points, on a toy ADE20K-format
dataset generated here (images of coloured shapes and their label PNGs)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from cbsa_core.checkpoint import save_model_checkpoint
from cbsa_core.engine import build_optimizer
from semantic_segmentation import (MS_RATIOS, DatasetError, build_dataset, confusion_matrix, create_segmenter,
                                   default_model_config, evaluate_miou, load_model, metrics_from_confusion,
                                   sliding_window_logits)
from semantic_segmentation import eval as seg_eval
from semantic_segmentation import main as seg_main
from semantic_segmentation.inference import (_upscale_short_side, confusion_on_shard, predict, predict_probabilities,
                                             window_anchors)
from semantic_segmentation.transforms import (TrainTransform, normalize, photometric_distortion, random_crop,
                                              random_rescale, reduce_zero_label)

REPO = Path(__file__).resolve().parent.parent
N_CLS = 4  # toy classes 1..4 in the PNGs (0 = "other", ignored), 0..3 after reduce_zero_label
COLORS = {1: (40, 40, 40), 2: (220, 60, 60), 3: (60, 200, 60), 4: (60, 60, 230)}  # RGB per class


def _toy_pair(rng: np.random.Generator, h: int, w: int, other: bool = True):
    label = np.full((h, w), 1, np.uint8)
    if other:
        label[: h // 8] = 0  # an "other" strip: ignored after reduce_zero_label
    y0, x0 = rng.integers(h // 8, h // 2), rng.integers(0, w // 2)
    label[y0:y0 + h // 3, x0:x0 + w // 3] = 2
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.integers(h // 2, h - 8), rng.integers(w // 4, w - 8), rng.integers(6, 14)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 3
    label[h - h // 6:, w - w // 4:] = 4
    img = np.zeros((h, w, 3), np.float32)
    for k, c in COLORS.items():
        img[label == k] = c
    img[label == 0] = (128, 128, 0)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img, label


def make_toy_ade20k(root: Path, n_train: int = 6, n_val: int = 3, seed: int = 0, other: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(64, 97)), int(rng.integers(64, 97))
            img, label = _toy_pair(rng, h, w, other)
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(base / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_ade20k(tmp_path_factory.mktemp("toy_ade"))


def tiny_model(crop: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = default_model_config("test", n_cls=N_CLS, crop_size=crop, d_model=32, n_heads=2, n_layers=1,
                               drop_path_rate=0.0,
                               decoder=dict(n_layers=1, n_heads=2, dim_head=16, rep_grid=[2, 2]))
    return create_segmenter(cfg).eval()


TINY_ARGS = ["--dataset", "ade20k", "--backbone", "test", "--d-model", "32", "--enc-heads", "2", "--enc-layers", "1",
             "--dec-layers", "1", "--dec-heads", "2", "--dec-dim-head", "16", "--rep-grid", "2", "2", "--n-cls",
             str(N_CLS), "--crop-size", "64", "--im-size", "64", "--window-size", "64", "--window-stride", "48",
             "--batch-size", "2", "--num-workers", "0", "--from-scratch", "--device", "cpu", "--no-tensorboard",
             "--print-freq", "1000", "--drop-path", "0.0"]

# --------------------------------------------------------------------------------------------------- labels, data


def test_reduce_zero_label_exact():
    label = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), np.array([[255, 0, 1], [149, 255, 6]], np.uint8))


def test_ade20k_dataset_reads_reduced_labels(toy_root):
    ds = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64)
    raw = np.array(Image.open(ds.samples[0][1]))
    label = ds[0]["label"].numpy()
    assert label.shape == raw.shape
    np.testing.assert_array_equal(label[raw == 0], 255)
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0].astype(np.int64) - 1)
    assert len(ds) == 3 and ds[0]["images"][0].shape[1:] == _short_side(raw.shape, 64)
    ds.verify()


def _short_side(shape, size):
    h, w = shape
    s = size / min(h, w)
    return (int(h * s + 0.5), int(w * s + 0.5))


def test_train_pipeline_shapes_values_and_determinism(tmp_path):
    # labels 1..4 only: after reduce_zero_label no pixel is 255, so every 255 in a crop is padding
    root = make_toy_ade20k(tmp_path, n_train=2, n_val=1, other=False)
    ds = build_dataset("ade20k", root, "train", mode="train", n_cls=N_CLS, crop_size=64, im_size=32, seed=3)
    padded = 0
    for index in range(2):
        for epoch in range(3):
            ds.set_epoch(epoch)
            img, label = ds[index]
            assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and label.shape == (64, 64)
            assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3, 255}
            assert img.abs().max() <= 1.0 + 1e-6  # vit normalisation maps [0, 255] to [-1, 1]
            # im_size 32 -> scale (128, 32) x [0.5, 2]: the short side is at most 64, so the crop is the whole
            # rescaled image in the top-left corner, padded at the bottom/right with label 255 and image 0
            valid = label != 255
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
            assert valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()
            assert torch.count_nonzero(img[:, h:]) == 0 and torch.count_nonzero(img[:, :, w:]) == 0
            padded += (h, w) != (64, 64)
    assert padded >= 5  # a short side of exactly 64 needs a ratio of exactly 2
    ds.set_epoch(0)
    img, label = ds[1]
    again_img, again_label = ds[1]
    torch.testing.assert_close(again_img, img, atol=0, rtol=0)
    assert torch.equal(again_label, label)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], img)


def test_normalize_vit_and_deit_statistics():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 128, 255  # B, G, R
    np.testing.assert_allclose(normalize(bgr, "vit")[0, 0], [(255 - 127.5) / 127.5, (128 - 127.5) / 127.5,
                                                             (10 - 127.5) / 127.5], rtol=1e-6)
    np.testing.assert_allclose(normalize(bgr, "deit")[0, 0], [(255 - 123.675) / 58.395, (128 - 116.28) / 57.12,
                                                              (10 - 103.53) / 57.375], rtol=1e-5)


def test_random_crop_cat_max_ratio_follows_mmseg():
    """mmseg RandomCrop: check up to 10 draws, keep the first whose largest valid class is < 75 % (with at least
    two classes); after 10 failures the 11th draw is used unchecked."""
    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # only 20x20 windows at x in 76..80 qualify (about 6 % of them)
    label[:5, :5] = 255
    img = np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3)
    outcomes = set()
    for seed in range(40):
        ref = np.random.default_rng(seed)
        for attempt in range(11):
            y, x = int(ref.integers(0, 81)), int(ref.integers(0, 81))
            window = label[y:y + 20, x:x + 20]
            counts = np.bincount(window[window != 255].ravel(), minlength=2)
            counts = counts[counts > 0]
            ok = len(counts) > 1 and counts.max() / counts.sum() < 0.75
            if ok or attempt == 10:
                break
        outcomes.add(ok)
        got_img, got_label = random_crop(img, label, (20, 20), np.random.default_rng(seed), cat_max_ratio=0.75)
        np.testing.assert_array_equal(got_label, window)
        np.testing.assert_array_equal(got_img, img[y:y + 20, x:x + 20])
    assert outcomes == {True, False}  # both the accepted and the fallback paths were exercised
    # a crop larger than the image keeps the whole image (padding comes later)
    assert random_crop(img[:10], label[:10], (20, 20), np.random.default_rng(0))[1].shape == (10, 20)


class ScriptedRng:
    """Stands in for numpy's Generator: returns scripted draws and checks the requested ranges."""

    def __init__(self, draws):
        self.draws = list(draws)

    def _next(self, kind, args):
        want_kind, want_args, value = self.draws.pop(0)
        assert (kind, args) == (want_kind, want_args)
        return value

    def integers(self, *args):
        return self._next("integers", args)

    def uniform(self, *args):
        return self._next("uniform", args)

    def random(self, *args):
        return self._next("random", args)


def _hsv_channel(img, channel, fn):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[..., channel] = fn(hsv[..., channel])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


@pytest.mark.parametrize("contrast_first", [True, False])
def test_photometric_distortion_order_and_ranges(contrast_first):
    """mmseg order: brightness; contrast first (mode 1) or last (mode 0); saturation; hue; each behind a coin."""
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    contrast = [("integers", (2,), 1), ("uniform", (0.5, 1.5), 1.3)]
    draws = ([("integers", (2,), 1), ("uniform", (-32, 32), 20.0), ("integers", (2,), int(contrast_first))]
             + (contrast if contrast_first else [])
             + [("integers", (2,), 1), ("uniform", (0.5, 1.5), 0.6),       # saturation
                ("integers", (2,), 1), ("integers", (-18, 18), -7)]        # hue
             + ([] if contrast_first else contrast))
    rng = ScriptedRng(draws)
    out = photometric_distortion(img.copy(), rng)
    assert not rng.draws
    lin = lambda x, a=1.0, b=0.0: np.clip(x.astype(np.float32) * a + b, 0, 255).astype(np.uint8)
    exp = lin(img, b=20.0)
    if contrast_first:
        exp = lin(exp, a=1.3)
    exp = _hsv_channel(exp, 1, lambda c: lin(c, a=0.6))
    exp = _hsv_channel(exp, 0, lambda c: (c.astype(int) - 7) % 180)
    if not contrast_first:
        exp = lin(exp, a=1.3)
    np.testing.assert_array_equal(out, exp)
    # all coins 0: the image is untouched
    none = ScriptedRng([("integers", (2,), 0)] * 6)
    np.testing.assert_array_equal(photometric_distortion(img.copy(), none), img)


def test_random_rescale_follows_mmseg_with_int_truncation():
    """mmseg Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True) for im_size 512: ratio =
    0.5 + 1.5·u, scale = (int(2048·ratio), int(512·ratio)), then mmcv.imrescale to fit it:
    factor = min(long / max(h, w), short / min(h, w)), size = int(side·factor + 0.5)."""
    assert TrainTransform(512, 512).img_scale == (2048, 512)  # (4·im_size, im_size)
    # u = 0.4 -> ratio 1.1 -> scale (int(2252.8), int(563.2)) = (2252, 563)
    # 10x50 (aspect 5): factor = min(2252/50, 563/10) = 45.04 -> 2252 x 450 (rounding 2252.8 up would give 2253)
    # 50x60: factor = min(2252/60, 563/50) = 11.26 -> 676 x 563
    for (h, w), expected in (((10, 50), (450, 2252)), ((50, 60), (563, 676))):
        img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.random.default_rng(1).integers(0, 4, (h, w), dtype=np.uint8)
        rng = ScriptedRng([("random", (), 0.4)])
        out_img, out_label = random_rescale(img, label, (2048, 512), (0.5, 2.0), rng)
        assert not rng.draws
        assert out_img.shape == (*expected, 3) and out_label.shape == expected
        size = (expected[1], expected[0])
        np.testing.assert_array_equal(out_img, cv2.resize(img, size, interpolation=cv2.INTER_LINEAR))
        np.testing.assert_array_equal(out_label, cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))
    # u = 0 -> ratio 0.5 -> (1024, 256): a 600x800 image shrinks to 256 x int(800·0.4267 + 0.5) = 341
    img = np.zeros((600, 800, 3), np.uint8)
    out, _ = random_rescale(img, img[..., 0], (2048, 512), (0.5, 2.0), ScriptedRng([("random", (), 0.0)]))
    assert out.shape == (256, 341, 3)


def test_train_transform_step_order():
    """rescale -> crop (cat_max_ratio) -> flip -> photometric distortion -> normalise -> pad, drawn in that order."""
    h, w = 50, 60
    label = np.full((h, w), 1, np.uint8)
    label[:, : w // 2] = 2  # two halves: every crop of the rescaled map holds both classes
    img = np.random.default_rng(0).integers(0, 200, (h, w, 3), dtype=np.uint8)
    # im_size 32 -> scale (128, 32); u = 0 -> ratio 0.5 -> (64, 16): factor min(64/60, 16/50) = 0.32 -> 16 x 19.
    # crop 12: y in [0, 16 - 12], x in [0, 19 - 12]
    draws = [("random", (), 0.0),                                        # 1. rescale
             ("integers", (0, 5), 2), ("integers", (0, 8), 3),          # 2. crop at (2, 3), accepted
             ("random", (), 0.2),                                        # 3. flip (0.2 < 0.5)
             ("integers", (2,), 1), ("uniform", (-32, 32), 30.0),        # 4. brightness +30
             ("integers", (2,), 0),                                      #    contrast last ...
             ("integers", (2,), 0), ("integers", (2,), 0),               #    no saturation, no hue
             ("integers", (2,), 0)]                                      #    ... and skipped
    rng = ScriptedRng(draws)
    out_img, out_label = TrainTransform(crop_size=12, im_size=32)(img, reduce_zero_label(label), rng)
    assert not rng.draws
    small = cv2.resize(img, (19, 16), interpolation=cv2.INTER_LINEAR)
    small_label = cv2.resize(reduce_zero_label(label), (19, 16), interpolation=cv2.INTER_NEAREST)
    crop, crop_label = small[2:14, 3:15][:, ::-1], small_label[2:14, 3:15][:, ::-1]
    bright = np.clip(crop.astype(np.float32) + 30.0, 0, 255).astype(np.uint8)
    rgb = bright[..., ::-1].astype(np.float32)
    expected = torch.from_numpy(((rgb - 127.5) / 127.5).transpose(2, 0, 1).copy())
    torch.testing.assert_close(out_img, expected, atol=1e-6, rtol=0)
    assert torch.equal(out_label, torch.from_numpy(crop_label.astype(np.int64)))

    # a crop larger than the rescaled image: crop 20 keeps all 16 x 19, pads to 20 x 20 (image 0, label 255)
    rng = ScriptedRng([("random", (), 0.0), ("integers", (0, 1), 0), ("integers", (0, 1), 0), ("random", (), 0.9)]
                      + [("integers", (2,), 0)] * 5)
    out_img, out_label = TrainTransform(crop_size=20, im_size=32)(img, reduce_zero_label(label), rng)
    assert not rng.draws and out_img.shape == (3, 20, 20)
    assert torch.equal(out_label[:16, :19], torch.from_numpy(small_label.astype(np.int64)))
    assert (out_label[16:] == 255).all() and (out_label[:, 19:] == 255).all()
    assert torch.count_nonzero(out_img[:, 16:]) == 0 and torch.count_nonzero(out_img[:, :, 19:]) == 0
    torch.testing.assert_close(out_img[:, :16, :19], torch.from_numpy(normalize(small, "vit").transpose(2, 0, 1)))


def test_generic_folder_dataset_keeps_labels(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            img, label = _toy_pair(rng, 64, 80)
            label = (label % 3).astype(np.uint8)
            label[0, :4] = 255
            Image.fromarray(img).save(tmp_path / "images" / split / f"{i}.png")
            Image.fromarray(label).save(tmp_path / "annotations" / split / f"{i}.png")
    ds = build_dataset("folder", tmp_path, "val", n_cls=3, im_size=64)
    raw = np.array(Image.open(tmp_path / "annotations" / "validation" / "0.png"))
    np.testing.assert_array_equal(ds[0]["label"].numpy(), raw)
    assert ds.mode == "eval" and build_dataset("folder", tmp_path, "train", n_cls=3).mode == "train"
    with pytest.raises(DatasetError, match=r"0\.png has values \[2\] >= n_cls=2"):
        build_dataset("folder", tmp_path, "val", n_cls=2, im_size=64)[0]
    with pytest.raises(ValueError, match="needs the number of classes"):
        build_dataset("folder", tmp_path, "val")


def test_bad_inputs_name_the_file(tmp_path):
    root = make_toy_ade20k(tmp_path / "a", n_train=2, n_val=2)
    base = root / "ADEChallengeData2016"
    # missing split folder
    for f in (base / "annotations" / "validation").iterdir():
        f.unlink()
    (base / "annotations" / "validation").rmdir()
    with pytest.raises(DatasetError, match=r"split folder not found: .*annotations/validation"):
        build_dataset("ade20k", root, "val", n_cls=N_CLS)
    # missing root
    with pytest.raises(DatasetError, match=r"ADE20K not found under .*nowhere"):
        build_dataset("ade20k", tmp_path / "nowhere", "train")
    # count mismatch
    train_imgs = base / "images" / "training"
    extra = train_imgs / "ADE_training_extra.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(extra)
    with pytest.raises(DatasetError, match=r"(?s)images/training holds 3 images but .*annotations/training holds "
                                           r"2 label PNGs.*ADE_training_extra"):
        build_dataset("ade20k", root, "train", n_cls=N_CLS)
    extra.unlink()
    # size mismatch
    lbl = base / "annotations" / "training" / "ADE_training_00000000.png"
    Image.fromarray(np.ones((10, 12), np.uint8)).save(lbl)
    ds = build_dataset("ade20k", root, "train", n_cls=N_CLS, crop_size=64)
    with pytest.raises(DatasetError, match=r"(?s)ADE_training_00000000\.jpg is \d+x\d+ but its label .*"
                                           r"ADE_training_00000000\.png is 12x10"):
        ds[0]
    with pytest.raises(DatasetError, match="ADE_training_00000000.png is 12x10"):
        ds.verify()
    # label value >= n_cls (after reduce_zero_label: PNG 9 -> 8 >= 4) that is not 255
    img = np.array(Image.open(base / "images" / "training" / "ADE_training_00000000.jpg"))
    bad = np.ones(img.shape[:2], np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(lbl)
    with pytest.raises(DatasetError, match=r"label .*ADE_training_00000000\.png has values \[8\] >= n_cls=4"):
        ds[0]
    # 255 after reduction (PNG 0) and PNG 255 stay legal
    bad[0, 0] = 0
    bad[0, 1] = 255
    Image.fromarray(bad).save(lbl)
    ds[0]
    # two images with the same name but different extensions: which one the label belongs to is ambiguous
    twin = train_imgs / "ADE_training_00000001.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(twin)
    with pytest.raises(DatasetError, match=r"ADE_training_00000001\.jpg and .*ADE_training_00000001\.png share"):
        build_dataset("ade20k", root, "train", n_cls=N_CLS)


# ----------------------------------------------------------------------------------------------------------- metrics


def test_miou_against_hand_computed_confusion():
    # 3 classes. Image 1: 6 pixels, one ignored. Image 2: 4 pixels. Class 2 never appears in GT.
    gt1 = torch.tensor([[0, 0, 1], [1, 1, 255]])
    pr1 = torch.tensor([[0, 1, 1], [1, 2, 0]])
    gt2 = torch.tensor([[0, 1], [1, 0]])
    pr2 = torch.tensor([[0, 1], [0, 0]])
    cm = confusion_matrix(pr1, gt1, 3) + confusion_matrix(pr2, gt2, 3)
    expected = torch.tensor([[3, 1, 0],    # GT 0: 0->0 x3 (1 + 2), 0->1 x1
                             [1, 3, 1],    # GT 1: 1->1 x3 (2 + 1), 1->0 x1, 1->2 x1
                             [0, 0, 0]])
    assert torch.equal(cm, expected)
    m = metrics_from_confusion(cm)
    # IoU0 = 3 / (4 + 4 - 3) = 0.6; IoU1 = 3 / (5 + 4 - 3) = 0.5; IoU2 = 0 / (0 + 1 - 0) = 0
    assert m["per_class_iou"] == pytest.approx([60.0, 50.0, 0.0])
    assert m["mean_iou"] == pytest.approx((60 + 50 + 0) / 3)
    assert m["pixel_accuracy"] == pytest.approx(100 * 6 / 9)
    # Acc0 = 3/4, Acc1 = 3/5, class 2 has no GT pixel: NaN, left out of the mean
    assert m["per_class_accuracy"][:2] == pytest.approx([75.0, 60.0]) and np.isnan(m["per_class_accuracy"][2])
    assert m["mean_accuracy"] == pytest.approx((75 + 60) / 2)
    # a class absent from GT and prediction is NaN and excluded from mIoU
    cm4 = torch.zeros(4, 4, dtype=torch.int64)
    cm4[:3, :3] = expected
    m4 = metrics_from_confusion(cm4)
    assert np.isnan(m4["per_class_iou"][3]) and m4["mean_iou"] == pytest.approx(m["mean_iou"])
    with pytest.raises(ValueError, match=r"label values \[7\] are outside \[0, 3\)"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([7, 255]), 3)


# --------------------------------------------------------------------------------------------------------- inference


def test_window_anchors():
    assert window_anchors(512, 512, 480) == [0]
    assert window_anchors(600, 512, 480) == [0, 88]
    assert window_anchors(1100, 512, 480) == [0, 480, 588]
    assert window_anchors(300, 512, 480) == [0]


def test_sliding_window_equals_direct_forward_and_averages_overlaps():
    model = tiny_model()
    im = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        direct = model(im)[0]
    torch.testing.assert_close(sliding_window_logits(model, im, 64, 48), direct, atol=1e-6, rtol=0)
    # 64 x 96 with window 64, stride 16: W anchors 0, 16 and 32; each column is the mean of the windows covering it
    im = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = [model(im[:, :, :, a:a + 64])[0] for a in (0, 16, 32)]
    expected = torch.zeros(N_CLS, 64, 96)
    count = torch.zeros(1, 1, 96)
    for a, o in zip((0, 16, 32), outs):
        expected[:, :, a:a + 64] += o
        count[..., a:a + 64] += 1
    torch.testing.assert_close(sliding_window_logits(model, im, 64, 16, window_batch_size=2), expected / count,
                               atol=1e-6, rtol=0)


def _hand_confusion(ds, predict_logits):
    cm = torch.zeros(N_CLS, N_CLS, dtype=torch.int64)
    for i in range(len(ds)):
        item = ds[i]
        logits = predict_logits(item["images"][0][None])
        logits = F.interpolate(logits, item["label"].shape, mode="bilinear", align_corners=False)
        pred, gt = logits[0].argmax(0).numpy().ravel(), item["label"].numpy().ravel()
        keep = gt != 255
        np.add.at(cm.numpy(), (gt[keep], pred[keep]), 1)
    return cm


def test_evaluate_miou_matches_direct_predictions(toy_root):
    model = tiny_model()
    ds = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64)
    # without the upscale each image (short side 64, long side <= 96) fits in one 128 window: one direct forward
    scores = evaluate_miou(model, ds, window_size=128, window_stride=96, upscale_small=False)
    with torch.no_grad():
        cm = _hand_confusion(ds, model)
    assert torch.equal(scores["confusion"], cm)
    assert scores["num_images"] == 3
    assert scores["mean_iou"] == pytest.approx(metrics_from_confusion(cm)["mean_iou"], nan_ok=True)

    # the release's default: short side 64 < window 128, so the image is first upscaled to short side 128
    # (long side int(long / short · 128)) and then covered by sliding 128 windows with stride 96
    def upscaled(im):
        h, w = im.shape[-2:]
        size = (128, int(w / h * 128)) if h < w else (int(h / w * 128), 128)
        im = F.interpolate(im, size, mode="bilinear", align_corners=False)
        return sliding_window_logits(model, im, 128, 96)[None]

    default = evaluate_miou(model, ds, window_size=128, window_stride=96)
    assert torch.equal(default["confusion"], _hand_confusion(ds, upscaled))
    assert not torch.equal(default["confusion"], cm)  # the two paths really differ on these images


def test_upscale_short_side_is_segmenters_resize():
    im = torch.randn(1, 3, 12, 50)
    out = _upscale_short_side(im, 16)  # short side 12 -> 16, long side int(50 / 12 · 16) = int(66.67) = 66
    assert out.shape == (1, 3, 16, 66)
    torch.testing.assert_close(out, F.interpolate(im, (16, 66), mode="bilinear", align_corners=False), atol=0, rtol=0)
    tall = torch.randn(2, 3, 50, 12)
    assert _upscale_short_side(tall, 16).shape == (2, 3, 66, 16)
    assert _upscale_short_side(torch.randn(1, 3, 10, 10), 16).shape == (1, 3, 16, 16)
    for big in (torch.randn(1, 3, 16, 40), torch.randn(1, 3, 64, 30)):  # short side >= size: untouched, no downscale
        assert _upscale_short_side(big, 16) is big


def test_multiscale_flip_probabilities_are_the_mean_of_unflipped_softmaxes():
    """predict_probabilities = mean over variants of softmax(un-flip(resize(sliding-window logits)))."""
    model = tiny_model()
    torch.manual_seed(2)
    image = torch.randn(3, 64, 80)
    big = F.interpolate(image[None], (80, 100), mode="bilinear", align_corners=False)[0]
    variants, flips = [image, torch.flip(big, (2,))], [False, True]
    out_size = (64, 80)

    def probs(im, unflip):
        logits = sliding_window_logits(model, im[None], 64, 32)
        logits = F.interpolate(logits[None], out_size, mode="bilinear", align_corners=False)[0]
        return torch.softmax(torch.flip(logits, (2,)) if unflip else logits, dim=0)

    expected = (probs(variants[0], False) + probs(variants[1], True)) / 2
    got = predict_probabilities(model, variants, flips, out_size, window_size=64, window_stride=32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(0), torch.ones(out_size), atol=1e-5, rtol=0)
    # forgetting to un-flip would be caught: it changes the result well beyond the tolerance
    not_unflipped = (probs(variants[0], False) + probs(variants[1], False)) / 2
    assert (not_unflipped - expected).abs().max() > 1e-3
    assert torch.equal(predict(model, variants, flips, out_size, window_size=64, window_stride=32),
                       got.argmax(0))


def test_sharded_evaluation_counts_every_image_once(toy_root):
    model = tiny_model()
    ds = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64)
    full, n = confusion_on_shard(model, ds, 0, 1, window_size=64, window_stride=32)
    for world in (2, 3, 4):  # 3 images over 2, 3 and 4 ranks (one rank idle)
        shards = [confusion_on_shard(model, ds, r, world, window_size=64, window_stride=32) for r in range(world)]
        assert sum(s for _, s in shards) == n == 3
        assert torch.equal(sum(c for c, _ in shards), full)


# ----------------------------------------------------------------------------------------------- train / eval CLIs


def _log(run: Path):
    """The per-epoch records of a run's log.txt (its start/end events left out)."""
    records = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    return [r for r in records if "event" not in r]


def test_training_lowers_loss_resumes_exactly_and_evaluates(toy_root, tmp_path):
    common = TINY_ARGS + ["--data-root", str(toy_root), "--learning-rate", "0.05", "--epochs", "6",
                          "--eval-freq", "100"]
    seg_main.main(common + ["--log-dir", str(tmp_path / "full")])
    log = _log(tmp_path / "full")
    assert [r["epoch"] for r in log] == list(range(6))
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert "val_mean_iou" in log[0] and "val_mean_iou" in log[-1]  # epoch 0 and the last epoch are evaluated
    # polynomial decay per iteration: 3 steps/epoch x 6 epochs; the last step uses (0.05 - 1e-5)(1/18)^0.9 + 1e-5
    assert log[-1]["train_learning_rate"] == pytest.approx((0.05 - 1e-5) * (1 / 18) ** 0.9 + 1e-5)

    # interrupted after 2 epochs, then resumed: identical weights at the end
    seg_main.main(common + ["--log-dir", str(tmp_path / "split"), "--stop-after", "2"])
    assert len(_log(tmp_path / "split")) == 2
    seg_main.main(common + ["--log-dir", str(tmp_path / "split")])
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k

    # evaluation CLI on the trained checkpoint: scores file beside it, equal to evaluate_miou
    assert seg_eval.main([str(tmp_path / "full" / "checkpoint.pth"), "ade20k", "--data-root", str(toy_root),
                          "--singlescale", "--num-workers", "0", "--device", "cpu"]) == 0
    report = yaml.safe_load((tmp_path / "full" / "scores_ss.yml").read_text())
    model = load_model(tmp_path / "full" / "checkpoint.pth")
    ds = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64)
    direct = evaluate_miou(model, ds, window_size=64, window_stride=32)
    assert report["mean_iou"] == pytest.approx(round(direct["mean_iou"], 2))
    assert report["settings"]["window_stride"] == 32 and report["settings"]["window_size"] == 64
    assert list(report["per_class_iou"]) == ["0", "1", "2", "3"]
    # multi-scale (ratios 0.5 and 0.75 fall below the 64 window): upscaled by default, as the release does;
    # --no-upscale-small runs them at their own size
    ms_set = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64, test_ratios=MS_RATIOS,
                           test_flip=True)
    for flag, upscale in (([], True), (["--no-upscale-small"], False)):
        assert seg_eval.main([str(tmp_path / "full" / "checkpoint.pth"), "ade20k", "--data-root", str(toy_root),
                              "--multiscale", "--num-workers", "0", "--device", "cpu", "--max-images", "1",
                              *flag]) == 0
        ms = yaml.safe_load((tmp_path / "full" / "scores_ms.yml").read_text())
        assert ms["settings"]["multiscale"] is True and ms["num_images"] == 1
        assert ms["settings"]["upscale_small"] is upscale
        direct = evaluate_miou(model, ms_set, window_size=64, window_stride=32, max_images=1, upscale_small=upscale)
        assert ms["mean_iou"] == pytest.approx(round(direct["mean_iou"], 2))


def test_seed_command_fails_cleanly_without_dataset(toy_root, tmp_path, monkeypatch, capsys):
    env = {k: v for k, v in os.environ.items() if k != "DATASET"}
    seed = ["--log-dir", str(tmp_path / "log" / "CBT-Small"), "--dataset", "ade20k", "--backbone",
            "vit_small_patch16_384", "--decoder", "mask_transformer"]
    # the README command, run from inside the folder
    proc = subprocess.run([sys.executable, "main.py", *seed], cwd=REPO / "semantic_segmentation", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a runtime refusal (engine exit codes): 1, one line
    assert "no dataset root: pass --data-root or set the DATASET environment variable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # $DATASET pointing nowhere
    monkeypatch.setenv("DATASET", str(tmp_path / "missing"))
    assert seg_main.main(seed) == 1
    assert f"dataset root not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    # a root without ADE20K in it
    assert seg_main.main(seed + ["--data-root", str(tmp_path)]) == 1
    assert "ADE20K not found under" in capsys.readouterr().err
    # a dataset but no pretrained weights: refused (status 1, like every runtime refusal) rather than silently
    # training the encoder from scratch; the message names the flag and the weights it must point at
    assert seg_main.main(seed + ["--data-root", str(toy_root)]) == 1
    err = capsys.readouterr().err
    assert ("error: no encoder weights: pass --pretrained-file PATH, a local copy of timm's "
            "vit_small_patch16_384.augreg_in21k_ft_in1k weights (.npz, .safetensors, or a .pth state dict with timm "
            "names); nothing is downloaded. Or pass --from-scratch") in err
    assert not (tmp_path / "log").exists()  # nothing written before the refusal
    with pytest.raises(FileNotFoundError, match=r"pretrained encoder file not found: .*vit_s\.npz"):
        seg_main.train(seg_main.parse_args(seed + ["--data-root", str(toy_root), "--n-cls", "4", "--device", "cpu",
                                                   "--pretrained-file", str(tmp_path / "vit_s.npz")]))


def test_config_files_parse_with_the_release_recipe():
    for size, backbone in (("t", "vit_tiny_patch16_384"), ("s", "vit_small_patch16_384"),
                           ("b", "vit_base_patch16_384"), ("l", "vit_large_patch16_384")):
        args = seg_main.parse_args(["--config", str(REPO / "configs" / "segmentation" / f"cbt_{size}.yaml"),
                                    "--log-dir", "x"])
        assert args.backbone == backbone and args.optimizer == "sgd" and args.learning_rate == 1e-3
        assert (args.epochs, args.batch_size, args.drop_path, args.weight_decay) == (64, 8, 0.1, 0.0)
        assert (args.dec_layers, args.dec_heads, args.dec_dim_head, args.rep_grid) == (3, 3, 100, [10, 10])
    with pytest.raises(SystemExit):
        seg_main.parse_args(["--config", str(REPO / "configs" / "segmentation" / "cbt_s.yaml")])  # no --log-dir


@pytest.mark.parametrize("text, message", [
    ("rep_grid: 10\n", r"bad\.yaml: key 'rep_grid': expected a list, got 10"),
    ("rep_grid: [10, 10, 10]\n", r"bad\.yaml: key 'rep_grid': expected 2 values, got 3"),
    ("epochs: seven\n", r"bad\.yaml: key 'epochs': invalid value 'seven'"),
    ("optimizer: adam\n", r"bad\.yaml: key 'optimizer': 'adam' is not one of"),
    ("amp: 1\n", r"bad\.yaml: key 'amp': expected true or false"),
    ("batchsize: 8\n", r"bad\.yaml: key 'batchsize' is not a setting"),
    ("epochs: [1\n", r"cannot parse config file .*bad\.yaml \(YAML syntax error\)"),
])
def test_bad_config_file_is_a_clean_usage_error(tmp_path, capsys, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        seg_main.parse_args(["--config", str(tmp_path / "bad.yaml"), "--log-dir", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "usage:" in err and "Traceback" not in err


def test_representative_grid_larger_than_the_crop_grid_fails_early(toy_root, tmp_path, capsys):
    # crop 64 / patch 16 = 4x4 patches cannot be pooled to 5x5 representatives
    i = TINY_ARGS.index("--rep-grid")
    args = TINY_ARGS[:i] + ["--rep-grid", "5", "2"] + TINY_ARGS[i + 3:]
    assert seg_main.main(args + ["--data-root", str(toy_root), "--log-dir", str(tmp_path / "run")]) == 2
    assert ("crop size 64x64 with patch 16 gives a 4x4 patch grid, smaller than the decoder's representative grid "
            "5x2") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="4x4 patch grid, smaller than the decoder's representative grid 2x5"):
        default_model_config("test", n_cls=3, crop_size=64, d_model=32, n_heads=2, n_layers=1,
                             decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 5]))
    cfg = default_model_config("test", n_cls=3, crop_size=64, d_model=32, n_heads=2, n_layers=1,
                               decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 4]))
    cfg["decoder"]["rep_grid"] = [2, 5]  # a config edited by hand is checked when the model is built
    with pytest.raises(ValueError, match="4x4 patch grid, smaller than the decoder's representative grid 2x5"):
        create_segmenter(cfg)


def test_weight_decay_groups_follow_timm_create_optimizer():
    model = tiny_model()
    (single,) = seg_main.optimizer_param_groups(model, 0.0)  # wd 0: one group, as timm (and the release) builds it
    # ... of every parameter but the encoder's unused (frozen) classifier head
    assert single["params"] == [p for n, p in model.named_parameters() if not n.startswith("encoder.head.")]
    assert single["weight_decay"] == 0.0 and not model.encoder.head.weight.requires_grad
    model.decoder.net.layers[0].norm.weight.requires_grad_(False)  # frozen: left out, as timm does
    no_decay, decay = seg_main.optimizer_param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    want_no_decay = {n for n, p in model.named_parameters() if p.requires_grad and
                     (p.ndim == 1 or n.endswith(".bias") or n in {"encoder.pos_embed", "encoder.cls_token",
                                                                   "decoder.cls_emb"})}
    assert {names[id(p)] for p in no_decay["params"]} == want_no_decay
    assert {"encoder.pos_embed", "encoder.cls_token", "decoder.cls_emb", "encoder.blocks.0.norm1.weight",
            "encoder.blocks.0.attn.qkv.bias", "decoder.mask_norm.weight"} <= want_no_decay
    got_decay = {names[id(p)] for p in decay["params"]}
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder.net.layers.0.fn.step_x",
            "decoder.net.layers.0.fn.proj.weight"} <= got_decay
    assert got_decay == {n for n, p in model.named_parameters() if p.requires_grad} - want_no_decay
    assert "decoder.net.layers.0.norm.weight" not in got_decay | want_no_decay
    # the optimizer keeps the groups' own decay: one SGD step from zero gradients moves only decayed weights
    opt = build_optimizer("sgd", [no_decay, decay], 0.1, 0.0, momentum=0.0, nesterov=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in got_decay:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.05), atol=1e-7, rtol=1e-6, msg=n)
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_verify_data_flag_checks_every_pair_up_front(tmp_path, capsys):
    root = make_toy_ade20k(tmp_path / "d", n_train=2, n_val=2)
    lbl = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_validation_00000001.png"
    Image.fromarray(np.ones((10, 12), np.uint8)).save(lbl)  # size mismatch in a validation pair
    args = TINY_ARGS + ["--data-root", str(root), "--log-dir", str(tmp_path / "run"), "--epochs", "1"]
    assert seg_main.main(args + ["--verify-data"]) == 1
    assert "ADE_validation_00000001.png is 12x10" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any training
    model = tiny_model()
    save_model_checkpoint(model, tmp_path / "m.pth")
    assert seg_eval.main([str(tmp_path / "m.pth"), "ade20k", "--data-root", str(root), "--num-workers", "0",
                          "--device", "cpu", "--verify-data"]) == 1
    assert "ADE_validation_00000001.png is 12x10" in capsys.readouterr().err
