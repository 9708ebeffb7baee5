"""The products behind CBSA's (and linear attention's) speed, each kept for a gain measured by
``python scripts/benchmark_attention.py --ablations --threads 1 --timer cpu --repeats 5 --batch B --tokens N``
(CBSA dim 384, 6 heads of 64, m = 64; forward+backward, process CPU time of one thread, variants interleaved;
development machine, 2026-11-30):

* :func:`matmul_nt`, :func:`matmul_tn`: the token-sized products (one side has T rows) with a backward that
  returns each gradient in its operand's own contiguous layout. Autograd's matmul backward hands the
  gradient of a transposed operand back as a transposed view, which costs a strided copy and strided adds of
  (B, H, m, T) tensors downstream. Replacing them by ``torch.matmul`` made the layer 7.6 % slower at
  B = 4, T = 4097, 11.6 % at B = 8, T = 1025, 6.0 % at T = 577 and 2.9 % at T = 197 (fp32); 5.1 % at
  B = 16, T = 1025 under bf16 autocast.
* :func:`fold_heads`: per-head rows times the matching row block of a merged-heads weight, used to fold
  the output projection into the m contracted representatives (``CBSA.broadcast_and_project``, where the
  fold's own gain and break-even are documented).

Under autocast every op here runs in the autocast dtype, as ``torch.matmul`` would, and casts its operands
*before* any copy, so no fp32 temporary of a product's size is built.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["matmul_nt", "matmul_tn", "fold_heads", "autocast_operands"]

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_operands(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast both operands as autocast would cast a matmul's (float64 is left alone; no-op without autocast),
    so that the tensors saved for backward, and any copy made of them, have the dtype the product runs in."""
    device = a.device.type
    if torch.is_autocast_enabled(device) and a.dtype in _AUTOCAST_ELIGIBLE and b.dtype in _AUTOCAST_ELIGIBLE:
        dtype = torch.get_autocast_dtype(device)
        return a.to(dtype), b.to(dtype)
    return a, b


class _MatmulNT(torch.autograd.Function):
    """a (..., M, K) @ b (..., N, K)ᵀ -> (..., M, N); gradients (..., M, K) and (..., N, K), both contiguous."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = autocast_operands(a, b)
        ctx.save_for_backward(a, b)
        return torch.matmul(a, b.transpose(-1, -2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = torch.matmul(grad, b) if ctx.needs_input_grad[0] else None
        grad_b = torch.matmul(grad.transpose(-1, -2), a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class _MatmulTN(torch.autograd.Function):
    """a (..., K, M)ᵀ @ b (..., K, N) [+ bias (N,)] -> (..., M, N); gradients (..., K, M), (..., K, N), contiguous."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a, b = autocast_operands(a, b)
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.matmul(a.transpose(-1, -2), b)
        if a.dim() == 3:  # the GEMM accumulates onto the broadcast bias: no separate pass over the output
            return torch.baddbmm(bias.to(b.dtype), a.transpose(1, 2), b)
        return torch.matmul(a.transpose(-1, -2), b) + bias.to(b.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = torch.matmul(b, grad.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.matmul(a, grad) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_a, grad_b, grad_bias


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.transpose(-1, -2)`` for a (..., M, K), b (..., N, K), with layout-preserving gradients.

    Used where ``b`` is token-sized (N = T) and contiguous: its gradient comes back as a contiguous
    (..., T, K) tensor instead of a transposed view. The forward is the same GEMM as ``torch.matmul``.
    """
    return _MatmulNT.apply(a, b)


def matmul_tn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a.transpose(-1, -2) @ b (+ bias)`` for a (..., K, M), b (..., K, N), with layout-preserving gradients.

    Used where ``a`` is token-sized (M = T, e.g. the extraction matrix (B, H·m, T)): its gradient comes
    back as a contiguous (..., K, T) tensor instead of a transposed view.
    """
    return _MatmulTN.apply(a, b, bias)


def fold_heads(per_head: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-head rows times the matching row block of a merged-heads weight, heads stacked along the rows.

    per_head (B, H, n, p), weight (H·p, dim) -> (B, H·n, dim), with row (h, i) equal to
    per_head[:, h, i] @ weight[h·p:(h+1)·p], so that Σ over the H·n rows with token weights is the merged-heads
    projection.

    One einsum, which runs as a bmm batched over the heads with the B·n rows of a head stacked: the weight is
    never copied per sample. Measured against the two other forms on CBSA's folded path (ablation variants
    "fold: broadcast matmul", a broadcast ``torch.matmul`` of (B, H, n, p) with (H, p, dim), and "fold:
    per-sample weight", the first version: the weight expanded to (B, H, p, dim), one bmm over B·H): at
    T = 577-4097 all three are within noise (-4 % to +5 % of the layer's forward+backward, no consistent
    order; the fold alone is a few percent of the layer there); at T = 197, where it is a larger share, the
    einsum was the fastest (fp32, B = 8: 36.2 ms against 37.7 and 36.8; bf16, B = 64: 513 ms against 544
    and 547) and needs the least memory (fp32: 24.3 MiB peak against 29.6 for both; bf16: 113.1 MiB against
    133.8 and 151.9).
    The ≈3× over a broadcast matmul that the first version's docstring claimed was never there. The operands
    are cast to the autocast dtype first; the first version built the per-sample weight in fp32 under
    autocast (the κ-scaled reps are fp32 there) and cast it afterwards, hence its 151.9 MiB.
    """
    b, h, n, p = per_head.shape
    per_head, weight = autocast_operands(per_head, weight)
    out = torch.einsum("bhnp,hpd->bhnd", per_head, weight.reshape(h, p, weight.shape[-1]))
    return out.reshape(b, h * n, weight.shape[-1])
