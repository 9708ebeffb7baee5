"""Performance machinery: compile-friendliness, reduced-precision paths, the benchmark baselines and scripts.

No assertion here depends on time. The baselines the benchmark compares against are checked against
formulas written in this file: ReLU-kernel linear attention with explicit loops, and the authors' CBSA
(scripts/official_cbsa.py) against cbsa_core.CBSA in the legacy token layout with shared weights.
"""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from cbsa_core import CBSA, ISTA, create_model
from cbsa_core.layers.ops import fold_heads, matmul_nt, matmul_tn
from cbsa_core.layers.linear_attention import LinearAttention

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TOL64 = dict(rtol=1e-10, atol=1e-10)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params_and_grads(module, x, grad, call):
    out = call(module, x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad)
    return out, grads


# ------------------------------------------------------------------------------------------------
# Layout-preserving products
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_a,shape_b", [((2, 3, 5, 4), (2, 3, 7, 4)), ((3, 6, 4), (3, 9, 4))])
def test_matmul_nt_is_a_times_b_transposed_with_contiguous_gradients(shape_a, shape_b):
    torch.manual_seed(0)
    a = torch.randn(shape_a, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape_b, dtype=torch.float64, requires_grad=True)
    out = matmul_nt(a, b)
    torch.testing.assert_close(out, torch.einsum("...mk,...nk->...mn", a, b), **TOL64)
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    torch.testing.assert_close(ga, torch.einsum("...mn,...nk->...mk", g, b), **TOL64)   # dL/da = g b
    torch.testing.assert_close(gb, torch.einsum("...mn,...mk->...nk", g, a), **TOL64)   # dL/db = gᵀ a
    assert ga.is_contiguous() and gb.is_contiguous()


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_tn_is_a_transposed_times_b_with_contiguous_gradients(with_bias):
    torch.manual_seed(1)
    a = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)     # (B, K, M): M plays the tokens
    b = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)     # (B, K, N)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = matmul_tn(a, b, bias)
    expected = torch.einsum("bkm,bkn->bmn", a, b) + (bias if with_bias else 0)
    torch.testing.assert_close(out, expected, **TOL64)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (a, b) + ((bias,) if with_bias else ()), g)
    torch.testing.assert_close(grads[0], torch.einsum("bkn,bmn->bkm", b, g), **TOL64)
    torch.testing.assert_close(grads[1], torch.einsum("bkm,bmn->bkn", a, g), **TOL64)
    if with_bias:
        torch.testing.assert_close(grads[2], g.sum(dim=(0, 1)), **TOL64)
    assert grads[0].is_contiguous() and grads[1].is_contiguous()


def test_fold_heads_multiplies_each_head_by_its_weight_block():
    torch.manual_seed(11)
    per_head = torch.randn(2, 3, 4, 5, dtype=torch.float64)           # (B, H, n, p)
    weight = torch.randn(7, 15, dtype=torch.float64).t()               # (H·p, dim), a transposed view
    got = fold_heads(per_head, weight)
    expected = torch.cat([per_head[:, h] @ weight[5 * h:5 * (h + 1)] for h in range(3)], dim=1)
    torch.testing.assert_close(got, expected, **TOL64)


def test_layout_preserving_products_follow_autocast():
    """Under autocast both operands run (and are saved) in bfloat16, and the gradients come back in the
    inputs' float32, as autocast's own matmul does."""
    torch.manual_seed(2)
    a = torch.randn(2, 6, 5, requires_grad=True)
    b = torch.randn(2, 7, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = matmul_nt(a, b)
        ref = torch.matmul(a, b.transpose(-1, -2))
        out_tn = matmul_tn(a.transpose(1, 2), b.transpose(1, 2))
    assert out.dtype == ref.dtype == out_tn.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)                        # the same bf16 GEMM
    torch.testing.assert_close(out_tn, ref, rtol=0, atol=0)
    ga, gb = torch.autograd.grad(out.float().sum(), (a, b))
    assert ga.dtype == gb.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
CONFIGS = {
    "cbsa": dict(),
    "dagger": dict(tied_output=True),
    "agent_legacy": dict(contraction=False, legacy_token_layout=True),
    "suffix_rect": dict(rep_grid=(2, 3), num_prefix_tokens=0, num_suffix_tokens=3),
}


