"""The segmentation baselines (Fig. 8): Segmenter's mask transformer and linear decoder, DEPICT-SA/CA and the
ToST decoder, against the independent re-statement of their releases in ``segmentation_reference`` (random
weights); their own checkpoint files (``checkpoint.pth`` + ``variant.yml``) loading with exact outputs; the
pretrained folder; FLOPs and parameter counts; training and evaluation of every decoder through ``main.py``
and ``eval.py``; the robustness script's choice of parameters; and the refusals of bad input."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError, save_model_checkpoint
from segmentation_reference import (RefDecoderLinear, RefDepictMaskTransformer, RefSegmenter,
                                    RefSegmenterMaskTransformer, RefTostMaskTransformer, RefViT, perturb_norms_,
                                    segmenter_variant, write_release_checkpoint)
from semantic_segmentation import (DECODERS, build_dataset, build_decoder, create_encoder, create_segmenter,
                                   decoder_flops, default_model_config, evaluate_miou, load_model,
                                   load_pretrained_encoder, save_pretrained)
from semantic_segmentation import eval as seg_eval
from semantic_segmentation import main as seg_main
from test_segmentation_data import N_CLS as TOY_CLS
from test_segmentation_data import make_toy_ade20k

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
robustness = importlib.import_module("robustness")

pytestmark = pytest.mark.usefixtures("one_thread")

# Small but complete: decoder widths differ from the encoder's where the release allows it, inner widths differ
# from the token width, a 4x4 crop grid, non-square and padded inputs.
PATCH, CROP, N_CLS = 16, 64, 5
SIZES = [(64, 64), (48, 80), (52, 60)]


def _tokens(grid, width, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, grid[0] * grid[1], width)


# Reference decoder, our config, encoder width: on random weights (torch's default inits, biases non-zero).
def _ref_decoder(name: str, d: int):
    if name == "segmenter_mask_transformer":
        return (RefSegmenterMaskTransformer(N_CLS, PATCH, d_encoder=d, n_layers=2, n_heads=2, d_model=64, d_ff=192),
                dict(name=name, n_layers=2, n_heads=2, d_model=64, d_ff=192))
    if name == "linear":
        return RefDecoderLinear(N_CLS, PATCH, d), dict(name=name)
    if name == "depict_sa":
        return (RefDepictMaskTransformer(N_CLS, PATCH, 2, 2, d, mode="sa", dim_head=12),
                dict(name=name, n_layers=2, n_heads=2, dim_head=12))
    if name == "depict_ca":
        return (RefDepictMaskTransformer(N_CLS, PATCH, 2, 2, d, mode="ca", dim_head=12, cross_layers=2,
                                         cross_dim_head=6),
                dict(name=name, n_layers=2, n_heads=2, dim_head=12, cross_layers=2, cross_dim_head=6))
    assert name == "tssa"
    return RefTostMaskTransformer(N_CLS, PATCH, 2, 4, d), dict(name=name, n_layers=2, n_heads=4)


BASELINES = ["segmenter_mask_transformer", "linear", "depict_sa", "depict_ca", "tssa"]


@pytest.mark.parametrize("name", BASELINES)
def test_decoder_matches_its_released_equations(name):
    d = 48
    torch.manual_seed(0)
    ref, config = _ref_decoder(name, d)
    ref = perturb_norms_(ref).eval()
    ours = build_decoder(config, N_CLS, d).eval()
    assert ours.name == name
    ours.load_state_dict(ref.state_dict(), strict=True)  # the release's parameter names, no renaming
    for grid in [(4, 4), (3, 5)]:
        x = _tokens(grid, d)
        with torch.no_grad():
            got, want = ours(x, grid), ref(x, (grid[0] * PATCH, grid[1] * PATCH))
        assert got.shape == (2, N_CLS, *grid)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=rf"\(B, N, {d}\)"):
        ours(torch.randn(1, 16, d + 1), (4, 4))
    with pytest.raises(ValueError, match=r"grid_size=\(4, 5\) needs 20 patch tokens, got 16"):
        ours(torch.randn(1, 16, d), (4, 5))


def test_segmenter_attention_maps_are_its_get_attention_map():
    torch.manual_seed(0)
    ref, config = _ref_decoder("segmenter_mask_transformer", 48)
    ours = build_decoder(config, N_CLS, 48).eval()
    ours.load_state_dict(perturb_norms_(ref).state_dict())
    x = _tokens((4, 4), 48)
    maps = ours.attention_maps(x, (4, 4))
    assert len(maps) == 2 and maps[0].shape == (2, 2, 16 + N_CLS, 16 + N_CLS)
    for j in range(2):
        torch.testing.assert_close(maps[j], ref.get_attention_map(x, j), atol=1e-6, rtol=1e-5)
    depict = build_decoder(_ref_decoder("depict_ca", 48)[1], N_CLS, 48)
    snet0, cnet0 = depict.attention_maps(x, (4, 4))[0], depict.attention_maps(x, (4, 4))[2]
    assert snet0.shape == (2, 2, 16, 16) and cnet0.shape == (2, 2, N_CLS, 16)  # classes attend to the patches
    torch.testing.assert_close(cnet0.sum(-1), torch.ones(2, 2, N_CLS))
    for name in ("depict_sa", "tssa"):  # over all 16 + K tokens; DEPICT's rows are softmaxes over the tokens
        (first, *_) = build_decoder(_ref_decoder(name, 48)[1], N_CLS, 48).attention_maps(x, (4, 4))
        assert first.shape[-2:] == (16 + N_CLS, 16 + N_CLS)
    torch.testing.assert_close(first.sum(1), torch.ones(2, 16 + N_CLS, 16 + N_CLS))  # TSSA: softmax over heads
    with pytest.raises(ValueError, match="no attention layers"):
        build_decoder(dict(name="linear"), N_CLS, 48).attention_maps(x, (4, 4))


# ------------------------------------------------------------------------------------ the releases' own files


def _release_model(kind: str, distilled: bool = False):
    """(reference Segmenter, variant decoder entry) as each release's train.py builds and records it."""
    d, heads = 64, 2
    encoder = RefViT(CROP, PATCH, d, depth=2, heads=heads, distilled=distilled)
    if kind == "segmenter_mask_transformer":  # factory: d_model = encoder width, d // 64 heads, 4d MLP
        decoder = RefSegmenterMaskTransformer(N_CLS, PATCH, d, n_layers=2, n_heads=d // 64, d_model=d, d_ff=4 * d)
        entry = dict(drop_path_rate=0.0, dropout=0.1, n_layers=2, name="mask_transformer")
    elif kind == "linear":
        decoder, entry = RefDecoderLinear(N_CLS, PATCH, d), dict(name="linear")
    elif kind == "depict_sa":  # DEPICT's config.yml: 3 layers, 3 heads; dim_head 100 in its code
        decoder = RefDepictMaskTransformer(N_CLS, PATCH, 2, 3, d, mode="sa")
        entry = dict(dropout=0.0, n_layers=2, n_heads=3, name="mask_transformer")
    else:  # DEPICT-CA: the same variant (DEPICT switches modes by editing code); cnet 3 layers x 50
        decoder = RefDepictMaskTransformer(N_CLS, PATCH, 1, 3, d, mode="ca")
        entry = dict(dropout=0.0, n_layers=1, n_heads=3, name="mask_transformer")
    torch.manual_seed(3)
    model = perturb_norms_(RefSegmenter(encoder, decoder)).eval()
    variant = segmenter_variant(crop=CROP, patch=PATCH, dim=d, depth=2, heads=heads, n_cls=N_CLS, decoder=entry,
                                backbone="deit_test" if distilled else "vit_test",
                                normalization="deit" if distilled else "vit", distilled=distilled)
    return model, variant


RELEASE_FILES = [("segmenter_mask_transformer", False), ("linear", False), ("linear", True),
                 ("segmenter_mask_transformer", True), ("depict_sa", False), ("depict_ca", False)]


@pytest.mark.parametrize("kind, distilled", RELEASE_FILES)
def test_release_checkpoint_loads_with_exact_outputs(tmp_path, kind, distilled):
    ref, variant = _release_model(kind, distilled)
    path = write_release_checkpoint(tmp_path / "log" / "run", ref, N_CLS, variant)
    model = load_model(path)
    assert not model.training and model.decoder.name == kind and model.encoder.distilled == int(distilled)
    assert model.model_config["normalization"] == ("deit" if distilled else "vit")
    dec = model.model_config["decoder"]
    if kind == "segmenter_mask_transformer":
        assert (dec["n_layers"], dec["n_heads"], dec["d_model"], dec["d_ff"], dec["dropout"]) == (2, 1, 64, 256, 0.1)
    if kind.startswith("depict"):
        assert (dec["n_heads"], dec["dim_head"]) == (3, 100)
    if kind == "depict_ca":
        assert (dec["n_layers"], dec["cross_layers"], dec["cross_dim_head"]) == (1, 3, 50)
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


def test_distilled_backbone_takes_pretrained_deit_weights(tmp_path):
    """Seg-B-dagger's encoder: [CLS] and [DIST] keep their position embeddings when the grid is resized."""
    torch.manual_seed(0)
    src = create_encoder("deit_base_distilled_patch16_384", (64, 64), d_model=32, n_heads=2, n_layers=1)
    assert src.distilled == 1 and tuple(src.pos_embed.shape) == (1, 2 + 16, 32)
    torch.save({"model": src.state_dict()}, tmp_path / "deit.pth")  # a DeiT release file holds {"model": ...}
    dst = create_encoder("deit_base_distilled_patch16_384", (96, 96), d_model=32, n_heads=2, n_layers=1)
    load_pretrained_encoder(dst, tmp_path / "deit.pth")
    torch.testing.assert_close(dst.pos_embed[:, :2], src.pos_embed[:, :2], atol=0, rtol=0)
    grid = src.pos_embed[:, 2:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dst.pos_embed[:, 2:], want.permute(0, 2, 3, 1).reshape(1, 36, 32))
    torch.testing.assert_close(dst.dist_token, src.dist_token, atol=0, rtol=0)
    assert default_model_config("deit_base_distilled_patch16_384")["distilled"] is True
    assert default_model_config("deit_base_distilled_patch16_384")["normalization"] == "deit"


@pytest.mark.parametrize("kind", ["depict_sa", "depict_ca", "segmenter_mask_transformer"])
def test_release_file_with_a_missing_key_is_refused_naming_file_and_key(tmp_path, kind):
    ref, variant = _release_model(kind)
    sd = ref.state_dict()
    key = {"depict_sa": "decoder.net.layers.1.fn.step_size", "depict_ca": "decoder.cnet.layers.2.fn.proj",
           "segmenter_mask_transformer": "decoder.proj_classes"}[kind]
    del sd[key]
    path = write_release_checkpoint(tmp_path / "run", ref, N_CLS, variant, state_dict=sd)
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)run/checkpoint\.pth.*{key.replace('.', r'[.]')}"):
        load_model(path)


