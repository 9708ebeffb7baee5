"""Coding-rate Based Transformer (CBT), its same-framework baselines and the original CRATE, as a timm model family.

    x = PatchEmbed(img)                         (B, N, d): the release's conv stem, or CRATE's linear embedding
    x = [cls, x] + pos                          (B, 1 + N, d)
    for each layer:
        z = x + DropPath(Attn(LN(x)))           pre-norm residual around attention
        x = ISTA(LN(z))                         NO residual around ISTA (docs/authors-release.md item 8)
    logits = Linear(Dropout(LN(pool(x))))       pool = [CLS] ('token'), as released

Module and parameter names follow the release (``to_patch_embedding``, ``transformer.layers.{i}.{0,1}``,
``mlp_head``), so the authors' state dicts load without renaming (docs/authors-release.md §1.1.7).

The original CRATE (Ma-Lab-Berkeley/CRATE ``model/crate.py``: CRATE-T/S/B/L, Table 3 compares with B/L; the
release's ``crate.py`` / ``CRATE_small_Yu``) is the same skeleton with MSSA in every layer and CRATE's linear patch
embedding (``patch_embed='linear'``: LayerNorm -> Linear -> LayerNorm on each flattened patch): the
``crate_original_*`` models. Their parameters are CRATE's up to one key name, which the loaders map
(:func:`cbsa_core.checkpoint.map_original_crate_keys`), so CRATE's checkpoint files give CRATE's logits.
Their initialisation is CRATE's, which is the release's (randn position embedding and [CLS], kaiming-uniform
ISTA dictionary, PyTorch's default Linear/LayerNorm).

This module is the family's timm module (``timm.list_models(module='cbt')``): importing it registers every
name in :data:`MODEL_CONFIGS` with pretrained configs built by ``generate_default_cfgs``, and the
entrypoints build through ``build_model_with_cfg`` as timm's own ViT does. The timm contract, as
``timm/models/vision_transformer.py`` implements it:

* ``forward_features`` returns the unpooled tokens (B, 1 + h·w, d); ``forward_head(x, pre_logits)`` pools,
  normalises with the release's head LayerNorm (``mlp_head.0``, timm's ``fc_norm`` position), drops and
  classifies (``mlp_head.1``);
* ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info`` (``features_only=True``),
  ``set_grad_checkpointing``, ``group_matcher``, ``reset_classifier``, ``set_input_size``; any input size
  divisible by the patch size works (the position embedding is resampled to the grid);
* ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` reads the authors' release wrapper, this
  project's files, timm train.py wrappers, bare state dicts and ``.safetensors``; the token layout follows
  :func:`cbsa_core.checkpoint.resolve_token_layout` (``legacy_token_layout=`` overrides it); another
  ``num_classes`` re-initialises the head and another ``in_chans`` adapts the first conv, as in timm.

Stochastic depth (``drop_path_rate``, none in the release) can only drop the attention residual: ISTA
has no residual, so dropping it would drop the whole stream.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, get_device_dtype
from timm.models import (build_model_with_cfg, clean_state_dict, generate_default_cfgs, load_pretrained,
                         register_model, resolve_pretrained_cfg)
from timm.models._features import feature_take_indices
from timm.models._input import update_model_args, update_model_input_size

from ..checkpoint import (CheckpointMismatchError, apply_token_layout, check_arch, check_patch_embedding,
                          check_state_dict, checkpoint_kind, extract_state_dict, map_original_crate_keys,
                          read_checkpoint)
from ..layers import (ATTENTION_TYPES, CBSA, ISTA, attention_options, build_attention, check_rep_grid,
                      resample_pos_embed)
from ..layers.patch_embed import (PATCH_EMBED_TYPES, ConvPatchEmbed, LinearPatchEmbed, check_linear_patch_size,
                                  check_patch_size)

__all__ = ["PreNorm", "Transformer", "CBT", "MODEL_CONFIGS", "RELEASE_WEIGHTS", "CRATE_RELEASED_WEIGHTS",
           "GLOBAL_POOL_TYPES", "FIRST_CONV", "FIRST_LINEAR", "CLASSIFIER", "checkpoint_filter_fn", "min_input_size",
           "first_layer_name", "recorded_model_config"]

_LOG = logging.getLogger(__name__)

_T = dict(dim=192, depth=12, heads=3, dim_head=64)
_S = dict(dim=384, depth=12, heads=6, dim_head=64)
_B = dict(dim=768, depth=12, heads=12, dim_head=64)
_L = dict(dim=1024, depth=24, heads=16, dim_head=64)

# Canonical configurations (docs/authors-release.md §1.1.3; Table 3/4 rows). The release cannot build
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
    # Hybrid used for emergent segmentation (paper Tables 5 and 6): MSSA in layers 1-6, CBSA in layers 7-12.
    "crate_cbt_small": dict(_S, attn=["mssa"] * 6 + ["cbsa"] * 6),
    # The original CRATE (Ma-Lab-Berkeley/CRATE model/crate.py, CRATE's own sizes: CRATE_tiny there is dim 384),
    # dim_head = dim / heads. Table 3 compares CBT with CRATE-B/L.
    "crate_original_tiny": dict(dim=384, depth=12, heads=6, dim_head=64, attn="mssa", patch_embed="linear"),
    "crate_original_small": dict(dim=576, depth=12, heads=12, dim_head=48, attn="mssa", patch_embed="linear"),
    "crate_original_base": dict(dim=768, depth=12, heads=12, dim_head=64, attn="mssa", patch_embed="linear"),
    "crate_original_large": dict(dim=1024, depth=24, heads=16, dim_head=64, attn="mssa", patch_embed="linear"),
}

# The models of the release's model zoo (README): ImageNet-1K weights on Google Drive, fetched by the user.
RELEASE_WEIGHTS = ("cbt_tiny", "cbt_small", "cbt_base", "cbt_large")
# CRATE's README releases ImageNet-1K weights for CRATE-S only (Google Drive); T, B and L are marked TODO.
CRATE_RELEASED_WEIGHTS = ("crate_original_small",)

GLOBAL_POOL_TYPES = ("", "token", "avg", "max", "avgmax")
FIRST_CONV = "to_patch_embedding.proj.0.0"     # the conv stem's first convolution
FIRST_LINEAR = "to_patch_embedding.2"          # the linear patch embedding's Linear (timm's first_conv entry)
CLASSIFIER = "mlp_head.1"
# The attention types that pool a token grid to representatives: those whose layer takes a rep_grid.
_REPRESENTATIVE_ATTENTION = tuple(a for a in ATTENTION_TYPES if "rep_grid" in attention_options(a))
DEFAULT_REP_GRID = (8, 8)


def first_layer_name(patch_embed: str) -> str:
    """The module timm's pretrained config calls ``first_conv`` for a patch embedding type."""
    return FIRST_LINEAR if patch_embed == "linear" else FIRST_CONV


