"""The original CRATE (Ma-Lab-Berkeley/CRATE ``model/crate.py``) as ``crate_original_{tiny,small,base,large}``.

The oracle is ``official_reference.CRATE``, re-stated in the tests from CRATE's equations (einops patchify,
LN -> Linear -> LN, ``to_out = Sequential(Linear, Dropout)``), not from cbsa_core. CRATE-format files are written
by the tests exactly as CRATE's ``main.py`` saves them (``{'epoch', 'arch': 'CRATE_base', 'state_dict'`` with
``module.`` keys, ``'best_acc1', 'optimizer', 'scheduler'}``) and must give the reference's logits through every
loader. Models are tiny (1-2 layers, 16-32 px images) except for the parameter counts, built on the meta device.
"""
from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torchvision import transforms as T
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import image_classification.main as icm
import official_reference as ref
from cbsa_core import MSSA, create_model, list_models
from cbsa_core.checkpoint import (CheckpointMismatchError, load_checkpoint, map_original_crate_keys,
                                  original_crate_variant, save_model_checkpoint)
from cbsa_core.flops import PAPER_CLASSIFICATION, analytic_flops, count_parameters, measured_flops
from cbsa_core.layers import ISTA, LinearPatchEmbed
from cbsa_core.layers.patch_embed import flatten_patches
from cbsa_core.models.cbt import MODEL_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

# Ours -> CRATE's own name of the same size (CRATE's main.py --arch choices).
CRATE_NAMES = {"crate_original_tiny": "CRATE_tiny", "crate_original_small": "CRATE_small",
               "crate_original_base": "CRATE_base", "crate_original_large": "CRATE_large"}
# The issue's exact counts (224², patch 16, 1000 classes).
EXPECTED_PARAMS = {"crate_original_tiny": 6_090_856, "crate_original_small": 13_116_328,
                   "crate_original_base": 22_796_008, "crate_original_large": 77_641_192}
TINY = dict(depth=2, image_size=32, patch_size=8, num_classes=10)