def test_file_without_a_recognisable_decoder_is_refused_naming_the_file(tmp_path):
    ref, variant = _release_model("depict_sa")
    sd = {k.replace("decoder.net.", "decoder.body."): v for k, v in ref.state_dict().items()}
    path = write_release_checkpoint(tmp_path / "odd", ref, N_CLS, variant, state_dict=sd)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)odd/checkpoint\.pth: no recognisable segmentation "
                                                      r"decoder.*decoder\.body\.layers\.0\.fn\.proj"):
        load_model(path)
    # a Segmenter file whose variant does not match the weights names the disagreement
    ref, variant = _release_model("segmenter_mask_transformer")
    variant["net_kwargs"]["decoder"]["n_layers"] = 3
    with pytest.raises(CheckpointMismatchError, match=r"(?s)variant\.yml.*decoder depth: variant n_layers=3, "
                                                      r"checkpoint has 2 blocks"):
        load_model(write_release_checkpoint(tmp_path / "seg", ref, N_CLS, variant))


def test_the_seed_command_evaluates_a_depict_checkpoint(tmp_path):
    """``python eval.py log/DEPICT-SA-Small/checkpoint.pth ade20k --singlescale`` (DEPICT's README command, as
    this track's README gives it), run from a folder holding log/ with $DATASET set."""
    root = make_toy_ade20k(tmp_path / "data", n_train=1, n_val=2)
    torch.manual_seed(0)
    ref = RefSegmenter(RefViT(CROP, PATCH, 32, 1, 2), RefDepictMaskTransformer(TOY_CLS, PATCH, 1, 2, 32, dim_head=8))
    variant = segmenter_variant(crop=CROP, patch=PATCH, dim=32, depth=1, heads=2, n_cls=TOY_CLS,
                                decoder=dict(dropout=0.0, n_layers=1, n_heads=2, name="mask_transformer"))
    run = tmp_path / "work" / "log" / "DEPICT-SA-Small"
    write_release_checkpoint(run, ref.eval(), TOY_CLS, variant)
    env = dict(os.environ, DATASET=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "semantic_segmentation" / "eval.py"),
                           "log/DEPICT-SA-Small/checkpoint.pth", "ade20k", "--singlescale", "--num-workers", "0"],
                          cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = yaml.safe_load((run / "scores_ss.yml").read_text())
    model = load_model(run / "checkpoint.pth")
    assert model.decoder.name == "depict_sa"
    direct = evaluate_miou(model, build_dataset("ade20k", root, "val", mode="eval", n_cls=TOY_CLS, im_size=CROP),
                           window_size=CROP, window_stride=CROP - 32)
    assert report["mean_iou"] == pytest.approx(round(direct["mean_iou"], 2))
    assert report["settings"]["window_size"] == CROP and report["num_images"] == 2