def _image_size(value: Any, name: str) -> Tuple[int, int]:
    """An image size given as one int or (H, W), checked positive; ``name`` is the argument at fault."""
    size = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else None
    if size is None or len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise ValueError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    if min(size) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


def _representative_grid(attn: Sequence[str], rep_grid: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """The representative grid the model's CBSA-type layers pool to (``rep_grid``, default 8x8), None when no
    layer pools; a ``rep_grid`` given to a model without such layers is refused, not dropped."""
    if not any(a in _REPRESENTATIVE_ATTENTION for a in attn):
        if rep_grid is not None:
            raise ValueError(f"rep_grid={rep_grid!r}: no layer of this model takes it (attn {sorted(set(attn))}; only "
                             f"{', '.join(_REPRESENTATIVE_ATTENTION)} pool representatives); leave rep_grid unset")
        return None
    return check_rep_grid(DEFAULT_REP_GRID if rep_grid is None else rep_grid)


def recorded_model_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor arguments a checkpoint's recorded ``model_config`` stands for, in today's terms.

    Files written before models without representative layers recorded ``rep_grid: None`` carry the unused
    default (8, 8) for MSSA/TSSA models; the constructor now refuses a rep_grid such a model cannot use, so it is
    dropped here. Every loader that rebuilds a model from a record goes through this function.
    """
    out = dict(config)
    attn = out.get("attn", "cbsa")
    attn_list = [attn] if isinstance(attn, str) else list(attn)
    if not any(a in _REPRESENTATIVE_ATTENTION for a in attn_list):
        out.pop("rep_grid", None)
    return out


def min_input_size(config: Mapping[str, Any]) -> Tuple[int, int, int]:
    """The smallest (C, H, W) a configuration runs at: the representative grid times the patch size, or one
    patch for models without representatives."""
    attn = config["attn"]
    attn = [attn] if isinstance(attn, str) else list(attn)
    patch = int(config.get("patch_size", 16))
    reps = _representative_grid(attn, config.get("rep_grid")) or (1, 1)
    return int(config.get("in_chans", 3)), reps[0] * patch, reps[1] * patch


def _options_of(kind: str, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The model-level layer settings that a layer of ``kind`` takes (the model records all of them)."""
    return {k: v for k, v in settings.items() if k in attention_options(kind)}


class PreNorm(nn.Module):
    """``fn(LayerNorm(x), **kwargs)``; the residual is added by the caller."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Transformer(nn.Module):
    """Stack of [PreNorm(attention) with residual, PreNorm(ISTA) without residual] layers.

    ``drop_path_rates`` (one per layer) drop the attention residual branch; ``grad_checkpointing`` recomputes
    each layer in the backward pass instead of keeping its activations.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, attn: Sequence[str],
                 cbsa_kwargs: Dict[str, Any], drop_path_rates: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PreNorm(dim, build_attention(attn[i], dim, heads, dim_head, **_options_of(attn[i], cbsa_kwargs))),
                PreNorm(dim, ISTA(dim)),
            ])
            for i in range(depth)
        ])
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth
        # No parameters: the state-dict keys stay the release's.
        self.drop_paths = nn.ModuleList([DropPath(r) if r > 0 else nn.Identity() for r in rates])
        self.grad_checkpointing = False

    def forward_layer(self, index: int, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Layer ``index``: (B, T, d) -> (B, T, d), recomputed in backward when checkpointing."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(self._layer, index, x, grid_size, use_reentrant=False)
        return self._layer(index, x, grid_size)

    def _layer(self, index: int, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        attn, ff = self.layers[index]
        return ff(self.drop_paths[index](attn(x, grid_size=grid_size)) + x)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        for i in range(len(self.layers)):
            x = self.forward_layer(i, x, grid_size)
        return x


class CBT(nn.Module):
    """CBT image classifier. ``forward(img (B, C, H, W)) -> logits (B, num_classes)``.

    Any image size divisible by the patch size works; the position embedding is resampled to the grid.

    Args:
        img_size: training resolution, an int or (H, W); it sets the stored position-embedding grid.
            ``image_size`` is the release's name for it (accepted too; both must agree when both are given).
        patch_size: a power of two >= 4 (log2 stride-2 conv stages) for the conv stem, any positive int for the
            linear embedding.
        patch_embed: 'conv' (the release's convolutional stem, default) or 'linear' (CRATE's LayerNorm -> Linear ->
            LayerNorm on each flattened patch).
        in_chans, num_classes: input channels; classes (0: no classifier, ``forward`` returns features).
        global_pool: '' (all tokens), 'token' ([CLS], as released), 'avg', 'max' or 'avgmax' over patch tokens.
        dim, depth, heads, dim_head: width, layers, heads, head width (default ``dim // heads``).
        attn: attention per layer, one name or a list of ``depth`` names (cbsa, cbsa_dagger, agent, mssa, tssa).
        rep_grid: representative grid of the CBSA layers (default 8×8 → m = 64); the token grid must be at least as
            large. Refused for models without CBSA-type layers (mssa, tssa), which have none.
        legacy_token_layout: pool the release's ``tokens[:, :-1]`` (the authors' checkpoints need it). None (the
            default) means "not requested": the corrected layout, unless pretrained weights record the legacy one.
        drop_rate: dropout before the classifier. drop_path_rate: stochastic depth of the attention residuals.
        dynamic_img_size: always True (accepted for timm compatibility).
    """

    def __init__(self, *, img_size: Union[int, Sequence[int], None] = None,
                 image_size: Union[int, Sequence[int], None] = None, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", dim: int = 384, depth: int = 12,
                 heads: int = 6, dim_head: Optional[int] = None, attn: Union[str, Sequence[str]] = "cbsa",
                 rep_grid: Optional[Sequence[int]] = None, legacy_token_layout: Optional[bool] = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, dynamic_img_size: bool = True,
                 patch_embed: str = "conv") -> None:
        super().__init__()
        size = self._check_config(img_size, image_size, patch_size, in_chans, num_classes, global_pool, dim, depth,
                                  heads, dim_head, attn, rep_grid, drop_rate, drop_path_rate, dynamic_img_size,
                                  patch_embed)
        dim_head = dim // heads if dim_head is None else dim_head
        attn_list = [attn] * depth if isinstance(attn, str) else list(attn)
        rep_grid = _representative_grid(attn_list, rep_grid)   # None: no layer pools representatives
        legacy = bool(legacy_token_layout)
        self.model_config: Dict[str, Any] = dict(
            image_size=size[0] if size[0] == size[1] else size, patch_size=patch_size, num_classes=num_classes,
            dim=dim, depth=depth, heads=heads, dim_head=dim_head, in_chans=in_chans,
            attn=attn if isinstance(attn, str) else attn_list, rep_grid=rep_grid, legacy_token_layout=legacy,
            global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path_rate, patch_embed=patch_embed,
        )
        self.arch = "CBT"
        # The explicit layout request (None: none); pretrained loading lets it win over the file's record.
        self.requested_legacy_token_layout = None if legacy_token_layout is None else legacy
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.img_size = size
        self.dynamic_img_size = True
        self.base_grid = (size[0] // patch_size, size[1] // patch_size)

        self.patch_embed_type = patch_embed
        embed_cls = LinearPatchEmbed if patch_embed == "linear" else ConvPatchEmbed
        self.to_patch_embedding = embed_cls(patch_size, in_chans, dim)
        # randn init (std 1), as released (item 11).
        self.pos_embedding = nn.Parameter(torch.randn(1, self.base_grid[0] * self.base_grid[1] + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        cbsa_kwargs = dict(rep_grid=rep_grid, num_prefix_tokens=1, legacy_token_layout=legacy)
        self.transformer = Transformer(dim, depth, heads, dim_head, attn_list, cbsa_kwargs,
                                       calculate_drop_path_rates(drop_path_rate, depth))
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim),
                                      nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity())
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [dict(module=f"transformer.layers.{i}", num_chs=dim, reduction=patch_size)
                             for i in range(depth)]

    @staticmethod
    def _check_config(img_size, image_size, patch_size, in_chans, num_classes, global_pool, dim, depth, heads,
                      dim_head, attn, rep_grid, drop_rate, drop_path_rate, dynamic_img_size,
                      patch_embed="conv") -> Tuple[int, int]:
        """Refuse impossible configurations, naming the argument and what would fit. Returns (H, W)."""
        size = _image_size(img_size, "img_size") if img_size is not None else None
        size_arg = "img_size"
        if image_size is not None:
            other = _image_size(image_size, "image_size")
            if size is not None and other != size:
                raise ValueError(f"img_size {img_size!r} and image_size {image_size!r} disagree; give one of them")
            size, size_arg = other, "image_size"
        size = size or (224, 224)
        shown = str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans <= 0:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if patch_embed not in PATCH_EMBED_TYPES:
            raise ValueError(f"patch_embed must be one of {PATCH_EMBED_TYPES}, got {patch_embed!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        if dim_head is not None and (not isinstance(dim_head, int) or dim_head < 1):
            raise ValueError(f"dim_head must be an int >= 1 (or None for dim // heads), got {dim_head!r}")
        if dim_head is None and (dim < heads or dim % heads):
            raise ValueError(f"dim={dim} does not divide into heads={heads}; pass dim_head explicitly")
        if patch_embed == "linear":
            check_linear_patch_size(patch_size)
        else:
            check_patch_size(patch_size, dim, dim_arg="dim")
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"{size_arg} {shown} does not divide by patch_size {patch_size}; use a multiple of "
                             f"{patch_size} (e.g. {max(patch_size, size[0] // patch_size * patch_size)})")
        attn_list = [attn] * depth if isinstance(attn, str) else list(attn)
        if len(attn_list) != depth:
            raise ValueError(f"attn lists {len(attn_list)} layers, depth is {depth}")
        unknown = sorted({a for a in attn_list if a not in ATTENTION_TYPES})
        if unknown:
            raise ValueError(f"attn has unknown attention type(s) {unknown}; valid: {', '.join(ATTENTION_TYPES)}")
        reps = _representative_grid(attn_list, rep_grid)
        grid = (size[0] // patch_size, size[1] // patch_size)
        if reps is not None:
            check_rep_grid(reps, grid, source=f"{size_arg} {shown} with patch_size {patch_size}",
                           remedy=f"an image size of at least {reps[0] * patch_size}x{reps[1] * patch_size} or a "
                                  f"rep_grid of at most {grid}")
        if global_pool not in GLOBAL_POOL_TYPES:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOL_TYPES}, got {global_pool!r}")
        for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= float(rate) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
        if not dynamic_img_size:
            raise ValueError("dynamic_img_size=False is not supported: CBT takes any image size divisible by the patch "
                             "size (its position embedding is resampled to the token grid)")
        return size

    # ----------------------------------------------------------------------------------------------
    # Layout, classifier, timm model API
    # ----------------------------------------------------------------------------------------------
    def set_legacy_token_layout(self, enabled: bool) -> None:
        """Switch every CBSA layer between the release's pooling input and the corrected one (and record it,
        so that an export of this model rebuilds it in the same layout)."""
        enabled = bool(enabled)
        self.model_config["legacy_token_layout"] = enabled
        for m in self.modules():
            if isinstance(m, CBSA):
                m.legacy_token_layout = enabled
        update_model_args(self, legacy_token_layout=enabled)

    @property
    def attention_layers(self) -> List[nn.Module]:
        return [layer[0].fn for layer in self.transformer.layers]

    @property
    def uses_token_layout(self) -> bool:
        """Whether any layer pools a token grid to representatives, the only computation the token layout
        changes; for a model without such layers (MSSA/TSSA, the original CRATE) the layout does not apply."""
        return any(isinstance(m, CBSA) for m in self.modules())

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embedding", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: the stem (conv embedding, [CLS], position embedding), one
        group per layer; the head LayerNorm and classifier are the last group, as timm's ViT ``fc_norm``/``head``."""
        return dict(stem=r"^cls_token|^pos_embedding|^to_patch_embedding",
                    blocks=[(r"^transformer\.layers\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.mlp_head[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none), optionally another pooling."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOL_TYPES:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOL_TYPES}, got {global_pool!r}")
            self.global_pool = global_pool
            self.model_config["global_pool"] = global_pool
        self.num_classes = num_classes
        self.model_config["num_classes"] = num_classes
        dd = get_device_dtype(self)
        self.mlp_head[1] = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.mlp_head[1].train(self.training)

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Sequence[int], None] = None,
                       patch_size: Optional[int] = None) -> None:
        """Make ``img_size`` the stored resolution: the position embedding is resampled to its grid once
        (inputs of any other size are still resampled on the fly). The patch embedding fixes the patch size."""
        if patch_size is not None and int(patch_size if isinstance(patch_size, int) else patch_size[0]) != \
                self.patch_size:
            embed = "conv stem" if self.patch_embed_type == "conv" else "linear patch embedding"
            raise ValueError(f"patch_size {patch_size!r}: this model's {embed} is built for patch_size "
                             f"{self.patch_size}; another patch size needs another model")
        if img_size is None:
            return
        size = _image_size(img_size, "img_size")
        cfg = dict(self.model_config)
        self._check_config(size, None, self.patch_size, self.in_chans, self.num_classes, self.global_pool,
                           self.embed_dim, len(self.transformer.layers), cfg["heads"], cfg["dim_head"], cfg["attn"],
                           cfg["rep_grid"], cfg["drop_rate"], cfg["drop_path_rate"], True, self.patch_embed_type)
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        if grid != self.base_grid:
            with torch.no_grad():
                pos = resample_pos_embed(self.pos_embedding.detach(), grid, self.base_grid, num_prefix_tokens=1)
            self.pos_embedding = nn.Parameter(pos, requires_grad=self.pos_embedding.requires_grad)
        self.base_grid, self.img_size = grid, size
        self.model_config["image_size"] = size[0] if size[0] == size[1] else size
        update_model_input_size(self, size)

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    def embed(self, img: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images -> tokens with [CLS] and position embedding: (B, 1 + h·w, d), (h, w)."""
        x, grid = self.to_patch_embedding(img)
        pos = resample_pos_embed(self.pos_embedding, grid, self.base_grid, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + pos.to(x.dtype), grid

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final tokens (B, 1 + h·w, d), unpooled, before the head's LayerNorm."""
        x, grid = self.embed(img)
        return self.transformer(x, grid)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """(B, 1 + N, d) -> (B, d) ([CLS] or a reduction over the patch tokens), or unchanged for ''."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return patches.mean(dim=1)
        if pool_type == "max":
            return patches.amax(dim=1)
        return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.mlp_head[0](self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.mlp_head[1](x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the outputs of the layers in ``indices`` (last n if an int, all if None).

        Intermediates are the patch tokens, (B, d, h, w) for ``output_fmt='NCHW'`` or (B, h·w, d) for 'NLC'
        ([CLS] split off; with ``return_prefix_tokens`` each entry is (tokens, (B, 1, d))); ``norm`` applies the
        head's LayerNorm to them. Returns ``(forward_features(x), intermediates)``, or only the intermediates;
        ``stop_early`` skips the layers after the last one asked for.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.transformer.layers), indices)
        batch = x.shape[0]
        x, grid = self.embed(x)
        last = max_index + 1 if stop_early else len(self.transformer.layers)
        intermediates = []
        for i in range(last):
            x = self.transformer.forward_layer(i, x, grid)
            if i in take_indices:
                intermediates.append(self.mlp_head[0](x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the layers after the last of ``indices`` (and the head LayerNorm / classifier)."""
        take_indices, max_index = feature_take_indices(len(self.transformer.layers), indices)
        self.transformer.layers = self.transformer.layers[:max_index + 1]
        self.transformer.drop_paths = self.transformer.drop_paths[:max_index + 1]
        self.model_config["depth"] = max_index + 1
        if not isinstance(self.model_config["attn"], str):
            self.model_config["attn"] = self.model_config["attn"][:max_index + 1]
        if prune_norm:
            self.mlp_head[0] = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_analysis(self, img: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Per layer: the layer input, the normalised attention input, the post-attention stream and the
        layer output, plus the token grid. Used by the coding-rate and attention-map tools."""
        x, grid = self.embed(img)
        out = []
        for attn, ff in self.transformer.layers:
            normed = attn.norm(x)
            z = attn.fn(normed, grid_size=grid) + x
            y = ff(z)
            out.append(dict(input=x, attn_input=normed, post_attn=z, output=y, grid=torch.tensor(grid)))
            x = y
        return out

    @torch.no_grad()
    def attention_maps(self, img: torch.Tensor) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """Attention estimate per layer ((B, H, T, T) each: AᵀA for CBSA, softmax for MSSA) and the grid."""
        x, grid = self.embed(img)
        maps = []
        for attn, ff in self.transformer.layers:
            normed = attn.norm(x)
            maps.append(attn.fn.attention_map(normed, grid))
            x = ff(attn.fn(normed, grid_size=grid) + x)
        return maps, grid

    # ----------------------------------------------------------------------------------------------
    # Pretrained weights
    # ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: Union[str, os.PathLike], prefix: str = "") -> None:
        """Load a local weights file as pretrained weights (timm's ``custom_load`` hook, ``prefix`` unused).

        Any format :func:`cbsa_core.checkpoint.read_checkpoint` reads (CRATE's own files too, for the
        ``crate_original_*`` models); the file's own wrapper decides the token layout unless ``legacy_token_layout``
        was given to the constructor. As in timm, a classifier with another number of classes is left freshly
        initialised and a first conv of another ``in_chans`` is adapted (the linear patch embedding cannot be).
        """
        ckpt = read_checkpoint(checkpoint_path)
        state_dict = extract_state_dict(ckpt)
        check_arch(checkpoint_path, ckpt, checkpoint_kind(ckpt), self, adaptable=("in_chans",), state_dict=state_dict)
        cfg = dict(getattr(self, "pretrained_cfg", None) or _cfg())
        cfg.update(state_dict=state_dict, file=None, url=None, source=None, custom_load=False, label_offset=0)
        head, first = state_dict.get(CLASSIFIER + ".weight"), state_dict.get(FIRST_CONV + ".weight")
        # The file's own class and channel counts (not the registry cfg's): timm adapts what differs from them.
        cfg["num_classes"] = int(head.shape[0]) if head is not None else 0
        cfg["first_conv"] = first_layer_name(self.patch_embed_type)
        if first is not None and first.dim() == 4:
            cfg["input_size"] = (int(first.shape[1]), *tuple(cfg.get("input_size", (3, 224, 224)))[1:])
        filter_fn = partial(checkpoint_filter_fn, checkpoint=ckpt, source=f"pretrained weights {checkpoint_path}")
        load_pretrained(self, cfg, num_classes=self.num_classes, in_chans=self.in_chans, filter_fn=filter_fn,
                        strict=True)


def _checkpoint_grid(num_tokens: int, model: CBT, checkpoint: Optional[Mapping[str, Any]]) -> Tuple[int, int]:
    """The token grid a position embedding of ``num_tokens`` grid entries was trained at."""
    saved = (checkpoint or {}).get("model_config") if checkpoint is not None else None
    candidates = []
    if isinstance(saved, Mapping) and "image_size" in saved:
        candidates.append((saved["image_size"], saved.get("patch_size", model.patch_size)))
    source_args = getattr(model, "pretrained_model_args", None) or {}
    for key in ("img_size", "image_size"):
        if source_args.get(key) is not None:
            candidates.append((source_args[key], source_args.get("patch_size", model.patch_size)))
    for size, patch in candidates:
        h, w = _image_size(size, "image_size")
        if (h // patch) * (w // patch) == num_tokens:
            return h // patch, w // patch
    side = int(round(num_tokens ** 0.5))
    if side * side == num_tokens:
        return side, side
    raise ValueError(f"cannot tell the grid of a position embedding with {num_tokens} patch entries (not square and "
                     f"no recorded image size)")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: CBT,
                         checkpoint: Optional[Mapping[str, Any]] = None,
                         source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """timm's pretrained filter: weights of any source -> this model's keys, its token layout set.

    * the token layout: :func:`cbsa_core.checkpoint.resolve_token_layout` on ``checkpoint`` (the whole file as
      read, wrapper included, when the caller has it; else the bare weights, which record nothing), with the
      constructor's ``legacy_token_layout`` as the explicit override; logged with its reason (models without
      representatives have no layout to set);
    * ``module.`` / ``_orig_mod.`` prefixes are removed; CRATE's key names become this project's
      (:func:`cbsa_core.checkpoint.map_original_crate_keys`), and weights of the other patch embedding (conv stem
      vs CRATE's linear one) are refused naming the model they fit
      (:func:`cbsa_core.checkpoint.check_patch_embedding`);
    * a position embedding of another grid is resampled to the model's (bicubic, as at run time);
    * every other key and shape must match (:class:`~cbsa_core.checkpoint.CheckpointMismatchError` lists all
      differences), except what timm adapts next: a classifier of another class count, a first conv of
      another input-channel count.
    """
    if source is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = f"pretrained weights {cfg.get('file') or cfg.get('hf_hub_id') or ''}".rstrip()
    state_dict = clean_state_dict(dict(state_dict))
    check_patch_embedding(source, state_dict, model, (checkpoint or {}).get("arch"))
    state_dict = map_original_crate_keys(state_dict, model)
    apply_token_layout(model, checkpoint if checkpoint is not None else state_dict,
                       getattr(model, "requested_legacy_token_layout", None), source)

    pos = state_dict.get("pos_embedding")
    if pos is not None and pos.dim() == 3 and pos.shape != model.pos_embedding.shape \
            and pos.shape[-1] == model.pos_embedding.shape[-1]:
        old_grid = _checkpoint_grid(pos.shape[1] - model.num_prefix_tokens, model, checkpoint)
        state_dict["pos_embedding"] = resample_pos_embed(pos, model.base_grid, old_grid,
                                                         num_prefix_tokens=model.num_prefix_tokens)
        _LOG.warning("%s: position embedding resampled from a %dx%d to a %dx%d grid", source, *old_grid,
                     *model.base_grid)

    expected = model.state_dict()
    adapted = set()
    head = state_dict.get(CLASSIFIER + ".weight")
    if (int(head.shape[0]) if head is not None else 0) != model.num_classes:
        adapted |= {CLASSIFIER + ".weight", CLASSIFIER + ".bias"}
    if model.patch_embed_type == "linear":
        _check_linear_embedding_inputs(state_dict, model, source)
    first, want = state_dict.get(FIRST_CONV + ".weight"), expected.get(FIRST_CONV + ".weight")
    if first is not None and want is not None and first.dim() == 4 and first.shape[1] != want.shape[1] \
            and (first.shape[0],) + tuple(first.shape[2:]) == (want.shape[0],) + tuple(want.shape[2:]):
        adapted.add(FIRST_CONV + ".weight")
    check_state_dict(model, state_dict, source=source, ignore=adapted)
    return state_dict


def _check_linear_embedding_inputs(state_dict: Mapping[str, torch.Tensor], model: CBT, source: str) -> None:
    """Refuse linear-embedding weights for another patch size or channel count with the fix, rather than a shape
    list: unlike a conv stem's first convolution, the (p1 p2 c)-ordered LayerNorm and Linear are not adapted."""
    norm = state_dict.get("to_patch_embedding.1.weight")
    embed = model.to_patch_embedding
    if norm is None or norm.dim() != 1 or int(norm.shape[0]) == embed.patch_dim:
        return
    n = int(norm.shape[0])
    p2 = embed.patch_size ** 2
    channels = f"{n // p2} input channels" if n % p2 == 0 else "another patch size"
    raise CheckpointMismatchError(
        f"{source} has a linear patch embedding over {n} = p·p·C patch values, the model "
        f"'{getattr(model, 'arch', 'CBT')}' over {embed.patch_dim} (patch_size {embed.patch_size}, in_chans "
        f"{embed.in_chans}); at patch_size {embed.patch_size} the weights would need {channels}. The linear "
        f"embedding cannot be adapted to another patch size or channel count: build the model with the weights' "
        f"patch_size and in_chans")


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """The family's pretrained config: the release's ImageNet evaluation, torchvision's default bilinear
    Resize(256) + CenterCrop(224) with ImageNet mean/std (docs/authors-release.md §1.1.4)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": FIRST_CONV,
        "classifier": CLASSIFIER,
        "license": "mit",
        "paper_ids": "arXiv:2509.16875",
        "paper_name": "Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few",
        "origin_url": "https://github.com/QishuaiWen/CBSA",
        **kwargs,
    }


# The original CRATE's metadata; its evaluation is the same torchvision pipeline (CRATE's main.py: Resize(256),
# CenterCrop(224), ImageNet mean/std, bilinear), which _cfg already describes.
_CRATE_META = dict(
    first_conv=FIRST_LINEAR,
    paper_ids="arXiv:2306.01129",
    paper_name="White-Box Transformers via Sparse Rate Reduction",
    origin_url="https://github.com/Ma-Lab-Berkeley/CRATE",
)


def _default_cfgs() -> Dict[str, Dict[str, Any]]:
    cfgs = {}
    for name, config in MODEL_CONFIGS.items():
        minimum = min_input_size(config)
        if config.get("patch_embed") == "linear":
            if name in CRATE_RELEASED_WEIGHTS:
                cfgs[f"{name}.crate_in1k"] = _cfg(
                    min_input_size=minimum, **_CRATE_META,
                    notes=("CRATE's ImageNet-1K CRATE-S checkpoint (Google Drive link in CRATE's README); nothing "
                           "downloads: fetch it and pass pretrained_cfg_overlay=dict(file=PATH).",))
            else:
                cfgs[name] = _cfg(min_input_size=minimum, **_CRATE_META)
        elif name in RELEASE_WEIGHTS:
            cfgs[f"{name}.authors_in1k"] = _cfg(
                min_input_size=minimum,
                notes=("The release's ImageNet-1K checkpoint (Google Drive link in its README model zoo); nothing "
                       "downloads: fetch it and pass pretrained_cfg_overlay=dict(file=PATH).",))
        else:
            cfgs[name] = _cfg(min_input_size=minimum)
    return cfgs


default_cfgs = generate_default_cfgs(_default_cfgs())

_WEIGHT_SOURCES = ("file", "state_dict", "url", "hf_hub_id")


def _create_cbt(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``variant`` through timm's ``build_model_with_cfg`` (pretrained configs, ``features_only``,
    pretrained weights); the one builder behind the timm entrypoints and :func:`cbsa_core.create_model`."""
    out_indices = kwargs.pop("out_indices", 3)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if kwargs.get("image_size") is not None:   # the release's name; timm reads the input size from img_size
        kwargs.setdefault("img_size", kwargs["image_size"])    # (the constructor refuses the two if they differ)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
        if not any(cfg.get(k) for k in _WEIGHT_SOURCES):
            raise ValueError(
                f"{variant}: pretrained=True needs a local weights file, e.g. timm.create_model('{variant}', "
                f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')); nothing is "
                f"downloaded")
        if cfg.get("file") and cfg.get("source") != "local-dir":   # from the overlay or a given pretrained_cfg
            # A file may be the release's wrapper, whose format decides the token layout: read it whole
            # (CBT.load_pretrained) rather than through timm's generic unwrapping.
            overlay.setdefault("custom_load", True)
    model = build_model_with_cfg(
        partial(_construct, variant), variant, pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(MODEL_CONFIGS[variant], **kwargs),
    )
    return model


def _construct(variant: str, **kwargs: Any) -> CBT:
    model = CBT(**kwargs)
    model.arch = variant   # before any pretrained weights load: their recorded arch is checked against it
    return model


@register_model
def cbt_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT-T (the authors' ``Ours_tiny``): CBSA, dim 192, 12 layers, 3 heads."""
    return _create_cbt("cbt_tiny", pretrained, **kwargs)


@register_model
def cbt_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT-S (``Ours_small``): CBSA, dim 384, 12 layers, 6 heads."""
    return _create_cbt("cbt_small", pretrained, **kwargs)


@register_model
def cbt_base(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT-B (``Ours_base``): CBSA, dim 768, 12 layers, 12 heads."""
    return _create_cbt("cbt_base", pretrained, **kwargs)


@register_model
def cbt_large(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT-L (``Ours_large``): CBSA, dim 1024, 24 layers, 16 heads."""
    return _create_cbt("cbt_large", pretrained, **kwargs)


@register_model
def cbt_dagger_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT†-T: CBSA with the output projected back through the basis W_U (tied), dim 192."""
    return _create_cbt("cbt_dagger_tiny", pretrained, **kwargs)


@register_model
def cbt_dagger_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """CBT†-S: tied-projection CBSA, dim 384."""
    return _create_cbt("cbt_dagger_small", pretrained, **kwargs)


@register_model
def mssa_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The release's ``CRATE_tiny``: MSSA (CRATE's softmax attention) in the CBT frame, dim 192."""
    return _create_cbt("mssa_tiny", pretrained, **kwargs)


@register_model
def mssa_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The release's ``CRATE_small``: MSSA in the CBT frame, dim 384."""
    return _create_cbt("mssa_small", pretrained, **kwargs)


@register_model
def tssa_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The release's ``ToST_tiny``: TSSA (ToST's channel attention) in the CBT frame, dim 192."""
    return _create_cbt("tssa_tiny", pretrained, **kwargs)


@register_model
def tssa_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The release's ``ToST_small``: TSSA in the CBT frame, dim 384."""
    return _create_cbt("tssa_small", pretrained, **kwargs)


@register_model
def agent_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """Agent attention (CBSA without contraction) in the CBT frame, dim 192."""
    return _create_cbt("agent_tiny", pretrained, **kwargs)


@register_model
def agent_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """Agent attention in the CBT frame, dim 384."""
    return _create_cbt("agent_small", pretrained, **kwargs)


@register_model
def crate_cbt_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """MSSA in layers 1-6 and CBSA in layers 7-12, dim 384 (emergent segmentation, paper Tables 5 and 6)."""
    return _create_cbt("crate_cbt_small", pretrained, **kwargs)


@register_model
def crate_original_tiny(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The original CRATE-T (CRATE's ``CRATE_tiny``): linear patch embedding, MSSA, dim 384, 12 layers, 6 heads."""
    return _create_cbt("crate_original_tiny", pretrained, **kwargs)


@register_model
def crate_original_small(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The original CRATE-S (CRATE's ``CRATE_small``, the release's ``CRATE_small_Yu``): dim 576, 12 layers,
    12 heads of width 48."""
    return _create_cbt("crate_original_small", pretrained, **kwargs)


@register_model
def crate_original_base(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The original CRATE-B (CRATE's ``CRATE_base``, Table 3): dim 768, 12 layers, 12 heads."""
    return _create_cbt("crate_original_base", pretrained, **kwargs)


@register_model
def crate_original_large(pretrained: bool = False, **kwargs: Any) -> CBT:
    """The original CRATE-L (CRATE's ``CRATE_large``, Table 3): dim 1024, 24 layers, 16 heads."""
    return _create_cbt("crate_original_large", pretrained, **kwargs)
