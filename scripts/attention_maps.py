#!/usr/bin/env python
"""Class-token attention maps per layer and head (paper Fig. 7), overlaid on the input image.

* CBT models (this project's checkpoints, the authors' release, or random weights): the [CLS] row of the
  paper's attention estimate AᵀA (A_k A_kᵀ in the paper's column notation, the map its Fig. 7 shows), from
  ``model.attention_maps(img)``. Layers that are not CBSA (MSSA in the CRATE+CBT hybrid, TSSA) give their
  own map (softmax attention for MSSA, the release's ``return_attn`` for TSSA).
* timm ViTs (``--timm vit_small_patch16_224``; random weights or a local file): the [CLS] row of the
  softmax attention softmax(q kᵀ/√p), recomputed from each block's ``attn.qkv`` (and ``q_norm``/``k_norm``)
  in a forward pre-hook, so timm's fused kernel, which never materialises the matrix, does not matter.

Any image size works, non-square included: CBT resamples its position embedding to the token grid, timm
models are built with ``dynamic_img_size=True``.

What is saved (``--out``):
    ``<image>.png``           grid of overlays, one row per layer; column 0 is the mean over heads, then heads
    ``cls_maps.npz``          ``<image>``: (L, H, h, w) float32, the CLS row restricted to the patch tokens
                              (the CLS column and any other prefix tokens excluded), reshaped to the grid
    ``attention_maps.json``   per image: input size, grid, and per layer and head ``row_sum`` (sum of the
                              full CLS row, prefix columns included), ``cls_self`` (the CLS column) and
                              ``patch_mass`` (sum over the patch columns = sum of the saved map)

Row sums: for softmax attention (timm, MSSA) every row sums to 1. For CBSA, row t of AᵀA sums to
Σ_j A[j, t], the total extraction weight token t receives from the m representatives (A's rows, one per
representative, sum to 1 over the tokens), so a CBSA row sum is not 1.

Example::

    python scripts/attention_maps.py --arch cbt_small --checkpoint cbt_small_best.pth.tar --images chelsea
    python scripts/attention_maps.py --timm vit_tiny_patch16_224 --images coffee --image-size 224 336
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_image_args, add_model_args, build_model, fit_size, load_rgb,  # noqa: E402
                     model_label, output_dir, overlay, parse_overrides, plt, resize_rgb, run_script, script_parser,
                     to_tensor, write_json)

import cbsa_core  # noqa: E402
from cbsa_core.checkpoint import check_state_dict, extract_state_dict, read_checkpoint  # noqa: E402

__all__ = ["cbt_class_token_maps", "timm_class_token_maps", "class_token_maps", "build_timm_vit", "model_input",
           "build_map_model", "main"]


# ---------------------------------------------------------------------------------------------------
# map extraction
@torch.no_grad()
def cbt_class_token_maps(model: nn.Module, img: torch.Tensor) -> Dict[str, Any]:
    """CLS rows of a CBT's per-layer attention estimates.

    img (B, C, H, W) -> dict(maps (B, L, heads, h, w), row_sum (B, L, heads), cls_self (B, L, heads), grid).
    The model has one prefix token ([CLS], index 0), so the patch columns are 1 .. h·w.
    """
    maps, grid = model.attention_maps(img)
    rows = torch.stack([m[:, :, 0, :] for m in maps], dim=1).double()  # (B, L, heads, T)
    return _split_row(rows, num_prefix=1, grid=grid)


class _ClsRowRecorder:
    """Forward pre-hook on a timm ``Attention``: recompute the CLS query's softmax row from qkv."""

    def __init__(self) -> None:
        self.rows: List[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        b, n, _ = x.shape
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])  # (B, heads, N, p)
        logits = torch.matmul(q[:, :, :1] * module.scale, k.transpose(-1, -2))  # CLS query only: (B, heads, 1, N)
        self.rows.append(torch.softmax(logits.double(), dim=-1)[:, :, 0])


@torch.no_grad()
def timm_class_token_maps(model: nn.Module, img: torch.Tensor) -> Dict[str, Any]:
    """CLS rows of the softmax attention of every block of a timm VisionTransformer (same output as
    :func:`cbt_class_token_maps`). Register tokens, if any, count as prefix tokens and are excluded."""
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"{type(model).__name__} has no class token; class-token maps need one")
    from timm.layers import Attention

    recorder = _ClsRowRecorder()
    hooks = []
    for i, blk in enumerate(model.blocks):
        # Only timm's own softmax attention: a converted block (e.g. finetune_vit's CBSA variants) keeps the
        # qkv weights but does not compute this matrix, so its "softmax map" would be fiction.
        if not isinstance(blk.attn, Attention) or getattr(blk.attn, "gate", None) is not None:
            raise ValueError(f"block {i} attention is {type(blk.attn).__name__}, not timm's softmax Attention; "
                             f"its softmax map cannot be recomputed")
        hooks.append(blk.attn.register_forward_pre_hook(recorder))
    try:
        model.forward_features(img)
    finally:
        for h in hooks:
            h.remove()
    grid = tuple(model.patch_embed.dynamic_feat_size(img.shape[-2:])) if getattr(model, "dynamic_img_size", False) \
        else tuple(model.patch_embed.grid_size)
    rows = torch.stack(recorder.rows, dim=1)  # (B, L, heads, N)
    return _split_row(rows, num_prefix=model.num_prefix_tokens, grid=grid)


def _split_row(rows: torch.Tensor, num_prefix: int, grid) -> Dict[str, Any]:
    h, w = int(grid[0]), int(grid[1])
    if rows.shape[-1] != num_prefix + h * w:
        raise ValueError(f"attention rows have {rows.shape[-1]} columns, expected {num_prefix} + {h}x{w}")
    patch = rows[..., num_prefix:]
    return dict(maps=patch.reshape(*patch.shape[:-1], h, w), row_sum=rows.sum(-1), cls_self=rows[..., 0],
                grid=(h, w))


