#!/usr/bin/env python
"""Decoder parameters and GFLOPs of every segmentation decoder for ViT-T/S/B/L, next to Fig. 8 left.

For each size (encoder width D = 192 / 384 / 768 / 1024, 150 classes) and each decoder at its released
settings (``semantic_segmentation.decoders``): CBT, CBT†, Segmenter's mask transformer and linear decoder,
DEPICT-SA and -CA, and the ToST (TSSA) decoder, on a 512² crop (a 32×32 patch grid), plus Segmenter-L on
640² (the crop of the released Seg-L-Mask/16):

* params: exact parameter count of the decoder;
* GFLOPs: ``semantic_segmentation.flops.decoder_flops``, the paper's convention (2 × multiply-accumulates of
  the matrix products, analytic, decoder only): everything from the encoder tokens to the masks;
* layers: the same count for the attention / transformer layers alone (without ``proj_dec``, Segmenter's class
  projections, the mask product or the linear head). The paper's Segmenter values (4.1 / 12.5 / 41.6 / 113)
  match this column, so it appears to count Segmenter's blocks only;
* measured (``--measured``): what torch's FlopCounterMode counts on one forward of the decoder (math SDPA);
  CBSA's folded output projection makes CBT's count differ from the analytic one;
* paper (digitised): values read off Fig. 8 left; CBT's values are the authors' README's exact ones. The paper
  does not say which DEPICT variant it plots; its values are shown on the DEPICT-SA rows.

The ToST decoder has 3 heads like CBT's; TSSA splits D into heads, and 1024 does not divide by 3, so its L row
uses 4 heads. ToST is not in Fig. 8 left (only in the robustness plots).

    python scripts/decoder_flops.py                     # the whole table (about 2 s)
    python scripts/decoder_flops.py --sizes T S --measured --csv decoder_flops.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import write_csv  # noqa: E402

from semantic_segmentation.decoders import build_decoder  # noqa: E402
from semantic_segmentation.flops import PAPER_DECODER_GFLOPS, decoder_flops  # noqa: E402

SIZES = {"T": 192, "S": 384, "B": 768, "L": 1024}
# (label, decoder config) at its released settings.
DECODER_ROWS = [
    ("cbt", dict(name="mask_transformer")),
    ("cbt_dagger", dict(name="mask_transformer", tied_output=True)),
    ("segmenter_mask_transformer", dict(name="segmenter_mask_transformer")),
    ("segmenter_linear", dict(name="linear")),
    ("depict_sa", dict(name="depict_sa")),
    ("depict_ca", dict(name="depict_ca")),
    ("tssa", dict(name="tssa")),
]
EXTRA_CROPS = {("segmenter_mask_transformer", "L"): 640}  # released crops other than 512
FIELDS = ["size", "decoder", "crop", "params", "gflops", "gflops_layers", "gflops_measured", "paper_gflops_digitised",
          "note"]
N_CLS, PATCH = 150, 16


def measured_decoder_flops(decoder: torch.nn.Module, d_encoder: int, grid: int) -> float:
    """FlopCounterMode's count for one forward of ``decoder`` on a grid×grid patch grid (2 per MAC)."""
    x = torch.zeros(1, grid * grid, d_encoder)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        decoder(x, (grid, grid))
    return float(counter.get_total_flops())


def table_rows(sizes: List[str], measured: bool = False) -> List[Dict[str, Any]]:
    rows = []
    for size in sizes:
        d = SIZES[size]
        for label, config in DECODER_ROWS:
            crops = [512] + ([EXTRA_CROPS[(label, size)]] if (label, size) in EXTRA_CROPS else [])
            for crop in crops:
                config_here, note = dict(config), ""
                if config["name"] == "tssa" and d % 3:
                    config_here["n_heads"], note = 4, "4 heads (1024 does not divide by 3)"
                torch.manual_seed(0)
                decoder = build_decoder(config_here, N_CLS, d).eval()
                grid = crop // PATCH
                paper = PAPER_DECODER_GFLOPS.get((label, size))
                if (label, size) in EXTRA_CROPS and crop != EXTRA_CROPS[(label, size)]:
                    paper = None  # the paper's value is for the released crop
                flops = decoder_flops(decoder, (grid, grid))
                rows.append(dict(
                    size=size, decoder=label, crop=crop, params=sum(p.numel() for p in decoder.parameters()),
                    gflops=flops["total"] / 1e9, gflops_layers=flops["layers"] / 1e9,
                    gflops_measured=measured_decoder_flops(decoder, d, grid) / 1e9 if measured else None,
                    paper_gflops_digitised=paper, note=note))
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    def num(v: Optional[float], fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (f"{'size':<4} {'decoder':<28} {'crop':>4} {'params':>11} {'GFLOPs':>8} {'layers':>7} {'measured':>9} "
              f"{'paper (digitised)':>17}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['size']:<4} {r['decoder']:<28} {r['crop']:>4} {r['params']:>11,} {r['gflops']:>8.2f} "
                     f"{r['gflops_layers']:>7.2f} {num(r['gflops_measured'], '.2f'):>9} "
                     f"{num(r['paper_gflops_digitised'], '.1f'):>17}  "
                     f"{r['note']}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="(default: all)")
    p.add_argument("--measured", action="store_true", help="also count FLOPs with FlopCounterMode (slower)")
    p.add_argument("--csv", type=Path, default=None, metavar="PATH", help="also write the table as CSV")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    rows = table_rows(args.sizes, args.measured)
    print(f"decoder only, {N_CLS} classes, patch {PATCH}; GFLOPs = 2 x multiply-accumulates (paper convention)")
    print(format_table(rows))
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(args.csv, rows, FIELDS)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
