"""Replacement attention modules for pretrained timm ViTs (the paper's ViT adaptation, Fig. 9;
docs/authors-release.md §2.3 and §3).

Every module here takes over the submodules of one ``timm.layers.Attention`` under their timm names
(``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``): the very same
parameter objects, so a converted model has exactly the parameters and ``state_dict`` keys of the timm
model and timm checkpoints load into it unchanged. No variant adds a parameter.

Notation (rows are tokens): B batch, N = P + h·w tokens (P prefix tokens: [CLS], registers; an h×w patch
grid), H heads of width p, I = H·p, m = rh·rw representatives, s = p^-1/2. X_q, X_k, X_v (B, N, I) are the
pretrained query/key/value projections of the (already normalised) block input.

``cbsa_vee`` (CBSA^∨, the authors' released operator, docs/authors-release.md §2.3)::

    Q0      = AdaptiveAvgPool(grid of X_q)               pooled before the head split      (B,H,m,p)
    Q_delta = softmax_N(q_norm(Q0) s k_norm(X_k)ᵀ) X_v    extraction                         (B,H,m,p)
    out     = softmax_m(X_q s Q0ᵀ) Q_delta                broadcast: a fresh softmax over the reps
                                                           (B,H,N,p) -> merge heads -> norm -> proj

``cbsa_star`` (CBSA*, the paper's Fig. 9: CBSA with the pretrained W_q, W_k, W_v in place of one shared U)::

    A   = softmax_N(q_norm(Q0) s k_norm(X_k)ᵀ)            extraction matrix                  (B,H,m,N)
    Q   = Q0 + A X_v                                      representative update (plain residual)
    C   = softmax_m(Q s Qᵀ) Q                             contraction = attention(Q, Q, Q)
    out = Aᵀ C                                            broadcast through the transposed A (default), or
    out = softmax_m(X_q s Q0ᵀ) C                          ``broadcast='softmax'``: the release's broadcast

  Choices (the paper leaves them open, and the release runs CBSA^∨ with its representative update commented out,
  docs/authors-release.md item 27): the update is the plain residual ``Q = Q0 + Q_delta`` of the release's
  commented-out line, with no per-head step size, so no parameter is added; the default broadcast reuses Aᵀ without
  renormalisation, as CBSA itself does (paper Eq. 7/8), and the alternative keeps the release's separate softmax with
  the pooled queries Q0 as keys.

``linear`` (the ReLU-kernel linear attention of the release's commented-out class; FLatten without the
focusing function or the depth-wise conv), per head, with φ(x) = ReLU(x) + 1e-6::

    out = φ(q) (φ(k)ᵀ v / N) / (φ(q) · mean_N φ(k) + 1e-6)

The grid (h, w) is not inferred from √N: :class:`TokenGrid` records it from the patch embedding's input at
every forward pass, so non-square grids and dynamic image sizes work.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

from cbsa_core.layers import adaptive_pool_tokens, check_rep_grid, check_token_layout

__all__ = ["TokenGrid", "ConvertedAttention", "CBSAVeeAttention", "CBSAStarAttention", "ReLULinearAttention",
           "PooledRepresentativeAttention", "ATTENTION_MODULES",
           "BROADCAST_CHOICES"]

BROADCAST_CHOICES = ("transpose", "softmax")


class TokenGrid:
    """The patch grid (h, w) of the forward pass in flight.

    Registered as a forward pre-hook on a timm ``PatchEmbed``: it reads the image size of every call and
    stores the grid the patch embedding produces from it. The converted attention modules of the same model
    hold a reference to it. It is a plain object, not a module, so it adds nothing to the state dict; a
    ``deepcopy`` of the model copies it once and keeps hook and attention modules pointing at the copy.
    """

    def __init__(self) -> None:
        self.size: Optional[Tuple[int, int]] = None

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        img = args[0]
        height, width = int(img.shape[-2]), int(img.shape[-1])
        ph, pw = patch_embed.patch_size
        if not getattr(patch_embed, "dynamic_img_pad", False) and (height % ph or width % pw):
            # timm's conv patchify would silently drop the border pixels here.
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {ph}x{pw}; resize or crop the "
                f"input to a multiple of the patch size (or build the ViT with dynamic_img_pad=True)"
            )
        self.size = tuple(int(s) for s in patch_embed.dynamic_feat_size((height, width)))

    def __repr__(self) -> str:
        return f"TokenGrid(size={self.size})"


class ConvertedAttention(nn.Module):
    """Base of the replacement modules: adopts a timm ``Attention``'s submodules and its call signature.

    Subclasses implement :meth:`mix`, which maps the projections q, k, v (B, N, I) to per-head outputs.
    """

    kind = ""
    needs_grid = False

    def __init__(self, attn: TimmAttention, token_grid: TokenGrid, *, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if type(attn) is not TimmAttention:
            raise TypeError(
                f"{type(self).__name__} converts timm.layers.Attention modules, got {type(attn).__name__}"
            )
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.num_prefix_tokens = int(num_prefix_tokens)
        # Registration order follows timm's Attention so state_dict keys keep their order as well as names.
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.token_grid = token_grid

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, I) -> (B, H, L, p)."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _grid(self, num_tokens: int, grid_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        size = grid_size if grid_size is not None else self.token_grid.size
        if size is None:
            raise RuntimeError(
                f"{type(self).__name__}: the token grid is unknown. Run the whole model (its patch embedding "
                f"records the grid; see finetune_vit.convert_vit) or pass grid_size=(h, w)"
            )
        return check_token_layout(num_tokens, size, self.num_prefix_tokens, 0, layer=type(self).__name__)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim_out), timm's ``Attention.forward`` signature.

        ``attn_mask`` and ``is_causal`` are refused: the representatives pool the whole grid and every
        token attends to them, so a token-to-token mask has no meaning here.
        """
        if attn_mask is not None or is_causal:
            raise ValueError(
                f"{type(self).__name__} ({self.kind}) does not support attn_mask or is_causal: its tokens attend "
                f"to pooled representatives of the whole grid, not to each other"
            )
        b, n, _ = x.shape
        grid = self._grid(n, grid_size) if self.needs_grid else None
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.attn_dim).unbind(2)  # each (B, N, I), timm's split
        out = self.mix(q, k, v, grid)  # (B, H, N, p)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            grid: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Token mixing: q, k, v (B, N, I) and the grid (h, w) (None unless ``needs_grid``) -> (B, H, N, p)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, prefix={self.num_prefix_tokens}"