# ------------------------------------------------------------------------------------------ pretrained folder


def _tiny_config(name: str, **decoder):
    settings = dict(mask_transformer=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2]),
                    segmenter_mask_transformer=dict(n_layers=1, n_heads=2), linear=dict(),
                    depict_sa=dict(n_layers=1, n_heads=2, dim_head=8),
                    depict_ca=dict(n_layers=1, n_heads=2, dim_head=8, cross_layers=1, cross_dim_head=4),
                    tssa=dict(n_layers=1, n_heads=2))[name]
    return default_model_config("test", n_cls=N_CLS, crop_size=CROP, d_model=32, n_heads=2, n_layers=1,
                                drop_path_rate=0.0, decoder=dict(name=name, **settings, **decoder))


@pytest.mark.parametrize("name, extra", [("mask_transformer", {}), ("mask_transformer", dict(tied_output=True)),
                                         *[(n, {}) for n in BASELINES]])
def test_pretrained_folder_round_trip(tmp_path, name, extra):
    torch.manual_seed(0)
    model = create_segmenter(_tiny_config(name, **extra)).eval()
    with torch.no_grad():  # nothing left at its init value (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "segmenter" and config["format_version"] == 1
    assert config["decoder"]["name"] == name and config["n_cls"] == N_CLS and config["normalization"] == "vit"
    assert config["inference"] == dict(im_size=CROP, window_size=CROP, window_stride=CROP - 32)
    loaded = load_model(out)
    assert loaded.model_config == model.model_config and not loaded.training
    assert loaded.variant["inference_kwargs"]["im_size"] == CROP
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_pretrained_folder_from_a_release_file_and_bad_folders(tmp_path):
    ref, variant = _release_model("depict_ca")
    model = load_model(write_release_checkpoint(tmp_path / "run", ref, N_CLS, variant))
    out = save_pretrained(model, tmp_path / "depict_ca")
    config = json.loads((out / "config.json").read_text())
    assert config["inference"] == dict(im_size=CROP, window_size=CROP, window_stride=CROP - 32)  # from variant.yml
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), ref(x), atol=1e-4, rtol=0)
    # bad folders: each error names the file at fault
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a folder without config\.json"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    save_pretrained(model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*broken/model\.safetensors"):
        load_model(broken)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"cannot parse .*broken/config\.json"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps(dict(config, arch="cbt_small")))
    with pytest.raises(CheckpointMismatchError, match=r"broken/config\.json describes arch 'cbt_small'"):
        load_model(broken)
    wrong = tmp_path / "wrong"
    save_pretrained(model, wrong)
    (wrong / "config.json").write_text(json.dumps(dict(config, decoder=dict(config["decoder"], cross_layers=2))))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)pretrained folder .*wrong.*decoder\.cnet\.layers\.2"):
        load_model(wrong)
    with pytest.raises(TypeError, match="takes a semantic_segmentation Segmenter"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "nope")


