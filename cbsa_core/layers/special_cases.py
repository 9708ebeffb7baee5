"""The paper's unifying formula and the attention mechanisms it specialises to (paper Sec. 3.3).

Everything is per head in row layout: tokens P (…, N, p) = (U_kᵀZ)ᵀ, representatives Q (…, m, p) =
(U_kᵀQ)ᵀ, coefficients A (…, N, m) with U_kᵀQ = U_kᵀZ A_k. One CBSA step moves the tokens by

    D = A · contract(Q)                                            (…, N, p)

where ``contract`` is either the exact gradient of the coding rate (Eq. 7),
    contract(Q) = (I_m + c Q Qᵀ)⁻¹ Q,   c = p / (m ε²),
the softmax approximation (Eq. 8), contract(Q) = softmax(Q Qᵀ/√p) Q, or nothing (agent attention).

Choosing the representatives recovers:
    * MSSA / softmax attention: Q = P, A = I (:func:`self_expressive_representatives`).
    * linear attention (Eqs. 10-12): Q = Σ Lᵀ, A = R from the SVD P = R Σ Lᵀ, m = p
      (:func:`principal_representatives`); equals P (I + PᵀP/ε²)⁻¹ (:func:`linear_attention_form`).
    * channel attention (Eq. 13, TSSA-like): Q = Diag(‖P_{:,i}‖), A = P Diag(1/‖P_{:,i}‖)
      (:func:`axis_representatives`); equals P Diag(1/(1 + ‖P_{:,i}‖²/ε²)) (:func:`channel_attention_form`).
    * agent attention: contraction removed.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "contract_exact", "contract_softmax", "cbsa_step", "self_expressive_representatives",
    "principal_representatives", "axis_representatives", "linear_attention_form", "channel_attention_form",
    "softmax_attention_form",
]


def contract_exact(reps: torch.Tensor, eps: float) -> torch.Tensor:
    """(I_m + p/(m ε²) Q Qᵀ)⁻¹ Q for Q (…, m, p): the exact gradient direction of Eq. 7."""
    m, p = reps.shape[-2:]
    gram = reps @ reps.transpose(-1, -2)
    eye = torch.eye(m, dtype=reps.dtype, device=reps.device)
    return torch.linalg.solve(eye + (p / (m * eps ** 2)) * gram, reps)


def contract_softmax(reps: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(Q Qᵀ · scale) Q, the self-attention approximation of Eq. 8 (scale defaults to 1/√p)."""
    scale = reps.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(reps @ reps.transpose(-1, -2) * scale, dim=-1) @ reps


def cbsa_step(coeffs: torch.Tensor, reps: torch.Tensor, contraction: str = "softmax", eps: float = 1.0,
              scale: float | None = None) -> torch.Tensor:
    """D = A · contract(Q): the one formula behind every mechanism of the paper's Sec. 3.3.

    coeffs A (…, N, m), reps Q (…, m, p), contraction in {"softmax", "exact", "none"} -> (…, N, p).
    """
    if contraction == "softmax":
        contracted = contract_softmax(reps, scale)
    elif contraction == "exact":
        contracted = contract_exact(reps, eps)
    elif contraction == "none":
        contracted = reps
    else:
        raise ValueError(f"contraction must be 'softmax', 'exact' or 'none', got {contraction!r}")
    return coeffs @ contracted


def self_expressive_representatives(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q = P, A = I (m = N): every token represents itself."""
    n = tokens.shape[-2]
    eye = torch.eye(n, dtype=tokens.dtype, device=tokens.device).expand(*tokens.shape[:-2], n, n)
    return eye, tokens


def principal_representatives(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Principal directions: with P = R Σ Lᵀ, Q = Σ Lᵀ (m = p orthogonal reps) and A = R. Needs N >= p."""
    r, s, lh = torch.linalg.svd(tokens, full_matrices=False)
    return r, s.unsqueeze(-1) * lh


def axis_representatives(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed axes: Q = Diag(‖P_{:,i}‖) (the basis axes scaled by the channel norms), A = P Diag(1/‖P_{:,i}‖)."""
    norms = tokens.norm(dim=-2)  # (…, p)
    return tokens / norms.unsqueeze(-2), torch.diag_embed(norms)


def softmax_attention_form(tokens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """MSSA per head: softmax(P Pᵀ · scale) P (quadratic in N)."""
    return contract_softmax(tokens, scale)


def linear_attention_form(tokens: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 12 per head: P L (I + Σ²/ε²)⁻¹ Lᵀ = P (I_p + PᵀP/ε²)⁻¹ — key-value product first, linear in N."""
    p = tokens.shape[-1]
    cov = tokens.transpose(-1, -2) @ tokens
    eye = torch.eye(p, dtype=tokens.dtype, device=tokens.device)
    return torch.linalg.solve(eye + cov / eps ** 2, tokens.transpose(-1, -2)).transpose(-1, -2)


def channel_attention_form(tokens: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 13 per head: P Diag(f(‖P_{:,i}‖²)) with f(x) = 1/(1 + x/ε²)."""
    return tokens / (1 + tokens.pow(2).sum(dim=-2, keepdim=True) / eps ** 2)
