"""Model registry: the canonical (timm) names, their aliases (mostly the authors' names), and one ``create_model``.

The models themselves are a timm model family (:mod:`cbsa_core.models.cbt`, registered on import):
``timm.create_model('cbt_small', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
``create_model(name, pretrained=PATH)`` is the same build path with the aliases accepted and a path
instead of the overlay; nothing downloads.
"""
from __future__ import annotations

import copy
import fnmatch
import os
from typing import Any, Dict, List, Optional

import timm
import torch.nn as nn

from .models.cbt import MODEL_CONFIGS

__all__ = ["MODEL_CONFIGS", "ALIASES", "create_model", "list_models", "model_config"]

# Other names for the same models. Most are the release's --arch choices (docs/authors-release.md §1.1.3), where
# CRATE_tiny/CRATE_small are its conv-stem MSSA models and CRATE_small_Yu is the original CRATE-S of its crate.py
# (CRATE's own names CRATE_tiny ... CRATE_large mean the crate_original_* models and are not aliases here: two of
# them would clash). The release has no agent-attention arch: Agent_tiny/Agent_small are this project's names,
# after the paper's Table 4 columns Agent-T/S.
ALIASES: Dict[str, str] = {
    "Ours_tiny": "cbt_tiny", "Ours_small": "cbt_small", "Ours_base": "cbt_base", "Ours_large": "cbt_large",
    "CRATE_tiny": "mssa_tiny", "CRATE_small": "mssa_small", "CRATE_small_Yu": "crate_original_small",
    "ToST_tiny": "tssa_tiny", "ToST_small": "tssa_small",
    "Agent_tiny": "agent_tiny", "Agent_small": "agent_small",
}


def list_models(pattern: str = "*") -> List[str]:
    """Registered names (canonical and the aliases) matching a shell-style pattern."""
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
    """Build a registered model; ``pretrained`` is a local weights file (any format
    :func:`cbsa_core.checkpoint.read_checkpoint` reads: the authors' release, this project's files, timm
    train.py wrappers, bare state dicts, ``.safetensors``).

    This is ``timm.create_model(canonical_name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), ...)``
    with the aliases accepted. Overrides are :class:`cbsa_core.CBT` arguments (image_size / img_size,
    patch_size, depth, rep_grid, in_chans, global_pool, drop_path_rate, ...). With pretrained weights, another
    ``num_classes`` re-initialises the classifier and another ``in_chans`` adapts the first conv, as in timm;
    every other difference is refused with the keys at fault. The token layout follows the file
    (:func:`cbsa_core.checkpoint.resolve_token_layout`): only the authors' release formats switch on the
    legacy layout; ``legacy_token_layout=True/False`` overrides it.
    """
    canonical = _resolve(name)
    kwargs: Dict[str, Any] = dict(overrides, num_classes=num_classes)
    if pretrained is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(pretrained)))
    try:
        model = timm.create_model(canonical, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(f"invalid override for model {name!r}: {e}") from e
    if hasattr(model, "model_config"):
        model.arch = name
    return model
