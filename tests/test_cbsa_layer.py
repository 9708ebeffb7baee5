"""CBSA layer against an independent implementation of the paper's equations (paper Eqs. 5-8; the released
layer's details, e.g. pooling before the head split, as docs/authors-release.md §2.1 states them).

The reference below is written from the equations, head by head with explicit loops and explicit pooling
bins, and shares nothing with cbsa_core except the parameter values it reads from the layer.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from cbsa_core import CBSA
from cbsa_core.layers.cbsa import adaptive_pool_tokens

TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Independent reference
# ------------------------------------------------------------------------------------------------
def pool_bins(size: int, out: int) -> List[Tuple[int, int]]:
    """Adaptive-average-pool bins: bin i covers [floor(i·S/r), ceil((i+1)·S/r)) (docs/authors-release.md §2.9)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def reference_pool(grid_tokens: torch.Tensor, grid: Tuple[int, int], rep_grid: Tuple[int, int]) -> torch.Tensor:
    """(B, h·w, C) raster-order tokens -> (B, rh·rw, C) by averaging each 2-D bin explicitly."""
    h, w = grid
    g = grid_tokens.reshape(grid_tokens.shape[0], h, w, -1)
    cells = []
    for r0, r1 in pool_bins(h, rep_grid[0]):
        for c0, c1 in pool_bins(w, rep_grid[1]):
            cells.append(g[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def reference_cbsa(x: torch.Tensor, *, w_u: torch.Tensor, w_out: Optional[torch.Tensor], b_out: Optional[torch.Tensor],
                   kappa: torch.Tensor, eta: torch.Tensor, heads: int, grid: Tuple[int, int],
                   rep_grid: Tuple[int, int], prefix: int, legacy: bool, contraction: bool = True):
    """CBSA (paper Eqs. 5 and 8 with the code's 1/√p and step sizes), row layout.

    x (B, T, d); w_u (I, d) stacks the bases U_k; w_out (d, I) or None for CBSA† (back-projection with U).
    Returns (out (B, T, d), [A_k (B, T, m)] per head).
    """
    b, t, _ = x.shape
    p = w_u.shape[0] // heads
    h, w = grid
    z = x @ w_u.T                                       # (B, T, I): U_kᵀ Z for all k, rows are tokens
    start = 0 if legacy else prefix                     # legacy: the release pools tokens[:, :-1] (1 prefix)
    q_ini = reference_pool(z[:, start:start + h * w], grid, rep_grid)   # pooled BEFORE the head split
    updates, attns = [], []
    for k in range(heads):
        zk = z[..., k * p:(k + 1) * p]                  # (B, T, p)
        qk = q_ini[..., k * p:(k + 1) * p]              # (B, m, p)
        a = torch.softmax(zk @ qk.transpose(1, 2) / math.sqrt(p), dim=1)   # A_k (B, T, m): softmax over tokens
        q = qk + eta[k] * (a.transpose(1, 2) @ zk)      # U_kᵀQ = U_kᵀQ_ini + η_k U_kᵀ Z A_k
        if contraction:
            c = torch.softmax(q @ q.transpose(1, 2) / math.sqrt(p), dim=-1) @ q   # Eq. 8 self-attention
        else:
            c = q                                       # agent attention: no contraction
        updates.append(kappa[k] * (a @ c))              # broadcast through A_k (no renormalisation)
        attns.append(a)
    d = torch.cat(updates, dim=-1)                      # concatenated heads (B, T, I)
    if w_out is None:
        out = d @ w_u                                   # Σ_k U_k (...): the rigorous back-projection
    else:
        out = d @ w_out.T + b_out
    return out, attns


def reference_for(layer: CBSA, x: torch.Tensor, grid: Tuple[int, int]):
    return reference_cbsa(
        x, w_u=layer.proj.weight, w_out=None if layer.to_out is None else layer.to_out.weight,
        b_out=None if layer.to_out is None else layer.to_out.bias, kappa=layer.step_x.flatten(),
        eta=layer.step_rep.flatten(), heads=layer.heads, grid=grid, rep_grid=layer.rep_grid,
        prefix=layer.num_prefix_tokens, legacy=layer.legacy_token_layout, contraction=layer.contraction)


# name: (dim, heads, dim_head, grid, cbsa kwargs)
CASES = {
    "corrected_14x14": (48, 3, 16, (14, 14), dict()),
    "legacy_14x14": (48, 3, 16, (14, 14), dict(legacy_token_layout=True)),
    "non_square_6x9_m12": (32, 2, 16, (6, 9), dict(rep_grid=(3, 4))),
    "registers_and_suffix": (24, 2, 12, (5, 7), dict(rep_grid=(2, 3), num_prefix_tokens=4, num_suffix_tokens=5)),
    "suffix_only_decoder": (24, 2, 12, (6, 6), dict(rep_grid=(4, 4), num_prefix_tokens=0, num_suffix_tokens=6)),
    "legacy_registers": (24, 2, 12, (5, 5), dict(rep_grid=(3, 3), num_prefix_tokens=3, legacy_token_layout=True)),
    "inner_ne_dim": (40, 3, 8, (7, 5), dict(rep_grid=(3, 2))),
    "agent_no_contraction": (32, 2, 16, (8, 8), dict(contraction=False)),
    "tied_output_dagger": (32, 4, 6, (6, 8), dict(rep_grid=(3, 4), tied_output=True)),
    "tied_legacy_agent": (32, 2, 8, (9, 9), dict(rep_grid=(4, 5), tied_output=True, contraction=False,
                                                   legacy_token_layout=True)),
}


def make_layer(name: str, seed: int = 0) -> Tuple[CBSA, torch.Tensor, Tuple[int, int]]:
    dim, heads, dim_head, grid, kw = CASES[name]
    torch.manual_seed(seed)
    layer = CBSA(dim, heads, dim_head, **kw).double()
    t = layer.num_prefix_tokens + grid[0] * grid[1] + layer.num_suffix_tokens
    x = torch.randn(2, t, dim, dtype=torch.float64)
    return layer, x, grid


# ------------------------------------------------------------------------------------------------
# Forward pass
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_paper_reference(name):
    layer, x, grid = make_layer(name)
    expected, attns = reference_for(layer, x, grid)
    out = layer(x, grid_size=grid)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOL)

    out2, ata = layer(x, grid_size=grid, return_attn=True)
    torch.testing.assert_close(out2, expected, **TOL)
    expected_ata = torch.stack([a @ a.transpose(1, 2) for a in attns], dim=1)   # A_k A_kᵀ (B, H, T, T)
    torch.testing.assert_close(ata, expected_ata, **TOL)
    torch.testing.assert_close(layer.attention_map(x, grid), expected_ata, **TOL)


@pytest.mark.parametrize("name", ["corrected_14x14", "registers_and_suffix", "inner_ne_dim", "tied_output_dagger",
                                  "agent_no_contraction"])
@pytest.mark.parametrize("fold", [True, False])
def test_fold_and_unfold_paths_agree(name, fold, monkeypatch):
    """``broadcast_and_project`` has a folded (W_out applied to the m reps) and a plain path; both are exact."""
    layer, x, grid = make_layer(name, seed=1)
    expected, _ = reference_for(layer, x, grid)
    monkeypatch.setattr(layer, "_fold_output", lambda t: fold)
    torch.testing.assert_close(layer(x, grid_size=grid), expected, **TOL)


def test_corrected_and_legacy_layouts_differ_and_pool_the_documented_tokens():
    """With rep_grid == token grid the pool is the identity, so the initial reps ARE the pooled tokens:
    corrected = the patches (tokens 1..h·w), legacy = tokens 0..h·w-1 ([CLS] in cell (0,0), last patch lost)."""
    torch.manual_seed(3)
    layer = CBSA(16, 2, 8, rep_grid=(4, 5)).double()
    x = torch.randn(1, 1 + 20, 16, dtype=torch.float64)
    det = layer.forward_details(x, (4, 5))
    torch.testing.assert_close(det["rep_init"], det["tokens"][:, :, 1:], **TOL)
    out_corrected = layer(x, grid_size=(4, 5))
    layer.legacy_token_layout = True
    det = layer.forward_details(x, (4, 5))
    torch.testing.assert_close(det["rep_init"], det["tokens"][:, :, :-1], **TOL)
    assert not torch.allclose(layer(x, grid_size=(4, 5)), out_corrected)


def test_forward_details_are_the_intermediates_of_forward():
    layer, x, grid = make_layer("non_square_6x9_m12", seed=4)
    det = layer.forward_details(x, grid)
    _, attns = reference_for(layer, x, grid)
    b, h, m, t, p = 2, layer.heads, 12, x.shape[1], layer.dim_head
    assert det["tokens"].shape == (b, h, t, p) and det["attn"].shape == (b, h, m, t)
    assert det["rep_init"].shape == det["reps"].shape == det["contracted"].shape == (b, h, m, p)
    torch.testing.assert_close(det["attn"], torch.stack([a.transpose(1, 2) for a in attns], 1), **TOL)
    torch.testing.assert_close(det["attn"].sum(-1), torch.ones(b, h, m, dtype=x.dtype), **TOL)   # over tokens
    torch.testing.assert_close(det["reps"], det["rep_init"] + layer.step_rep * det["attn"] @ det["tokens"], **TOL)
    torch.testing.assert_close(det["update"], layer.step_x * det["attn"].transpose(-1, -2) @ det["contracted"], **TOL)
    torch.testing.assert_close(det["output"], layer(x, grid_size=grid), **TOL)
    # κ override (Fig. 6 uses κ = 1): the update is then the plain broadcast AᵀC.
    det1 = layer.forward_details(x, grid, step_x=1.0)
    torch.testing.assert_close(det1["update"], det["attn"].transpose(-1, -2) @ det["contracted"], **TOL)


def test_batch_elements_are_independent():
    layer, x, grid = make_layer("corrected_14x14", seed=5)
    torch.testing.assert_close(layer(x, grid_size=grid)[1:], layer(x[1:], grid_size=grid), **TOL)


def test_parameter_names_and_shapes_follow_the_release():
    layer = CBSA(384, 6, 64)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"step_x": (6, 1, 1), "step_rep": (6, 1, 1), "proj.weight": (384, 384),
                      "to_out.weight": (384, 384), "to_out.bias": (384,)}
    assert isinstance(layer.qkv, nn.Identity)
    dagger = CBSA(384, 6, 32, tied_output=True)
    assert dagger.to_out is None
    assert {k: tuple(v.shape) for k, v in dagger.state_dict().items()} == {
        "step_x": (6, 1, 1), "step_rep": (6, 1, 1), "proj.weight": (192, 384)}


