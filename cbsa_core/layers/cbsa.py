"""Contract-and-Broadcast Self-Attention (paper §2, official-code.md §2.1).

Notation (rows are tokens, as in PyTorch):
    B batch, T = P + h·w + S tokens (P prefix tokens such as [CLS] or registers, an h×w grid of patch
    tokens, S suffix tokens such as the segmentation decoder's class embeddings), H heads of width p,
    inner width I = H·p, m = rh·rw representatives.

One forward pass:
    1. Z_p = x W_U                                   projected tokens, one matrix shared by q, k and v  (B,H,T,p)
    2. Q0  = AdaptiveAvgPool(grid of Z_p)            initial representatives, pooled before the head split (B,H,m,p)
    3. A   = softmax_T(Q0 Z_pᵀ / √p)                 extraction (Eq. 5), softmax over the tokens   (B,H,m,T)
    4. Q   = Q0 + η_h · A Z_p                        representative update with per-head step η
    5. C   = softmax_m(Q Qᵀ / √p) Q                  contraction: self-attention among the reps (Eq. 8)
    6. D   = κ_h · Aᵀ C                              broadcast through the transposed extraction matrix
    7. out = merge_heads(D) W_out + b                over-parameterised projection (CBT), or
       out = merge_heads(D) W_Uᵀ                     the basis itself (CBT†, ``tied_output=True``)

``contraction=False`` drops step 5 (C = Q), which is agent attention (paper §3).

Cost: every token-sized product (steps 3, 4, 6) is a GEMM with one m-sized side, so time and memory are
linear in T. The token-sized products go through :func:`matmul_nt` / :func:`matmul_tn`, whose backward
returns contiguous gradients in the operands' own layout (autograd's bmm backward hands the gradient of a
transposed operand back as a transposed view, which costs a strided copy and strided adds of (B, H, m, T)
tensors downstream: 6-12% of a forward+backward at B = 4, T = 4097, dim 384, one CPU thread).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CBSA", "check_token_layout", "adaptive_pool_tokens", "fold_heads", "matmul_nt", "matmul_tn"]


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_operands(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast both operands as autocast would cast a matmul's (float64 is left alone), so that the tensors
    saved for backward have the dtype the product actually ran in."""
    device = a.device.type
    if torch.is_autocast_enabled(device) and a.dtype in _AUTOCAST_ELIGIBLE and b.dtype in _AUTOCAST_ELIGIBLE:
        dtype = torch.get_autocast_dtype(device)
        return a.to(dtype), b.to(dtype)
    return a, b


class _MatmulNT(torch.autograd.Function):
    """a (..., M, K) @ b (..., N, K)ᵀ -> (..., M, N); gradients (..., M, K) and (..., N, K), both contiguous."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _autocast_operands(a, b)
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
        a, b = _autocast_operands(a, b)
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
    (..., T, K) tensor instead of a transposed view. The forward is the same GEMM as ``torch.matmul``;
    under autocast both operands are cast as autocast casts a matmul's.
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

    per_head (B, H, n, p), weight (H·p, dim) -> (B, H·n, dim) with row (h, i) = per_head[:, h, i] @ weight[h·p:(h+1)·p],
    so that Σ over the H·n rows with token weights is the merged-heads projection. One bmm over B·H with
    the weight blocks copied per sample: ``torch.matmul``'s broadcasting of an (H, p, dim) weight measured
    ≈ 3× slower at these sizes (CPU, B = 4-8, H·p = dim = 384).
    """
    b, h, n, p = per_head.shape
    # contiguous first (W_outᵀ is a transposed view): the per-sample copy below then streams, not gathers
    w_heads = weight.contiguous().view(1, h, p, weight.shape[-1]).expand(b, h, p, weight.shape[-1])
    out = torch.bmm(per_head.reshape(b * h, n, p), w_heads.reshape(b * h, p, weight.shape[-1]))
    return out.view(b, h * n, weight.shape[-1])


def check_token_layout(num_tokens: int, grid_size: Tuple[int, int], num_prefix: int, num_suffix: int,
                       layer: str = "CBSA") -> None:
    """Refuse a grid that does not account for every token, naming all the numbers involved."""
    h, w = grid_size
    if h <= 0 or w <= 0:
        raise ValueError(f"{layer}: grid_size must be positive, got {tuple(grid_size)}")
    expected = num_prefix + h * w + num_suffix
    if expected != num_tokens:
        raise ValueError(
            f"{layer}: grid_size=({h}, {w}) with {num_prefix} prefix and {num_suffix} suffix tokens needs "
            f"{num_prefix} + {h}*{w} + {num_suffix} = {expected} tokens, but the input has {num_tokens}"
        )


