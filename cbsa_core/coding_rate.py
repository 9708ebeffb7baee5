"""Coding rates (paper Eq. 1) and the per-layer compression term R^c (paper Fig. 5).

Rows are tokens. For Z (…, N, d):   R(Z) = ½ logdet(I_d + d/(N ε²) ZᵀZ)
(the d×d Gram form; it equals the N×N form of Eq. 1 by Sylvester's determinant identity).
For per-head projections P (…, H, N, p):   R^c = Σ_k ½ logdet(I_p + p/(N ε²) P_kᵀ P_k).

The release's measurement uses ε² = 0.01, so ``eps`` defaults to 0.1 here.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["coding_rate", "compression_term", "split_heads", "layerwise_compression"]


def coding_rate(z: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """R(Z) for Z (…, N, d) -> (…). Computed in float64 for a stable logdet."""
    z = z.double()
    n, d = z.shape[-2:]
    gram = z.transpose(-1, -2) @ z
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return 0.5 * torch.logdet(eye + (d / (n * eps ** 2)) * gram)


def compression_term(heads: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """R^c(Z | U_[K]) = Σ_k R(U_kᵀZ) for per-head projected tokens (…, H, N, p) -> (…)."""
    return coding_rate(heads, eps).sum(dim=-1)


def split_heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·p) -> (B, H, N, p)."""
    b, n, c = z.shape
    return z.reshape(b, n, heads, c // heads).transpose(1, 2)


@torch.no_grad()
def layerwise_compression(model: nn.Module, images: torch.Tensor, eps: float = 0.1,
                          normalize: bool = False) -> List[float]:
    """R^c of every attention layer's projected tokens, averaged over the batch.

    Works for any model exposing ``attention_layers`` whose layers have a ``qkv`` submodule producing the
    subspace projections (CBSA's parameter-free hook point, MSSA's and TSSA's projection). With
    ``normalize=True`` each projected token is scaled to unit norm per head first (Fig. 5's normalised rate).
    """
    layers: Sequence[nn.Module] = model.attention_layers
    captured: List[torch.Tensor] = []
    hooks = [layer.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for layer in layers]
    was_training = model.training
    model.eval()  # a measurement must not update BatchNorm running statistics
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rates = []
    for layer, z in zip(layers, captured):
        p = split_heads(z.float(), layer.heads)
        if normalize:
            p = F.normalize(p, dim=-1)
        rates.append(compression_term(p, eps).mean().item())
    return rates
