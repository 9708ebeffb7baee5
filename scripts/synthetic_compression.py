#!/usr/bin/env python
"""Synthetic compression experiment (paper Fig. 4): noisy points on 10 lines through the origin in
R³ collapse onto the lines under the parameter-free linear-attention form of CBSA.

Data: 10 unit directions u_j, drawn at random (seeded) with every pair at least ``--min-angle`` degrees
apart (as lines, i.e. |cos| ≤ cos(min-angle)); class j has ``--points`` points t·u_j + σ·g with
t ~ N(0, 1) and g ~ N(0, I₃). Defaults: 50 points per class, σ = ``--noise`` = 0.2.

Update (per class separately, U = I, so the "head" is all of R³): paper Eq. 12, the linear-attention form
with principal-direction representatives,
    F(Z) = Z (I + ZᵀZ/ε²)⁻¹ = Z L (I + Σ²/ε²)⁻¹ Lᵀ       (``linear_attention_form``; rows are points)
    Z ← Z − step · F(Z)
with ε = ``--eps`` = 1 and step = ``--step`` = 0.005. F shrinks each principal direction by
ε²/(ε² + σ_i²): the low-variance (noise) directions are shrunk by up to ``step`` per iteration, the line's
own direction (σ₁² ≈ N) barely, so the points collapse onto their lines. The minus sign is the one that
compresses: F(Z) = ε²·∇_Z R(Z) for the coding rate R(Z) = ½ logdet(I + ZᵀZ/ε²) (Eq. 1 with
d/(Nε_R²) = 1/ε²), so the update is gradient descent on the coding rate; the plus sign expands.
``--operator principal`` runs the same step through the general formula instead
(``cbsa_step(A = R, Q = ΣLᵀ, contraction='exact')`` with the SVD representatives), which is identical.

Measured: the coding rate Σ_j R(Z_j) (ε as above) and R of all points together at every iteration; the
subspace-fit residual Σ_j (σ₂² + σ₃²)(Z_j) / Σ_j ‖Z_j‖²_F, i.e. the mean squared distance of the points
to their class's best-fit line through the origin relative to their mean squared norm; the |cos| between
each class's final principal direction and its generating direction; the smallest angle between the
final class directions.

Outputs (``--out``): ``snapshots.png`` (3-D scatter at iterations 0, 1, 256, 512, 640, 768, 896, 1024),
``coding_rate.png`` (rate and residual against iteration), ``synthetic_compression.json`` (config and
measurements), ``curve.csv`` (per iteration) and ``snapshots.npz`` (points at each snapshot, labels,
generating directions).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (output_dir, plt, run_script, script_parser, torch_threads, write_csv,  # noqa: E402
                     write_json)

from cbsa_core.layers.special_cases import cbsa_step, linear_attention_form, principal_representatives  # noqa: E402

__all__ = ["SNAPSHOTS", "make_lines", "compression_step", "subspace_residual", "coding_rate_sum", "main"]

SNAPSHOTS = (0, 1, 256, 512, 640, 768, 896, 1024)


def make_lines(classes: int, points: int, noise: float, min_angle: float, seed: int):
    """Directions (classes, 3) and points (classes, points, 3), float64, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    max_cos = math.cos(math.radians(min_angle))
    dirs: List[torch.Tensor] = []
    for _ in range(100000):
        v = torch.randn(3, generator=g, dtype=torch.float64)
        v = v / v.norm()
        if all(abs(float(v @ u)) <= max_cos for u in dirs):
            dirs.append(v)
            if len(dirs) == classes:
                break
    else:
        raise ValueError(f"could not place {classes} lines at least {min_angle} degrees apart; lower --min-angle")
    directions = torch.stack(dirs)
    t = torch.randn(classes, points, 1, generator=g, dtype=torch.float64)
    z = t * directions[:, None, :] + noise * torch.randn(classes, points, 3, generator=g, dtype=torch.float64)
    return directions, z


def compression_step(z: torch.Tensor, step: float, eps: float, operator: str = "linear") -> torch.Tensor:
    """One iteration Z ← Z − step·Z(I + ZᵀZ/ε²)⁻¹ for every class at once; z (classes, N, 3)."""
    if operator == "linear":
        update = linear_attention_form(z, eps)
    elif operator == "principal":
        coeffs, reps = principal_representatives(z)
        update = cbsa_step(coeffs, reps, contraction="exact", eps=eps)
    else:
        raise ValueError(f"operator must be 'linear' or 'principal', got {operator!r}")
    return z - step * update


def subspace_residual(z: torch.Tensor) -> float:
    """Σ_j (σ₂² + σ₃²) / Σ_j ‖Z_j‖²: squared distance to each class's best line through 0, relative."""
    s = torch.linalg.svdvals(z)
    return float((s[:, 1:] ** 2).sum() / (s ** 2).sum())


