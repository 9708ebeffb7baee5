"""The figure scripts (attention maps, zero-shot segmentation, coding rates, synthetic compression,
robustness): each is run in-process through ``main(argv)`` on tiny models and bundled data, and its saved
numbers are checked against independent computations written here."""
from __future__ import annotations

import csv
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import cbsa_core
from cbsa_core.checkpoint import save_model_checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
attention_maps = importlib.import_module("attention_maps")
zss = importlib.import_module("zero_shot_segmentation")
coding_rate_script = importlib.import_module("coding_rate")
synthetic = importlib.import_module("synthetic_compression")
robustness = importlib.import_module("robustness")

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
TINY = dict(num_classes=10, dim=64, heads=2, dim_head=32, depth=2, image_size=32, patch_size=8, rep_grid=(2, 2))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cbt_checkpoint(path: Path, arch: str = "cbt_tiny", seed: int = 0, **overrides) -> tuple:
    torch.manual_seed(seed)
    model = cbsa_core.create_model(arch, **{**TINY, **overrides}).eval()
    save_model_checkpoint(model, path)
    return model, path


def photo_tensor(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """PIL bicubic resize + ImageNet normalisation, written out here rather than taken from the scripts."""
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC), dtype=np.float64) / 255.0
    return torch.from_numpy(((resized - MEAN) / STD).transpose(2, 0, 1)).float().unsqueeze(0)


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scripts_have_help(capsys):
    for module in (attention_maps, zss, coding_rate_script, synthetic, robustness):
        with pytest.raises(SystemExit) as exc:
            module.main(["--help"])
        assert exc.value.code == 0
        assert "--out" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# attention_maps.py
def test_cbt_maps_equal_AtA_from_forward_details_on_a_non_square_image(tmp_path):
    model, ckpt = tiny_cbt_checkpoint(tmp_path / "tiny.pth")
    res = attention_maps.main(["--checkpoint", str(ckpt), "--images", "chelsea", "--image-size", "48", "80",
                               "--out", str(tmp_path / "out")])
    saved = np.load(tmp_path / "out" / "cls_maps.npz")["chelsea"]  # (L, H, h, w)
    summary = json.loads((tmp_path / "out" / "attention_maps.json").read_text())["images"]["chelsea"]
    assert saved.shape == (2, 2, 6, 10) and summary["grid"] == [6, 10] and summary["input_size"] == [48, 80]
    assert (tmp_path / "out" / "chelsea.png").stat().st_size > 0

    # Independent: run the layers by hand and form the CLS row of AᵀA from the extraction matrix A.
    x, grid = model.embed(photo_tensor(skimage.data.chelsea(), 48, 80))
    assert grid == (6, 10)
    with torch.no_grad():
        for li, (attn, ff) in enumerate(model.transformer.layers):
            normed = attn.norm(x)
            a = attn.fn.forward_details(normed, grid)["attn"][0].double()  # (H, m, T), rows sum to 1
            cls_row = torch.einsum("hm,hmt->ht", a[:, :, 0], a)  # row 0 of AᵀA
            expected = cls_row[:, 1:].reshape(2, 6, 10).numpy()
            np.testing.assert_allclose(saved[li], expected, rtol=1e-4, atol=1e-8)
            layer = summary["layers"][li]
            # a CBSA row of AᵀA sums to the extraction weight the token receives, Σ_j A[j, CLS]
            np.testing.assert_allclose(layer["row_sum"], a[:, :, 0].sum(-1).numpy(), rtol=1e-6)
            np.testing.assert_allclose(layer["cls_self"], (a[:, :, 0] ** 2).sum(-1).numpy(), rtol=1e-6)
            np.testing.assert_allclose(layer["patch_mass"], expected.sum((-1, -2)), rtol=1e-5)
            assert not np.allclose(layer["row_sum"], 1.0)
            x = ff(attn.fn(normed, grid_size=grid) + x)
    assert res["maps"]["chelsea"].shape == saved.shape