def crate_parameter_formula(dim: int, depth: int, heads: int, *, patch: int = 16, chans: int = 3, image: int = 224,
                            classes: int = 1000) -> int:
    """CRATE's parameters by hand: LN(p²C) + Linear(p²C -> d) + LN(d); pos (1 + N)·d and [CLS] d; per layer
    LN + qkv d·I (no bias) + to_out I·d + d + LN + ISTA d²; head LN + Linear(d -> classes); I = d."""
    patch_dim, tokens, inner = patch * patch * chans, (image // patch) ** 2 + 1, dim
    assert dim % heads == 0
    embed = 2 * patch_dim + patch_dim * dim + dim + 2 * dim
    layer = 2 * dim + dim * inner + inner * dim + dim + 2 * dim + dim * dim
    return embed + tokens * dim + dim + depth * layer + 2 * dim + dim * classes + classes


def write_crate_file(path: Path, arch: str = "CRATE_base", seed: int = 0, **overrides) -> nn.Module:
    """A checkpoint as CRATE's main.py writes it, from a reference CRATE with random non-default weights and one
    real AdamW step (so the optimizer state is not empty). Returns the reference model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ref.randomize_(ref.build_crate(arch, **{**TINY, **overrides}), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min((step + 1) / 20, 1.0))
    size = overrides.get("image_size", TINY["image_size"])
    model(torch.randn(2, 3, size, size, generator=g)).logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    ref.randomize_(model, generator=g)
    ref.save_authors_checkpoint(model, path, arch=arch, epoch=90, best_acc1=torch.tensor(70.8), optimizer=opt,
                                scheduler=sched)
    return model.eval()


def images(n: int = 3, size: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Architecture: exact parameter counts and CRATE's key layout at full size (meta device)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_are_the_issues_and_crates(name):
    dim, depth, heads = ref.CRATE_ARCHS[CRATE_NAMES[name]]
    with torch.device("meta"):
        model = create_model(name)
        reference = ref.build_crate(CRATE_NAMES[name])
    assert count_parameters(model) == EXPECTED_PARAMS[name]
    assert count_parameters(model) == crate_parameter_formula(dim, depth, heads)
    assert count_parameters(model) == sum(p.numel() for p in reference.parameters())
    cfg = model.model_config
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["dim_head"]) == (dim, depth, heads, dim // heads)
    assert cfg["patch_embed"] == "linear" and cfg["attn"] == "mssa" and cfg["global_pool"] == "token"
    assert isinstance(model.to_patch_embedding, LinearPatchEmbed)
    assert all(isinstance(a, MSSA) for a in model.attention_layers)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_state_dict_is_crates_up_to_the_one_documented_key_mapping(name):
    with torch.device("meta"):
        ours = create_model(name).state_dict()
        crate = ref.build_crate(CRATE_NAMES[name]).state_dict()
    assert any(".fn.to_out.0.weight" in k for k in crate)                 # CRATE's Sequential(Linear, Dropout)
    mapped = map_original_crate_keys(crate)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert {k for k in ours if k.startswith("to_patch_embedding.")} == {
        f"to_patch_embedding.{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}


def test_patch_flattening_is_crates_p1_p2_c_order():
    x = torch.randn(2, 3, 24, 40)
    expected = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=8, p2=8)
    assert torch.equal(flatten_patches(x, 8), expected)
    embed = LinearPatchEmbed(8, 3, 16)
    tokens, grid = embed(x)
    assert grid == (3, 5) and tokens.shape == (2, 15, 16)
    with pytest.raises(ValueError, match=r"LinearPatchEmbed: expected images \(B, 3, H, W\), got \(2, 1, 24, 40\)"):
        embed(torch.randn(2, 1, 24, 40))


# ------------------------------------------------------------------------------------------------
# CRATE's checkpoint files: exact logits through every loader
# ------------------------------------------------------------------------------------------------
def _load(loader: str, name: str, path: Path, **kw) -> nn.Module:
    if loader == "create_model":
        return create_model(name, pretrained=path, **kw)
    if loader == "timm":
        kw = dict(kw, img_size=kw.pop("image_size"))
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    model = create_model(name, **kw)
    load_checkpoint(model, path)
    return model


@pytest.mark.parametrize("loader", ["create_model", "timm", "load_checkpoint"])
def test_crate_file_gives_crates_logits(loader, tmp_path, caplog):
    path = tmp_path / "model_best.pth.tar"
    reference = write_crate_file(path, "CRATE_base", seed=1)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "scheduler"}
    assert raw["arch"] == "CRATE_base" and all(k.startswith("module.") for k in raw["state_dict"])
    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        model = _load(loader, "crate_original_base", path, **TINY).eval()
    x = images()
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # CRATE has no representatives: no token layout is set or recorded, and the log says why.
    assert model.model_config["legacy_token_layout"] is False
    assert "no token layout applies" in caplog.text


def test_the_releases_crate_small_yu_file_loads_through_its_alias(tmp_path):
    """The CBSA release ships CRATE's crate.py and trains its CRATE_small as arch 'CRATE_small_Yu'."""
    path = tmp_path / "crate_small_yu.pth.tar"
    kw = dict(TINY, depth=1)
    reference = write_crate_file(path, "CRATE_small", seed=2, depth=1)
    raw = torch.load(path, weights_only=True)
    raw["arch"] = "CRATE_small_Yu"
    torch.save(raw, path)
    assert "CRATE_small_Yu" in list_models()
    model = create_model("CRATE_small_Yu", pretrained=path, **kw).eval()
    assert model.arch == "CRATE_small_Yu" and model.model_config["dim_head"] == 48
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference(images()), rtol=0, atol=1e-5)