# ----------------------------------------------------------------------------------- configs, params, FLOPs


def test_released_settings_are_the_defaults():
    cfg = default_model_config("vit_small_patch16_384", decoder=dict(name="segmenter_mask_transformer"))["decoder"]
    assert cfg == dict(name="segmenter_mask_transformer", n_layers=2, d_model=384, n_heads=6, d_ff=1536,
                       dropout=0.1, drop_path_rate=0.0)  # segm/config.yml + factory (n_heads = d // 64, d_ff = 4d)
    assert default_model_config("vit_large_patch16_384", decoder=dict(name="depict_ca"))["decoder"] == dict(
        name="depict_ca", n_layers=3, n_heads=3, dim_head=100, cross_layers=3, cross_dim_head=50, dropout=0.0)
    assert default_model_config("vit_tiny_patch16_384", decoder=dict(name="depict_sa"))["decoder"] == dict(
        name="depict_sa", n_layers=3, n_heads=3, dim_head=100, dropout=0.0)
    assert default_model_config(decoder=dict(name="tssa"))["decoder"] == dict(name="tssa", n_layers=3, n_heads=3)
    assert default_model_config()["decoder"] == dict(name="mask_transformer", n_layers=3, n_heads=3, dim_head=100,
                                                     rep_grid=[10, 10], tied_output=False)
    with pytest.raises(ValueError, match=r"decoder\.rep_grid: not a setting of the depict_sa decoder"):
        default_model_config(decoder=dict(name="depict_sa", rep_grid=[2, 2]))
    with pytest.raises(ValueError, match="unknown decoder 'deeplab'"):
        default_model_config(decoder=dict(name="deeplab"))
    with pytest.raises(ValueError, match=r"n_heads=3 does not divide the width D=1024"):
        default_model_config("vit_large_patch16_384", decoder=dict(name="tssa"))
    with pytest.raises(ValueError, match=r"decoder\.n_layers must be an integer >= 1, got 0"):
        default_model_config(decoder=dict(name="depict_sa", n_layers=0))


