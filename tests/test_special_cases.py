"""The special cases of the paper's Sec. 3.3, checked numerically against independent formulas.

Row layout throughout: P (N, p) are one head's projected tokens (U_kᵀZ)ᵀ, representatives Q (m, p),
coefficients A (N, m). One CBSA step is D = A · contract(Q).
"""
from __future__ import annotations

import math

import pytest
import torch

from cbsa_core import CBSA, MSSA
from cbsa_core.layers.special_cases import (axis_representatives, cbsa_step, channel_attention_form,
                                            linear_attention_form, principal_representatives,
                                            self_expressive_representatives, softmax_attention_form)

TOL = dict(rtol=1e-9, atol=1e-10)
F64 = torch.float64


def tokens(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


# ------------------------------------------------------------------------------------------------
# Softmax attention (MSSA, Eq. 9): representatives = all tokens, A = I
# ------------------------------------------------------------------------------------------------
def test_self_expressive_representatives_give_softmax_attention():
    p_tok = tokens(2, 3, 10, 4)                              # (B, H, N, p)
    a, q = self_expressive_representatives(p_tok)
    torch.testing.assert_close(a, torch.eye(10, dtype=F64).expand(2, 3, 10, 10))
    torch.testing.assert_close(q, p_tok)
    expected = torch.softmax(p_tok @ p_tok.transpose(-1, -2) / math.sqrt(4), dim=-1) @ p_tok
    torch.testing.assert_close(cbsa_step(a, q, "softmax"), expected, **TOL)
    torch.testing.assert_close(softmax_attention_form(p_tok), expected, **TOL)


def test_mssa_module_equals_cbsa_step_with_all_tokens_as_representatives():
    """Share the MSSA projection W_U; the step's output must equal MSSA before and after ``to_out``."""
    torch.manual_seed(1)
    dim, heads, dim_head = 12, 3, 5                          # inner width 15 != dim
    mssa = MSSA(dim, heads, dim_head).double()
    x = tokens(2, 9, dim, seed=1)
    captured = []
    hook = mssa.to_out.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    out = mssa(x)
    hook.remove()

    p_tok = (x @ mssa.qkv.weight.T).reshape(2, 9, heads, dim_head).transpose(1, 2)   # (B, H, N, p)
    a, q = self_expressive_representatives(p_tok)
    d = cbsa_step(a, q, "softmax")                                                     # (B, H, N, p)
    merged = d.transpose(1, 2).reshape(2, 9, heads * dim_head)
    torch.testing.assert_close(captured[0], merged, **TOL)                             # before to_out
    torch.testing.assert_close(out, merged @ mssa.to_out.weight.T + mssa.to_out.bias, **TOL)   # after
    # and the explicit attention matrix agrees with the one MSSA reports
    _, attn = mssa(x, return_attn=True)
    torch.testing.assert_close(attn, torch.softmax(p_tok @ p_tok.transpose(-1, -2) / math.sqrt(dim_head), -1), **TOL)


# ------------------------------------------------------------------------------------------------
# Exact contraction = gradient of the representatives' coding rate (Eq. 7)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,p", [(6, 4), (3, 7)])
def test_exact_contraction_is_the_coding_rate_gradient(m, p):
    """contract(Q) = (I + c QQᵀ)⁻¹ Q with c = p/(mε²) is ∇_Q R(Q) / c, R(Q) = ½ logdet(I_m + c Q Qᵀ)."""
    eps = 0.7
    q = tokens(m, p, seed=2).requires_grad_(True)
    c = p / (m * eps ** 2)
    rate = 0.5 * torch.logdet(torch.eye(m, dtype=F64) + c * q @ q.T)
    (grad,) = torch.autograd.grad(rate, q)
    coeffs = tokens(5, m, seed=3)
    torch.testing.assert_close(cbsa_step(coeffs, q.detach(), "exact", eps=eps), coeffs @ grad / c, **TOL)


# ------------------------------------------------------------------------------------------------
# Linear attention (Eqs. 10-12): principal directions as representatives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_principal_representatives_give_linear_attention(eps):
    n, p = 20, 5
    p_tok = tokens(3, n, p, seed=4)
    a, q = principal_representatives(p_tok)
    assert a.shape == (3, n, p) and q.shape == (3, p, p)                         # m = p representatives
    torch.testing.assert_close(a.transpose(-1, -2) @ a, torch.eye(p, dtype=F64).expand(3, p, p), **TOL)   # R ∈ O(N,p)
    torch.testing.assert_close(a.transpose(-1, -2) @ p_tok, q, **TOL)            # U_kᵀQ = U_kᵀZ A_k
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.diag_embed(torch.linalg.svdvals(p_tok) ** 2), **TOL)

    # Independent: eigendecomposition of the p×p covariance PᵀP = L Λ Lᵀ, then P L (I + Λ/ε²)⁻¹ Lᵀ.
    lam, l_vec = torch.linalg.eigh(p_tok.transpose(-1, -2) @ p_tok)
    expected = p_tok @ l_vec @ torch.diag_embed(1 / (1 + lam / eps ** 2)) @ l_vec.transpose(-1, -2)
    torch.testing.assert_close(cbsa_step(a, q, "exact", eps=eps), expected, **TOL)
    torch.testing.assert_close(linear_attention_form(p_tok, eps), expected, **TOL)
    # F = f applied to the spectrum, f(λ) = ε²/(ε² + λ): the same thing written with ε² on top.
    f_spec = l_vec @ torch.diag_embed(eps ** 2 / (eps ** 2 + lam)) @ l_vec.transpose(-1, -2)
    torch.testing.assert_close(linear_attention_form(p_tok, eps), p_tok @ f_spec, **TOL)