# ------------------------------------------------------------------------------------------------
# Adaptive pooling bins
# ------------------------------------------------------------------------------------------------
def _support_of_bins(size: int, out: int) -> List[Tuple[int, int]]:
    """Which input rows nn.AdaptiveAvgPool2d averages into each output row, read off an indicator basis."""
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, size, 1)   # basis image e_r, width 1
    pooled = nn.AdaptiveAvgPool2d((out, 1))(eye)[:, 0, :, 0]              # (size, out): weight of row r in bin i
    bins = []
    for i in range(out):
        rows = torch.nonzero(pooled[:, i]).flatten().tolist()
        assert rows == list(range(rows[0], rows[-1] + 1))                   # contiguous
        torch.testing.assert_close(pooled[rows, i], torch.full((len(rows),), 1 / len(rows), dtype=torch.float64))
        bins.append((rows[0], rows[-1] + 1))
    return bins


def test_pool_bins_of_the_release_are_the_overlapping_14_to_8_bins():
    # The bins docs/authors-release.md §2.9 lists.
    expected_14_8 = [(0, 2), (1, 4), (3, 6), (5, 7), (7, 9), (8, 11), (10, 13), (12, 14)]
    expected_32_10 = [(0, 4), (3, 7), (6, 10), (9, 13), (12, 16), (16, 20), (19, 23), (22, 26), (25, 29), (28, 32)]
    assert _support_of_bins(14, 8) == pool_bins(14, 8) == expected_14_8
    assert _support_of_bins(32, 10) == pool_bins(32, 10) == expected_32_10
    assert _support_of_bins(24, 8) == pool_bins(24, 8) == [(3 * i, 3 * i + 3) for i in range(8)]