def _released_params(name: str, d: int, k: int = 150) -> int:
    """Parameter count from the released shapes (written out here, not read from the modules)."""
    ln = 2 * d
    if name == "segmenter_mask_transformer":  # proj_dec, cls_emb, 2 blocks, proj_patch/classes, norms
        block = ln + (3 * d * d + 3 * d) + (d * d + d) + ln + (4 * d * d + 4 * d) + (4 * d * d + d)
        return (d * d + d) + k * d + 2 * block + 2 * d * d + ln + 2 * k
    if name == "linear":
        return d * k + k
    if name == "depict_sa":  # cls_emb, 3 x (LN, proj 300 x d, step_size), decoder_norm, mask_norm
        return k * d + 3 * (ln + 300 * d + 1) + ln + 2 * k
    if name == "depict_ca":  # snet 3 x (LN, 300 x d, step), cnet 3 x (LN, 150 x d, step), snorm, cnorm
        return k * d + 3 * (ln + 300 * d + 1) + 3 * (ln + 150 * d + 1) + 2 * ln + 2 * k
    if name == "tssa":  # 3 x (LN, temp (3, 1), qkv d x d, to_out d x d + d)
        return k * d + 3 * (ln + 3 + d * d + d * d + d) + ln + 2 * k
    raise KeyError(name)