# ------------------------------------------------------------------------------------------------
# Channel attention (Eq. 13): fixed axes as representatives
# ------------------------------------------------------------------------------------------------
def _per_channel(p_tok: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(p_tok)
    for i in range(p_tok.shape[-1]):
        energy = sum(float(v) ** 2 for v in p_tok[:, i])          # ‖u_iᵀZ‖²
        out[:, i] = p_tok[:, i] * (eps ** 2 / (eps ** 2 + energy))
    return out


@pytest.mark.parametrize("eps", [0.3, 1.5])
def test_axis_representatives_give_channel_attention(eps):
    p_tok = tokens(15, 6, seed=5)
    a, q = axis_representatives(p_tok)
    assert a.shape == (15, 6) and q.shape == (6, 6)
    torch.testing.assert_close(q, torch.diag(p_tok.norm(dim=0)), **TOL)      # axes scaled by channel norms
    torch.testing.assert_close(a @ q, p_tok, **TOL)                           # tokens = A Q
    expected = _per_channel(p_tok, eps)
    torch.testing.assert_close(cbsa_step(a, q, "exact", eps=eps), expected, **TOL)
    torch.testing.assert_close(channel_attention_form(p_tok, eps), expected, **TOL)


def test_channel_attention_is_linear_attention_when_the_principal_directions_are_the_axes():
    """Paper: channel attention = the linear-attention case with U_k = L_k (decorrelated channels)."""
    eps = 0.8
    r, _ = torch.linalg.qr(tokens(12, 4, seed=6))                 # orthonormal columns
    p_tok = r * torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=F64)     # PᵀP diagonal
    torch.testing.assert_close(channel_attention_form(p_tok, eps), linear_attention_form(p_tok, eps), **TOL)
    a, q = axis_representatives(p_tok)
    torch.testing.assert_close(a.T @ p_tok, q, **TOL)             # then also U_kᵀQ = U_kᵀZ A_k


# ------------------------------------------------------------------------------------------------
# Agent attention: contraction removed
# ------------------------------------------------------------------------------------------------
def test_no_contraction_is_the_plain_broadcast():
    a, q = tokens(2, 9, 4, seed=7), tokens(2, 4, 3, seed=8)
    torch.testing.assert_close(cbsa_step(a, q, "none"), a @ q, **TOL)
    with pytest.raises(ValueError, match="contraction must be"):
        cbsa_step(a, q, "inverse")


def _agent_reference(x, w_u, w_out, b_out, eta, kappa, heads, grid, rep_grid):
    """Σ_k U_k (U_kᵀQ) A_kᵀ with Q = Q_ini + η A-weighted tokens; vectorised over heads with einsum."""
    b, t, _ = x.shape
    p = w_u.shape[0] // heads
    z = torch.einsum("btd,id->bti", x, w_u)
    img = z[:, 1:].reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    q0 = torch.nn.functional.adaptive_avg_pool2d(img, rep_grid).flatten(2)           # (B, I, m)
    zh = z.reshape(b, t, heads, p)                                                      # (B, T, H, p)
    q0h = q0.reshape(b, heads, p, -1)                                                   # (B, H, p, m)
    logits = torch.einsum("bthp,bhpm->bhtm", zh, q0h) / math.sqrt(p)
    a = torch.softmax(logits, dim=2)                                                    # over tokens
    q = q0h + eta.view(1, heads, 1, 1) * torch.einsum("bthp,bhtm->bhpm", zh, a)
    d = kappa.view(1, heads, 1, 1) * torch.einsum("bhpm,bhtm->bhpt", q, a)             # (B, H, p, T)
    merged = d.permute(0, 3, 1, 2).reshape(b, t, heads * p)
    return merged @ w_out.T + b_out


def test_cbsa_without_contraction_is_agent_attention():
    torch.manual_seed(9)
    layer = CBSA(20, 2, 6, rep_grid=(3, 3), contraction=False).double()
    grid = (5, 6)
    x = tokens(2, 1 + 30, 20, seed=9)
    expected = _agent_reference(x, layer.proj.weight, layer.to_out.weight, layer.to_out.bias,
                                layer.step_rep.flatten(), layer.step_x.flatten(), 2, grid, (3, 3))
    torch.testing.assert_close(layer(x, grid_size=grid), expected, **TOL)
    # and the layer's update is exactly cbsa_step(Aᵀ, Q, 'none') scaled by κ
    det = layer.forward_details(x, grid)
    step = cbsa_step(det["attn"].transpose(-1, -2), det["reps"], "none")
    torch.testing.assert_close(det["update"], layer.step_x * step, **TOL)


def test_cbsa_layer_update_is_the_unified_step_with_softmax_contraction():
    torch.manual_seed(10)
    layer = CBSA(16, 2, 8, rep_grid=(2, 2)).double()
    x = tokens(1, 1 + 12, 16, seed=10)
    det = layer.forward_details(x, (3, 4))
    step = cbsa_step(det["attn"].transpose(-1, -2), det["reps"], "softmax")
    torch.testing.assert_close(det["update"], layer.step_x * step, **TOL)