@pytest.mark.parametrize("grid,rep", [((14, 14), (8, 8)), ((6, 9), (3, 4)), ((5, 7), (5, 7)), ((32, 32), (10, 10)),
                                      ((9, 4), (4, 3))])
def test_adaptive_pool_tokens_equals_adaptive_avg_pool2d(grid, rep):
    torch.manual_seed(6)
    tokens = torch.randn(2, grid[0] * grid[1], 5, dtype=torch.float64)
    got = adaptive_pool_tokens(tokens, grid, rep)
    image = tokens.reshape(2, grid[0], grid[1], 5).permute(0, 3, 1, 2)
    expected = nn.AdaptiveAvgPool2d(rep)(image).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got, reference_pool(tokens, grid, rep), **TOL)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(tied_output=True), dict(contraction=False, legacy_token_layout=True)])
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(7)
    layer = CBSA(16, 2, 8, rep_grid=(2, 3), **kw)
    x = torch.randn(2, 1 + 4 * 5, 16, requires_grad=True)
    (layer(x, grid_size=(4, 5)) ** 2).sum().backward()
    expected = {"step_x", "step_rep", "proj.weight"}
    if "tied_output" not in kw:
        expected |= {"to_out.weight", "to_out.bias"}
    assert {n for n, _ in layer.named_parameters()} == expected
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(), dict(tied_output=True, legacy_token_layout=True)])
@pytest.mark.parametrize("fold", [True, False])
def test_gradcheck_finite_differences(kw, fold, monkeypatch):
    torch.manual_seed(8)
    layer = CBSA(4, 2, 3, rep_grid=(2, 2), num_suffix_tokens=1, **kw).double()
    monkeypatch.setattr(layer, "_fold_output", lambda t: fold)
    grid = (2, 3)
    x = torch.randn(1, 1 + 6 + 1, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def fn(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp,), dict(grid_size=grid))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bfloat16_autocast_forward_and_float32_gradients():
    torch.manual_seed(9)
    layer = CBSA(32, 2, 16, rep_grid=(2, 2))
    x = torch.randn(2, 1 + 16, 32, requires_grad=True)
    expected = layer(x, grid_size=(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, grid_size=(4, 4))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.02 * expected.abs().max().item())
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# Bad input is refused with the numbers involved
# ------------------------------------------------------------------------------------------------
def test_grid_that_does_not_account_for_the_tokens_is_refused():
    layer = CBSA(16, 2, 8, rep_grid=(2, 2), num_suffix_tokens=2)
    x = torch.randn(1, 1 + 20 + 2, 16)
    with pytest.raises(ValueError, match=r"grid_size=\(4, 6\).*1 \+ 4\*6 \+ 2 = 27.*has 23"):
        layer(x, grid_size=(4, 6))
    with pytest.raises(ValueError, match=r"\(B, T, 16\).*\(1, 23, 12\)"):
        layer(torch.randn(1, 23, 12), grid_size=(4, 5))
    with pytest.raises(ValueError, match=r"representative grid \(8, 8\).*token grid \(4, 5\)"):
        CBSA(16, 2, 8)(torch.randn(1, 21, 16), grid_size=(4, 5))
    with pytest.raises(ValueError, match="rep_grid"):
        CBSA(16, 2, 8, rep_grid=(0, 4))