def test_timm_maps_are_softmax_rows_matching_the_unfused_attention(tmp_path):
    import timm

    torch.manual_seed(0)
    kw = dict(depth=2, embed_dim=64, num_heads=2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **kw).eval()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    attention_maps.main(["--timm", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"),
                         "--set", "depth=2", "--set", "embed_dim=64", "--set", "num_heads=2",
                         "--images", "coffee", "--image-size", "32", "48", "--out", str(tmp_path / "out")])
    saved = np.load(tmp_path / "out" / "cls_maps.npz")["coffee"]
    layers = json.loads((tmp_path / "out" / "attention_maps.json").read_text())["images"]["coffee"]["layers"]
    assert saved.shape == (2, 2, 2, 3)

    # Independent: timm's own non-fused path materialises softmax(q kᵀ/√p); capture it at attn_drop.
    captured = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    mean, std = ref.pretrained_cfg["mean"], ref.pretrained_cfg["std"]
    rgb = np.asarray(Image.fromarray(skimage.data.coffee()).resize((48, 32), Image.BICUBIC), dtype=np.float64) / 255
    img = torch.from_numpy(((rgb - np.array(mean)) / np.array(std)).transpose(2, 0, 1)).float().unsqueeze(0)
    with torch.no_grad():
        ref.forward_features(img)
    for li, attn in enumerate(captured):
        cls_row = attn[0, :, 0].double().numpy()  # (heads, 1 + 6)
        np.testing.assert_allclose(saved[li].reshape(2, -1), cls_row[:, 1:], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(layers[li]["row_sum"], 1.0, atol=1e-9)  # softmax rows sum to 1
        np.testing.assert_allclose(np.array(layers[li]["cls_self"]) + saved[li].sum((-1, -2)), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# zero_shot_segmentation.py
def test_thresholding_band_and_jaccard_on_hand_computed_masks():
    amap = np.array([[4.0, 3.0], [2.0, 1.0]])  # normalised ascending: .1 .2 .3 .4, cumulative .1 .3 .6 1.0
    np.testing.assert_array_equal(zss.mass_threshold(amap, 0.6), [[True, True], [False, False]])  # cum > 0.4
    np.testing.assert_array_equal(zss.mass_threshold(amap, 0.3), [[True, False], [False, False]])  # cum > 0.7
    np.testing.assert_array_equal(zss.mass_threshold(amap, 1.0), [[True, True], [True, True]])
    np.testing.assert_array_equal(zss.mass_threshold(np.zeros((2, 2)), 0.6), np.zeros((2, 2), bool))
    np.testing.assert_array_equal(zss.mass_threshold(np.array([[-5.0, 1.0], [0.0, 0.0]]), 0.6),
                                  [[False, True], [False, False]])  # negatives clipped to 0
    with pytest.raises(ValueError, match="mass"):
        zss.mass_threshold(amap, 0.0)

    np.testing.assert_array_equal(zss.upsample_mask(np.array([[True, False]]), (2, 4)),
                                  [[True, True, False, False]] * 2)

    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert zss.jaccard(pred, gt) == 2 / 4
    valid = np.array([[1, 0, 1], [1, 1, 1]], bool)
    assert zss.jaccard(pred, gt, valid) == 2 / 3
    assert np.isnan(zss.jaccard(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))

    square = np.zeros((6, 6), bool)
    square[1:4, 1:4] = True  # dilation by one: the 5x5 block 0..4; erosion: only (2, 2)
    band = zss.boundary_band(square, 1)
    assert band.sum() == 24 and not band[2, 2] and band[0, 0] and not band[5, 5]
    left = np.zeros((4, 4), bool)
    left[:, :2] = True  # touches the image border: the border column is not boundary
    np.testing.assert_array_equal(zss.boundary_band(left, 1), np.tile([False, True, True, False], (4, 1)))

    # VOC labels: 255 band ignored for fg/bg, scored for the boundary.
    labels = np.array([[0, 0, 0, 0], [0, 255, 255, 0], [0, 255, 7, 255], [0, 0, 255, 0]], np.uint8)
    fg = np.zeros((4, 4), bool)
    fg[1:3, 1:4] = True  # predicted fg: 6 pixels, 2 of them valid (2,2) and (1,3)
    # fg: valid pred {(1,3), (2,2)}, gt {(2,2)} -> 1/2; bg: valid pred 9 pixels (all valid non-fg), gt 10 -> 9/10
    band_pred = zss.boundary_band(fg, 1)
    expected_boundary = (band_pred & (labels == 255)).sum() / (band_pred | (labels == 255)).sum()
    assert zss.score_masks(fg, labels, 1) == pytest.approx((1 / 2, 9 / 10, expected_boundary))
    assert zss.score_masks(fg, labels, 0)[2] == 0.0  # no predicted band, 5 void pixels


def _rectangle_voc(root: Path) -> np.ndarray:
    """A 64x96 image whose foreground is the patch-aligned rectangle rows 16..47, cols 24..71."""
    shape = np.zeros((64, 96), bool)
    shape[16:48, 24:72] = True
    rgb = np.where(shape[..., None], np.array([230, 40, 40]), np.array([30, 90, 200])).astype(np.uint8)
    labels = np.where(shape, 12, 0).astype(np.uint8)
    labels[zss.boundary_band(shape, 2)] = 255
    zss.write_voc_item(root, "rect", rgb, labels)
    return shape


def test_oracle_map_on_a_generated_voc_folder_scores_one(tmp_path):
    shape = _rectangle_voc(tmp_path / "voc")
    items = zss.voc_items(tmp_path / "voc")
    assert [i[0] for i in items] == ["rect"]
    np.testing.assert_array_equal(zss.read_labels(items[0][2])[shape & ~zss.boundary_band(shape, 2)], 12)
    grid_fg = shape[::8, ::8].astype(np.float64)  # the foreground on an 8x12 patch grid

    def oracle(rgb):
        return np.stack([grid_fg, 1.0 - grid_fg])[None]  # (1 layer, 2 heads, 8, 12): fg map and its complement

    scores = zss.evaluate_dataset(items, oracle, mass=1.0, radius=2)
    assert scores.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(scores[0, 0, 0], [1.0, 1.0, 1.0])  # exact fg, exact bg, exact band
    summary = zss.summarize(scores)
    assert summary["best_map"]["head"] == 1 and summary["best_map"]["foreground"] == 1.0
    assert summary["per_layer"][0]["head"] == 1
    # the complement map puts the foreground on the background: fg IoU 0, bg IoU 0
    assert scores[0, 0, 1, 0] == 0.0 and scores[0, 0, 1, 1] == 0.0


def test_zero_shot_main_tables_match_an_independent_scoring(tmp_path):
    _rectangle_voc(tmp_path / "voc")
    model, ckpt = tiny_cbt_checkpoint(tmp_path / "tiny.pth")
    res = zss.main(["--checkpoint", str(ckpt), "--voc", str(tmp_path / "voc"), "--image-size", "32",
                    "--out", str(tmp_path / "out")])
    label = next(iter(res["results"]))
    scores = np.load(next((tmp_path / "out").glob("scores_*.npz")))["scores"]
    assert scores.shape == (1, 2, 2, 3)

    # Independent scoring of every map: DINO threshold, nearest upsampling, bands, Jaccard, by hand.
    labels = np.array(Image.open(tmp_path / "voc" / "SegmentationClass" / "rect.png"))
    rgb = np.array(Image.open(tmp_path / "voc" / "JPEGImages" / "rect.jpg").convert("RGB"))
    img = photo_tensor(rgb, 32, 48)
    maps, _ = model.attention_maps(img)
    from scipy import ndimage
    for li in range(2):
        for hi in range(2):
            row = maps[li][0, hi, 0, 1:].double().numpy()
            order = np.argsort(row, kind="stable")
            keep = np.zeros(row.size, bool)
            keep[order] = np.cumsum(row[order]) / row.sum() > 0.4
            fg = np.kron(keep.reshape(4, 6), np.ones((16, 16), bool)).astype(bool)  # 4x6 grid -> 64x96
            valid = labels != 255
            inter, union = (fg & (labels > 0) & valid).sum(), ((fg | (labels > 0)) & valid).sum()
            bg_i, bg_u = (~fg & (labels == 0) & valid).sum(), ((~fg | (labels == 0)) & valid).sum()
            k = np.ones((3, 3), bool)
            band = ndimage.binary_dilation(fg, k, 2) & ~ndimage.binary_erosion(fg, k, 2, border_value=1)
            b_i, b_u = (band & ~valid).sum(), (band | ~valid).sum()
            np.testing.assert_allclose(scores[0, li, hi], [inter / union, bg_i / bg_u, b_i / b_u], rtol=1e-12)

    per_layer = read_csv(tmp_path / "out" / "per_layer.csv")
    for li, row in enumerate(per_layer):
        head = int(row["head"]) - 1
        assert head == int(np.argmax(scores[0, li, :, 0]))
        assert float(row["foreground"]) == pytest.approx(scores[0, li, head, 0])
    best = np.unravel_index(np.argmax(scores[0, :, :, 0]), (2, 2))
    table5 = {r["target"]: r[label] for r in read_csv(tmp_path / "out" / "table5_best_map.csv")}
    assert table5["(layer, head)"] == f"L{best[0] + 1} h{best[1] + 1}"
    for k, target in enumerate(("Foreground", "Background", "Boundary")):
        assert float(table5[target]) == pytest.approx(scores[0, best[0], best[1], k])
    table6 = read_csv(tmp_path / "out" / "table6_per_layer.csv")[0]
    assert float(table6["L2"]) == pytest.approx(scores[0, 1, :, 0].max())


def test_zero_shot_refuses_a_folder_without_labels(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        zss.voc_items(tmp_path)


# ---------------------------------------------------------------------------------------------------
# coding_rate.py
def _rate(z: np.ndarray, eps: float) -> float:
    """½ logdet(I + p/(N ε²) ZᵀZ) for rows z (N, p)."""
    n, p = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(p) + p / (n * eps ** 2) * z.T @ z)[1]


def test_coding_rate_values_match_forward_details(tmp_path):
    model, ckpt = tiny_cbt_checkpoint(tmp_path / "tiny.pth", arch="crate_cbt_small", depth=2,
                                      attn=("mssa", "cbsa"))
    names = ["astronaut", "coffee", "rocket"]
    coding_rate_script.main(["--checkpoint", str(ckpt), "--images", *names, "--image-size", "32",
                             "--out", str(tmp_path / "out")])
    compression = read_csv(tmp_path / "out" / "compression.csv")
    reduction = read_csv(tmp_path / "out" / "cbsa_reduction.csv")
    assert [int(r["layer"]) for r in compression] == [1, 2]
    assert sorted({int(r["layer"]) for r in reduction}) == [2]  # layer 1 is MSSA: no Fig. 6 rows

    rgbs = []
    for n in names:
        rgb = getattr(skimage.data, n)()
        s = min(rgb.shape[:2])
        top, left = (rgb.shape[0] - s) // 2, (rgb.shape[1] - s) // 2
        rgbs.append(photo_tensor(np.ascontiguousarray(rgb[top:top + s, left:left + s]), 32, 32))
    x, grid = model.embed(torch.cat(rgbs))
    eps = 0.1
    with torch.no_grad():
        for li, (attn, ff) in enumerate(model.transformer.layers):
            normed = attn.norm(x)
            proj = attn.fn.qkv(attn.fn.proj(normed)) if li == 1 else attn.fn.qkv(normed)
            heads = proj.double().reshape(3, proj.shape[1], 2, 32).transpose(1, 2).numpy()  # (B, H, T, p)
            unit = heads / np.linalg.norm(heads, axis=-1, keepdims=True)
            raw = np.mean([sum(_rate(heads[b, h], eps) for h in range(2)) for b in range(3)])
            nrm = np.mean([sum(_rate(unit[b, h], eps) for h in range(2)) for b in range(3)])
            assert float(compression[li]["raw"]) == pytest.approx(raw, rel=1e-6)
            assert float(compression[li]["normalized"]) == pytest.approx(nrm, rel=1e-6)
            if li == 1:
                d = attn.fn.forward_details(normed, grid, step_x=1.0)
                tokens, update = d["tokens"].double().numpy(), d["update"].double().numpy()
                reps, contracted = d["reps"].double().numpy(), d["contracted"].double().numpy()
                for h in range(2):
                    row = reduction[h]
                    assert int(row["head"]) == h + 1
                    before = np.array([_rate(tokens[b, h], eps) for b in range(3)])
                    after = np.array([_rate(tokens[b, h] + update[b, h], eps) for b in range(3)])
                    r_before = np.array([_rate(reps[b, h], eps) for b in range(3)])
                    r_after = np.array([_rate(contracted[b, h], eps) for b in range(3)])
                    for key, vals in (("tokens_before", before), ("tokens_after", after), ("reps_before", r_before),
                                      ("reps_after", r_after), ("tokens_reduction", before - after),
                                      ("reps_reduction", r_before - r_after)):
                        # rates are O(100) from float32 activations: compare to 1e-6 of that scale
                        assert float(row[f"{key}_mean"]) == pytest.approx(vals.mean(), rel=1e-6, abs=1e-4)
                        assert float(row[f"{key}_std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)
                # κ = 1 really is used: the update is the broadcast contraction AᵀC itself
                a, c = d["attn"].double(), d["contracted"].double()
                np.testing.assert_allclose(update, (a.transpose(-1, -2) @ c).numpy(), rtol=1e-4, atol=1e-6)
            x = ff(attn.fn(normed, grid_size=grid) + x)
    assert (tmp_path / "out" / "compression.png").exists()
    assert next((tmp_path / "out").glob("reduction_*.png"))


def test_coding_rate_refuses_unpaired_models(tmp_path):
    with pytest.raises(ValueError, match="--arch lists 2"):
        coding_rate_script.main(["--arch", "cbt_tiny", "cbt_small", "--checkpoint", "a.pth",
                                 "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------
# synthetic_compression.py
def test_synthetic_compression_collapses_points_onto_separated_lines(tmp_path):
    res = synthetic.main(["--out", str(tmp_path)])
    result = json.loads((tmp_path / "synthetic_compression.json").read_text())
    assert result["residual_ratio"] >= 10.0
    assert result["direction_abs_cos_min"] > 0.99 and len(result["direction_abs_cos"]) == 10
    assert result["min_angle_final_deg"] > 20.0
    assert result["coding_rate_monotone"] and result["coding_rate_final"] < result["coding_rate_initial"]
    assert result["snapshots"] == [0, 1, 256, 512, 640, 768, 896, 1024]

    snaps = np.load(tmp_path / "snapshots.npz")
    z0, z1, zn = snaps["iter_0"], snaps["iter_1"], snaps["iter_1024"]
    assert z0.shape == (10, 50, 3)
    # one step, written out: Z - step * Z (I + ZᵀZ/ε²)⁻¹ with step 0.005, ε = 1
    expected = np.stack([z - 0.005 * z @ np.linalg.inv(np.eye(3) + z.T @ z) for z in z0])
    np.testing.assert_allclose(z1, expected, rtol=1e-10, atol=1e-13)

    def residual(z):
        s = np.linalg.svd(z, compute_uv=False)
        return (s[:, 1:] ** 2).sum() / (s ** 2).sum()

    assert result["residual_initial"] == pytest.approx(residual(z0), rel=1e-9)
    assert result["residual_final"] == pytest.approx(residual(zn), rel=1e-6)
    dirs = snaps["directions"]
    final = np.linalg.svd(zn)[2][:, 0]
    np.testing.assert_allclose(np.abs((final * dirs).sum(-1)), result["direction_abs_cos"], rtol=1e-9)
    curve = read_csv(tmp_path / "curve.csv")
    assert len(curve) == 1025 and float(curve[0]["residual"]) == pytest.approx(residual(z0))
    assert res["result"]["residual_ratio"] == result["residual_ratio"]


def test_synthetic_principal_operator_equals_linear_form(tmp_path):
    a = synthetic.main(["--iterations", "5", "--out", str(tmp_path / "a")])["snapshots"][5]
    b = synthetic.main(["--iterations", "5", "--operator", "principal", "--out", str(tmp_path / "b")])["snapshots"][5]
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# robustness.py
ROBUST_TINY = ["--set", "depth=1", "--set", "dim=32", "--set", "heads=2", "--set", "dim_head=16"]


def test_robustness_noise_only_on_chosen_modules_restored_and_averaged(tmp_path):
    calls = []
    state0 = {}

    def fake_metric(model):
        """Deterministic: squared deviation of the perturbed tensors from the clean weights, per value."""
        if not state0:
            state0.update({k: v.clone() for k, v in model.state_dict().items()})
        now = model.state_dict()
        changed = {k for k in now if not torch.equal(now[k], state0[k])}
        calls.append(changed)
        return float(sum(((now[k] - state0[k]).double() ** 2).sum() for k in now))

    sigmas, seeds = ["0", "0.01", "0.1", "1"], ["0", "1", "2"]
    res = robustness.main(["--sigmas", *sigmas, "--seeds", *seeds, *ROBUST_TINY, "--out", str(tmp_path)],
                          metric_fn=fake_metric)
    model = res["model"]
    chosen = {n for n, _ in res["parameters"]}
    attn_names = {n for n, _ in model.named_parameters() if ".0.fn." in n}
    assert chosen == attn_names and chosen  # default set: the attention layers, all of their parameters
    n_values = sum(p.numel() for n, p in model.named_parameters() if n in chosen)
    assert n_values > 1000
    for changed in calls:
        assert changed <= chosen  # nothing outside the chosen modules ever moves
    assert calls[0] == set() and all(calls[1 + i] == set() for i in range(3))  # clean and σ = 0
    assert all(c == chosen for c in calls[4:])
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())  # restored at the end

    rows = read_csv(tmp_path / "robustness.csv")
    metric = {(float(r["sigma"]), int(r["seed"])): float(r["metric"]) for r in rows}
    assert res["clean"] == 0.0 and all(metric[(0.0, s)] == 0.0 for s in range(3))
    for s in range(3):
        # restored before each trial: the same seed's unit noise at every σ (no accumulation)
        unit = metric[(1.0, s)]
        assert metric[(0.1, s)] == pytest.approx(unit * 0.01, rel=1e-5)
        assert metric[(0.01, s)] == pytest.approx(unit * 1e-4, rel=1e-5)
        assert unit == pytest.approx(n_values, rel=0.1)  # E‖σ g‖² = σ² n
    assert len({metric[(1.0, s)] for s in range(3)}) == 3  # seeds differ
    for row in read_csv(tmp_path / "curve.csv"):
        vals = [metric[(float(row["sigma"]), s)] for s in range(3)]
        assert float(row["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-9)
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert set(saved["parameters"]) == chosen and (tmp_path / "robustness.png").exists()


def test_robustness_zero_sigma_reproduces_clean_top1_and_patterns_select(tmp_path):
    res = robustness.main(["--sigmas", "0", "0.5", "--seeds", "0", "1", *ROBUST_TINY,
                           "--modules", "mlp_head.*", "--out", str(tmp_path)])
    assert {n for n, _ in res["parameters"]} == {"mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight",
                                                 "mlp_head.1.bias"}
    zero = [r["metric"] for r in res["rows"] if r["sigma"] == 0.0]
    assert zero == [res["clean"], res["clean"]] and 0.0 <= res["clean"] <= 100.0
    # top-1 on the 359 validation digits of the demo split is a multiple of 100/359
    assert all(abs(r["metric"] * 3.59 - round(r["metric"] * 3.59)) < 1e-9 for r in res["rows"])
    with pytest.raises(ValueError, match="matches no parameter"):
        robustness.main(["--modules", "nothing.*", "--sigmas", "0", *ROBUST_TINY, "--out", str(tmp_path)])


def test_robustness_segmentation_path_perturbs_only_the_decoder_attention(tmp_path):
    from semantic_segmentation.model import create_segmenter, default_model_config

    torch.manual_seed(0)
    cfg = default_model_config("test", n_cls=4, crop_size=32, d_model=32, n_heads=2, n_layers=1, drop_path_rate=0.0,
                               decoder=dict(n_layers=2, n_heads=2, dim_head=8, rep_grid=[2, 2], tied_output=True))
    save_model_checkpoint(create_segmenter(cfg).eval(), tmp_path / "seg.pth")
    rng = np.random.default_rng(0)
    base = tmp_path / "ade" / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (base / sub / "validation").mkdir(parents=True)
    for i in range(2):
        label = rng.integers(0, 5, (32, 48)).astype(np.uint8)  # 0 = "other" (ignored), 1..4 = classes
        Image.fromarray(rng.integers(0, 255, (32, 48, 3)).astype(np.uint8)).save(
            base / "images" / "validation" / f"ADE_val_{i:08d}.jpg")
        Image.fromarray(label).save(base / "annotations" / "validation" / f"ADE_val_{i:08d}.png")
    argv = ["--task", "segmentation", "--checkpoint", str(tmp_path / "seg.pth"), "--data", str(tmp_path / "ade"),
            "--im-size", "32", "--window-size", "32", "--window-stride", "32", "--seeds", "0", "1"]

    res = robustness.main(argv + ["--sigmas", "0", "0.3", "--out", str(tmp_path / "real")])
    assert [r["metric"] for r in res["rows"] if r["sigma"] == 0.0] == [res["clean"]] * 2
    assert 0.0 <= res["clean"] <= 100.0
    chosen = {n for n, _ in res["parameters"]}
    assert chosen == {n for n, _ in res["model"].named_parameters() if n.startswith("decoder.net.layers.")
                      and ".fn." in n}  # the CBSA layers of the decoder; no to_out in the tied (CBT-dagger) form
    assert not any("to_out" in n for n in chosen) and any(n.endswith("fn.proj.weight") for n in chosen)

    seen = []
    robustness.main(argv + ["--sigmas", "0.1", "--out", str(tmp_path / "fake")],
                    metric_fn=lambda m: seen.append({n: p.detach().clone() for n, p in m.named_parameters()}) or 0.0)
    clean, noisy = seen[0], seen[1:]
    for state in noisy:
        assert all(torch.equal(state[n], clean[n]) == (n not in chosen) for n in clean)


def test_bad_inputs_are_refused_with_the_offending_value(tmp_path):
    common = importlib.import_module("_common")
    with pytest.raises(ValueError, match="unknown image 'nosuchphoto'"):
        common.load_rgb("nosuchphoto")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        common.load_rgb(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="100x224 must be positive multiples of the patch size 16"):
        common.fit_size(300, 400, [100, 224], 16)
    assert common.fit_size(300, 451, [224], 16) == (224, 336)  # short side 224, long side 336.7 -> 336
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        common.parse_overrides(["depth"])
    assert common.parse_overrides(["depth=2", "rep_grid=[4, 4]"]) == {"depth": 2, "rep_grid": (4, 4)}
    authors = tmp_path / "authors.pth.tar"
    model = cbsa_core.create_model("cbt_tiny", **TINY)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1, "best_acc1": 0.0}, authors)
    with pytest.raises(ValueError, match=r"authors.pth.tar has no arch record .*--arch"):
        common.build_model(None, str(authors))
    loaded = common.build_model("cbt_tiny", str(authors), TINY)
    assert loaded.model_config["legacy_token_layout"] is True  # the release's layout for its checkpoints
    rgb_label = tmp_path / "voc" / "SegmentationClass"
    rgb_label.mkdir(parents=True)
    (tmp_path / "voc" / "JPEGImages").mkdir()
    Image.new("RGB", (4, 4)).save(rgb_label / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "voc" / "JPEGImages" / "x.jpg")
    with pytest.raises(ValueError, match=r"x.png has mode RGB"):
        zss.read_labels(zss.voc_items(tmp_path / "voc")[0][2])
