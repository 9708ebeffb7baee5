"""Contract-and-Broadcast Self-Attention (paper Eqs. 5-8 and Fig. 1, docs/authors-release.md §2.1).

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

``contraction=False`` drops step 5 (C = Q), which is agent attention (paper Sec. 3.3).

Cost: every token-sized product (steps 3, 4, 6) is a GEMM with one m-sized side, so time and memory are
linear in T. Each optimisation is a named op of :mod:`cbsa_core.layers.ops`, kept for a gain that
``scripts/benchmark_attention.py --ablations`` measures: the layout-preserving products ``matmul_nt`` /
``matmul_tn`` for the token-sized products, and ``fold_heads``, which folds W_out into the m contracted
representatives so that steps 6 and 7 are one GEMM (``broadcast_and_project``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid import adaptive_pool_tokens, check_rep_grid, check_token_layout
from .ops import fold_heads, matmul_nt, matmul_tn

# adaptive_pool_tokens, check_token_layout and the ops stay importable from here for existing callers.
__all__ = ["CBSA", "adaptive_pool_tokens", "check_token_layout", "fold_heads", "matmul_nt", "matmul_tn"]


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
            pooled; docs/authors-release.md §2.9). The authors' checkpoints were trained this way. Default
            False pools exactly the patch tokens.

    Shapes: ``forward(x (B, T, dim), grid_size=(h, w)) -> (B, T, dim)``; B = 0 gives an empty output.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, *, rep_grid: Tuple[int, int] = (8, 8),
                 num_prefix_tokens: int = 1, num_suffix_tokens: int = 0, contraction: bool = True,
                 tied_output: bool = False, legacy_token_layout: bool = False) -> None:
        super().__init__()
        if heads <= 0 or dim_head <= 0:
            raise ValueError(f"CBSA: heads and dim_head must be positive, got heads={heads}, dim_head={dim_head}")
        if num_prefix_tokens < 0 or num_suffix_tokens < 0:
            raise ValueError("CBSA: num_prefix_tokens and num_suffix_tokens must be >= 0")
        self.dim, self.heads, self.dim_head, self.inner_dim = dim, heads, dim_head, heads * dim_head
        self.rep_grid = check_rep_grid(rep_grid, layer="CBSA")
        self.num_prefix_tokens = num_prefix_tokens
        self.num_suffix_tokens = num_suffix_tokens
        self.contraction = contraction
        self.tied_output = tied_output
        self.legacy_token_layout = legacy_token_layout
        self.scale = dim_head ** -0.5

        # Parameter names follow the release so its state dicts load unchanged (docs/authors-release.md §1.1.7).
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))     # κ, step 6
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))   # η, step 4
        self.proj = nn.Linear(dim, self.inner_dim, bias=False)   # W_U, step 1
        # Parameter-free hook point on the projected tokens, used by coding-rate tooling
        # (docs/authors-release.md item 6).
        self.qkv = nn.Identity()
        self.to_out = None if tied_output else nn.Linear(self.inner_dim, dim)   # W_out, b, step 7

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, rep_grid={self.rep_grid}, "
                f"prefix={self.num_prefix_tokens}, suffix={self.num_suffix_tokens}, contraction={self.contraction}, "
                f"tied_output={self.tied_output}, legacy_token_layout={self.legacy_token_layout}")

    # ------------------------------------------------------------------------------------------------
    # The forward pass, step by step
    # ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int], return_attn: bool = False):
        """x (B, T, dim) -> (B, T, dim). With ``return_attn`` also returns AᵀA (B, H, T, T)."""
        z, rep0, attn = self._extract(x, grid_size)                       # steps 1-3
        rep = self._update(rep0, attn, z)                                 # step 4
        # κ (step 6) scales the m×p contraction rather than the T×p broadcast: same product, T/m fewer multiplies.
        contracted = self._contract(rep) * self.step_x                    # step 5
        out = self.broadcast_and_project(attn, contracted)                # steps 6-7
        if return_attn:
            return out, torch.matmul(attn.transpose(-1, -2), attn)
        return out

    def _extract(self, x: torch.Tensor, grid_size: Tuple[int, int]):
        """Steps 1-3. Returns projected tokens Z_p (B,H,T,p), initial reps Q0 (B,H,m,p) and A (B,H,m,T)."""
        h, w = self._check(x, grid_size)
        b, t, _ = x.shape
        z = self.qkv(self.proj(x))                                                       # step 1: (B, T, I)
        start = 0 if self.legacy_token_layout else self.num_prefix_tokens
        rep0 = adaptive_pool_tokens(z[:, start:start + h * w], (h, w), self.rep_grid)   # step 2: (B, m, I)
        # One head-major copy of the tokens; both token products then run on contiguous operands.
        z = z.view(b, t, self.heads, self.dim_head).transpose(1, 2).contiguous()
        rep0 = rep0.reshape(b, self.num_representatives, self.heads, self.dim_head).transpose(1, 2)
        # Step 3. 1/√p scales the m×p reps rather than the m×T logits: same product, T/p fewer multiplies.
        attn = torch.softmax(matmul_nt(rep0 * self.scale, z), dim=-1)
        # CUDA autocast runs softmax in float32; every product with A would cast it to z's dtype again
        # (and save another copy for backward), so cast once. Without autocast this is a no-op.
        return z, rep0, attn.to(z.dtype)

    def _update(self, rep0: torch.Tensor, attn: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Step 4, Q = Q0 + η A Z_p: (B, H, m, p)."""
        return rep0 + self.step_rep * torch.matmul(attn, z)

    def _contract(self, rep: torch.Tensor) -> torch.Tensor:
        """Step 5, softmax(Q Qᵀ/√p) Q: self-attention among the m reps with q = k = v, run by the fused
        scaled_dot_product_attention kernel (no m×m matrix is kept for backward). Identity for agent attention."""
        if not self.contraction:
            return rep
        return F.scaled_dot_product_attention(rep, rep, rep, scale=self.scale)

    def broadcast_and_project(self, attn: torch.Tensor, contracted: torch.Tensor) -> torch.Tensor:
        """Steps 6-7, out = merge_heads(Aᵀ C) W_out + b for A (B,H,m,T) and κ-scaled C (B,H,m,p) -> (B, T, dim).

        By associativity this equals Σ_h A_hᵀ (C_h W_out,h) + b: W_out folded into the m reps of each head
        (``fold_heads``), then one GEMM over the H·m stacked representatives. That runs when it is cheaper.
        """
        if not self._fold_output(attn.shape[-1]):
            return self._project_out(matmul_tn(attn, contracted))
        b, h, m, t = attn.shape
        weight, bias = self._output_weight()
        folded = fold_heads(contracted, weight)  # (B, H·m, dim)
        return matmul_tn(attn.reshape(b, h * m, t), folded, bias)  # Σ over heads and reps in one GEMM

    # ------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> Tuple[int, int]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"CBSA: expected input (B, T, {self.dim}), got {tuple(x.shape)}")
        grid = check_token_layout(x.shape[1], grid_size, self.num_prefix_tokens, self.num_suffix_tokens)
        check_rep_grid(self.rep_grid, grid, layer="CBSA")
        return grid

    def _project_out(self, d: torch.Tensor) -> torch.Tensor:
        """Step 7 on the broadcast tokens: (B, H, T, p) -> (B, T, dim)."""
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

    def _fold_output(self, num_tokens: int) -> bool:
        """Whether steps 6-7 run folded: per sample, m·I·dim (the fold) + T·H·m·dim (one GEMM) multiply-adds
        against T·m·I (broadcast) + T·I·dim (projection), and no head-merge copy. For dim = I = 384, H = 6,
        m = 64 the fold pays from T = 384 on. Measured (``scripts/benchmark_attention.py --ablations``, the
        other path against this choice, forward+backward): folding at T = 197 would cost 7.6 % (fp32, B = 8)
        and 6.1 % (bf16, B = 64) and 15 % more memory; not folding would cost 5.5 %, 12.3 % and 14.7 % at
        T = 577, 1025 and 4097 (fp32) and 7.7 % at T = 1025 (bf16)."""
        h, m, i, d = self.heads, self.num_representatives, self.inner_dim, self.dim
        return m * i * d + num_tokens * h * m * d <= num_tokens * (m * i + i * d)

    # ------------------------------------------------------------------------------------------------
    # Analysis
    # ------------------------------------------------------------------------------------------------
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
        rep = self._update(rep0, attn, z)
        contracted = self._contract(rep)
        kappa = self.step_x if step_x is None else torch.full_like(self.step_x, float(step_x))
        update = torch.matmul(attn.transpose(-1, -2), contracted * kappa)
        return dict(tokens=z, rep_init=rep0, reps=rep, contracted=contracted, attn=attn, update=update,
                    output=self._project_out(update))