@pytest.mark.parametrize("name", BASELINES)
def test_released_decoder_parameter_counts(name):
    for d in (192, 384, 768) + (() if name == "tssa" else (1024,)):
        decoder = build_decoder(dict(name=name), 150, d)
        assert sum(p.numel() for p in decoder.parameters()) == _released_params(name, d), (name, d)
    assert sum(p.numel() for p in build_decoder(dict(name="linear"), 150, 384).parameters()) == 57_750


@pytest.mark.parametrize("name", BASELINES)
def test_analytic_flops_equal_flop_counter(name):
    """FlopCounterMode counts every matrix product that runs (math SDPA); the analytic count must equal it."""
    _, config = _ref_decoder(name, 48)
    decoder = build_decoder(config, N_CLS, 48).eval()
    for grid in [(4, 4), (3, 5)]:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            decoder(torch.zeros(1, grid[0] * grid[1], 48), grid)
        assert decoder_flops(decoder, grid)["total"] == counter.get_total_flops(), (name, grid)


def test_released_decoder_gflops_by_formula():
    """CBT at 512² (N = 1024 patches, K = 150): 2·(3·(2TDI + 3TmI + 2m²I) + NKD), T = N + K, I = 300, m = 100
    (docs/authors-release.md §4.1: 1.54 / 2.41 / 4.15 / 5.31 G); DEPICT-SA: 2·(3·(2TDI + 2T²I) + NKD)."""
    n, k, t, i, m = 1024, 150, 1174, 300, 100
    for d, expected in ((192, 1.54), (384, 2.41), (768, 4.15), (1024, 5.31)):
        cbt = 2 * (3 * (2 * t * d * i + 3 * t * m * i + 2 * m * m * i) + n * k * d)
        assert decoder_flops(build_decoder(dict(name="mask_transformer"), k, d), (32, 32))["total"] == cbt
        assert round(cbt / 1e9, 2) == expected
        depict = 2 * (3 * (2 * t * d * i + 2 * t * t * i) + n * k * d)
        assert decoder_flops(build_decoder(dict(name="depict_sa"), k, d), (32, 32))["total"] == depict
    # Segmenter's two blocks alone (qkv + proj 4TD², attention 2T²D, MLP 8TD²): Seg-L at 640² (T = 1600 + 150)
    t, d = 1750, 1024
    flops = decoder_flops(build_decoder(dict(name="segmenter_mask_transformer"), k, d), (40, 40))
    assert flops["layers"] == 2 * 2 * (4 * t * d * d + 2 * t * t * d + 8 * t * d * d)
    assert flops["total"] == flops["layers"] + 2 * (1600 * d * d + 1600 * d * d + k * d * d + 1600 * k * d)