def _small_cbsa(kw):
    torch.manual_seed(3)
    layer = CBSA(32, 2, 16, **{"rep_grid": (2, 2), **kw})
    grid = (4, 5)
    t = layer.num_prefix_tokens + 20 + layer.num_suffix_tokens
    return layer, torch.randn(2, t, 32, requires_grad=True), grid


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cbsa_traces_as_one_graph_without_breaks(name):
    layer, x, grid = _small_cbsa(CONFIGS[name])
    explanation = torch._dynamo.explain(layer)(x, grid_size=grid)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["cbsa", "agent_legacy"])
def test_compiled_cbsa_equals_eager_with_fullgraph(name):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through AOTAutograd
    (the custom autograd Functions included) without the minutes of C++ code generation of inductor."""
    torch._dynamo.reset()
    layer, x, grid = _small_cbsa(CONFIGS[name])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    call = lambda mod, inp: mod(inp, grid_size=grid)   # noqa: E731
    g = torch.randn(x.shape)
    out_c, grads_c = _params_and_grads(compiled, x, g, call)
    out_e, grads_e = _params_and_grads(layer, x, g, call)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_compiled_cbsa_with_dynamic_shapes_serves_several_grids_and_keeps_the_grid_error():
    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = CBSA(32, 2, 16, rep_grid=(2, 2))
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True)
    for grid in [(4, 5), (6, 3), (3, 3)]:
        x = torch.randn(2, 1 + grid[0] * grid[1], 32)
        torch.testing.assert_close(compiled(x, grid_size=grid), layer(x, grid_size=grid), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"grid_size=\(4, 4\).*1 \+ 4\*4 \+ 0 = 17.*has 20"):
        compiled(torch.randn(2, 20, 32), grid_size=(4, 4))


def _tiny_cbt(**kw):
    torch.manual_seed(10)
    cfg = dict(depth=2, dim=32, heads=2, dim_head=16, image_size=32, patch_size=4, rep_grid=(2, 2), num_classes=5)
    model = create_model("crate_cbt_small", **{**cfg, "attn": ["mssa", "cbsa"], **kw})
    with torch.no_grad():   # non-default BatchNorm statistics, so that eval mode reads them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("legacy", [False, True])
def test_compiled_cbt_with_fullgraph_equals_eager(legacy):
    """The whole model (conv stem, position-embedding resampling, MSSA and CBSA layers, head) is one graph;
    the timm fx notrace registrations leave torch.compile untouched."""
    torch._dynamo.reset()
    model = _tiny_cbt(legacy_token_layout=legacy).eval()   # eval BatchNorm: both calls see the same statistics
    img = torch.randn(2, 3, 32, 40, requires_grad=True)     # another grid than the stored one: resampled
    g = torch.randn(2, 5)
    call = lambda mod, inp: mod(inp)   # noqa: E731
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, grads_c = _params_and_grads(compiled, img, g, call)
    out_e, grads_e = _params_and_grads(model, img, g, call)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def test_exported_cbt_equals_eager():
    """torch.export of the whole model (strict export; the grid arithmetic is static for a fixed input size)."""
    model = _tiny_cbt().eval()
    img = torch.randn(2, 3, 32, 40)
    exported = torch.export.export(model, (img,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(img), model(img), rtol=1e-6, atol=1e-6)
        other = torch.randn(2, 3, 32, 40)
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Reduced precision and memory formats
# ------------------------------------------------------------------------------------------------
def test_cbsa_bf16_autocast_forward_and_backward_are_close_to_fp32():
    torch.manual_seed(5)
    layer = CBSA(64, 4, 16, rep_grid=(4, 4))
    x = torch.randn(2, 1 + 8 * 8, 64, requires_grad=True)
    g = torch.randn(2, 65, 64)
    out32 = layer(x, grid_size=(8, 8))
    gx32, gw32 = torch.autograd.grad(out32, (x, layer.proj.weight), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer(x, grid_size=(8, 8))
    assert out16.dtype == torch.bfloat16
    gx16, gw16 = torch.autograd.grad(out16, (x, layer.proj.weight), g.bfloat16())
    assert gx16.dtype == gw16.dtype == torch.float32

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per operation)
    assert rel(out16, out32) < 2e-2
    assert rel(gx16, gx32) < 5e-2
    assert rel(gw16, gw32) < 5e-2


def test_ista_fused_path_backward_matches_the_release_form():
    """The fused path shifts and rectifies the GEMM output in place; its gradients must still be exact."""
    torch.manual_seed(6)
    ista = ISTA(8).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)   # 15 rows > d/2: the fused path runs
    assert torch.autograd.gradcheck(lambda inp, w: functional_call(ista, {"weight": w}, (inp,)),
                                    (x, ista.weight.detach().clone().requires_grad_(True)))
    g = torch.randn(3, 5, 8, dtype=torch.float64)
    fused = torch.autograd.grad(ista(x), (x, ista.weight), g)
    release = torch.autograd.grad(ista.forward_reference(x), (x, ista.weight), g)
    for a, b in zip(fused, release):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cbt_bf16_and_channels_last_paths_run_and_agree():
    torch.manual_seed(7)
    model = create_model("cbt_tiny", depth=2, image_size=128, num_classes=10).eval()
    img = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = model(img)
        cl = model.to(memory_format=torch.channels_last)(img.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert ((low.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_cbsa_peak_memory_is_linear_in_the_number_of_tokens():
    """A forward+backward must not hold any T×T tensor: 4× the tokens, at most 4× the peak bytes (the
    token-independent part, parameter gradients and reps, keeps the ratio below 4)."""
    bench = load_script("benchmark_attention")
    torch.manual_seed(8)
    layer = CBSA(32, 2, 16, rep_grid=(4, 4))

    def peak(grid):
        x = torch.randn(2, 1 + grid * grid, 32, requires_grad=True)
        g = torch.randn(2, 1 + grid * grid, 32)
        layer.zero_grad(set_to_none=True)           # both calls allocate their parameter gradients
        return bench.cpu_peak_bytes(lambda: layer(x, grid_size=(grid, grid)).backward(g))

    small, large = peak(16), peak(32)
    assert small > 2 * (1 + 16 * 16) * 32 * 4          # at least the output and the input gradient
    assert large / small <= 4.0


def test_cpu_peak_bytes_sees_a_known_allocation():
    bench = load_script("benchmark_attention")
    kept = []

    def allocate():
        tmp = torch.empty(1 << 20, dtype=torch.float32)        # 4 MiB, freed on return
        kept.append(torch.empty(1 << 18, dtype=torch.float32))  # 1 MiB, kept
        del tmp

    peak = bench.cpu_peak_bytes(allocate)
    assert 5 * 2 ** 20 <= peak < 5 * 2 ** 20 + 64 * 1024


# ------------------------------------------------------------------------------------------------
# Benchmark baselines
# ------------------------------------------------------------------------------------------------
def reference_linear_attention(x, layer: LinearAttention):
    """out_t = Σ_s κ(t, s) v_s / Σ_s κ(t, s) per head with the kernel κ(t, s) = φ(q_t)·φ(k_s), φ = ReLU + 1e-6,
    written in its quadratic form (the full T×T kernel matrix, head by head)."""
    h, p, i = layer.heads, layer.dim_head, layer.inner_dim
    qkv = x @ layer.qkv.weight.T + layer.qkv.bias

    def phi(u):
        return torch.relu(u) + 1e-6

    heads = []
    for k in range(h):
        q = phi(qkv[..., k * p:(k + 1) * p])
        key = phi(qkv[..., i + k * p:i + (k + 1) * p])
        v = qkv[..., 2 * i + k * p:2 * i + (k + 1) * p]
        kernel = q @ key.transpose(1, 2)                                  # (B, T, T)
        heads.append(kernel @ v / kernel.sum(dim=-1, keepdim=True))
    return torch.cat(heads, dim=-1) @ layer.proj.weight.T + layer.proj.bias


def test_linear_attention_equals_its_formula():
    torch.manual_seed(9)
    layer = LinearAttention(12, heads=3, dim_head=5).double()
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]     # four projections
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    out, grads = _params_and_grads(layer, x, g, lambda mod, inp: mod(inp))
    expected = reference_linear_attention(x, layer)
    torch.testing.assert_close(out, expected, **TOL64)
    for got, want in zip(grads, torch.autograd.grad(expected, [x, *layer.parameters()], g)):
        torch.testing.assert_close(got, want, **TOL64)
    # φ keeps the normaliser positive even where every q or k feature is negative
    assert torch.isfinite(layer(-100 * x.detach().abs())).all()
    with pytest.raises(ValueError, match=r"\(B, T, 12\).*\(2, 7, 10\)"):
        layer(torch.randn(2, 7, 10, dtype=torch.float64))


def test_official_cbsa_equals_cbsa_in_the_legacy_layout_with_shared_weights():
    official = load_script("official_cbsa").OfficialCBSA(64, heads=4, dim_head=16).double()
    torch.manual_seed(10)
    ours = CBSA(64, 4, 16, legacy_token_layout=True).double()
    official.load_state_dict(ours.state_dict())          # the same parameter names, no renaming
    x = torch.randn(2, 1 + 10 * 10, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 101, 64, dtype=torch.float64)
    out_o, grads_o = _params_and_grads(official, x, g, lambda mod, inp: mod(inp))
    out_c, grads_c = _params_and_grads(ours, x, g, lambda mod, inp: mod(inp, grid_size=(10, 10)))
    torch.testing.assert_close(out_o, out_c, **TOL64)
    names_o = [n for n, _ in official.named_parameters()]
    names_c = [n for n, _ in ours.named_parameters()]
    for name, grad in zip(names_o, grads_o[1:]):
        torch.testing.assert_close(grad, grads_c[1 + names_c.index(name)], **TOL64)
    torch.testing.assert_close(grads_o[0], grads_c[0], **TOL64)
    torch.testing.assert_close(official(x, return_attn=True), ours(x, grid_size=(10, 10), return_attn=True)[1],
                               **TOL64)
    # the corrected layout pools different tokens, so it is a different function
    ours.legacy_token_layout = False
    assert not torch.allclose(ours(x, grid_size=(10, 10)), out_o)


def test_benchmark_flop_formulas():
    bench = load_script("benchmark_attention")
    from cbsa_core.flops import attention_macs
    b, t = 3, 1 + 14 * 14
    layer = CBSA(384, 6, 64)
    assert bench.attention_flops("cbsa", b, t, 384, 6, 64) == 2 * b * attention_macs(layer, t)
    assert bench.attention_flops("agent", b, t, 384, 6, 64) == 2 * b * attention_macs(
        CBSA(384, 6, 64, contraction=False), t)
    # SDPA: q, k, v, out projections 4·T·d² and the two T×T products 2·T²·d
    assert bench.attention_flops("sdpa", 1, 197, 384, 6, 64) == 2 * (4 * 197 * 384 ** 2 + 2 * 197 ** 2 * 384)
    # linear: four projections and two T·p·I kernel products
    assert bench.attention_flops("linear", 1, 197, 384, 6, 64) == 2 * (4 * 197 * 384 ** 2 + 2 * 197 * 64 * 384)


# ------------------------------------------------------------------------------------------------
# Benchmark scripts (tiny sizes, no timing assertions)
# ------------------------------------------------------------------------------------------------
def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_benchmark_attention_quick_writes_the_table(tmp_path):
    bench = load_script("benchmark_attention")
    threads = torch.get_num_threads()
    bench.main(["--quick", "--tokens", "64", "--batch", "1", "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads                     # --threads applies to the run only
    header, rows = _read_csv(tmp_path / "attention_benchmark.csv")
    assert tuple(header) == bench.CSV_COLUMNS
    assert [r["impl"] for r in rows] == list(bench.IMPLS)
    assert (tmp_path / "attention_benchmark.png").stat().st_size > 0
    for r in rows:
        assert r["status"] == "ok" and r["tokens"] == "65" and r["grid"] == "8x8"
        for key in ("fwd_ms", "fwdbwd_ms", "mem_fwdbwd_mb", "gflops_fwd", "matmul_gflops_fwd"):
            assert float(r[key]) > 0, key
        assert math.isclose(float(r["gflop_fwd"]),
                            bench.attention_flops(r["impl"], 1, 65, 384, 6, 64) / 1e9, rel_tol=1e-5)
    sdpa = next(r for r in rows if r["impl"] == "sdpa")
    assert float(sdpa["speedup_fwdbwd_vs_sdpa"]) == 1.0
    cbsa = next(r for r in rows if r["impl"] == "cbsa")
    assert math.isclose(float(cbsa["speedup_fwd_vs_sdpa"]), float(sdpa["fwd_ms"]) / float(cbsa["fwd_ms"]),
                        rel_tol=1e-4)


def test_benchmark_attention_skips_what_exceeds_the_time_budget(tmp_path):
    bench = load_script("benchmark_attention")
    rows = bench.main(["--quick", "--tokens", "64", "--threads", "1", "--impls", "cbsa", "sdpa",
                       "--time-budget", "1e-9", "--out", str(tmp_path)])
    assert [r["status"].split(":")[0] for r in rows] == ["skipped", "skipped"]
    assert "--time-budget" in rows[0]["status"]
    _, csv_rows = _read_csv(tmp_path / "attention_benchmark.csv")
    assert [r["status"] for r in csv_rows] == [r["status"] for r in rows] and csv_rows[0]["fwd_ms"] == ""


def test_benchmark_attention_refuses_bad_token_counts(tmp_path):
    bench = load_script("benchmark_attention")
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "200", "--out", str(tmp_path)])      # not a square grid
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "49", "--out", str(tmp_path)])       # 7×7 < the 8×8 representatives


def test_benchmark_models_quick_writes_the_table(tmp_path):
    bench = load_script("benchmark_models")
    bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    header, rows = _read_csv(tmp_path / "model_benchmark.csv")
    assert tuple(header) == bench.CSV_COLUMNS
    assert [(r["model"], r["size"]) for r in rows] == [("cbt_tiny", "128"), ("vit_tiny", "128")]
    cbt, vit = rows
    for r in rows:
        assert float(r["train_img_s"]) > 0 and float(r["infer_img_s"]) > 0
        assert math.isclose(float(r["train_img_s"]) * float(r["train_ms"]) / 1e3, 2.0, rel_tol=1e-4)  # batch 2
    assert math.isclose(float(cbt["infer_ratio_vs_vit"]), float(cbt["infer_img_s"]) / float(vit["infer_img_s"]),
                        rel_tol=1e-4)
    assert vit["infer_ratio_vs_vit"] == ""


def test_benchmark_attention_ablations_undo_one_optimisation_each_and_compute_the_same_function(tmp_path):
    bench = load_script("benchmark_attention")
    import cbsa_core.layers.cbsa as cbsa_module
    layer = CBSA(384, 6, 64)
    originals = (cbsa_module.matmul_nt, cbsa_module.matmul_tn, cbsa_module.fold_heads)
    with bench.ablation("plain products"):
        assert (cbsa_module.matmul_nt, cbsa_module.matmul_tn) == (bench._plain_nt, bench._plain_tn)
    with bench.ablation("other projection path"):
        assert layer._fold_output(65) and not layer._fold_output(4097)        # the rule, flipped
    with bench.ablation("fold: per-sample weight"):
        assert cbsa_module.fold_heads is bench._fold_per_sample_weight and layer._fold_output(65)
    assert (cbsa_module.matmul_nt, cbsa_module.matmul_tn, cbsa_module.fold_heads) == originals
    assert not layer._fold_output(65) and layer._fold_output(4097)

    rows = bench.main(["--quick", "--ablations", "--tokens", "64", "--batch", "1", "--threads", "1",
                       "--out", str(tmp_path)])
    header, csv_rows = _read_csv(tmp_path / "ablation_benchmark.csv")
    assert tuple(header) == bench.ABLATION_COLUMNS
    assert [r["variant"] for r in csv_rows] == list(bench.ABLATIONS)
    assert float(csv_rows[0]["time_vs_built_fwdbwd"]) == 1.0 and float(csv_rows[0]["max_abs_diff"]) == 0.0
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["mem_fwdbwd_mb"] > 0
        assert r["max_abs_diff"] < 1e-5, r["variant"]                        # the same function, reordered


def test_ista_fused_path_under_bf16_is_no_less_accurate_than_the_release_form():
    """The fused block keeps the identity out of its matrix: I + η(W − WᵀW) rounded to bf16 would lose most of
    the update (entries near 1 keep 8 bits). Against fp64, its bf16 error must not exceed the three-product form's,
    while the near-identity form it replaced is measurably worse."""
    torch.manual_seed(8)
    ista = ISTA(384)
    x = torch.nn.functional.layer_norm(torch.randn(4, 197, 384), (384,))
    with torch.no_grad():
        exact = ista.double().forward_reference(x.double()).float()
        ista.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused, release = ista(x).float(), ista.forward_reference(x).float()
        near_identity = (torch.eye(384) + ista.update_matrix()).bfloat16().float()
        replaced = torch.relu(x.bfloat16().float() @ near_identity - ista.step_size * ista.lambd)

    def err(a):
        return ((a - exact).norm() / exact.norm()).item()

    assert err(fused) <= err(release) < 1e-2        # measured: 1.2e-3 vs 1.5e-3
    assert err(replaced) > 1.5 * err(fused)          # measured: 2.2e-3
