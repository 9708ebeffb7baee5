"""The core's library edges: empty batches, grid arguments, one rep_grid rule, attention options, the head fold
under autocast.

* B = 0 gives an empty output of the right shape, forward and backward, through every layer, every registered
  model, every segmentation decoder and every converted-ViT attention; parameters get zero (not NaN) gradients.
* ``grid_size`` must be two positive ints: bools, floats, numpy floats, float tensors, other lengths and None are
  refused with a ValueError naming the value; numpy ints and 0-d integer tensors mean their value.
* ``rep_grid`` is checked by one function (``cbsa_core.layers.check_rep_grid``) for CBSA, the CBT constructor,
  the segmentation decoders and the ViT track; the same bad values are refused everywhere.
* ``build_attention`` takes exactly the options of each kind's class and refuses the others by name; a model
  passes each layer only what it takes and records the model-level settings.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbsa_core.layers as layers
from cbsa_core import CBSA, ISTA, MSSA, TSSA, create_model
from cbsa_core.layers import attention_options, build_attention, check_grid_size, check_rep_grid
from cbsa_core.layers.linear_attention import LinearAttention
from cbsa_core.layers.ops import fold_heads
from cbsa_core.layers import special_cases as sc
from cbsa_core.models.cbt import MODEL_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_GRIDS = [(4.7, 4.2), (4.0, 4.0), (np.float32(4), 4), (True, 4), (4, 4, 1), (4,), None, (0, 4), (-1, 4),
             (torch.tensor(4.0), 4), "44", 16]


def _empty_backward(module: nn.Module, x: torch.Tensor, call) -> torch.Tensor:
    """Run ``call(module, x)`` on an empty batch, backpropagate, and check every gradient is an exact zero."""
    out = call(module, x)
    assert out.shape[0] == 0
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, torch.zeros_like(p)), name
    return out


# ------------------------------------------------------------------------------------------------
# B = 0
# ------------------------------------------------------------------------------------------------
LAYERS = {
    "cbsa": lambda: CBSA(16, 2, 8, rep_grid=(2, 3)),
    "agent": lambda: CBSA(16, 2, 8, rep_grid=(2, 3), contraction=False),
    "cbsa_dagger": lambda: CBSA(16, 2, 8, rep_grid=(2, 3), tied_output=True),
    "cbsa_unfolded": lambda: CBSA(16, 8, 2, rep_grid=(3, 4)),       # H·m·dim > m·I + I·dim: the plain path
    "cbsa_legacy_suffix": lambda: CBSA(16, 2, 8, rep_grid=(2, 2), num_suffix_tokens=2, legacy_token_layout=True),
    "mssa": lambda: MSSA(16, 2, 8),
    "tssa": lambda: TSSA(16, 2, 8),
    "linear": lambda: LinearAttention(16, 2, 8),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_batch_through_every_attention_layer(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    suffix = getattr(layer, "num_suffix_tokens", 0)
    t = 1 + 4 * 5 + suffix
    if isinstance(layer, CBSA):   # both projection paths are covered
        assert layer._fold_output(t) == (name != "cbsa_unfolded")
    x = torch.randn(3, t, 16)
    full = layer(x, grid_size=(4, 5))
    empty = x[:0].clone().requires_grad_(True)
    out = _empty_backward(layer, empty, lambda m, inp: m(inp, grid_size=(4, 5)))
    assert out.shape == (0, t, 16) == full[:0].shape and out.dtype == full.dtype
    if isinstance(layer, CBSA):
        assert layer.attention_map(x[:0], (4, 5)).shape == (0, layer.heads, t, t)
        assert all(v.shape[0] == 0 for v in layer.forward_details(x[:0], (4, 5)).values())


def test_empty_batch_through_ista_and_the_special_cases():
    ista = ISTA(16)
    x = torch.randn(0, 7, 16, requires_grad=True)
    assert _empty_backward(ista, x, lambda m, inp: m(inp)).shape == (0, 7, 16)
    tokens = torch.randn(0, 2, 6, 3, requires_grad=True)
    forms = [sc.softmax_attention_form(tokens), sc.linear_attention_form(tokens, 1.0),
             sc.channel_attention_form(tokens, 1.0), sc.cbsa_step(*sc.axis_representatives(tokens)),
             sc.cbsa_step(*sc.principal_representatives(tokens), contraction="exact"),
             sc.cbsa_step(*sc.self_expressive_representatives(tokens), contraction="none")]
    assert all(f.shape == (0, 2, 6, 3) for f in forms)
    sum(f.sum() for f in forms).backward()
    assert tokens.grad.shape == tokens.shape


def _tiny_kwargs(name: str):
    kw = dict(dim=32, heads=2, dim_head=16, image_size=32, patch_size=4, num_classes=5, depth=1)
    if name == "crate_cbt_small":
        kw.update(depth=2, attn=["mssa", "cbsa"])
    attn = kw.get("attn", MODEL_CONFIGS[name]["attn"])
    if any(a in ("cbsa", "cbsa_dagger", "agent") for a in ([attn] if isinstance(attn, str) else attn)):
        kw["rep_grid"] = (2, 2)
    return kw


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_empty_batch_through_every_registered_model(name):
    torch.manual_seed(0)
    model = create_model(name, **_tiny_kwargs(name)).train()
    img = torch.randn(0, 3, 32, 40, requires_grad=True)     # another grid than the stored one
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    logits = _empty_backward(model, img, lambda m, inp: m(inp))
    assert logits.shape == (0, 5)
    # An empty training batch leaves the BatchNorm statistics as they were (no NaN from a mean over nothing).
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())
    with torch.no_grad():
        model.eval()
        assert model.forward_features(img).shape == (0, 1 + 8 * 10, 32)
        assert model(img).shape == (0, 5)


@pytest.mark.parametrize("decoder", ["mask_transformer", "segmenter_mask_transformer", "linear", "depict_sa",
                                     "depict_ca", "tssa"])
def test_empty_batch_through_every_segmentation_decoder(decoder):
    from semantic_segmentation.decoders import DECODERS
    from semantic_segmentation.model import create_segmenter, default_model_config

    settings = dict(name=decoder)
    if decoder != "linear" and "n_layers" in DECODERS[decoder]:
        settings.update(n_layers=1, n_heads=2)
    if "rep_grid" in DECODERS[decoder]:
        settings.update(rep_grid=[2, 2], dim_head=16)
    torch.manual_seed(0)
    cfg = default_model_config("test", n_cls=3, crop_size=32, d_model=32, n_heads=2, n_layers=1, decoder=settings)
    model = create_segmenter(cfg).train()
    out = _empty_backward(model, torch.randn(0, 3, 32, 48, requires_grad=True), lambda m, inp: m(inp))
    assert out.shape == (0, 3, 32, 48)


@pytest.mark.parametrize("attention", ["cbsa_vee", "cbsa_star", "linear", "mhsa"])
def test_empty_batch_through_every_converted_vit(attention):
    from finetune_vit.models import create_vit

    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", attention=attention, num_classes=3, rep_grid=(2, 2),
                       model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)).train()
    out = _empty_backward(model, torch.randn(0, 3, 32, 32, requires_grad=True), lambda m, inp: m(inp))
    assert out.shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# grid_size
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", BAD_GRIDS, ids=repr)
def test_bad_grid_sizes_are_refused_naming_the_value(grid):
    layer = CBSA(16, 2, 8, rep_grid=(2, 2))
    x = torch.randn(1, 17, 16)
    with pytest.raises(ValueError, match=r"CBSA: grid_size must be a pair of positive ints") as err:
        layer(x, grid_size=grid)
    assert repr(grid) in str(err.value)
    with pytest.raises(ValueError, match="grid_size must be a pair of positive ints"):
        check_grid_size(grid)


def test_integer_grid_sizes_of_any_integer_type_mean_their_value():
    torch.manual_seed(1)
    layer = CBSA(16, 2, 8, rep_grid=(2, 2))
    x = torch.randn(2, 1 + 12, 16)
    expected = layer(x, grid_size=(3, 4))
    for grid in [[3, 4], (np.int64(3), np.int32(4)), (torch.tensor(3), torch.tensor(4, dtype=torch.int32)),
                 torch.Size([3, 4])]:
        torch.testing.assert_close(layer(x, grid_size=grid), expected, rtol=0, atol=0)
    assert check_grid_size(np.array([3, 4])) == (3, 4)


def test_converted_vit_attention_checks_an_explicit_grid_size():
    from finetune_vit.models import create_vit

    model = create_vit("vit_tiny_patch16_224", attention="cbsa_star", num_classes=3, rep_grid=(2, 2),
                       model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    attn = model.blocks[0].attn
    with pytest.raises(ValueError, match=r"CBSAStarAttention: grid_size must be a pair of positive ints.*\(4\.0, 4\)"):
        attn(torch.randn(1, 17, 32), grid_size=(4.0, 4))


# ------------------------------------------------------------------------------------------------
# rep_grid: one rule everywhere
# ------------------------------------------------------------------------------------------------
BAD_REP_GRIDS = [(4.7, 4.2), (2.0, 2), (True, 2), (2, 2, 1), (0, 2), None, "22", (np.float64(2), 2)]


@pytest.mark.parametrize("rep_grid", BAD_REP_GRIDS, ids=repr)
def test_bad_rep_grids_are_refused_by_every_consumer(rep_grid):
    from finetune_vit.attention import CBSAVeeAttention, TokenGrid
    from finetune_vit.convert import convert_vit
    from semantic_segmentation.decoders import resolve_decoder_config
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    message = r"rep_grid must be a pair of positive ints \(rh, rw\), got "
    with pytest.raises(ValueError, match=message):
        check_rep_grid(rep_grid)
    with pytest.raises(ValueError, match="CBSA: " + message):
        CBSA(16, 2, 8, rep_grid=rep_grid)
    if rep_grid is not None:   # None means "the default" to a model and a decoder config
        with pytest.raises(ValueError, match=message):
            create_model("cbt_tiny", depth=1, rep_grid=rep_grid)
        with pytest.raises(ValueError, match="decoder.rep_grid must be a pair of positive ints"):
            resolve_decoder_config(dict(name="mask_transformer", rep_grid=rep_grid), 32)
    with pytest.raises(ValueError, match="CBSAVeeAttention: " + message):
        CBSAVeeAttention(Attention(32, num_heads=2), TokenGrid(), rep_grid=rep_grid)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=message):
        convert_vit(vit, "cbsa_star", rep_grid=rep_grid)


def test_rep_grid_larger_than_the_token_grid_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"CBSA: representative grid \(3, 2\) is larger than the token grid \(2, 5\)"):
        CBSA(16, 2, 8, rep_grid=(3, 2))(torch.randn(1, 11, 16), grid_size=(2, 5))
    with pytest.raises(ValueError, match=r"img_size 32 with patch_size 8 gives a 4x4 patch grid, smaller than rep_grid "
                                         r"5x2; use an image size of at least 40x16"):
        create_model("cbt_tiny", depth=1, img_size=32, patch_size=8, rep_grid=(5, 2))
    assert check_rep_grid([np.int64(2), 3], (2, 3)) == (2, 3)   # equal sides fit


def test_a_rep_grid_for_a_model_without_representatives_is_refused():
    for name in ("mssa_tiny", "tssa_tiny", "CRATE_tiny"):
        with pytest.raises(ValueError, match=r"rep_grid=\(3, 3\): no layer of this model takes it"):
            create_model(name, rep_grid=(3, 3))
        model = create_model(name, depth=1)
        assert model.model_config["rep_grid"] is None
    assert create_model("cbt_tiny", depth=1).model_config["rep_grid"] == (8, 8)   # the default
    assert create_model("cbt_tiny", depth=1, rep_grid=[4, 2]).model_config["rep_grid"] == (4, 2)


# ------------------------------------------------------------------------------------------------
# build_attention and what a model passes to its layers
# ------------------------------------------------------------------------------------------------
def test_build_attention_refuses_options_its_kind_does_not_take():
    for kind in ("mssa", "tssa"):
        with pytest.raises(ValueError, match=rf"attention '{kind}' \({kind.upper()}\) does not take rep_grid; its "
                                             r"options: none"):
            build_attention(kind, 16, 2, 8, rep_grid=(3, 3))
    # contraction / tied_output define cbsa, agent and cbsa_dagger: they are not options of any of them
    for kind, option in (("cbsa", "tied_output"), ("agent", "contraction"), ("cbsa_dagger", "tied_output")):
        with pytest.raises(ValueError, match=rf"'{kind}' \(CBSA\) does not take {option}; its options: rep_grid"):
            build_attention(kind, 16, 2, 8, **{option: True})
    with pytest.raises(ValueError, match="unknown attention type 'softmax'"):
        build_attention("softmax", 16, 2, 8)
    layer = build_attention("agent", 16, 2, 8, rep_grid=(3, 3), num_suffix_tokens=2, legacy_token_layout=True)
    assert (layer.rep_grid, layer.num_suffix_tokens, layer.legacy_token_layout, layer.contraction,
            layer.tied_output) == ((3, 3), 2, True, False, False)
    assert build_attention("cbsa_dagger", 16, 2, 8).to_out is None


def test_attention_options_are_read_from_the_classes(monkeypatch):
    assert attention_options("mssa") == attention_options("tssa") == ()
    assert set(attention_options("cbsa")) == {"rep_grid", "num_prefix_tokens", "num_suffix_tokens",
                                              "legacy_token_layout"}

    class Probe(nn.Module):
        def __init__(self, dim, heads=1, dim_head=4, window=3, *, gain=1.0, mode="a"):
            super().__init__()
            self.args = (dim, heads, dim_head, window, gain, mode)

    monkeypatch.setitem(layers.ATTENTION_KINDS, "probe", (Probe, dict(mode="b")))
    assert attention_options("probe") == ("window", "gain")
    assert build_attention("probe", 8, 2, 4, gain=2.0).args == (8, 2, 4, 3, 2.0, "b")
    with pytest.raises(ValueError, match=r"'probe' \(Probe\) does not take mode; its options: window, gain"):
        build_attention("probe", 8, 2, 4, mode="c")


def test_a_hybrid_model_passes_each_layer_only_its_options_and_records_the_settings():
    model = create_model("crate_cbt_small", depth=3, dim=32, heads=2, dim_head=16, image_size=32, patch_size=4,
                         attn=["mssa", "cbsa", "tssa"], rep_grid=(2, 3), legacy_token_layout=True)
    mssa, cbsa, tssa = model.attention_layers
    assert isinstance(mssa, MSSA) and isinstance(tssa, TSSA)
    assert (cbsa.rep_grid, cbsa.legacy_token_layout, cbsa.num_prefix_tokens) == ((2, 3), True, 1)
    assert model.model_config["rep_grid"] == (2, 3) and model.model_config["legacy_token_layout"] is True
    # A model without CBSA layers still records the layout it was asked for (its pretrained files carry it).
    assert create_model("mssa_tiny", depth=1, legacy_token_layout=True).model_config["legacy_token_layout"] is True


# ------------------------------------------------------------------------------------------------
# The head fold under autocast
# ------------------------------------------------------------------------------------------------
class _Allocations(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor the dispatched ops return."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out


def test_fold_heads_never_builds_a_per_sample_float32_weight_under_autocast():
    torch.manual_seed(3)
    b, h, n, p, dim = 6, 3, 2, 5, 7                          # n < p: the per-sample weight outsizes the output
    per_head = torch.randn(b, h, n, p, requires_grad=True)   # float32, as κ·C is under autocast
    weight = torch.randn(dim, h * p, requires_grad=True)
    per_sample_weight = b * h * p * dim
    with torch.autocast("cpu", dtype=torch.bfloat16), _Allocations() as seen:
        out = fold_heads(per_head, weight.t())
    assert out.dtype == torch.bfloat16
    big_fp32 = [o for o in seen.outputs if o[1] == torch.float32 and o[2] >= per_sample_weight]
    assert not big_fp32, big_fp32
    expected = torch.cat([per_head[:, k].bfloat16().float() @ weight.t()[k * p:(k + 1) * p].bfloat16().float()
                          for k in range(h)], dim=1)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    with _Allocations() as seen:                              # nor in float32: no per-sample copy at all
        out.float().sum().backward()
        fold_heads(per_head, weight.t()).sum().backward()
    assert max(o[2] for o in seen.outputs) < per_sample_weight
    assert per_head.grad.dtype == weight.grad.dtype == torch.float32


def test_cbsa_under_autocast_folds_in_bfloat16():
    """Inside CBSA the folded weight (B, H·m, dim) is produced in bf16 and no float32 tensor of that size or of
    the per-sample weight's (B, H, p, dim) is created."""
    torch.manual_seed(4)
    layer = CBSA(24, 3, 8, rep_grid=(2, 2))
    assert layer._fold_output(17)
    x = torch.randn(5, 1 + 16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Allocations() as seen:
        out = layer(x, grid_size=(4, 4))
    assert out.dtype == torch.bfloat16
    folded = 5 * 3 * 4 * 24
    assert any(o[1] == torch.bfloat16 and o[2] == folded for o in seen.outputs)
    assert not [o for o in seen.outputs if o[1] == torch.float32 and o[2] in (folded, 5 * 3 * 8 * 24)]