def test_decoder_flops_script_prints_every_decoder(capsys):
    script = importlib.import_module("decoder_flops")
    rows = script.main(["--sizes", "T", "L"])
    out = capsys.readouterr().out
    assert "paper (digitised)" in out
    labels = {(r["size"], r["decoder"], r["crop"]) for r in rows}
    for size in ("T", "L"):
        for label in ("cbt", "cbt_dagger", "segmenter_mask_transformer", "segmenter_linear", "depict_sa",
                      "depict_ca", "tssa"):
            assert (size, label, 512) in labels
    assert ("L", "segmenter_mask_transformer", 640) in labels
    cbt_t = next(r for r in rows if (r["size"], r["decoder"]) == ("T", "cbt"))
    assert round(cbt_t["gflops"], 2) == 1.54 and cbt_t["paper_gflops_digitised"] == 1.5
    assert cbt_t["params"] == 376_830


# ---------------------------------------------------------------------------------- training and evaluation


TRAIN_ARGS = ["--dataset", "ade20k", "--backbone", "test", "--d-model", "32", "--enc-heads", "2", "--enc-layers", "1",
              "--n-cls", str(TOY_CLS), "--crop-size", "64", "--im-size", "64", "--window-size", "64",
              "--window-stride", "48", "--batch-size", "2", "--num-workers", "0", "--from-scratch", "--device", "cpu",
              "--no-tensorboard", "--print-freq", "1000", "--drop-path", "0.0", "--epochs", "1",
              "--max-steps-per-epoch", "1", "--learning-rate", "0.05"]