class PooledRepresentativeAttention(ConvertedAttention):
    """Shared part of CBSA^∨ and CBSA*: representatives pooled from the query projections of the grid."""

    needs_grid = True

    def __init__(self, attn: TimmAttention, token_grid: TokenGrid, *, num_prefix_tokens: int = 1,
                 rep_grid: Tuple[int, int] = (8, 8), legacy_token_layout: bool = False) -> None:
        super().__init__(attn, token_grid, num_prefix_tokens=num_prefix_tokens)
        self.rep_grid = check_rep_grid(rep_grid, layer=type(self).__name__)
        self.legacy_token_layout = bool(legacy_token_layout)

    def _initial_reps(self, q: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Q0: (B, N, I) query projections -> (B, H, m, p), pooled before the head split as released.

        The legacy layout pools the first h·w tokens, i.e. the release's ``X_q[:, :-1]`` with one [CLS]
        (docs/authors-release.md §2.9: [CLS] lands in cell (0, 0), the last patch is never pooled).
        """
        h, w = grid
        check_rep_grid(self.rep_grid, grid, layer=type(self).__name__, remedy="a smaller rep_grid or a larger image")
        start = 0 if self.legacy_token_layout else self.num_prefix_tokens
        rep0 = adaptive_pool_tokens(q[:, start:start + h * w], (h, w), self.rep_grid)  # (B, m, I)
        return self._heads(rep0)

    def _extraction(self, rep0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax over the N tokens of q_norm(Q0) s k_norm(K)ᵀ: (B, H, m, N), with timm's attention dropout."""
        logits = torch.matmul(self.q_norm(rep0) * self.scale, self.k_norm(k).transpose(-1, -2))
        return self.attn_drop(logits.softmax(dim=-1))

    def _softmax_broadcast(self, q: torch.Tensor, rep0: torch.Tensor) -> torch.Tensor:
        """The release's broadcast weights softmax_m(X_q s Q0ᵀ): (B, H, N, m). No dropout, as released."""
        return torch.matmul(q * self.scale, rep0.transpose(-1, -2)).softmax(dim=-1)

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", rep_grid={self.rep_grid}, legacy_token_layout={self.legacy_token_layout}")