def test_single_head_crate_without_output_projection_loads_exactly(tmp_path):
    """heads == 1 and dim_head == dim: CRATE's to_out is Identity (no keys); the loader gives ours the identity."""
    path = tmp_path / "one_head.pth"
    kw = dict(depth=1, heads=1, dim_head=768)
    reference = write_crate_file(path, "CRATE_base", seed=3, **kw)
    assert not any("to_out" in k for k in reference.state_dict())
    model = create_model("crate_original_base", pretrained=path, **TINY | kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference(images()), rtol=0, atol=1e-5)
    assert torch.equal(model.attention_layers[0].to_out.weight, torch.eye(768))


def test_crate_file_at_another_image_size_resamples_the_position_embedding(tmp_path):
    """Trained at 32 px (4x4 grid), run at 48 px (6x6): the grid part of CRATE's position embedding is resampled
    bicubically, [CLS]'s kept (CRATE itself would slice, which only works for smaller inputs)."""
    path = tmp_path / "crate.pth"
    reference = write_crate_file(path, "CRATE_base", seed=4, depth=1)
    model = create_model("crate_original_base", pretrained=path, **dict(TINY, depth=1, image_size=48)).eval()
    pos = reference.pos_embedding.detach()
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    with torch.no_grad():
        reference.pos_embedding = nn.Parameter(torch.cat([pos[:, :1], grid], dim=1))
        torch.testing.assert_close(model(images(size=48)), reference(images(size=48)), rtol=0, atol=1e-5)


def test_pretrained_crate_with_another_head_keeps_everything_else(tmp_path):
    path = tmp_path / "crate.pth"
    reference = write_crate_file(path, "CRATE_base", seed=5, depth=1)
    model = create_model("crate_original_base", pretrained=path, **dict(TINY, depth=1, num_classes=4)).eval()
    x = images()
    with torch.no_grad():
        expected = reference.mlp_head[0](reference.transformer(_crate_tokens(reference, x))[:, 0])
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected,
                                   rtol=0, atol=1e-5)
    assert model(x).shape == (3, 4)


def _crate_tokens(crate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = crate.to_patch_embedding(x)
    return torch.cat([crate.cls_token.expand(len(x), -1, -1), t], dim=1) + crate.pos_embedding[:, :t.shape[1] + 1]


def test_pretrained_crate_refuses_another_channel_count_naming_the_fix(tmp_path):
    path = tmp_path / "crate.pth"
    write_crate_file(path, "CRATE_base", seed=6, depth=1)
    with pytest.raises(CheckpointMismatchError, match=r"over 192 = p·p·C patch values.*over 64 \(patch_size 8, "
                                                      r"in_chans 1\).*3 input channels.*cannot be adapted"):
        create_model("crate_original_base", pretrained=path, **dict(TINY, depth=1, in_chans=1))


def test_own_format_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(8)
    model = ref.randomize_(create_model("crate_original_tiny", **TINY), generator=torch.Generator().manual_seed(8))
    model.eval()
    path = save_model_checkpoint(model, tmp_path / "own.pth")
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "crate_original_tiny" and raw["model_config"]["patch_embed"] == "linear"
    assert any(k.endswith(".fn.to_out.weight") for k in raw["state_dict"])
    x = images()
    for loaded in (create_model("crate_original_tiny", pretrained=path, **TINY),
                   _load("load_checkpoint", "crate_original_tiny", path, **TINY)):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))


# ------------------------------------------------------------------------------------------------
# The arch check goes by the key layout: wrong names are refused both ways, naming the right model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["create_model", "load_checkpoint"])
def test_crate_file_given_the_releases_crate_tiny_name_names_crate_original_tiny(loader, tmp_path):
    """CRATE's CRATE_tiny (dim 384, linear embedding) vs the release's CRATE_tiny (mssa_tiny, dim 192, conv stem)."""
    path = tmp_path / "crate_tiny.pth"
    write_crate_file(path, "CRATE_tiny", seed=9, depth=1)
    with pytest.raises(CheckpointMismatchError) as info:
        _load(loader, "CRATE_tiny", path, **dict(TINY, depth=1))
    message = str(info.value)
    assert str(path) in message and "original CRATE weights" in message and "width 384" in message
    assert "--arch crate_original_tiny" in message and "CRATE_tiny" in message and "mssa_tiny" in message
    assert message.count("\n") == 0                                       # one clear sentence, not a key list


