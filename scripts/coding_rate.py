#!/usr/bin/env python
"""Coding-rate measurements of the paper's Figs. 5, 6 and 10: the per-layer compression term (Figs. 5 and 10)
and the coding-rate reduction by each CBSA layer and head (Fig. 6).

Compression term (Fig. 5): for every model and attention layer, R^c(Z|U) = Σ_k R(U_kᵀZ) of the layer's
projected tokens (``cbsa_core.coding_rate.layerwise_compression``: the ``qkv`` hook point of CBSA, the
projection of MSSA/TSSA), averaged over the images; "raw" as is and "normalised" with each projected
token scaled to unit norm per head first. R(P) = ½ logdet(I + p/(N ε²) PᵀP) with ε = ``--eps``
(0.1, i.e. the release's ε² = 0.01).

Reduction by CBSA (Fig. 6), per CBSA layer and head, on the layer's normalised input X (``forward_details``):
    tokens:           before = U_kᵀX (the projected tokens P_k, N = T rows: [CLS] and patches)
                      after  = P_k + κ·A_kᵀC_k with κ = 1
    representatives:  before = Q_k, the extracted representatives (Q0 + η·A P, m rows)
                      after  = C_k = softmax(Q_k Q_kᵀ/√p) Q_k, the contracted representatives
    reduction = R(before) − R(after), per image; the tables give mean and sample std over the images.
Sign convention: Eq. 6 writes the exact step as Z ← Z − κ·CBSA(Z); Eq. 8's softmax approximation flips
the sign, which the paper absorbs into κ (footnote 4), and the code adds ``step_x · AᵀC`` to the residual
stream. So with κ = 1 the "after" tokens are tokens + update in the code's convention, which is the
direction the layer moves them when κ > 0. ``reps_plus_contraction`` additionally reports R(Q + C), the
representatives moved by the same κ = 1 step, in case "contracted" is read that way.

Images: a square batch of bundled scikit-image photos (centre crop, ``--image-size``), ImageNet
normalisation. Outputs (``--out``): ``compression.csv`` (model, layer, raw, normalised),
``cbsa_reduction.csv`` (model, layer, head, means and stds), ``coding_rate.json``, ``compression.png``
(Fig. 5 style) and ``reduction_<model>.png`` (Fig. 6 style, error bars = std over images).

Example::

    python scripts/coding_rate.py --arch cbt_small mssa_small tssa_small --checkpoint a.pth b.pth c.pth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BUNDLED_GRAY, BUNDLED_RGB, add_model_args, build_model, image_batch, model_label,  # noqa: E402
                     model_specs, output_dir, parse_overrides, plt, run_script, script_parser, write_csv,
                     write_json)

from cbsa_core import CBSA  # noqa: E402
from cbsa_core.coding_rate import coding_rate, layerwise_compression  # noqa: E402

__all__ = ["cbsa_rate_reduction", "summarize_reduction", "main"]

QUANTITIES = ("tokens_before", "tokens_after", "reps_before", "reps_after", "reps_plus_contraction")


@torch.no_grad()
def cbsa_rate_reduction(model: torch.nn.Module, images: torch.Tensor,
                        eps: float = 0.1) -> Dict[int, Dict[str, np.ndarray]]:
    """Per CBSA layer (0-based index): coding rates (images, heads) of every quantity in ``QUANTITIES``."""
    out: Dict[int, Dict[str, np.ndarray]] = {}
    for li, inter in enumerate(model.forward_analysis(images)):
        layer = model.attention_layers[li]
        if not isinstance(layer, CBSA):
            continue
        d = layer.forward_details(inter["attn_input"], tuple(int(g) for g in inter["grid"]), step_x=1.0)
        quantities = dict(tokens_before=d["tokens"], tokens_after=d["tokens"] + d["update"],
                          reps_before=d["reps"], reps_after=d["contracted"],
                          reps_plus_contraction=d["reps"] + d["contracted"])
        out[li] = {k: coding_rate(v, eps).numpy() for k, v in quantities.items()}
    return out


def _mean_std(x: np.ndarray) -> tuple:
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def summarize_reduction(rates: Dict[int, Dict[str, np.ndarray]], label: str) -> List[Dict[str, Any]]:
    """Rows (model, layer, head) with mean/std over images of each rate and of both reductions."""
    rows = []
    for li, q in rates.items():
        for h in range(q["tokens_before"].shape[1]):
            row: Dict[str, Any] = dict(model=label, layer=li + 1, head=h + 1)
            series = {k: q[k][:, h] for k in QUANTITIES}
            series["tokens_reduction"] = q["tokens_before"][:, h] - q["tokens_after"][:, h]
            series["reps_reduction"] = q["reps_before"][:, h] - q["reps_after"][:, h]
            for k, v in series.items():
                row[f"{k}_mean"], row[f"{k}_std"] = _mean_std(v)
            rows.append(row)
    return rows


def plot_compression(rows: List[Dict[str, Any]], path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.5))
    for label in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == label]
        for ax, key in zip(axes, ("raw", "normalized")):
            ax.plot([r["layer"] for r in sel], [r[key] for r in sel], marker="o", label=label)
    for ax, title in zip(axes, ("R^c (raw)", "R^c (normalised tokens)")):
        ax.set_xlabel("layer")
        ax.set_ylabel("compression term")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def plot_reduction(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 3.6))
    heads = sorted({r["head"] for r in rows})
    width = 0.8 / max(len(heads), 1)
    for k, h in enumerate(heads):
        sel = [r for r in rows if r["head"] == h]
        x = np.array([r["layer"] for r in sel]) + (k - (len(heads) - 1) / 2) * width
        for ax, key in zip(axes, ("tokens_reduction", "reps_reduction")):
            ax.bar(x, [r[f"{key}_mean"] for r in sel], width, yerr=[r[f"{key}_std"] for r in sel],
                   capsize=1.5, label=f"head {h}")
    for ax, name in zip(axes, ("tokens: R(P) − R(P + AᵀC), κ = 1", "representatives: R(Q) − R(C)")):
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("layer")
        ax.set_ylabel("coding-rate reduction")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_args(parser, multiple=True)
    parser.add_argument("--images", nargs="+", default=list(BUNDLED_RGB + BUNDLED_GRAY[:4]),
                        help="bundled photo names and/or image paths (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="square input size (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=0.1, help="coding-rate precision ε (default: %(default)s)")
    parser.add_argument("--out", default="runs/coding_rate", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.arch and not args.checkpoint:
        args.arch = ["cbt_small"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = output_dir(args.out)
    overrides = parse_overrides(args.overrides)
    compression_rows: List[Dict[str, Any]] = []
    reduction_rows: List[Dict[str, Any]] = []
    for arch, checkpoint in model_specs(args.arch, args.checkpoint):
        model = build_model(arch, checkpoint, overrides)
        label = model_label(arch or model.arch, checkpoint)
        images, _ = image_batch(args.images, args.image_size, model.model_config["in_chans"])
        raw = layerwise_compression(model, images, eps=args.eps, normalize=False)
        normalized = layerwise_compression(model, images, eps=args.eps, normalize=True)
        compression_rows += [dict(model=label, layer=i + 1, raw=r, normalized=n)
                             for i, (r, n) in enumerate(zip(raw, normalized))]
        rows = summarize_reduction(cbsa_rate_reduction(model, images, args.eps), label)
        reduction_rows += rows
        if rows:
            slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace("@", "_").replace("/", "_")
            plot_reduction(rows, out / f"reduction_{slug}.png",
                           f"{label}: coding-rate reduction by CBSA (mean ± std over {len(images)} images)")
        print(f"{label}: R^c raw {['%.1f' % r for r in raw]}")
    write_csv(out / "compression.csv", compression_rows)
    if reduction_rows:
        write_csv(out / "cbsa_reduction.csv", reduction_rows)
    plot_compression(compression_rows, out / "compression.png")
    write_json(out / "coding_rate.json", dict(
        config=dict(images=args.images, image_size=args.image_size, eps=args.eps,
                    after_tokens="P + A^T C (kappa = 1)", after_reps="C = softmax(Q Q^T / sqrt(p)) Q",
                    std="sample std (ddof=1) over images"),
        compression=compression_rows, reduction=reduction_rows))
    return dict(out=out, compression=compression_rows, reduction=reduction_rows)


if __name__ == "__main__":
    sys.exit(run_script(main))
