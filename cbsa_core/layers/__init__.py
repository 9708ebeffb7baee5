"""Attention layers and building blocks of the CBSA family."""
from timm.layers import register_notrace_module

from .cbsa import CBSA, adaptive_pool_tokens, check_token_layout
from .ista import ISTA
from .linear_attention import LinearAttention
from .mssa import MSSA
from .patch_embed import ConvPatchEmbed, LinearPatchEmbed
from .pos_embed import resample_pos_embed
from .tssa import TSSA

__all__ = ["CBSA", "MSSA", "TSSA", "ISTA", "LinearAttention", "ConvPatchEmbed", "resample_pos_embed", "adaptive_pool_tokens",
           "check_token_layout", "build_attention", "ATTENTION_TYPES"]

ATTENTION_TYPES = ("cbsa", "cbsa_dagger", "agent", "mssa", "tssa")

# torch.fx leaves (timm's notrace registry): CBSA checks and slices its token grid with Python ints and runs
# custom autograd products; ISTA picks its product order from the number of rows. Traced models call them whole.
register_notrace_module(CBSA)
register_notrace_module(ISTA)


def build_attention(kind: str, dim: int, heads: int, dim_head: int, **cbsa_kwargs):
    """Attention layer by name: cbsa, cbsa_dagger (tied output projection), agent (no contraction),
    mssa (CRATE) or tssa (ToST)."""
    if kind == "cbsa":
        return CBSA(dim, heads, dim_head, **cbsa_kwargs)
    if kind == "cbsa_dagger":
        return CBSA(dim, heads, dim_head, tied_output=True, **cbsa_kwargs)
    if kind == "agent":
        return CBSA(dim, heads, dim_head, contraction=False, **cbsa_kwargs)
    if kind == "mssa":
        return MSSA(dim, heads, dim_head)
    if kind == "tssa":
        return TSSA(dim, heads, dim_head)
    raise ValueError(f"unknown attention type {kind!r}; valid: {', '.join(ATTENTION_TYPES)}")