def adaptive_pool_tokens(tokens: torch.Tensor, grid_size: Tuple[int, int], out_size: Tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of grid tokens.

    tokens: (B, h·w, C) in raster order -> (B, rh·rw, C), with exactly the bins of ``nn.AdaptiveAvgPool2d``.
    The grid is viewed channels-last, so no copy of the token tensor is needed.
    """
    b, _, c = tokens.shape
    h, w = grid_size
    grid = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, out_size)  # (B, C, rh, rw)
    return pooled.flatten(2).transpose(1, 2)


class CBSA(nn.Module):
    """Contract-and-Broadcast Self-Attention.

    Args:
        dim: token width d.
        heads: number of heads H (= number of subspaces K).
        dim_head: head width p. The inner width H·p may differ from ``dim``.
        rep_grid: grid (rh, rw) of pooled initial representatives; m = rh·rw.
        num_prefix_tokens: tokens before the patch grid ([CLS], registers).
        num_suffix_tokens: tokens after the patch grid (e.g. class embeddings of a mask decoder).
        contraction: apply the representatives' self-attention (False gives agent attention).
        tied_output: project back with the basis W_U itself (CBSA†) instead of a free Linear with bias.
        legacy_token_layout: reproduce the release's ``tokens[:, :-1]`` pooling input, i.e. pool the
            *first* h·w tokens of the sequence ([CLS] lands in grid cell (0, 0) and the last patch is never
            pooled; official-code.md §2.9). The authors' checkpoints were trained this way. Default False
            pools exactly the patch tokens.

    Shapes: ``forward(x (B, T, dim), grid_size=(h, w)) -> (B, T, dim)``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, *, rep_grid: Tuple[int, int] = (8, 8),
                 num_prefix_tokens: int = 1, num_suffix_tokens: int = 0, contraction: bool = True,
                 tied_output: bool = False, legacy_token_layout: bool = False) -> None:
        super().__init__()
        if heads <= 0 or dim_head <= 0:
            raise ValueError(f"CBSA: heads and dim_head must be positive, got heads={heads}, dim_head={dim_head}")
        rep_grid = tuple(int(r) for r in rep_grid)
        if len(rep_grid) != 2 or min(rep_grid) <= 0:
            raise ValueError(f"CBSA: rep_grid must be two positive ints, got {rep_grid}")
        if num_prefix_tokens < 0 or num_suffix_tokens < 0:
            raise ValueError("CBSA: num_prefix_tokens and num_suffix_tokens must be >= 0")
        inner = heads * dim_head
        self.dim, self.heads, self.dim_head, self.inner_dim = dim, heads, dim_head, inner
        self.rep_grid = rep_grid
        self.num_prefix_tokens = num_prefix_tokens
        self.num_suffix_tokens = num_suffix_tokens
        self.contraction = contraction
        self.tied_output = tied_output
        self.legacy_token_layout = legacy_token_layout
        self.scale = dim_head ** -0.5

        # Parameter names follow the release so its state dicts load unchanged (official-code.md §1.1.7).
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))
        self.proj = nn.Linear(dim, inner, bias=False)
        # Parameter-free hook point on the projected tokens, used by coding-rate tooling (item 6).
        self.qkv = nn.Identity()
        self.to_out = None if tied_output else nn.Linear(inner, dim)

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, rep_grid={self.rep_grid}, "
                f"prefix={self.num_prefix_tokens}, suffix={self.num_suffix_tokens}, contraction={self.contraction}, "
                f"tied_output={self.tied_output}, legacy_token_layout={self.legacy_token_layout}")

    def _check(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> Tuple[int, int]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"CBSA: expected input (B, T, {self.dim}), got {tuple(x.shape)}")
        h, w = int(grid_size[0]), int(grid_size[1])
        check_token_layout(x.shape[1], (h, w), self.num_prefix_tokens, self.num_suffix_tokens)
        rh, rw = self.rep_grid
        if rh > h or rw > w:
            raise ValueError(
                f"CBSA: representative grid {self.rep_grid} is larger than the token grid ({h}, {w}); "
                f"use a smaller rep_grid or a larger input"
            )
        return h, w

    def _grid_tokens(self, z: torch.Tensor, h: int, w: int) -> torch.Tensor:
        start = 0 if self.legacy_token_layout else self.num_prefix_tokens
        return z[:, start:start + h * w]

    def _extract(self, x: torch.Tensor, grid_size: Tuple[int, int]):
        """Steps 1-3. Returns projected tokens (B,H,T,p), initial reps (B,H,m,p) and A (B,H,m,T)."""
        h, w = self._check(x, grid_size)
        b, t, _ = x.shape
        z = self.qkv(self.proj(x))  # (B, T, I)
        rep0 = adaptive_pool_tokens(self._grid_tokens(z, h, w), (h, w), self.rep_grid)  # (B, m, I)
        # One head-major copy of the tokens; both token products below then run on contiguous operands.
        z = z.view(b, t, self.heads, self.dim_head).transpose(1, 2).contiguous()
        rep0 = rep0.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        # 1/√p scales the m×p reps rather than the m×T logits: same product, T/p fewer multiplies.
        attn = torch.softmax(matmul_nt(rep0 * self.scale, z), dim=-1)
        # CUDA autocast runs softmax in float32; every product with A would cast it to z's dtype again
        # (and save another copy for backward), so cast once. Without autocast this is a no-op.
        return z, rep0, attn.to(z.dtype)

    def _contract(self, rep: torch.Tensor) -> torch.Tensor:
        """Step 5, softmax(Q Qᵀ/√p) Q: self-attention among the m reps with q = k = v, run by the fused
        scaled_dot_product_attention kernel (no m×m matrix is kept for backward)."""
        if not self.contraction:
            return rep
        return F.scaled_dot_product_attention(rep, rep, rep, scale=self.scale)

    def _project_out(self, d: torch.Tensor) -> torch.Tensor:
        """(B, H, T, p) -> (B, T, dim)."""
        b, _, t, _ = d.shape
        d = d.transpose(1, 2).reshape(b, t, self.inner_dim)
        if self.to_out is None:
            return F.linear(d, self.proj.weight.t())
        return self.to_out(d)

    def _output_weight(self) -> Tuple[torch.Tensor, torch.Tensor | None]:
        """The back-projection as (I, dim) plus bias: W_outᵀ and b (CBSA), or W_U and no bias (CBSA†)."""
        if self.to_out is None:
            return self.proj.weight, None
        return self.to_out.weight.t(), self.to_out.bias

    def _fold_output(self) -> bool:
        # Folding W_out into the contracted reps costs T·H·m·dim per sample instead of T·m·I (broadcast)
        # + T·I·dim (projection) and skips the head-merge copy; it wins unless H·m is much larger than I.
        h, m = self.heads, self.num_representatives
        return h * m * self.dim <= m * self.inner_dim + self.inner_dim * self.dim

    def broadcast_and_project(self, attn: torch.Tensor, contracted: torch.Tensor) -> torch.Tensor:
        """out = merge_heads(Aᵀ C) W_out + b for A (B,H,m,T) and κ-scaled C (B,H,m,p) -> (B, T, dim).

        By associativity this equals Σ_h A_hᵀ (C_h W_out,h) + b, one GEMM over the H·m stacked
        representatives, which is what runs when it is cheaper.
        """
        if not self._fold_output():
            return self._project_out(matmul_tn(attn, contracted))
        b, h, m, t = attn.shape
        weight, bias = self._output_weight()
        folded = fold_heads(contracted, weight.to(contracted.dtype))  # (B, H·m, dim)
        return matmul_tn(attn.reshape(b, h * m, t), folded, bias)  # Σ over heads and reps in one GEMM

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int], return_attn: bool = False):
        """x (B, T, dim) -> (B, T, dim). With ``return_attn`` also returns AᵀA (B, H, T, T)."""
        z, rep0, attn = self._extract(x, grid_size)
        rep = rep0 + self.step_rep * torch.matmul(attn, z)
        # κ is applied to the m×p contraction rather than the T×p broadcast: same product, T/m fewer multiplies.
        contracted = self._contract(rep) * self.step_x
        out = self.broadcast_and_project(attn, contracted)
        if return_attn:
            return out, torch.matmul(attn.transpose(-1, -2), attn)
        return out

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """The paper's estimate of the full attention matrix, AᵀA per head: (B, H, T, T)."""
        _, _, attn = self._extract(x, grid_size)
        return torch.matmul(attn.transpose(-1, -2), attn)

    @torch.no_grad()
    def forward_details(self, x: torch.Tensor, grid_size: Tuple[int, int],
                        step_x: float | None = None) -> Dict[str, torch.Tensor]:
        """Intermediate quantities of one pass, for analysis (coding rates, Fig. 6).

        Returns per-head tensors: ``tokens`` (B,H,T,p) projected inputs, ``rep_init`` and ``reps``
        (B,H,m,p) before and after extraction, ``contracted`` (B,H,m,p), ``attn`` (B,H,m,T),
        ``update`` (B,H,T,p) = κ·AᵀC, and ``output`` (B,T,dim). ``step_x`` overrides κ (Fig. 6 uses 1).
        """
        z, rep0, attn = self._extract(x, grid_size)
        rep = rep0 + self.step_rep * torch.matmul(attn, z)
        contracted = self._contract(rep)
        kappa = self.step_x if step_x is None else torch.full_like(self.step_x, float(step_x))
        update = torch.matmul(attn.transpose(-1, -2), contracted * kappa)
        return dict(tokens=z, rep_init=rep0, reps=rep, contracted=contracted, attn=attn, update=update,
                    output=self._project_out(update))

