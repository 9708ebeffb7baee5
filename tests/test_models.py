"""CBT models: exact parameter counts, registry, position-embedding resampling, stems, ISTA, timm integration."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import cbsa_core
from cbsa_core import CBSA, ISTA, MSSA, TSSA, create_model, list_models, save_model_checkpoint
from cbsa_core.flops import count_parameters
from cbsa_core.registry import ALIASES

# docs/authors-release.md §6 (arithmetic of the release's modules, 1000 classes).
EXACT_PARAMS = {
    "cbt_tiny": 1_789_192, "cbt_small": 6_667_048, "cbt_base": 25_691_752, "cbt_large": 83_051_368,
    "mssa_tiny": 1_789_120, "mssa_small": 6_666_904, "tssa_tiny": 1_789_156, "tssa_small": 6_666_976,
}


def param_formula(dim: int, depth: int, heads: int, attn: str) -> int:
    """§6 per-component arithmetic, written out: conv stem + pos/cls + layers + head (patch 16, I = D)."""
    chans = [3, dim // 8, dim // 4, dim // 2, dim]
    stem = sum(chans[i] * chans[i + 1] * 9 + 2 * chans[i + 1] for i in range(4))
    attn_params = {"cbsa": 2 * dim * dim + dim + 2 * heads, "mssa": 2 * dim * dim + dim,
                   "tssa": 2 * dim * dim + dim + heads}[attn]
    per_layer = 2 * dim + attn_params + 2 * dim + dim * dim
    return stem + 197 * dim + dim + depth * per_layer + 2 * dim + 1000 * dim + 1000


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    with torch.device("meta"):                      # structure only; no memory or init cost
        model = create_model(name)
    n = count_parameters(model)
    assert n == EXACT_PARAMS[name]
    cfg = model.model_config
    assert n == param_formula(cfg["dim"], cfg["depth"], cfg["heads"], name.split("_")[0].replace("cbt", "cbsa"))


def test_aliases_build_the_same_models():
    for alias, canonical in [("Ours_tiny", "cbt_tiny"), ("CRATE_small", "mssa_small"), ("ToST_tiny", "tssa_tiny")]:
        with torch.device("meta"):
            a, c = create_model(alias), create_model(canonical)
        assert a.arch == alias and c.arch == canonical
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
    assert set(ALIASES) <= set(list_models())
    assert {"cbt_tiny", "cbt_small", "cbt_base", "cbt_large", "crate_cbt_small"} <= set(list_models())


def test_dagger_ties_the_output_projection():
    with torch.device("meta"):
        dagger, plain = create_model("cbt_dagger_tiny"), create_model("cbt_tiny")
    d = 192
    assert count_parameters(plain) - count_parameters(dagger) == 12 * (d * d + d)   # no to_out per layer
    assert all(isinstance(a, CBSA) and a.to_out is None for a in dagger.attention_layers)


def test_hybrid_crate_cbt_small_has_mssa_then_cbsa():
    with torch.device("meta"):
        model = create_model("crate_cbt_small")
    kinds = [type(a) for a in model.attention_layers]
    assert kinds == [MSSA] * 6 + [CBSA] * 6
    assert [a.contraction for a in model.attention_layers[6:]] == [True] * 6


def test_baseline_attention_types():
    with torch.device("meta"):
        assert all(isinstance(a, MSSA) for a in create_model("mssa_tiny").attention_layers)
        assert all(isinstance(a, TSSA) for a in create_model("tssa_small").attention_layers)
        agent = create_model("agent_tiny")
    assert all(isinstance(a, CBSA) and not a.contraction for a in agent.attention_layers)
    assert count_parameters(agent) == EXACT_PARAMS["cbt_tiny"]                      # agent adds no parameters


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("cbt_gigantic")
    msg = str(info.value)
    assert "cbt_gigantic" in msg
    for name in ("cbt_tiny", "cbt_large", "mssa_small", "Ours_small"):
        assert name in msg


def test_invalid_override_names_the_model():
    with pytest.raises(TypeError, match="cbt_tiny"):
        create_model("cbt_tiny", no_such_option=3)


# ------------------------------------------------------------------------------------------------
# Small models that actually run
# ------------------------------------------------------------------------------------------------
def tiny(name="cbt_tiny", **kw):
    cfg = dict(depth=1, num_classes=7)
    cfg.update(kw)
    torch.manual_seed(0)
    return create_model(name, **cfg).eval()


def test_forward_features_and_head_compose_to_forward():
    model = tiny(depth=2, image_size=128)
    img = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        feats = model.forward_features(img)
        assert feats.shape == (2, 1 + 8 * 8, 192)
        torch.testing.assert_close(model.forward_head(feats), model(img))
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, F.layer_norm(feats[:, 0], (192,), model.mlp_head[0].weight,
                                                     model.mlp_head[0].bias))
        torch.testing.assert_close(model.mlp_head[1](pre), model(img))
        inter = model.forward_analysis(img)
        assert len(inter) == 2
        torch.testing.assert_close(inter[-1]["output"], feats)
        maps, grid = model.attention_maps(img)
        assert grid == (8, 8) and [m.shape for m in maps] == [(2, 3, 65, 65)] * 2


def test_pos_embedding_at_the_base_grid_is_unchanged():
    model = tiny(image_size=128)
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        tokens, grid = model.embed(img)
        stem, _ = model.to_patch_embedding(img)
        expected = torch.cat([model.cls_token, stem], dim=1) + model.pos_embedding
    assert grid == (8, 8)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_pos_embedding_is_bicubically_resampled_for_rectangular_inputs():
    model = tiny(image_size=224, num_classes=5)
    img = torch.randn(2, 3, 160, 224)                                    # grid 10×14, base grid 14×14
    with torch.no_grad():
        tokens, grid = model.embed(img)
        stem, _ = model.to_patch_embedding(img)
        pos_grid = model.pos_embedding[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
        resized = F.interpolate(pos_grid, size=(10, 14), mode="bicubic", align_corners=False)
        pos = torch.cat([model.pos_embedding[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)
        expected = torch.cat([model.cls_token.expand(2, -1, -1), stem], dim=1) + pos
        logits = model(img)
    assert grid == (10, 14)
    torch.testing.assert_close(tokens, expected, rtol=1e-6, atol=1e-6)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize("patch,image", [(4, 32), (8, 64)])
def test_small_patch_sizes_with_one_input_channel(patch, image):
    model = tiny(patch_size=patch, in_chans=1, image_size=image, num_classes=10)
    convs = [m for m in model.to_patch_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == {4: 2, 8: 3}[patch]                             # log2(patch) stride-2 stages
    assert convs[0].in_channels == 1 and convs[-1].out_channels == 192
    assert [c.out_channels for c in convs] == {4: [96, 192], 8: [48, 96, 192]}[patch]
    with torch.no_grad():
        out = model(torch.randn(2, 1, image, image))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, image, image))


def test_image_size_not_divisible_by_patch_is_refused():
    with pytest.raises(ValueError, match=r"image_size 225 .*patch_size 16"):
        create_model("cbt_tiny", image_size=225, depth=1)
    model = tiny(image_size=128)
    with pytest.raises(ValueError, match=r"130x128 .*patch size 16"):
        model(torch.randn(1, 3, 130, 128))


def test_legacy_switch_reaches_every_cbsa_layer():
    model = tiny("crate_cbt_small", image_size=128, depth=12, num_classes=3)
    assert not any(a.legacy_token_layout for a in model.attention_layers[6:])
    model.set_legacy_token_layout(True)
    assert all(a.legacy_token_layout for a in model.attention_layers[6:])
    assert model.model_config["legacy_token_layout"] is True


def test_every_parameter_of_a_small_cbt_gets_a_gradient():
    model = tiny(depth=2, image_size=128, num_classes=4).train()
    img = torch.randn(2, 3, 128, 128)
    F.cross_entropy(model(img), torch.tensor([1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# ISTA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [3, 50])          # 3 rows: d >= 2·rows, the three-product path runs
def test_ista_fused_equals_the_release_form_and_the_formula(rows):
    torch.manual_seed(1)
    ista = ISTA(24).double()
    x = torch.randn(rows, 24, dtype=torch.float64)
    w = ista.weight
    # out = ReLU(x + η (x W − x Wᵀ W) − η λ), η = λ = 0.1 (docs/authors-release.md §2.6)
    expected = torch.relu(x + 0.1 * (x @ w - x @ w.T @ w) - 0.1 * 0.1)
    torch.testing.assert_close(ista(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ista.forward_reference(x), expected, rtol=1e-12, atol=1e-12)
    assert (ista(x) == 0).any() and (ista(x) > 0).any()               # both sides of the ReLU exercised
    assert [n for n, _ in ista.named_parameters()] == ["weight"]     # η, λ are constants (its item 9)


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------
def test_timm_lists_the_cbt_models():
    names = timm.list_models("cbt_*")
    assert {"cbt_tiny", "cbt_small", "cbt_base", "cbt_large"} <= set(names)


def test_timm_create_model_loads_a_local_checkpoint(tmp_path):
    src = tiny(depth=2, image_size=128, num_classes=9)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_model_checkpoint(src, tmp_path / "cbt_tiny.pth")
    model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              depth=2, image_size=128, num_classes=9).eval()
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(img), src(img), rtol=0, atol=0)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        timm.create_model("cbt_tiny", pretrained=True)
    fresh = timm.create_model("cbt_tiny", depth=1)
    assert isinstance(fresh, cbsa_core.CBT) and fresh.num_classes == 1000