def test_crate_file_of_another_size_names_the_size_it_fits(tmp_path):
    path = tmp_path / "crate_base.pth"
    write_crate_file(path, "CRATE_base", seed=10, depth=1)
    with pytest.raises(CheckpointMismatchError, match=r"width 768.*'crate_original_small' \(width 576\).*"
                                                      r"--arch crate_original_base"):
        create_model("crate_original_small", pretrained=path, **dict(TINY, depth=1))
    assert original_crate_variant({"to_patch_embedding.2.weight": torch.zeros(576, 192)}) == "crate_original_small"
    assert original_crate_variant({"to_patch_embedding.2.weight": torch.zeros(500, 192)}) is None


@pytest.mark.parametrize("loader", ["create_model", "timm", "load_checkpoint"])
def test_releases_conv_stem_crate_tiny_file_is_refused_by_crate_original(loader, tmp_path):
    path = tmp_path / "release_crate_tiny.pth.tar"
    release = ref.build("CRATE_tiny", depth=1, image_size=32, patch_size=8)
    opt = torch.optim.AdamW(release.parameters())
    ref.save_authors_checkpoint(release, path, arch="CRATE_tiny", epoch=150, best_acc1=64.7, optimizer=opt,
                                scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0))
    with pytest.raises(CheckpointMismatchError, match=r"convolutional stem.*'crate_original_tiny' is an original "
                                                      r"CRATE model.*'CRATE_tiny' \(mssa_tiny\).*--arch CRATE_tiny"):
        _load(loader, "crate_original_tiny", path, **dict(TINY, depth=1))