def class_token_maps(model: nn.Module, img: torch.Tensor) -> Dict[str, Any]:
    """Dispatch on the model family: a ``cbsa_core.CBT`` or a timm ViT."""
    if isinstance(model, cbsa_core.CBT):
        return cbt_class_token_maps(model, img)
    return timm_class_token_maps(model, img)


# ---------------------------------------------------------------------------------------------------
# models
def build_timm_vit(name: str, checkpoint: Optional[str] = None,
                   overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, dynamic_img_size=True)``; weights from a local file
    (a timm/augreg ``.npz``, a ``.safetensors``, or a torch checkpoint, ``module.`` prefixes stripped)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(name, pretrained=False, dynamic_img_size=True, **(overrides or {}))
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
        if path.suffix == ".npz":
            model.load_pretrained(str(path))
        else:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state_dict = load_file(str(path))
            else:
                state_dict = extract_state_dict(read_checkpoint(path))
            state_dict = checkpoint_filter_fn(state_dict, model)  # resamples pos_embed to this model's grid
            check_state_dict(model, state_dict, source=f"checkpoint {checkpoint}")
            model.load_state_dict(state_dict)
    return model.eval()


def build_map_model(arch: Optional[str], checkpoint: Optional[str], timm_name: Optional[str],
                    overrides: Dict[str, Any]) -> nn.Module:
    if timm_name:
        if arch:
            raise ValueError("give either --arch (a CBT) or --timm (a timm ViT), not both")
        return build_timm_vit(timm_name, checkpoint, overrides)
    return build_model(arch, checkpoint, overrides)


def model_input(model: nn.Module, rgb: np.ndarray, image_size: Sequence[int]) -> tuple:
    """Resize an RGB image for ``model`` and normalise it: returns (img (1, C, H, W), resized rgb)."""
    if isinstance(model, cbsa_core.CBT):
        patch, in_chans = model.patch_size, model.model_config["in_chans"]
        mean = std = None
    else:
        patch, in_chans = model.patch_embed.patch_size[0], 3
        mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    size = fit_size(rgb.shape[0], rgb.shape[1], image_size, patch)
    resized = resize_rgb(rgb, size)
    kwargs = {} if mean is None else dict(mean=mean, std=std)
    return to_tensor(resized, in_chans=in_chans, **kwargs).unsqueeze(0), resized


# ---------------------------------------------------------------------------------------------------
def plot_grid(rgb: np.ndarray, maps: np.ndarray, path: Path, title: str, max_heads: int = 16) -> None:
    """maps (L, heads, h, w): rows are layers; column 0 is the head mean, then one column per head."""
    pyplot = plt()
    layers, heads = maps.shape[:2]
    heads = min(heads, max_heads)
    cell = 1.3
    aspect = rgb.shape[0] / rgb.shape[1]
    fig, axes = pyplot.subplots(layers, heads + 1, figsize=(cell * (heads + 1), cell * layers * aspect + 0.6),
                                squeeze=False)
    for li in range(layers):
        overlay(axes[li, 0], rgb, maps[li].mean(0), f"L{li + 1} mean")
        for hi in range(heads):
            overlay(axes[li, hi + 1], rgb, maps[li, hi], f"L{li + 1} h{hi + 1}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--timm", default=None, metavar="NAME",
                        help="a timm ViT instead of a CBT, e.g. vit_small_patch16_224 (--checkpoint: local weights)")
    add_image_args(parser, default=["astronaut", "chelsea", "coffee"], size_default=[224])
    parser.add_argument("--out", default="runs/attention_maps", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.timm and not args.arch and not args.checkpoint:
        args.arch = "cbt_small"
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = output_dir(args.out)
    model = build_map_model(args.arch, args.checkpoint, args.timm, parse_overrides(args.overrides))
    label = args.timm or model_label(args.arch or getattr(model, "arch", None), args.checkpoint)
    kind = "timm softmax attention" if args.timm else "CBT attention estimate (AᵀA for CBSA layers)"

    summary: Dict[str, Any] = dict(model=label, map=kind, images={})
    arrays: Dict[str, np.ndarray] = {}
    for name in args.images:
        img, rgb = model_input(model, load_rgb(name), args.image_size)
        res = class_token_maps(model, img)
        key = Path(name).stem
        maps = res["maps"][0].float().numpy()  # (L, heads, h, w)
        arrays[key] = maps
        layers = []
        for li in range(maps.shape[0]):
            layers.append(dict(
                layer=li + 1,
                row_sum=res["row_sum"][0, li].tolist(),
                cls_self=res["cls_self"][0, li].tolist(),
                patch_mass=res["maps"][0, li].sum((-1, -2)).tolist(),
            ))
        summary["images"][key] = dict(source=name, input_size=list(img.shape[-2:]), grid=list(res["grid"]),
                                      layers=layers, plot=f"{key}.png")
        plot_grid(rgb, maps, out / f"{key}.png", f"{label}: [CLS] attention, {key} {img.shape[-2]}x{img.shape[-1]}")
        print(f"{key}: {img.shape[-2]}x{img.shape[-1]} input, grid {res['grid']}, {maps.shape[0]} layers x "
              f"{maps.shape[1]} heads -> {out / (key + '.png')}")
    np.savez_compressed(out / "cls_maps.npz", **arrays)
    write_json(out / "attention_maps.json", summary)
    return dict(out=out, summary=summary, maps=arrays)


if __name__ == "__main__":
    sys.exit(run_script(main))
