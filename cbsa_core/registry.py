"""Model registry: the authors' names, lowercase aliases, and timm registration.

``create_model(name, pretrained=PATH)`` builds a model and loads a local checkpoint; nothing downloads.
After ``import cbsa_core`` the lowercase names are also timm models:
``timm.create_model('cbt_small', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn

from .checkpoint import load_checkpoint
from .models.cbt import CBT

__all__ = ["MODEL_CONFIGS", "ALIASES", "create_model", "list_models", "model_config", "register_timm_models"]

_LOG = logging.getLogger(__name__)

_T = dict(dim=192, depth=12, heads=3, dim_head=64)
_S = dict(dim=384, depth=12, heads=6, dim_head=64)
_B = dict(dim=768, depth=12, heads=12, dim_head=64)
_L = dict(dim=1024, depth=24, heads=16, dim_head=64)

# Canonical configurations (official-code.md §1.1.3; Table 3/4 rows). The release cannot build
# Ours_base/Ours_large (item 1: they reference an undefined ``Ours``); they are CBSA here.
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "cbt_tiny": dict(_T, attn="cbsa"),
    "cbt_small": dict(_S, attn="cbsa"),
    "cbt_base": dict(_B, attn="cbsa"),
    "cbt_large": dict(_L, attn="cbsa"),
    "cbt_dagger_tiny": dict(_T, attn="cbsa_dagger"),
    "cbt_dagger_small": dict(_S, attn="cbsa_dagger"),
    "mssa_tiny": dict(_T, attn="mssa"),
    "mssa_small": dict(_S, attn="mssa"),
    "tssa_tiny": dict(_T, attn="tssa"),
    "tssa_small": dict(_S, attn="tssa"),
    "agent_tiny": dict(_T, attn="agent"),
    "agent_small": dict(_S, attn="agent"),
    # Hybrid used for emergent segmentation (paper §5.8): MSSA in layers 1-6, CBSA in layers 7-12.
    "crate_cbt_small": dict(_S, attn=["mssa"] * 6 + ["cbsa"] * 6),
}

# The authors' names (their --arch choices) for the same models.
ALIASES: Dict[str, str] = {
    "Ours_tiny": "cbt_tiny", "Ours_small": "cbt_small", "Ours_base": "cbt_base", "Ours_large": "cbt_large",
    "CRATE_tiny": "mssa_tiny", "CRATE_small": "mssa_small",
    "ToST_tiny": "tssa_tiny", "ToST_small": "tssa_small",
    "Agent_tiny": "agent_tiny", "Agent_small": "agent_small",
}


def list_models(pattern: str = "*") -> List[str]:
    """Registered names (canonical and the authors' aliases) matching a shell-style pattern."""
    return sorted(n for n in list(MODEL_CONFIGS) + list(ALIASES) if fnmatch.fnmatch(n, pattern))


def _resolve(name: str) -> str:
    canonical = ALIASES.get(name, name)
    if canonical not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return canonical


def model_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The constructor kwargs of a registered model, with overrides applied."""
    cfg = copy.deepcopy(MODEL_CONFIGS[_resolve(name)])
    cfg.update(overrides)
    return cfg


def create_model(name: str, *, pretrained: Optional[str | os.PathLike] = None, num_classes: int = 1000,
                 **overrides: Any) -> nn.Module:
    """Build a registered model; ``pretrained`` is a local checkpoint path (this project's or the authors').

    Overrides are CBT constructor arguments (image_size, patch_size, depth, rep_grid, in_chans, ...).
    The token layout follows the file (:func:`cbsa_core.checkpoint.resolve_token_layout`): only the authors'
    release format switches on the legacy layout; ``legacy_token_layout=True/False`` overrides it.
    """
    canonical = _resolve(name)
    cfg = model_config(canonical, num_classes=num_classes, **overrides)
    try:
        model = CBT(**cfg)
    except TypeError as e:
        raise TypeError(f"invalid override for model {name!r}: {e}") from e
    model.arch = name
    if pretrained is not None:
        # An explicit legacy_token_layout override also decides how the file's weights are read.
        load_checkpoint(model, pretrained, legacy_token_layout=overrides.get("legacy_token_layout"))
    return model


def _make_timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Optional[dict] = None,
                   cache_dir: Any = None, **kwargs: Any) -> nn.Module:
        file = (pretrained_cfg_overlay or {}).get("file")
        if pretrained and not file:
            raise ValueError(
                f"{name}: pretrained=True needs a local file, e.g. timm.create_model('{name}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')); nothing is downloaded"
            )
        kwargs.pop("drop_path_rate", None)  # CBT has no drop-path (as released)
        return create_model(name, pretrained=file if pretrained else None, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"CBSA-family model '{name}' ({MODEL_CONFIGS[name]['attn']} attention)."
    return entrypoint


def register_timm_models() -> None:
    """Register every canonical (lowercase) name as a timm model; idempotent."""
    try:
        from timm.models import is_model, register_model
    except ImportError:  # timm is a declared dependency; stay importable without it
        return
    module = sys.modules[__name__]
    for name in MODEL_CONFIGS:
        if not is_model(name):
            fn = _make_timm_entrypoint(name)
            setattr(module, name, fn)
            register_model(fn)