def test_classification_cli_evaluates_a_crate_file_exactly_and_refuses_the_wrong_name(tmp_path):
    """``main.py --arch crate_original_base --evaluate --resume F`` on a 6-image folder; the loss (label-smoothed
    CE of the logits) and accuracies equal the reference CRATE's on the same preprocessed images."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    for split in ("train", "val"):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    overrides = dict(depth=1, image_size=16, patch_size=4, num_classes=3)
    path = tmp_path / "crate_base.pth.tar"
    reference = write_crate_file(path, "CRATE_base", seed=11, **overrides)
    common = ["--data", str(tmp_path / "data"), "--evaluate", "--resume", str(path), "--input-size", "16",
              "--eval-resize", "16", "--workers", "0", "--batch-size", "4", "--device", "cpu", "--precision", "fp32",
              "--no-tensorboard", "--model-override", "depth=1", "--model-override", "image_size=16",
              "--model-override", "patch_size=4"]
    result = icm.main(["--arch", "crate_original_base", "--output-dir", str(tmp_path / "eval"), *common])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())

    tf = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for c in classes
                     for f in sorted((tmp_path / "data" / "val" / c).iterdir())])
    y = torch.tensor([i for i in range(3) for _ in range(2)])
    with torch.no_grad():
        logits = reference(x).double()
    loss = F.cross_entropy(logits, y, label_smoothing=0.1).item()
    top1 = 100.0 * (logits.argmax(1) == y).double().mean().item()
    assert saved["num_images"] == 6 and saved["legacy_token_layout"] is False and result["top1"] == saved["top1"]
    assert saved["loss"] == pytest.approx(loss, rel=1e-5) and saved["top1"] == pytest.approx(top1, abs=1e-9)
    assert saved["top5"] == pytest.approx(100.0)

    with pytest.raises(CheckpointMismatchError, match=r"--arch crate_original_base"):
        icm.main(["--arch", "CRATE_tiny", "--output-dir", str(tmp_path / "wrong"), *common])


# ------------------------------------------------------------------------------------------------
# load_checkpoint(strict=False) and impossible sizes
# ------------------------------------------------------------------------------------------------
def test_non_strict_load_with_no_matching_key_is_an_error(tmp_path, caplog):
    model = create_model("crate_original_tiny", **dict(TINY, depth=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(OrderedDict([("encoder.blocks.0.weight", torch.randn(4, 4)), ("decoder.head.bias", torch.zeros(4))]),
               tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match=r"other\.pth shares no key with model 'crate_original_tiny'.*"
                                                      r"encoder\.blocks\.0\.weight"):
        load_checkpoint(model, tmp_path / "other.pth", strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # A partial file still loads with strict=False: what it has is loaded, the rest is kept and logged.
    path = tmp_path / "crate.pth"
    reference = write_crate_file(path, "CRATE_tiny", seed=12, depth=1)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = OrderedDict((k, v) for k, v in raw["state_dict"].items() if "mlp_head" not in k)
    torch.save(raw, path)
    with caplog.at_level(logging.WARNING, logger="cbsa_core"):
        load_checkpoint(model, path, strict=False)
    assert "partial load" in caplog.text and "mlp_head.1.weight" in caplog.text
    assert torch.equal(model.pos_embedding, reference.pos_embedding)
    assert torch.equal(model.mlp_head[1].weight, before["mlp_head.1.weight"])


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=100), r"img_size 100 does not divide by patch_size 16"),
    (dict(img_size=(32, 40)), r"img_size 32x40 does not divide by patch_size 16"),
    (dict(patch_size=0), r"patch_size must be a positive int for the linear patch embedding"),
    (dict(patch_size=2.5), r"patch_size must be a positive int for the linear patch embedding"),
    (dict(depth=0), r"depth must be an int >= 1"),
    (dict(heads=0), r"heads must be an int >= 1"),
    (dict(dim=0), r"dim must be an int >= 1"),
    (dict(dim_head=0), r"dim_head must be an int >= 1"),
    (dict(in_chans=0), r"in_chans must be a positive int"),
    (dict(num_classes=-1), r"num_classes must be an int >= 0"),
    (dict(global_pool="mean"), r"global_pool must be one of"),
    (dict(patch_embed="patchify"), r"patch_embed must be one of \('conv', 'linear'\)"),
])
@pytest.mark.parametrize("name", ["crate_original_tiny", "crate_original_large"])
def test_impossible_sizes_are_refused_for_crate_models(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **overrides)


def test_linear_embedding_takes_any_patch_size_and_runs_down_to_one_patch():
    model = create_model("crate_original_tiny", depth=1, patch_size=5, img_size=20, num_classes=3).eval()
    assert model.base_grid == (4, 4) and model.to_patch_embedding.patch_dim == 75
    with torch.no_grad():
        assert model(torch.randn(2, 3, 5, 10)).shape == (2, 3)               # a 1x2 grid
        with pytest.raises(ValueError, match="does not divide by the patch size 5"):
            model(torch.randn(2, 3, 12, 10))


# ------------------------------------------------------------------------------------------------
# timm registration, configs and contract pieces specific to the linear embedding
# ------------------------------------------------------------------------------------------------
def test_registered_with_timm_with_crates_eval_config_and_no_weights():
    family = timm.list_models(module="cbt")
    assert set(EXPECTED_PARAMS) <= set(family)      # scripts/run_timm_model_tests.sh selects module 'cbt'
    tagged = {n for n in timm.list_models("crate_original_*", include_tags=True) if "." in n}
    assert tagged == {"crate_original_small.crate_in1k"}                    # CRATE released only CRATE-S
    assert not set(timm.list_models(pretrained=True)) & set(timm.list_models("crate_original_*", include_tags=True))
    for name in EXPECTED_PARAMS:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["first_conv"] == "to_patch_embedding.2" and cfg["classifier"] == "mlp_head.1"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
        assert cfg["min_input_size"] == (3, 16, 16) and not cfg.get("url") and not cfg.get("hf_hub_id")
        assert cfg["paper_ids"] == "arXiv:2306.01129" and "Ma-Lab-Berkeley/CRATE" in cfg["origin_url"]


def test_intermediates_and_fx_trace_match_eager():
    model = create_model("crate_original_tiny", **dict(TINY, depth=2)).eval()
    x = images(n=2, size=48)
    tokens, grid = model.to_patch_embedding(x)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert grid == (6, 6) and tokens.shape == (2, 36, 384)
        assert [tuple(t.shape) for t in inter] == [(2, 384, 6, 6)] * 2
        assert torch.equal(model.forward_head(final), model(x))
    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out"}, tracer_kwargs=tracer_kwargs)
    for size in (32, 48):
        with torch.no_grad():
            assert torch.equal(fx_model(images(n=2, size=size))["out"], model(images(n=2, size=size)))


# ------------------------------------------------------------------------------------------------
# FLOPs in the paper's convention, next to Table 3's CRATE-B/L
# ------------------------------------------------------------------------------------------------
def crate_macs(dim: int, depth: int, *, image: int = 224, patch: int = 16, classes: int = 1000) -> dict:
    """By hand: linear embedding N·(p²·3)·d; MSSA 2·T·d² + 2·T²·d; ISTA two d×d products; the classifier."""
    n = (image // patch) ** 2
    t = n + 1
    layers = depth * (2 * t * dim * dim + 2 * t * t * dim + 2 * t * dim * dim)
    return dict(stem=n * patch * patch * 3 * dim, layers=layers, head=dim * classes)


@pytest.mark.parametrize("name", ["crate_original_base", "crate_original_large"])
def test_analytic_flops_by_hand_and_next_to_table_3(name):
    dim, depth, _ = ref.CRATE_ARCHS[CRATE_NAMES[name]]
    with torch.device("meta"):
        flops = analytic_flops(create_model(name))
    macs = crate_macs(dim, depth)
    assert flops["stem"] == 2 * macs["stem"] and flops["layers"] == 2 * macs["layers"]
    assert flops["total"] == 2 * (macs["stem"] + macs["layers"] + macs["head"])
    paper_params, paper_gflops = PAPER_CLASSIFICATION[name]
    assert EXPECTED_PARAMS[name] / 1e6 == pytest.approx(paper_params, abs=0.05)
    # The cited CRATE numbers are within 0.5 % of the layers alone (and 1-2 % below the whole model).
    assert flops["layers"] / 1e9 == pytest.approx(paper_gflops, rel=0.005)
    assert 0.01 < flops["total"] / 1e9 / paper_gflops - 1 < 0.02


def test_measured_flops_of_a_tiny_crate_by_hand(monkeypatch):
    """With the release's three-product ISTA, what runs = the analytic count + one more d×d product per layer."""
    monkeypatch.setattr(ISTA, "forward", ISTA.forward_reference)
    dim, depth = 64, 2
    model = create_model("crate_original_tiny", dim=dim, heads=2, dim_head=32, depth=depth, image_size=32,
                         patch_size=8, num_classes=10)
    n, t = 16, 17
    macs = n * 192 * dim + depth * (2 * t * dim * dim + 2 * t * t * dim + 3 * t * dim * dim) + dim * 10
    assert measured_flops(model, 32) == 2 * macs
    assert measured_flops(model, 32) == analytic_flops(model, 32)["total"] + depth * 2 * t * dim * dim


def test_model_configs_name_crates_four_sizes():
    linear = {n for n, c in MODEL_CONFIGS.items() if c.get("patch_embed") == "linear"}
    assert linear == set(EXPECTED_PARAMS)
    assert math.prod(MODEL_CONFIGS["crate_original_small"][k] for k in ("heads", "dim_head")) == 576
