"""The CBT family as timm models: pretrained configs, keyword arguments, the head and pooling, intermediates and
features, gradient checkpointing, layer-wise lr decay, resizing, pretrained adaptation, torch.fx, TorchScript-free
export paths. Every model here is tiny (a few layers of width 32-64 on 32-64 px inputs)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

import cbsa_core  # noqa: F401  (registers the CBT family with timm)
from cbsa_core import CBSA, ISTA, save_model_checkpoint
from cbsa_core.models.cbt import CLASSIFIER, CRATE_RELEASED_WEIGHTS, FIRST_CONV, MODEL_CONFIGS, RELEASE_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = dict(dim=32, heads=2, dim_head=16, depth=3, img_size=32, patch_size=4, rep_grid=(2, 2), num_classes=5)


def tiny(name: str = "cbt_tiny", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


def image(batch: int = 2, size=(32, 32), chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, *size, generator=torch.Generator().manual_seed(seed))


def layer_outputs(model, img):
    """The residual stream after every layer, computed from the modules directly (the reference)."""
    x, grid = model.embed(img)
    outs = []
    for attn, ff in model.transformer.layers:
        x = ff(attn.fn(attn.norm(x), grid_size=grid) + x)
        outs.append(x)
    return outs, grid


# ------------------------------------------------------------------------------------------------
# Registration and pretrained configs
# ------------------------------------------------------------------------------------------------
def test_family_is_one_timm_module_with_release_tags_and_no_downloadable_weights():
    assert timm.list_models(module="cbt") == sorted(MODEL_CONFIGS)
    tagged = {n for n in timm.list_models(module="cbt", include_tags=True) if "." in n}
    assert tagged == ({f"{n}.authors_in1k" for n in RELEASE_WEIGHTS}
                      | {f"{n}.crate_in1k" for n in CRATE_RELEASED_WEIGHTS})
    assert not set(timm.list_models(pretrained=True)) & set(timm.list_models(module="cbt", include_tags=True))
    for name in MODEL_CONFIGS:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert not cfg.get("url") and not cfg.get("hf_hub_id") and not cfg["fixed_input_size"]
        attn = MODEL_CONFIGS[name]["attn"]
        pools = any(a in ("cbsa", "cbsa_dagger", "agent") for a in ([attn] if isinstance(attn, str) else attn))
        assert cfg["min_input_size"] == ((3, 128, 128) if pools else (3, 16, 16))
        with torch.device("meta"):
            keys = timm.create_model(name).state_dict()
        assert cfg["first_conv"] + ".weight" in keys and cfg["classifier"] + ".weight" in keys


def test_min_input_size_is_the_smallest_size_that_runs():
    model = timm.create_model("cbt_tiny", depth=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)
        with pytest.raises(ValueError, match=r"rep_grid|representative grid"):
            model(torch.randn(1, 3, 112, 128))


def test_data_config_is_the_release_evaluation_bilinear_resize_256_center_crop_224():
    model = timm.create_model("cbt_small", depth=1)
    cfg = resolve_data_config(model=model)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
    ops = create_transform(**cfg, is_training=False).transforms
    resize, crop = next(t for t in ops if isinstance(t, Resize)), next(t for t in ops if isinstance(t, CenterCrop))
    assert resize.size in (256, [256]) and resize.interpolation == InterpolationMode.BILINEAR
    assert tuple(crop.size) == (224, 224)


# ------------------------------------------------------------------------------------------------
# Constructor: keyword arguments and refused sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=30), r"img_size 30 does not divide by patch_size 4; use a multiple of 4"),
    (dict(img_size=4), r"img_size 4 with patch_size 4 gives a 1x1 patch grid, smaller than rep_grid 2x2; use an "
                       r"image size of at least 8x8"),
    (dict(img_size=(32, 4)), r"gives a 8x1 patch grid"),
    (dict(patch_size=6), r"patch_size must be a power of two >= 4"),
    (dict(patch_size=0), r"patch_size must be a power of two >= 4"),
    (dict(num_classes=-1), r"num_classes must be an int >= 0"),
    (dict(img_size=0), r"img_size must be positive"),
    (dict(img_size=32, image_size=64), r"img_size 32 and image_size 64 disagree"),
    (dict(global_pool="map"), r"global_pool must be one of"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
    (dict(attn="softmax"), r"attn has unknown attention type"),
    (dict(dim=35), r"dim=35 must be a positive multiple of 2 for patch_size=4"),
])
def test_impossible_sizes_are_refused_naming_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("cbt_tiny", **{**TINY, **overrides})


def test_models_without_representatives_run_down_to_one_patch():
    model = tiny("mssa_tiny", img_size=4, rep_grid=None)   # no representatives, so no rep_grid
    assert model.base_grid == (1, 1)
    with torch.no_grad():
        assert model(image(size=(4, 4))).shape == (2, 5)


def test_timm_keyword_arguments_reach_the_model():
    model = tiny(img_size=(32, 48), in_chans=1, drop_rate=0.25, drop_path_rate=0.2, global_pool="avg", num_classes=3)
    assert model.img_size == (32, 48) and model.base_grid == (8, 12) and model.pos_embedding.shape == (1, 97, 32)
    assert model.model_config["image_size"] == (32, 48) and model.in_chans == 1 and model.global_pool == "avg"
    assert model.head_drop.p == 0.25
    assert [round(getattr(d, "drop_prob", 0.0), 6) for d in model.transformer.drop_paths] == [0.0, 0.1, 0.2]
    assert model.num_features == model.head_hidden_size == 32
    with torch.no_grad():
        assert model(image(size=(16, 20), chans=1)).shape == (2, 3)      # any size divisible by the patch
    same = tiny(image_size=(32, 48), img_size=None)                     # the release's name for img_size
    assert same.base_grid == (8, 12)


def test_drop_path_drops_only_the_attention_residual():
    """Train mode, drop_path_rate: per sample, layer i's output is either ISTA(LN(x)) (attention branch
    dropped) or ISTA(LN(x + Attn(LN x) / (1 - p))) (kept, rescaled); ISTA itself is never dropped."""
    model = tiny(depth=2, drop_path_rate=0.5).train()
    p = model.transformer.drop_paths[1].drop_prob
    assert p == 0.5
    x, grid = model.embed(image(batch=16))
    attn, ff = model.transformer.layers[1]
    with torch.no_grad():
        branch = attn(x, grid_size=grid)
        dropped, kept = ff(x), ff(x + branch / (1 - p))
        torch.manual_seed(3)
        out = model.transformer.forward_layer(1, x, grid)
    is_dropped = [torch.allclose(o, d, atol=1e-6) for o, d in zip(out, dropped)]
    is_kept = [torch.allclose(o, k, atol=1e-6) for o, k in zip(out, kept)]
    assert all(a != b for a, b in zip(is_dropped, is_kept))           # each sample is exactly one of the two
    assert any(is_dropped) and any(is_kept)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.transformer.forward_layer(1, x, grid), ff(x + branch), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Head, pooling, classifier
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["token", "avg", "max", "avgmax", ""])
def test_forward_head_pools_then_normalises_then_classifies(pool):
    model = tiny(global_pool=pool)
    img = image()
    with torch.no_grad():
        feats = model.forward_features(img)
        outs, _ = layer_outputs(model, img)
        torch.testing.assert_close(feats, outs[-1], rtol=0, atol=0)       # unpooled, before the head's LayerNorm
        pooled = {"token": feats[:, 0], "avg": feats[:, 1:].mean(1), "max": feats[:, 1:].amax(1),
                  "avgmax": 0.5 * (feats[:, 1:].mean(1) + feats[:, 1:].amax(1)), "": feats}[pool]
        ln, fc = model.mlp_head[0], model.mlp_head[1]
        pre = F.layer_norm(pooled, (32,), ln.weight, ln.bias)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pre)
        torch.testing.assert_close(model(img), pre @ fc.weight.T + fc.bias)


def test_reset_classifier_and_headless_creation():
    model = tiny()
    img = image()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(img), pre_logits=True)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model.model_config["num_classes"] == 0
        torch.testing.assert_close(model(img), pre)                       # (B, dim): pooled features
        model.reset_classifier(7, "avg")
        assert model.get_classifier().out_features == 7 and model.global_pool == "avg"
        assert model(img).shape == (2, 7)
        headless = tiny(num_classes=0, global_pool="")
        out = headless(img)
        assert out.shape == (2, 1 + 64, 32)
        torch.testing.assert_close(out, F.layer_norm(headless.forward_features(img), (32,),
                                                     headless.mlp_head[0].weight, headless.mlp_head[0].bias))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "map")


# ------------------------------------------------------------------------------------------------
# Intermediates and features
# ------------------------------------------------------------------------------------------------
def test_forward_intermediates_follow_timm_semantics():
    model = tiny(depth=4)
    img = image()
    with torch.no_grad():
        outs, (h, w) = layer_outputs(model, img)
        final, inter = model.forward_intermediates(img)
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        assert len(inter) == 4
        for got, ref in zip(inter, outs):                                  # NCHW: patch tokens on the grid
            torch.testing.assert_close(got, ref[:, 1:].reshape(2, h, w, 32).permute(0, 3, 1, 2), rtol=0, atol=0)
        nlc = model.forward_intermediates(img, indices=2, output_fmt="NLC", intermediates_only=True)
        assert [t.shape for t in nlc] == [(2, 64, 32)] * 2
        torch.testing.assert_close(nlc[0], outs[2][:, 1:], rtol=0, atol=0)
        normed = model.forward_intermediates(img, indices=[0, -1], norm=True, output_fmt="NLC",
                                             intermediates_only=True)
        torch.testing.assert_close(normed[1], model.mlp_head[0](outs[3])[:, 1:], rtol=0, atol=0)
        with_prefix = model.forward_intermediates(img, indices=[1], return_prefix_tokens=True, output_fmt="NLC",
                                                  intermediates_only=True)
        torch.testing.assert_close(with_prefix[0][1], outs[1][:, :1], rtol=0, atol=0)
        early, inter = model.forward_intermediates(img, indices=[1], stop_early=True)
        torch.testing.assert_close(early, outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(img, output_fmt="NHWC")
    assert len(model.feature_info) == 4
    assert {(f["num_chs"], f["reduction"]) for f in model.feature_info} == {(32, 4)}


def test_features_only_prunes_and_returns_the_requested_layers():
    reference = tiny(depth=4)
    torch.manual_seed(0)
    features = timm.create_model("cbt_tiny", features_only=True, out_indices=(0, 2), **TINY | dict(depth=4)).eval()
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [4, 4]
    pruned = features.model
    assert len(pruned.transformer.layers) == 3 and pruned.num_classes == 0
    assert isinstance(pruned.mlp_head[0], torch.nn.Identity)             # norm=False: the head norm is pruned
    img = image()
    with torch.no_grad():
        got = features(img)
        want = reference.forward_intermediates(img, indices=[0, 2], intermediates_only=True)
    assert len(got) == 2
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_analysis_method_keeps_its_per_layer_dicts():
    model = tiny(depth=2)
    img = image()
    with torch.no_grad():
        outs, grid = layer_outputs(model, img)
        analysis = model.forward_analysis(img)
    assert [sorted(a) for a in analysis] == [["attn_input", "grid", "input", "output", "post_attn"]] * 2
    torch.testing.assert_close(analysis[1]["output"], outs[1], rtol=0, atol=0)
    assert tuple(analysis[0]["grid"].tolist()) == grid


# ------------------------------------------------------------------------------------------------
# Gradient checkpointing, lr decay groups, resizing
# ------------------------------------------------------------------------------------------------
def test_grad_checkpointing_gives_the_same_gradients_with_a_lower_peak_memory():
    spec = importlib.util.spec_from_file_location("_bench_attention", SCRIPTS / "benchmark_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny(depth=6, dim=64, dim_head=32, img_size=64, num_classes=10).train()
    img, target = image(batch=4, size=(64, 64)), torch.tensor([1, 2, 3, 4])

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(img), target).backward()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_peak = bench.cpu_peak_bytes(run)
    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt_peak = bench.cpu_peak_bytes(run)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ckpt_peak < 0.7 * plain_peak, (ckpt_peak, plain_peak)
    model.set_grad_checkpointing(False)
    assert not model.transformer.grad_checkpointing


def test_group_matcher_gives_timm_layer_decay_scales():
    from timm.optim import param_groups_layer_decay

    model = tiny(depth=3)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    scale = {}
    for group in groups:
        for p in group["params"]:
            scale[p] = group["lr_scale"]
    names = dict(model.named_parameters())
    expected = {0: 0.5 ** 4, 1: 0.5 ** 3, 2: 0.5 ** 2, 3: 0.5, 4: 1.0}    # stem, layers 0-2, head
    for name, p in names.items():
        if name.startswith(("cls_token", "pos_embedding", "to_patch_embedding")):
            layer = 0
        elif name.startswith("transformer.layers."):
            layer = int(name.split(".")[2]) + 1
        else:
            assert name.startswith("mlp_head."), name
            layer = 4
        assert scale[p] == pytest.approx(expected[layer]), name


def test_set_input_size_resamples_the_position_embedding_once():
    model = tiny()
    img = image(size=(48, 40))
    with torch.no_grad():
        before = model(img)                                             # resampled on the fly
        model.set_input_size(img_size=(48, 40))
        assert model.pos_embedding.shape == (1, 1 + 12 * 10, 32) and model.base_grid == (12, 10)
        torch.testing.assert_close(model(img), before, rtol=1e-6, atol=1e-6)
    assert model.model_config["image_size"] == (48, 40)
    assert timm.models.get_model_args(model)["img_size"] == (48, 40)
    with pytest.raises(ValueError, match="conv stem"):
        model.set_input_size(patch_size=8)
    with pytest.raises(ValueError, match="smaller than rep_grid"):
        model.set_input_size(img_size=4)


# ------------------------------------------------------------------------------------------------
# Pretrained weights: another num_classes, another in_chans (as timm does)
# ------------------------------------------------------------------------------------------------
def _trained_file(tmp_path, **overrides):
    source = tiny(**overrides)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return source, save_model_checkpoint(source, tmp_path / "src.pth")


def test_pretrained_with_another_num_classes_reinitialises_only_the_head(tmp_path, caplog):
    source, path = _trained_file(tmp_path)
    model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY | dict(num_classes=9))
    loaded, original = model.state_dict(), source.state_dict()
    assert loaded[CLASSIFIER + ".weight"].shape == (9, 32)
    for key, value in original.items():
        if not key.startswith(CLASSIFIER):
            assert torch.equal(loaded[key], value), key


def test_pretrained_with_one_input_channel_sums_the_first_conv(tmp_path):
    source, path = _trained_file(tmp_path)
    model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY | dict(in_chans=1))
    want = source.state_dict()[FIRST_CONV + ".weight"].sum(dim=1, keepdim=True)   # timm's adapt_input_conv
    torch.testing.assert_close(model.state_dict()[FIRST_CONV + ".weight"], want, rtol=0, atol=0)
    gray = image(chans=1)
    with torch.no_grad():   # a gray image repeated over RGB gives the source model's logits
        torch.testing.assert_close(model.eval()(gray), source(gray.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)


def test_pretrained_at_another_img_size_resamples_the_position_embedding(tmp_path):
    source, path = _trained_file(tmp_path)
    model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY | dict(img_size=48)).eval()
    assert model.pos_embedding.shape == (1, 1 + 144, 32)
    with torch.no_grad():
        img = image(size=(48, 48))
        torch.testing.assert_close(model(img), source(img), rtol=1e-6, atol=1e-6)


def test_pretrained_without_a_file_says_nothing_downloads():
    with pytest.raises(ValueError, match="nothing is downloaded"):
        timm.create_model("cbt_tiny", pretrained=True)


# ------------------------------------------------------------------------------------------------
# torch.fx (timm's notrace registrations) and the model API on timm's wrappers
# ------------------------------------------------------------------------------------------------
def test_fx_tracing_treats_cbsa_and_ista_as_leaves_and_matches_eager():
    model = tiny("crate_cbt_small", attn=["mssa", "cbsa", "tssa"])
    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions())
    assert {CBSA, ISTA} <= set(tracer_kwargs["leaf_modules"])
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert "transformer.layers.1.0.fn" in eval_nodes                     # the CBSA layer, called whole
    assert not any(n.startswith("transformer.layers.1.0.fn.") for n in eval_nodes)
    assert any(n.startswith("transformer.layers.0.0.fn.") for n in eval_nodes)   # MSSA is traced through
    fx_model = create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out",
                                                              "transformer.layers.1.1.fn": "ista1"},
                                        tracer_kwargs=tracer_kwargs)
    img = image()
    with torch.no_grad():
        out = fx_model(img)
        assert torch.equal(out["out"], model(img))
        outs, _ = layer_outputs(model, img)
        assert torch.equal(out["ista1"], outs[1])
    for size in [(48, 32), (16, 16)]:                                   # the traced grid is not frozen
        with torch.no_grad():
            assert torch.equal(fx_model(image(size=size))["out"], model(image(size=size)))
