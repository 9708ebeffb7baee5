"""FLOPs: the paper-convention analytic count (2 × multiply-accumulates, see docs/REPRODUCING.md) and what
FlopCounterMode measures on the ops that actually run, both against hand-computed numbers."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cbsa_core import CBSA, ISTA, MSSA, TSSA, create_model
from cbsa_core.flops import PAPER_CLASSIFICATION, analytic_flops, attention_macs, measured_flops

PAPER_GFLOPS = {"cbt_tiny": 1.1, "cbt_small": 4.0, "cbt_base": 15.1, "cbt_large": 47.3}   # paper Table 3


def hand_count_macs(dim: int, depth: int, heads: int, *, image: int = 224, patch: int = 16, m: int = 64,
                    classes: int = 1000) -> int:
    """Paper convention for a CBT with I = dim: conv stem + per layer (CBSA 2Td² + 3Tmd + 2m²d and ISTA
    counted as two d×d products, docs/authors-release.md item 22) + classifier."""
    stages = patch.bit_length() - 1
    chans = [3] + [dim // 2 ** (stages - 1 - i) for i in range(stages)]
    side, stem = image, 0
    for i in range(stages):
        side //= 2
        stem += side * side * chans[i] * chans[i + 1] * 9
    t = 1 + (image // patch) ** 2
    cbsa = 2 * t * dim * dim + 3 * t * m * dim + 2 * m * m * dim
    ista = 2 * t * dim * dim
    return stem + depth * (cbsa + ista) + dim * classes


@pytest.mark.parametrize("name,dims", [("cbt_tiny", (192, 12, 3)), ("cbt_small", (384, 12, 6)),
                                       ("cbt_base", (768, 12, 12)), ("cbt_large", (1024, 24, 16))])
def test_analytic_flops_match_the_paper(name, dims):
    with torch.device("meta"):
        model = create_model(name)
    flops = analytic_flops(model, 224)
    assert flops["total"] == 2 * hand_count_macs(*dims)
    assert flops["total"] == pytest.approx(flops["stem"] + flops["attention"] + flops["ista"] + flops["head"])
    assert flops["total"] / 1e9 == pytest.approx(PAPER_GFLOPS[name], rel=0.03)
    assert PAPER_CLASSIFICATION[name][1] == PAPER_GFLOPS[name]


def test_cbt_tiny_total_by_hand():
    # stem: 112²·24·3·9 + 56²·48·24·9 + 28²·96·48·9 + 14²·192·96·9 = 8,128,512 + 3 × 32,514,048
    # layers: 12 × (23,359,488 CBSA + 14,524,416 ISTA); head 192·1000   -> 560,469,504 MACs
    with torch.device("meta"):
        model = create_model("cbt_tiny")
    assert analytic_flops(model)["total"] == 2 * 560_469_504


def test_analytic_attention_formula_for_one_layer_by_hand():
    t = 197
    # CBSA d = I = 192, m = 64:  2·197·192² + 3·197·64·192 + 2·64²·192 = 14,524,416 + 7,262,208 + 1,572,864
    assert attention_macs(CBSA(192, 3, 64), t) == 23_359_488
    assert attention_macs(CBSA(192, 3, 64, tied_output=True), t) == 23_359_488
    assert attention_macs(CBSA(192, 3, 64, contraction=False), t) == 14_524_416 + 7_262_208
    # MSSA: 2·197·192² + 2·197²·192 = 14,524,416 + 14,902,656
    assert attention_macs(MSSA(192, 3, 64), t) == 29_427_072
    # TSSA: 2·197·192² + 197·192
    assert attention_macs(TSSA(192, 3, 64), t) == 14_562_240
    # inner width != dim, m = 12: 2·50·40·24 + 3·50·12·24 + 2·12²·24
    assert attention_macs(CBSA(40, 3, 8, rep_grid=(3, 4)), 50) == 96_000 + 43_200 + 6_912


def test_cbsa_becomes_cheaper_than_mssa_beyond_two_p_tokens():
    """Paper Table 1 and Fig. 2: CBSA is cheaper than MSSA once N > 2p (m = p = 64 -> 128 tokens)."""
    cbsa, mssa = CBSA(384, 6, 64), MSSA(384, 6, 64)
    assert attention_macs(cbsa, 128) == attention_macs(mssa, 128)
    assert attention_macs(cbsa, 127) > attention_macs(mssa, 127)
    assert attention_macs(cbsa, 129) < attention_macs(mssa, 129)


def test_analytic_flops_for_rectangular_images():
    with torch.device("meta"):
        model = create_model("cbt_tiny", depth=1)
    t = 1 + 10 * 14
    expected_attn = 2 * (2 * t * 192 * 192 + 3 * t * 64 * 192 + 2 * 64 * 64 * 192)
    assert analytic_flops(model, (160, 224))["attention"] == expected_attn


# ------------------------------------------------------------------------------------------------
# Measured FLOPs
# ------------------------------------------------------------------------------------------------
def counted(fn) -> int:
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kw", [dict(), dict(tied_output=True), dict(contraction=False)])
@pytest.mark.parametrize("fold", [False, True])
def test_measured_cbsa_layer_by_hand(kw, fold, monkeypatch):
    d, heads, p, grid, m = 40, 4, 8, (6, 7), 12
    layer = CBSA(d, heads, p, rep_grid=(3, 4), **kw)
    monkeypatch.setattr(layer, "_fold_output", lambda t: fold)
    t, i = 1 + 42, heads * p
    x = torch.randn(1, t, d)
    macs = t * d * i + 2 * t * m * i                       # projection; extraction A = softmax(Q0 Zᵀ), A Z
    macs += 2 * m * m * i if layer.contraction else 0      # contraction: Q Qᵀ and softmax(·) Q
    if fold:
        macs += m * i * d + t * heads * m * d              # W_out folded into the reps, then one (T, H·m)·(H·m, d)
    else:
        macs += t * m * i + t * i * d                      # broadcast Aᵀ C, then the output projection
    assert counted(lambda: layer(x, grid_size=grid)) == 2 * macs
    if not fold:                                           # the unfolded path is exactly the paper's formula
        assert counted(lambda: layer(x, grid_size=grid)) == 2 * attention_macs(layer, t)


def test_measured_mssa_layer_equals_the_paper_formula():
    layer = MSSA(24, 2, 16)
    t = 30
    assert counted(lambda: layer(torch.randn(1, t, 24))) == 2 * (2 * t * 24 * 32 + 2 * t * t * 32)
    assert counted(lambda: layer(torch.randn(1, t, 24))) == 2 * attention_macs(layer, t)


def test_measured_model_by_hand(monkeypatch):
    """Unfolded CBSA and the release's three-product ISTA: measured = analytic + depth · 2·T·d² (the one
    ISTA product the paper does not count, docs/authors-release.md item 22)."""
    monkeypatch.setattr(CBSA, "_fold_output", lambda self, t: False)
    monkeypatch.setattr(ISTA, "forward", ISTA.forward_reference)
    dim, depth, image, patch = 64, 2, 64, 8
    model = create_model("cbt_tiny", dim=dim, heads=2, dim_head=32, depth=depth, image_size=image,
                         patch_size=patch, num_classes=10)
    t = 1 + 8 * 8
    stem = 32 * 32 * 16 * 3 * 9 + 16 * 16 * 32 * 16 * 9 + 8 * 8 * 64 * 32 * 9
    cbsa = 2 * t * dim * dim + 3 * t * 64 * dim + 2 * 64 * 64 * dim
    ista = 3 * t * dim * dim
    expected = 2 * (stem + depth * (cbsa + ista) + dim * 10)
    assert measured_flops(model, image) == expected
    assert measured_flops(model, image) == analytic_flops(model, image)["total"] + depth * 2 * t * dim * dim


@pytest.mark.parametrize("image", [64, 96])
def test_measured_mssa_minus_cbsa_is_the_quadratic_term(image, monkeypatch):
    monkeypatch.setattr(CBSA, "_fold_output", lambda self, t: False)
    kw = dict(dim=64, heads=2, dim_head=32, depth=2, image_size=image, patch_size=8, num_classes=10)
    cbt, mssa = create_model("cbt_tiny", **kw), create_model("mssa_tiny", **kw)
    t, i, m = 1 + (image // 8) ** 2, 64, 64
    diff = measured_flops(mssa, image) - measured_flops(cbt, image)
    assert diff == 2 * 2 * (2 * t * t * i - 3 * t * m * i - 2 * m * m * i)


def test_measured_flops_keeps_the_training_mode():
    model = create_model("cbt_tiny", depth=1, image_size=64, patch_size=8, num_classes=3).train()
    bn = model.to_patch_embedding.proj[0][1]
    stats = bn.running_mean.clone()
    assert measured_flops(model, 64) > 0
    assert model.training and torch.equal(bn.running_mean, stats)


# ------------------------------------------------------------------------------------------------
# scripts/model_table.py
# ------------------------------------------------------------------------------------------------
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_table_prints_exact_params_and_paper_gflops(tmp_path, capsys):
    table = load_script()
    csv_path = tmp_path / "out" / "table.csv"
    assert table.main(["--models", "cbt_tiny", "mssa_tiny", "Ours_tiny", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["cbt_tiny"], ["mssa_tiny"], ["Ours_tiny"])}
    assert set(rows) == {"cbt_tiny", "mssa_tiny", "Ours_tiny"}
    name, attn, params, gflops, layers, measured, paper_m, _, paper_g, _ = rows["cbt_tiny"]
    assert attn == "cbsa" and int(params.replace(",", "")) == 1_789_192
    assert float(gflops) == pytest.approx(1.1, rel=0.03) and float(paper_g) == 1.1 and float(paper_m) == 1.8
    assert int(rows["mssa_tiny"][2].replace(",", "")) == 1_789_120 and rows["mssa_tiny"][6] == "-"
    assert rows["Ours_tiny"][2:] == rows["cbt_tiny"][2:]                           # alias -> the paper's CBT-T

    with open(csv_path, newline="") as f:
        records = {r["model"]: r for r in csv.DictReader(f)}
    with torch.device("meta"):
        model = create_model("cbt_tiny")
    assert int(records["cbt_tiny"]["params"]) == 1_789_192
    assert float(records["cbt_tiny"]["gflops_paper_convention"]) == analytic_flops(model, 224)["total"] / 1e9
    assert float(records["cbt_tiny"]["gflops_layers"]) == analytic_flops(model, 224)["layers"] / 1e9
    assert float(layers) == pytest.approx(analytic_flops(model, 224)["layers"] / 1e9, abs=5e-4)
    assert float(records["cbt_tiny"]["gflops_paper_convention"]) == pytest.approx(1.1, rel=0.03)
    assert float(records["cbt_tiny"]["gflops_measured"]) == pytest.approx(float(measured), abs=5e-4)
    assert float(records["cbt_tiny"]["gflops_deviation"]) == pytest.approx(1.120939008 / 1.1 - 1)
    assert float(records["cbt_tiny"]["params_deviation"]) == pytest.approx(1.789192 / 1.8 - 1)
    assert records["mssa_tiny"]["paper_gflops"] == ""
    row = table.model_row("cbt_tiny", image_size=128, num_classes=10)
    assert row["paper_gflops"] is None and row["params"] == 1_789_192 - 197 * 192 + 65 * 192 - 990 * 193


def test_model_table_shows_crate_b_l_next_to_table_3(capsys, monkeypatch):
    """CRATE-B/L: exact parameters, the whole-model count against Table 3, and a note with the layers-only
    deviation (the scope of the numbers the paper cites from CRATE)."""
    table = load_script()
    monkeypatch.setattr(table, "measured_flops", lambda *a, **k: 0.0)      # a full-size forward is not needed here
    monkeypatch.setattr(table, "create_model", lambda name, **kw: _on_meta(name, **kw))
    assert table.main(["--models", "crate_original_base", "crate_original_large"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("crate_original_")}
    base, large = rows["crate_original_base"], rows["crate_original_large"]
    assert int(base[2].replace(",", "")) == 22_796_008 and int(large[2].replace(",", "")) == 77_641_192
    assert (base[6], base[8], large[6], large[8]) == ("22.8", "12.6", "77.6", "43.3")
    assert float(base[3]) == pytest.approx(2 * (196 * 768 * 768 + 12 * (4 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768)
                                                + 768_000) / 1e9, abs=5e-4)
    layers = 2 * 12 * (4 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768) / 1e9
    assert float(base[4]) == pytest.approx(layers, abs=5e-4)
    assert f"crate_original_base {layers:.3f} vs 12.6 ({layers / 12.6 - 1:+.1%})" in out


def _on_meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_model_table_defaults_and_errors(capsys):
    table = load_script()
    assert table.canonical_models()[:4] == ["cbt_tiny", "cbt_small", "cbt_base", "cbt_large"]
    assert "Ours_small" not in table.canonical_models() and "crate_cbt_small" in table.canonical_models()
    assert table.describe_attention(["mssa"] * 6 + ["cbsa"] * 6) == "mssa*6+cbsa*6"
    with pytest.raises(SystemExit) as info:
        table.main(["--models", "cbt_huge"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "cbt_huge" in err and "cbt_tiny" in err


def test_model_table_help(capsys):
    with pytest.raises(SystemExit) as info:
        load_script().main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--csv PATH" in out and "--models" in out and "python scripts/model_table.py" in out
