#!/usr/bin/env python
"""Parameters and GFLOPs of every registered model, next to the paper's Table 3 where it has a value.

For each canonical model (``cbsa_core.list_models()`` without the aliases) at one image size:

* params: exact count of parameters (buffers such as BatchNorm statistics excluded);
* GFLOPs (paper): ``cbsa_core.flops.analytic_flops``, the paper's convention (2 × multiply-accumulates, ISTA counted
  as two d×d products; docs/REPRODUCING.md, docs/authors-release.md item 22), and ``layers``, the same for the
  transformer layers alone (no patch embedding, no classifier): the scope of the CRATE-B/L numbers the paper cites
  from CRATE;
* GFLOPs (measured): ``cbsa_core.flops.measured_flops``, what torch's FlopCounterMode counts on the ops
  that actually run for one image (the folded CBSA output projection, and the fused ISTA whose d×d×d
  matrix product is paid once per call, so batch 1 is its worst case);
* the paper's params (M) / GFLOPs for CBT-T/S/B/L and CRATE-B/L (224², 1000 classes) and our relative
  deviation (of the whole model; a note under the table gives the CRATE rows' deviation of ``layers``).

    python scripts/model_table.py                                  # all models, 224², 1000 classes
    python scripts/model_table.py --models cbt_tiny cbt_small --csv table.csv
    python scripts/model_table.py --models crate_original_base crate_original_large     # Table 3's CRATE columns

The measured column runs one real forward per model (about 20 s for all of them on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from cbsa_core import create_model, list_models
from cbsa_core.flops import PAPER_CLASSIFICATION, analytic_flops, count_parameters, measured_flops
from cbsa_core.registry import ALIASES, MODEL_CONFIGS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_script, write_csv  # noqa: E402

FIELDS = ["model", "attention", "params", "gflops_paper_convention", "gflops_layers", "gflops_measured",
          "paper_params_m", "params_deviation", "paper_gflops", "gflops_deviation"]


# The original CRATE models (linear patch embedding), whose Table 3 numbers the paper cites from CRATE.
CRATE_MODELS = tuple(n for n, cfg in MODEL_CONFIGS.items() if cfg.get("patch_embed") == "linear")


def canonical_models() -> List[str]:
    """Registered names without the authors' aliases, in registry order (CBT-T/S/B/L first)."""
    return list(MODEL_CONFIGS)


def describe_attention(attn: Any) -> str:
    """'cbsa', or a run-length summary of a per-layer list such as 'mssa*6+cbsa*6'."""
    if isinstance(attn, str):
        return attn
    runs: List[List[Any]] = []
    for kind in attn:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return "+".join(f"{kind}*{count}" for kind, count in runs)


def _deviation(ours: float, paper: Optional[float]) -> Optional[float]:
    return None if paper is None else (ours - paper) / paper


def model_row(name: str, image_size: int = 224, num_classes: int = 1000, device: str = "cpu") -> Dict[str, Any]:
    """One table row; paper values only where the paper reports this model at 224² with 1000 classes."""
    with torch.device(device):
        model = create_model(name, num_classes=num_classes, image_size=image_size)
    params = count_parameters(model)
    analytic = analytic_flops(model, image_size)
    gflops, layers = analytic["total"] / 1e9, analytic["layers"] / 1e9
    measured = measured_flops(model, image_size, in_chans=model.model_config["in_chans"]) / 1e9
    canonical = ALIASES.get(name, name)
    paper = PAPER_CLASSIFICATION.get(canonical) if (image_size, num_classes) == (224, 1000) else None
    paper_params, paper_gflops = paper if paper else (None, None)
    return dict(model=name, attention=describe_attention(model.model_config["attn"]), params=params,
                gflops_paper_convention=gflops, gflops_layers=layers, gflops_measured=measured,
                paper_params_m=paper_params,
                params_deviation=_deviation(params / 1e6, paper_params), paper_gflops=paper_gflops,
                gflops_deviation=_deviation(gflops, paper_gflops))


def format_table(rows: List[Dict[str, Any]]) -> str:
    def num(v: Optional[float], fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (f"{'model':<20} {'attention':<14} {'params':>12} {'GFLOPs':>8} {'layers':>8} {'measured':>9} "
              f"{'paper M':>8} {'dev':>7} {'paper G':>8} {'dev':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<20} {r['attention']:<14} {r['params']:>12,} {r['gflops_paper_convention']:>8.3f} "
            f"{r['gflops_layers']:>8.3f} {r['gflops_measured']:>9.3f} {num(r['paper_params_m'], '.1f'):>8} "
            f"{num(r['params_deviation'], '+.1%'):>7} "
            f"{num(r['paper_gflops'], '.1f'):>8} {num(r['gflops_deviation'], '+.1%'):>7}")
    cited = [r for r in rows if r["paper_gflops"] is not None and ALIASES.get(r["model"], r["model"]) in CRATE_MODELS]
    if cited:
        pairs = [f"{r['model']} {r['gflops_layers']:.3f} vs {r['paper_gflops']:.1f} "
                 f"({_deviation(r['gflops_layers'], r['paper_gflops']):+.1%})" for r in cited]
        lines.append("The paper's CRATE GFLOPs, cited from CRATE, are closest to the transformer layers alone (column "
                     "'layers': no patch embedding, no classifier): " + ", ".join(pairs))
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"models to tabulate (default: all canonical models: {', '.join(canonical_models())}); "
                        f"the authors' aliases (Ours_small, ...) are accepted too")
    p.add_argument("--image-size", type=int, default=224, help="square input size (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the measured forward runs (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, metavar="PATH", help="also write the table as CSV")
    args = p.parse_args(argv)
    valid = set(list_models())
    unknown = [m for m in args.models or [] if m not in valid]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; valid names: {', '.join(sorted(valid))}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    names = args.models or canonical_models()
    rows = [model_row(n, args.image_size, args.num_classes, args.device) for n in names]
    print(f"image {args.image_size}x{args.image_size}, {args.num_classes} classes; GFLOPs = 2 x multiply-accumulates "
          f"(paper convention: analytic, ISTA as two d x d products, 'layers' without patch embedding and classifier; "
          f"measured: FlopCounterMode on the ops that run)")
    print(format_table(rows))
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(args.csv, rows, FIELDS)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