def coding_rate_sum(z: torch.Tensor, eps: float) -> float:
    """Σ_j ½ logdet(I + Z_jᵀZ_j/ε²): the rate the update descends."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype)
    return float(0.5 * torch.logdet(eye + z.transpose(-1, -2) @ z / eps ** 2).sum())


def principal_directions(z: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(z, full_matrices=False)[2][:, 0]  # (classes, 3)


def min_line_angle(directions: torch.Tensor) -> float:
    """Smallest angle (degrees) between two of the lines."""
    cos = (directions @ directions.T).abs().clamp(max=1.0)
    cos.fill_diagonal_(0.0)
    return math.degrees(math.acos(float(cos.max())))


def plot_snapshots(snaps: Dict[int, np.ndarray], path: Path) -> None:
    pyplot = plt()
    fig = pyplot.figure(figsize=(14, 7))
    colors = pyplot.get_cmap("tab10")
    for k, (it, z) in enumerate(snaps.items()):
        ax = fig.add_subplot(2, (len(snaps) + 1) // 2, k + 1, projection="3d")
        for j in range(z.shape[0]):
            ax.scatter(z[j, :, 0], z[j, :, 1], z[j, :, 2], s=4, color=colors(j % 10), depthshade=False)
        lim = float(np.abs(z).max()) or 1.0
        for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            set_lim(-lim, lim)
        ax.set_title(f"iteration {it}", fontsize=9)
        ax.tick_params(labelsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def plot_curve(curve: List[Dict[str, float]], path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.4))
    it = [c["iteration"] for c in curve]
    axes[0].plot(it, [c["coding_rate_classes"] for c in curve], label="Σ_j R(Z_j) (per class)")
    axes[0].plot(it, [c["coding_rate_all"] for c in curve], label="R(Z) (all points)")
    axes[0].set_ylabel("coding rate")
    axes[0].legend(fontsize=7)
    axes[1].semilogy(it, [c["residual"] for c in curve])
    axes[1].set_ylabel("subspace-fit residual (relative)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--classes", type=int, default=10, help="number of lines (default: %(default)s)")
    parser.add_argument("--points", type=int, default=50, help="points per class (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=0.2, help="isotropic noise std σ (default: %(default)s)")
    parser.add_argument("--min-angle", type=float, default=25.0,
                        help="smallest angle between two generating lines, degrees (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=1.0, help="ε of the linear-attention form (default: %(default)s)")
    parser.add_argument("--step", type=float, default=0.005, help="step size (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--operator", choices=("linear", "principal"), default="linear",
                        help="Eq. 12 closed form or the general CBSA step with SVD representatives "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out", default="runs/synthetic_compression", help="output folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = output_dir(args.out)
    directions, z = make_lines(args.classes, args.points, args.noise, args.min_angle, args.seed)
    snapshot_at = sorted({s for s in SNAPSHOTS if s <= args.iterations} | {args.iterations})
    snaps: Dict[int, np.ndarray] = {}
    curve: List[Dict[str, float]] = []
    with torch_threads(1):
        for it in range(args.iterations + 1):
            if it:
                z = compression_step(z, args.step, args.eps, args.operator)
            curve.append(dict(iteration=it, coding_rate_classes=coding_rate_sum(z, args.eps),
                              coding_rate_all=coding_rate_sum(z.reshape(1, -1, 3), args.eps),
                              residual=subspace_residual(z)))
            if it in snapshot_at:
                snaps[it] = z.numpy().copy()

    final_dirs = principal_directions(z)
    cos = (final_dirs * directions).sum(-1).abs()
    r0, r1 = curve[0]["residual"], curve[-1]["residual"]
    rates = [c["coding_rate_classes"] for c in curve]
    result = dict(
        config=dict(classes=args.classes, points_per_class=args.points, noise=args.noise, eps=args.eps, step=args.step,
                    iterations=args.iterations, operator=args.operator, seed=args.seed, min_angle=args.min_angle,
                    update="Z <- Z - step * Z (I + Z^T Z / eps^2)^-1, per class, U = I"),
        residual_initial=r0, residual_final=r1, residual_ratio=r0 / r1 if r1 > 0 else float("inf"),
        coding_rate_initial=rates[0], coding_rate_final=rates[-1],
        coding_rate_monotone=bool(all(b <= a + 1e-9 for a, b in zip(rates, rates[1:]))),
        direction_abs_cos=cos.tolist(), direction_abs_cos_min=float(cos.min()),
        min_angle_generating_deg=min_line_angle(directions), min_angle_final_deg=min_line_angle(final_dirs),
        mean_norm_initial=float(np.linalg.norm(snaps[0], axis=-1).mean()),
        mean_norm_final=float(z.norm(dim=-1).mean()),
        snapshots=list(snaps),
    )
    np.savez_compressed(out / "snapshots.npz", directions=directions.numpy(), iterations=np.array(list(snaps)),
                        labels=np.repeat(np.arange(args.classes), args.points),
                        **{f"iter_{it}": v for it, v in snaps.items()})
    write_csv(out / "curve.csv", curve)
    write_json(out / "synthetic_compression.json", result)
    plot_snapshots(snaps, out / "snapshots.png")
    plot_curve(curve, out / "coding_rate.png")
    print(f"residual {r0:.4g} -> {r1:.4g} ({result['residual_ratio']:.3g}x), coding rate {rates[0]:.2f} -> "
          f"{rates[-1]:.2f}, min |cos| to the generating lines {result['direction_abs_cos_min']:.5f}, "
          f"min angle between final lines {result['min_angle_final_deg']:.1f} deg")
    return dict(out=out, result=result, curve=curve, snapshots=snaps)


if __name__ == "__main__":
    sys.exit(run_script(main))
