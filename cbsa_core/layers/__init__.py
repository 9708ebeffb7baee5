"""Attention layers and building blocks of the CBSA family."""
import inspect
from typing import Any, Dict, Mapping, Tuple, Type

import torch.nn as nn
from timm.layers import register_notrace_module

from .cbsa import CBSA
from .grid import adaptive_pool_tokens, check_grid_size, check_rep_grid, check_token_layout
from .ista import ISTA
from .linear_attention import LinearAttention
from .mssa import MSSA
from .patch_embed import ConvPatchEmbed, LinearPatchEmbed
from .pos_embed import resample_pos_embed
from .tssa import TSSA

__all__ = ["CBSA", "MSSA", "TSSA", "ISTA", "LinearAttention", "ConvPatchEmbed", "LinearPatchEmbed",
           "resample_pos_embed", "adaptive_pool_tokens", "check_token_layout", "check_grid_size", "check_rep_grid",
           "build_attention", "attention_options", "ATTENTION_KINDS", "ATTENTION_TYPES"]

# Attention kind -> (class, the constructor arguments that define the kind). Every other keyword argument of
# the class's constructor is an option of the kind; the kind-defining ones are fixed and not options.
ATTENTION_KINDS: Dict[str, Tuple[Type[nn.Module], Mapping[str, Any]]] = {
    "cbsa": (CBSA, dict(contraction=True, tied_output=False)),
    "cbsa_dagger": (CBSA, dict(contraction=True, tied_output=True)),   # output projected by the basis W_U
    "agent": (CBSA, dict(contraction=False, tied_output=False)),       # no contraction among the reps
    "mssa": (MSSA, {}),                                                  # CRATE
    "tssa": (TSSA, {}),                                                  # ToST
}
ATTENTION_TYPES = tuple(ATTENTION_KINDS)
_SHAPE_ARGS = ("dim", "heads", "dim_head")   # the positional arguments every attention class takes

# torch.fx leaves (timm's notrace registry): CBSA checks and slices its token grid with Python ints and runs
# custom autograd products; ISTA picks its product order from the number of rows. Traced models call them whole.
register_notrace_module(CBSA)
register_notrace_module(ISTA)


def _kind(kind: str) -> Tuple[Type[nn.Module], Mapping[str, Any]]:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention type {kind!r}; valid: {', '.join(ATTENTION_TYPES)}")
    return ATTENTION_KINDS[kind]


def attention_options(kind: str) -> Tuple[str, ...]:
    """The keyword options an attention kind takes, read from its class's constructor signature (minus
    dim, heads, dim_head and the arguments that define the kind), e.g. ``rep_grid`` for cbsa, none for mssa."""
    cls, fixed = _kind(kind)
    params = inspect.signature(cls.__init__).parameters
    return tuple(n for n, p in params.items()
                 if n != "self" and n not in _SHAPE_ARGS and n not in fixed
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build_attention(kind: str, dim: int, heads: int, dim_head: int, **options: Any) -> nn.Module:
    """Attention layer by name: cbsa, cbsa_dagger (tied output projection), agent (no contraction),
    mssa (CRATE) or tssa (ToST). ``options`` must be options of that kind (:func:`attention_options`);
    any other is refused with a ``ValueError`` naming it, never dropped."""
    cls, fixed = _kind(kind)
    valid = attention_options(kind)
    foreign = [k for k in options if k not in valid]
    if foreign:
        raise ValueError(f"attention {kind!r} ({cls.__name__}) does not take {', '.join(foreign)}; its options: "
                         f"{', '.join(valid) or 'none'}")
    return cls(dim, heads, dim_head, **fixed, **options)
