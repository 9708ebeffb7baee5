"""Segmentation data, metrics, inference and the training / evaluation entry points, on a toy ADE20K-format
dataset generated here (images of coloured shapes and their label PNGs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semantic_segmentation import (DatasetError, build_dataset, confusion_matrix, create_segmenter,
                                   default_model_config, evaluate_miou, load_model, metrics_from_confusion,
                                   sliding_window_logits)
from semantic_segmentation import eval as seg_eval
from semantic_segmentation import main as seg_main
from semantic_segmentation.inference import confusion_on_shard, window_anchors
from semantic_segmentation.transforms import normalize, photometric_distortion, random_crop, reduce_zero_label

REPO = Path(__file__).resolve().parent.parent
N_CLS = 4  # toy classes 1..4 in the PNGs (0 = "other", ignored), 0..3 after reduce_zero_label
COLORS = {1: (40, 40, 40), 2: (220, 60, 60), 3: (60, 200, 60), 4: (60, 60, 230)}  # RGB per class


def _toy_pair(rng: np.random.Generator, h: int, w: int):
    label = np.full((h, w), 1, np.uint8)
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


def make_toy_ade20k(root: Path, n_train: int = 6, n_val: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(64, 97)), int(rng.integers(64, 97))
            img, label = _toy_pair(rng, h, w)
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


def test_train_pipeline_shapes_values_and_determinism(toy_root):
    ds = build_dataset("ade20k", toy_root, "train", mode="train", n_cls=N_CLS, crop_size=64, im_size=32, seed=3)
    img, label = ds[1]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and label.shape == (64, 64)
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3, 255}
    # im_size 32 -> scale (128, 32) x [0.5, 2]: short side <= 64, so the crop is padded with 255 somewhere
    assert (label == 255).any()
    assert img.abs().max() <= 1.0 + 1e-6  # vit normalisation maps [0, 255] to [-1, 1]
    again_img, again_label = ds[1]
    torch.testing.assert_close(again_img, img, atol=0, rtol=0)
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


def test_evaluate_miou_matches_direct_predictions(toy_root):
    model = tiny_model()
    ds = build_dataset("ade20k", toy_root, "val", mode="eval", n_cls=N_CLS, im_size=64)
    scores = evaluate_miou(model, ds, window_size=128, window_stride=96)
    cm = torch.zeros(N_CLS, N_CLS, dtype=torch.int64)
    for i in range(len(ds)):
        item = ds[i]
        with torch.no_grad():  # each image fits in one 128 window: one direct forward, resized to the label size
            logits = model(item["images"][0][None])
        logits = torch.nn.functional.interpolate(logits, item["label"].shape, mode="bilinear", align_corners=False)
        pred, gt = logits[0].argmax(0).numpy().ravel(), item["label"].numpy().ravel()
        keep = gt != 255
        np.add.at(cm.numpy(), (gt[keep], pred[keep]), 1)
    assert torch.equal(scores["confusion"], cm)
    assert scores["num_images"] == 3
    assert scores["mean_iou"] == pytest.approx(metrics_from_confusion(cm)["mean_iou"], nan_ok=True)


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
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


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
    assert seg_eval.main([str(tmp_path / "full" / "checkpoint.pth"), "ade20k", "--data-root", str(toy_root),
                          "--multiscale", "--num-workers", "0", "--device", "cpu", "--max-images", "1"]) == 0
    ms = yaml.safe_load((tmp_path / "full" / "scores_ms.yml").read_text())
    assert ms["settings"]["multiscale"] is True and ms["num_images"] == 1


def test_seed_command_fails_cleanly_without_dataset(toy_root, tmp_path, monkeypatch, capsys):
    env = {k: v for k, v in os.environ.items() if k != "DATASET"}
    seed = ["--log-dir", str(tmp_path / "log" / "CBT-Small"), "--dataset", "ade20k", "--backbone",
            "vit_small_patch16_384", "--decoder", "mask_transformer"]
    # the README command, run from inside the folder
    proc = subprocess.run([sys.executable, "main.py", *seed], cwd=REPO / "semantic_segmentation", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no dataset root: pass --data-root or set the DATASET environment variable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # $DATASET pointing nowhere
    monkeypatch.setenv("DATASET", str(tmp_path / "missing"))
    assert seg_main.main(seed) == 2
    assert f"dataset root not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    # a root without ADE20K in it
    assert seg_main.main(seed + ["--data-root", str(tmp_path)]) == 2
    assert "ADE20K not found under" in capsys.readouterr().err
    # a dataset but no pretrained weights: refused rather than silently training the encoder from scratch
    with pytest.raises(SystemExit, match="pass --pretrained-file .* or --from-scratch"):
        seg_main.main(seed + ["--data-root", str(toy_root)])
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