class CBSAVeeAttention(PooledRepresentativeAttention):
    """CBSA^∨: extraction plus softmax broadcast, no update or contraction (docs/authors-release.md §2.3)."""

    kind = "cbsa_vee"

    def mix(self, q, k, v, grid):
        rep0 = self._initial_reps(q, grid)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        rep_delta = torch.matmul(self._extraction(rep0, k), v)  # (B, H, m, p)
        return torch.matmul(self._softmax_broadcast(q, rep0), rep_delta)


class CBSAStarAttention(PooledRepresentativeAttention):
    """CBSA*: extraction, residual representative update, contraction among the reps, broadcast (paper Fig. 9)."""

    kind = "cbsa_star"

    def __init__(self, attn: TimmAttention, token_grid: TokenGrid, *, num_prefix_tokens: int = 1,
                 rep_grid: Tuple[int, int] = (8, 8), legacy_token_layout: bool = False,
                 broadcast: str = "transpose") -> None:
        super().__init__(attn, token_grid, num_prefix_tokens=num_prefix_tokens, rep_grid=rep_grid,
                         legacy_token_layout=legacy_token_layout)
        if broadcast not in BROADCAST_CHOICES:
            raise ValueError(f"unknown broadcast {broadcast!r}; valid: {', '.join(BROADCAST_CHOICES)}")
        self.broadcast = broadcast

    def mix(self, q, k, v, grid):
        rep0 = self._initial_reps(q, grid)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        extract = self._extraction(rep0, k)  # (B, H, m, N)
        reps = rep0 + torch.matmul(extract, v)
        sim = torch.matmul(reps * self.scale, reps.transpose(-1, -2)).softmax(dim=-1)
        contracted = torch.matmul(sim, reps)  # (B, H, m, p)
        if self.broadcast == "transpose":
            return torch.matmul(extract.transpose(-1, -2), contracted)
        return torch.matmul(self._softmax_broadcast(q, rep0), contracted)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", broadcast={self.broadcast}"


class ReLULinearAttention(ConvertedAttention):
    """Linear attention with the kernel φ(x) = ReLU(x) + 1e-6, normalised by φ(q)·mean φ(k).

    Not :class:`cbsa_core.layers.linear_attention.LinearAttention` (the from-scratch baseline of the benchmarks),
    on purpose; the two must stay separate:

    * The normaliser is the release's FLatten one (the commented-out class the authors' ViT code describes),
      ``φ(q) (φ(k)ᵀ v / N) / (φ(q)·mean_N φ(k) + 1e-6)``. That equals ``φ(q) φ(k)ᵀ v / (φ(q)·Σ φ(k) + N·1e-6)``:
      the constant is added after the mean, i.e. scaled by N, where the core layer adds none to ``φ(q)·Σ φ(k)``.
    * It owns no parameters: it reuses the pretrained timm block's ``qkv``/``proj`` (and ``q_norm``/``k_norm``)
      submodules under their timm names, so timm checkpoints load unchanged; the core layer creates its own.
    * The kernel products run in fp32 under autocast (fp16 overflows in φ(k)ᵀv, FLatten issues #5 and #15),
      because this module is fine-tuned with the release's fp16 AMP.
    """

    kind = "linear"

    def mix(self, q, k, v, grid):
        q, k, v = self.q_norm(self._heads(q)), self.k_norm(self._heads(k)), self._heads(v)
        n, dtype = k.shape[-2], v.dtype
        # fp16 overflows in φ(k)ᵀv and the normaliser (FLatten issues #5, #15), so this part runs in fp32.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = F.relu(q.float()) + 1e-6, F.relu(k.float()) + 1e-6, v.float()
            norm = torch.matmul(q, k.mean(dim=-2, keepdim=True).transpose(-1, -2)) + 1e-6  # (B, H, N, 1)
            kv = torch.matmul(k.transpose(-1, -2), v) / n  # (B, H, p, p)
            out = torch.matmul(q, kv) / norm
        return out.to(dtype)


ATTENTION_MODULES = {
    "cbsa_vee": CBSAVeeAttention,
    "cbsa_star": CBSAStarAttention,
    "linear": ReLULinearAttention,
}
