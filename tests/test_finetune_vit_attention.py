"""finetune_vit.convert_vit and its attention modules against reference formulas written here.

The references follow docs/authors-release.md §2.3 (CBSA^∨ as released, including its ``X_q[:, :-1]`` pooling
with a square grid from int(sqrt(N))), the paper's CBSA* (Fig. 9; item 27 of that page) and the release's
commented-out ReLU-kernel linear attention. Adaptive pooling is re-derived from its bins
(docs/authors-release.md §2.9), not taken from torch or cbsa_core.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention

from finetune_vit import ATTENTION_CHOICES, convert_vit, set_legacy_token_layout
from finetune_vit.attention import CBSAStarAttention, CBSAVeeAttention, ReLULinearAttention

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**overrides) -> torch.nn.Module:
    kw = dict(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    kw.update(overrides)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    # timm's init (std 0.02) makes every attention nearly uniform and its output ~1e-3, which would make a
    # 1e-5 tolerance meaningless; these weights give peaked attention and outputs of order one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn." in name:
                p.normal_(0.0, 0.2)
    return model


# ------------------------------------------------------------------------------------------------ references
def pool_bins(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive-pool bin i covers [floor(i*S/r), ceil((i+1)*S/r)) (docs/authors-release.md §2.9)."""
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def ref_pool(grid_tokens: torch.Tensor, h: int, w: int, rh: int, rw: int) -> torch.Tensor:
    """(B, h*w, C) raster-order tokens -> (B, rh*rw, C) bin means, looping over the bins."""
    b, _, c = grid_tokens.shape
    g = grid_tokens.reshape(b, h, w, c)
    reps = []
    for r0, r1 in pool_bins(h, rh):
        for c0, c1 in pool_bins(w, rw):
            reps.append(g[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(reps, dim=1)


def ref_qkv(attn, x):
    """timm's split: qkv(x) -> (B, N, 3, H, p): queries, keys, values each (B, N, C)."""
    b, n, _ = x.shape
    y = x @ attn.qkv.weight.t() + attn.qkv.bias
    c = y.shape[-1] // 3
    return y[..., :c], y[..., c:2 * c], y[..., 2 * c:]


def split(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def merge(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def softmax(t, dim):
    e = torch.exp(t - t.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def ref_pooled_queries(xq, grid, legacy, rep_grid, prefix=1):
    n = xq.shape[1]
    if legacy:  # the release: square grid from sqrt(N), pool X_q[:, :-1]
        side = int(math.sqrt(n))
        h = w = side
        tokens = xq[:, :-1]
    else:
        h, w = grid
        tokens = xq[:, prefix:]
    return ref_pool(tokens, h, w, *rep_grid)


def ref_cbsa_vee(attn, x, grid, legacy, rep_grid, heads, prefix=1):
    """docs/authors-release.md §2.3 steps 1-7."""
    xq, xk, xv = ref_qkv(attn, x)
    q0 = ref_pooled_queries(xq, grid, legacy, rep_grid, prefix)  # (B, m, C), pooled before the head split
    p = xq.shape[-1] // heads
    s = p ** -0.5
    xq, xk, xv, q0 = (split(t, heads) for t in (xq, xk, xv, q0))
    q_delta = softmax(q0 * s @ xk.transpose(-1, -2), dim=-1) @ xv
    bm = softmax(xq * s @ q0.transpose(-1, -2), dim=-1)
    out = merge(bm @ q_delta)
    return out @ attn.proj.weight.t() + attn.proj.bias


def ref_cbsa_star(attn, x, grid, rep_grid, heads, broadcast):
    """CBSA* (paper Fig. 9): Q = Q0 + A V, C = attention(Q, Q, Q), out = Aᵀ C (or the release's softmax broadcast)."""
    xq, xk, xv = ref_qkv(attn, x)
    q0 = ref_pooled_queries(xq, grid, False, rep_grid)
    p = xq.shape[-1] // heads
    s = p ** -0.5
    xq, xk, xv, q0 = (split(t, heads) for t in (xq, xk, xv, q0))
    a = softmax(q0 @ xk.transpose(-1, -2) * s, dim=-1)  # (B, H, m, N)
    q = q0 + a @ xv
    c = softmax(q @ q.transpose(-1, -2) * s, dim=-1) @ q
    if broadcast == "transpose":
        out = a.transpose(-1, -2) @ c
    else:
        out = softmax(xq @ q0.transpose(-1, -2) * s, dim=-1) @ c
    return merge(out) @ attn.proj.weight.t() + attn.proj.bias


def ref_linear(attn, x, heads):
    """out_n = sum_j (φq_n·φk_j) v_j / N / (φq_n·mean_j φk_j + 1e-6), φ = ReLU + 1e-6, per head."""
    xq, xk, xv = ref_qkv(attn, x)
    q, k, v = (split(t, heads) for t in (xq, xk, xv))
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    n = k.shape[-2]
    weights = torch.einsum("bhnd,bhmd->bhnm", q, k)  # the N×N kernel matrix, explicitly
    num = torch.einsum("bhnm,bhmd->bhnd", weights, v) / n
    den = torch.einsum("bhnd,bhd->bhn", q, k.mean(dim=2)).unsqueeze(-1) + 1e-6
    return merge(num / den) @ attn.proj.weight.t() + attn.proj.bias


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("attention", ATTENTION_CHOICES)
def test_conversion_keeps_every_parameter_and_key(attention):
    model = tiny_vit()
    before_params = [(name, p) for name, p in model.named_parameters()]
    before_sd = model.state_dict()
    convert_vit(model, attention, rep_grid=(2, 2))
    after_params = list(model.named_parameters())
    assert [n for n, _ in after_params] == [n for n, _ in before_params]
    assert all(a is b for (_, a), (_, b) in zip(after_params, before_params))  # the very same tensors
    assert sum(p.numel() for _, p in after_params) == sum(p.numel() for _, p in before_params)
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)
    expected = TimmAttention if attention == "mhsa" else {
        "cbsa_vee": CBSAVeeAttention, "cbsa_star": CBSAStarAttention, "linear": ReLULinearAttention}[attention]
    assert all(type(blk.attn) is expected for blk in model.blocks)


def test_timm_state_dict_round_trip():
    src = tiny_vit()
    converted = convert_vit(tiny_vit(), "cbsa_star", rep_grid=(2, 2))
    with torch.no_grad():
        for p in converted.parameters():
            p.normal_()
    # A timm checkpoint loads strictly into the converted model, and back.
    converted.load_state_dict(src.state_dict(), strict=True)
    fresh = tiny_vit()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), src.state_dict().values()))


def test_mhsa_leaves_timm_output_unchanged():
    img = torch.randn(2, 3, 48, 48)
    ref = tiny_vit()
    model = convert_vit(tiny_vit(), "mhsa")
    with torch.no_grad():
        assert torch.equal(model(img), ref(img))


def test_layers_subset_converts_only_those_blocks():
    model = convert_vit(tiny_vit(depth=3), "linear", layers=[2, 0])
    assert [type(b.attn) for b in model.blocks] == [ReLULinearAttention, TimmAttention, ReLULinearAttention]
    assert model.vit_adaptation["layers"] == [0, 2]


# ------------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("grid,rep_grid", [((14, 14), (8, 8)), ((6, 6), (4, 4))])
def test_cbsa_vee_matches_released_operator(legacy, grid, rep_grid):
    model = convert_vit(tiny_vit(), "cbsa_vee", rep_grid=rep_grid, legacy_token_layout=legacy)
    attn = model.blocks[0].attn
    torch.manual_seed(1)
    x = torch.randn(3, 1 + grid[0] * grid[1], 64)
    with torch.no_grad():
        out = attn(x, grid_size=grid)
        ref = ref_cbsa_vee(attn, x, grid, legacy, rep_grid, heads=2)
        other = ref_cbsa_vee(attn, x, grid, not legacy, rep_grid, heads=2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # The layout matters: the other pooling input gives a clearly different output.
    assert (out - other).abs().max() > 1e-3


@pytest.mark.parametrize("broadcast", ["transpose", "softmax"])
def test_cbsa_star_matches_reference(broadcast):
    model = convert_vit(tiny_vit(), "cbsa_star", rep_grid=(3, 4), broadcast=broadcast)
    attn = model.blocks[1].attn
    torch.manual_seed(2)
    grid = (6, 10)
    x = torch.randn(2, 1 + 60, 64)
    with torch.no_grad():
        out = attn(x, grid_size=grid)
        ref = ref_cbsa_star(attn, x, grid, (3, 4), heads=2, broadcast=broadcast)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_cbsa_star_differs_from_cbsa_vee():
    torch.manual_seed(3)
    x = torch.randn(2, 37, 64)
    star = convert_vit(tiny_vit(), "cbsa_star", rep_grid=(2, 2)).blocks[0].attn
    vee = convert_vit(tiny_vit(), "cbsa_vee", rep_grid=(2, 2)).blocks[0].attn
    with torch.no_grad():
        assert (star(x, grid_size=(6, 6)) - vee(x, grid_size=(6, 6))).abs().max() > 1e-3


def test_linear_matches_reference():
    attn = convert_vit(tiny_vit(), "linear").blocks[0].attn
    torch.manual_seed(4)
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        out = attn(x)
        ref = ref_linear(attn, x, heads=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_linear_attention_under_fp16_autocast_stays_finite():
    attn = convert_vit(tiny_vit(), "linear").blocks[0].attn
    # Large activations: in fp16, φ(k)ᵀv reaches ~1e5 > 65504 and overflows unless computed in fp32.
    x = torch.randn(2, 37, 64) * 50
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = attn(x)
    ref = ref_linear(attn, x, heads=2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.2, rtol=0.01)


# ------------------------------------------------------------------------------------------------ token grid
def manual_forward(model, img, attn_fn):
    """The timm ViT forward with ``attn_fn(block_attn, x)`` in place of each block's attention."""
    x = model._pos_embed(model.patch_embed(img))
    for blk in model.blocks:
        x = x + attn_fn(blk.attn, blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("attention", ["cbsa_vee", "cbsa_star"])
def test_dynamic_non_square_image_sizes(attention):
    model = convert_vit(tiny_vit(dynamic_img_size=True), attention, rep_grid=(2, 3))
    for size in [(48, 80), (64, 40)]:  # grids 6x10 and 8x5, one after the other
        torch.manual_seed(5)
        img = torch.randn(2, 3, *size)
        grid = (size[0] // 8, size[1] // 8)
        if attention == "cbsa_vee":
            fn = lambda a, x: ref_cbsa_vee(a, x, grid, False, (2, 3), heads=2)  # noqa: E731
        else:
            fn = lambda a, x: ref_cbsa_star(a, x, grid, (2, 3), heads=2, broadcast="transpose")  # noqa: E731
        with torch.no_grad():
            out = model(img)
            ref = manual_forward(model, img, fn)
        assert model.blocks[0].attn.token_grid.size == grid
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_fixed_non_square_model_and_registers():
    # img_size 40x64 -> a fixed 5x8 grid; two register tokens after [CLS] make 3 prefix tokens.
    model = convert_vit(tiny_vit(img_size=(40, 64), reg_tokens=2), "cbsa_vee", rep_grid=(2, 2))
    assert model.blocks[0].attn.num_prefix_tokens == 3
    img = torch.randn(1, 3, 40, 64)
    with torch.no_grad():
        out = model(img)
        # Corrected layout: the pooled queries are exactly the 40 patch tokens after the 3 prefix tokens.
        ref = manual_forward(model, img, lambda a, x: ref_cbsa_vee(a, x, (5, 8), False, (2, 2), heads=2, prefix=3))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert model(img).shape == (1, 5)


def test_deepcopy_keeps_grid_hook_shared():
    model = convert_vit(tiny_vit(), "cbsa_vee", rep_grid=(2, 2))
    clone = copy.deepcopy(model)
    hook = [h for h in clone.patch_embed._forward_pre_hooks.values()][0]
    assert all(b.attn.token_grid is hook for b in clone.blocks)
    assert hook is not model.blocks[0].attn.token_grid
    img = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(clone(img), model(img))


def test_set_legacy_token_layout_switches_every_block():
    model = convert_vit(tiny_vit(), "cbsa_star", rep_grid=(2, 2))
    assert set_legacy_token_layout(model, True) == 2
    assert all(b.attn.legacy_token_layout for b in model.blocks)
    assert model.vit_adaptation["legacy_token_layout"] is True


# ------------------------------------------------------------------------------------------------ bad input
def test_image_not_divisible_by_patch_is_refused():
    model = convert_vit(tiny_vit(dynamic_img_size=True), "cbsa_vee", rep_grid=(2, 2))
    with pytest.raises(ValueError, match=r"image size 50x80 is not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 50, 80))


def test_attn_mask_is_refused():
    attn = convert_vit(tiny_vit(), "cbsa_vee", rep_grid=(2, 2)).blocks[0].attn
    x = torch.randn(1, 37, 64)
    with pytest.raises(ValueError, match="does not support attn_mask"):
        attn(x, attn_mask=torch.zeros(37, 37), grid_size=(6, 6))


def test_unknown_grid_and_wrong_token_count_are_refused():
    attn = convert_vit(tiny_vit(), "cbsa_star", rep_grid=(2, 2)).blocks[0].attn
    with pytest.raises(RuntimeError, match="token grid is unknown"):
        attn(torch.randn(1, 37, 64))
    with pytest.raises(ValueError, match=r"grid_size=\(5, 5\).*needs 1 \+ 5\*5 \+ 0 = 26 tokens, but the input has 37"):
        attn(torch.randn(1, 37, 64), grid_size=(5, 5))


def test_rep_grid_larger_than_token_grid_is_refused():
    model = convert_vit(tiny_vit(), "cbsa_vee")  # 8x8 reps on a 6x6 grid
    with pytest.raises(ValueError, match=r"representative grid \(8, 8\) is larger than the token grid \(6, 6\)"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="softmax"), "unknown attention 'softmax'; valid: cbsa_vee, cbsa_star, linear, mhsa"),
    (dict(attention="cbsa_star", broadcast="mean"), "unknown broadcast 'mean'; valid: transpose, softmax"),
    (dict(attention="cbsa_vee", broadcast="softmax"), "only applies to attention='cbsa_star'"),
    (dict(attention="linear", layers=[2]), r"layers must be block indices in \[0, 2\), got 2"),
    (dict(attention="linear", layers=[1, 1]), "block index 1 listed twice"),
])
def test_bad_conversion_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert_vit(tiny_vit(), **kwargs)


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match="expects a timm VisionTransformer, got Linear"):
        convert_vit(torch.nn.Linear(2, 2))
    model = convert_vit(tiny_vit(), "cbsa_vee", rep_grid=(2, 2))
    with pytest.raises(ValueError, match="block 0 already uses cbsa_vee attention"):
        convert_vit(model, "linear")
    with pytest.raises(ValueError, match="patch dropout"):
        convert_vit(tiny_vit(patch_drop_rate=0.5), "cbsa_vee")


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_tiny_patch16_384"])
def test_paper_archs_convert_and_run_at_their_resolution(arch):
    model = timm.create_model(arch, pretrained=False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    convert_vit(model, "cbsa_vee", legacy_token_layout=True)  # 8x8 reps on the 14x14 / 24x24 grid, as released
    size = int(arch[-3:])
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert model.blocks[11].attn.token_grid.size == (size // 16, size // 16)
    assert sum(p.numel() for p in model.parameters()) == n_params