DECODER_ARGS = {
    "mask_transformer": ["--dec-layers", "1", "--dec-heads", "2", "--dec-dim-head", "16", "--rep-grid", "2", "2"],
    "segmenter_mask_transformer": ["--dec-layers", "1", "--dec-heads", "2"],  # 32 // 64 = 0 heads by default
    "linear": [],
    "depict_sa": ["--dec-layers", "1", "--dec-heads", "2", "--dec-dim-head", "16"],
    "depict_ca": ["--dec-layers", "1", "--dec-heads", "2", "--dec-dim-head", "16", "--dec-cross-layers", "1",
                  "--dec-cross-dim-head", "8"],
    "tssa": ["--dec-layers", "1", "--dec-heads", "2"],
}


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory) -> Path:
    return make_toy_ade20k(tmp_path_factory.mktemp("small_ade"), n_train=2, n_val=1)


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_decoder_trains_a_step_and_evaluates_through_the_clis(small_ade, tmp_path, name):
    run = tmp_path / "run"
    assert seg_main.main(TRAIN_ARGS + DECODER_ARGS[name] + ["--decoder", name, "--data-root", str(small_ade),
                                                           "--log-dir", str(run)]) == 0
    record = [r for r in map(json.loads, (run / "log.txt").read_text().splitlines()) if "event" not in r][-1]
    assert torch.isfinite(torch.tensor(record["train_loss"])) and "val_mean_iou" in record
    model = load_model(run / "checkpoint.pth")
    assert model.decoder.name == name and model.model_config["decoder"]["name"] == name
    # the one SGD step reached every decoder parameter: each has a non-zero momentum buffer
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    state = ckpt["optimizer"]["state"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's (no frozen encoder head)
    decoder_idx = [i for i, n in enumerate(names) if n.startswith("decoder.")]
    assert decoder_idx and all(i in state and state[i]["momentum_buffer"].abs().sum() > 0 for i in decoder_idx)
    assert seg_eval.main([str(run / "checkpoint.pth"), "ade20k", "--data-root", str(small_ade), "--singlescale",
                          "--num-workers", "0", "--device", "cpu"]) == 0
    report = yaml.safe_load((run / "scores_ss.yml").read_text())
    direct = evaluate_miou(model, build_dataset("ade20k", small_ade, "val", mode="eval", n_cls=TOY_CLS, im_size=64),
                           window_size=64, window_stride=32)
    assert report["mean_iou"] == pytest.approx(round(direct["mean_iou"], 2))
    # the exported folder evaluates to the same scores through eval.py
    folder = save_pretrained(model, tmp_path / "export" / name)
    assert seg_eval.main([str(folder), "ade20k", "--data-root", str(small_ade), "--num-workers", "0", "--device",
                          "cpu", "--output", str(tmp_path / "folder_scores.yml")]) == 0
    folder_report = yaml.safe_load((tmp_path / "folder_scores.yml").read_text())
    assert folder_report["mean_iou"] == report["mean_iou"] and folder_report["settings"] == report["settings"]


@pytest.mark.parametrize("args, message", [
    (["--decoder", "depict_sa", "--rep-grid", "2", "2"],
     r"--rep-grid: not a setting of the depict_sa decoder \(its settings: --dec-layers, --dec-heads, "
     r"--dec-dim-head, --dec-dropout\)"),
    (["--decoder", "segmenter_mask_transformer"], r"d_model // 64 heads, none for d_model=32; set --dec-heads"),
    (["--decoder", "tssa", "--dec-heads", "3"], r"--dec-heads=3 does not divide the width D=32"),
    (["--decoder", "linear", "--dec-layers", "2"], r"--dec-layers: not a setting of the linear decoder"),
])
def test_decoder_flags_that_do_not_fit_are_refused_before_any_work(tmp_path, capsys, args, message):
    assert seg_main.main(TRAIN_ARGS + args + ["--data-root", str(tmp_path / "none"), "--log-dir",
                                              str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_help_lists_every_decoder(capsys):
    with pytest.raises(SystemExit):
        seg_main.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in DECODERS:
        assert f"{name} =" in out
    assert seg_main.parse_args(["--decoder", "depict_ca", "--log-dir", "x", "--backbone", "vit_tiny_patch16_384"]).decoder == "depict_ca"
    with pytest.raises(SystemExit):
        seg_main.parse_args(["--decoder", "deeplab", "--log-dir", "x"])


# ------------------------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("name, expected", [
    ("mask_transformer", r"decoder\.net\.layers\.\d\.fn\.(proj\.weight|to_out\.(weight|bias)|step_x|step_rep)"),
    ("segmenter_mask_transformer", r"decoder\.blocks\.\d\.attn\.(qkv|proj)\.(weight|bias)"),
    ("depict_sa", r"decoder\.net\.layers\.\d\.fn\.(proj|step_size)"),
    ("depict_ca", r"decoder\.[sc]net\.layers\.\d\.fn\.(proj|step_size)"),
    ("tssa", r"decoder\.net\.layers\.\d\.fn\.(qkv\.weight|to_out\.(weight|bias)|temp)"),
])
def test_robustness_perturbs_exactly_each_decoders_attention_layers(name, expected):
    model = create_segmenter(_tiny_config(name))
    chosen = [n for n, _ in robustness.select_parameters(model)]
    want = [n for n, _ in model.named_parameters() if re.fullmatch(expected, n)]
    assert chosen == want and len(want) >= 2
    if name == "depict_ca":
        assert any(".snet." in n for n in chosen) and any(".cnet." in n for n in chosen)
    with pytest.raises(ValueError, match="LinearDecoder has no attention layers to perturb; pass --modules"):
        robustness.select_parameters(create_segmenter(_tiny_config("linear")))


def test_robustness_script_runs_on_a_baseline_checkpoint(small_ade, tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_config("depict_ca")
    cfg["n_cls"] = TOY_CLS
    save_model_checkpoint(create_segmenter(cfg).eval(), tmp_path / "seg.pth")
    res = robustness.main(["--task", "segmentation", "--checkpoint", str(tmp_path / "seg.pth"), "--data",
                           str(small_ade), "--sigmas", "0", "0.5", "--seeds", "0", "--out", str(tmp_path / "out")])
    assert [r["metric"] for r in res["rows"] if r["sigma"] == 0.0] == [res["clean"]]
    assert {n for n, _ in res["parameters"]} == {n for n, _ in res["model"].named_parameters()
                                                 if ".snet." in n and ".fn." in n or ".cnet." in n and ".fn." in n}
    assert (tmp_path / "out" / "robustness.png").exists()
