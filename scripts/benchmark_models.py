#!/usr/bin/env python
"""Model throughput: CBT-T/S against timm ViT-T/S, training and inference images per second.

Every model is built at the benchmark's image size (CBT via ``cbsa_core.create_model(name,
image_size=S)``, ViT via ``timm.create_model('vit_*_patch16_224', img_size=S, pretrained=False)``), so
neither resamples position embeddings per forward. In one run and with the same batch:

* inference: ``model.eval()`` under ``torch.no_grad()``;
* training: ``model.train()``, cross-entropy on random labels, ``backward()`` and an optimizer step: AdamW by
  default, or ``--optimizer recipe``: each model's training recipe, Lion (this project's multi-tensor one) for
  CBT and AdamW for ViT, or ``lion`` for both;

each timed as the minimum over ``--repeats`` steps after ``--warmup`` steps (CUDA: synchronised), with
``--dtype bf16``/``fp16`` under ``torch.autocast`` (fp16 with a ``GradScaler``, as the fp16 recipe trains). On CUDA
the peak memory of the training steps is reported too (``train_peak_mem_mb``). Prints images/s and the CBT / ViT
ratios per size (paper Table 7, 512² on a GPU: CBT-S 205 / 405 img/s against ViT-S 94 / 211, i.e. 2.2× training
and 1.9× inference) and writes ``model_benchmark.csv`` to ``--out``.

    python scripts/benchmark_models.py --out runs/bench_models                       # CPU, fp32, 224² and 512²
    python scripts/benchmark_models.py --device cuda --dtype bf16 --batch 64 --channels-last --out runs/gpu
    python scripts/benchmark_models.py --quick --out /tmp/bench                       # 2-layer models, 128²
    python scripts/benchmark_models.py --device cuda --dtype bf16 --optimizer recipe --batch 32 --out runs/gpu
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import cbsa_core
from cbsa_core.engine.amp import autocast_context, make_grad_scaler
from cbsa_core.engine.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import output_dir, run_script, torch_threads, write_csv  # noqa: E402
from benchmark_attention import TIMERS, time_min  # noqa: E402  (the same timing as the layer benchmark)

# benchmark name -> (family, builder name)
MODELS: Dict[str, tuple] = {
    "cbt_tiny": ("cbt", "cbt_tiny"),
    "cbt_small": ("cbt", "cbt_small"),
    "vit_tiny": ("vit", "vit_tiny_patch16_224"),
    "vit_small": ("vit", "vit_small_patch16_224"),
}
# Table 7's other columns, by request (--models): the same-framework MSSA (CRATE) and TSSA (ToST) models, and the
# original CRATE; the default run stays the CBT/ViT pairs whose ratios the README reports.
EXTRA_MODELS: Dict[str, tuple] = {name: ("cbt", name) for name in (
    "mssa_tiny", "mssa_small", "tssa_tiny", "tssa_small", "crate_original_tiny", "crate_original_small")}
MODELS.update(EXTRA_MODELS)
PAIRS = (("cbt_tiny", "vit_tiny"), ("cbt_small", "vit_small"))
CSV_COLUMNS = ("device", "dtype", "threads", "timer", "batch", "channels_last", "compile", "model", "size", "params_m",
               "train_ms", "infer_ms", "train_img_s", "infer_img_s", "train_ratio_vs_vit", "infer_ratio_vs_vit",
               "optimizer", "train_peak_mem_mb")
# --optimizer recipe: what each family trains with (classification recipe: Lion; the timm ViTs: AdamW).
RECIPE_OPTIMIZER = {"cbt": "lion", "vit": "adamw"}
RECIPE_LR = {"lion": 2e-4, "adamw": 1e-3}
CSV_NAME = "model_benchmark.csv"


def build_model(name: str, size: int, num_classes: int, depth: Optional[int] = None) -> nn.Module:
    family, builder = MODELS[name]
    extra = {} if depth is None else dict(depth=depth)
    if family == "cbt":
        return cbsa_core.create_model(builder, image_size=size, num_classes=num_classes, **extra)
    import timm
    return timm.create_model(builder, img_size=size, pretrained=False, num_classes=num_classes, **extra)


def measure(name: str, size: int, args, device: torch.device) -> Dict:
    torch.manual_seed(0)
    model = build_model(name, size, args.num_classes, args.depth).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(args.batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    runner = torch.compile(model) if args.compile else model
    opt_name = RECIPE_OPTIMIZER[MODELS[name][0]] if args.optimizer == "recipe" else args.optimizer
    optimizer = build_optimizer(opt_name, model, lr=RECIPE_LR[opt_name], weight_decay=0.05)
    scaler = make_grad_scaler(device, args.dtype)

    def infer():
        with torch.no_grad(), autocast_context(device, args.dtype):
            runner(images)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, args.dtype):
            loss = F.cross_entropy(runner(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.eval()
    t_infer = time_min(infer, device, args.repeats, args.warmup, args.timer)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = time_min(train, device, args.repeats, args.warmup, args.timer)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(device=device.type, dtype=args.dtype, threads=torch.get_num_threads(), timer=args.timer,
                batch=args.batch,
                channels_last=args.channels_last, compile=args.compile, model=name, size=size, params_m=params / 1e6,
                train_ms=1e3 * t_train, infer_ms=1e3 * t_infer, train_img_s=args.batch / t_train,
                infer_img_s=args.batch / t_infer, optimizer=opt_name, train_peak_mem_mb=peak)


def add_ratios(rows: List[Dict]) -> None:
    """CBT images/s divided by the same-size ViT's (T with T, S with S)."""
    by_key = {(r["model"], r["size"]): r for r in rows}
    for cbt, vit in PAIRS:
        for r in rows:
            if r["model"] != cbt or (vit, r["size"]) not in by_key:
                continue
            ref = by_key[(vit, r["size"])]
            r["train_ratio_vs_vit"] = r["train_img_s"] / ref["train_img_s"]
            r["infer_ratio_vs_vit"] = r["infer_img_s"] / ref["infer_img_s"]


def format_table(rows: List[Dict]) -> str:
    head = (f"{'model':20s} {'size':>5s} {'params M':>8s} {'train ms':>9s} {'infer ms':>9s} {'train img/s':>11s} "
            f"{'infer img/s':>11s} {'train x ViT':>11s} {'infer x ViT':>11s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tr, ir = r.get("train_ratio_vs_vit"), r.get("infer_ratio_vs_vit")
        lines.append(f"{r['model']:20s} {r['size']:>5d} {r['params_m']:8.2f} {r['train_ms']:9.1f} {r['infer_ms']:9.1f} "
                     f"{r['train_img_s']:11.2f} {r['infer_img_s']:11.2f} "
                     f"{'-' if tr is None else format(tr, '11.2f'):>11s} {'-' if ir is None else format(ir, '11.2f'):>11s}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="bf16/fp16 run under torch.autocast (fp16: CUDA only, with a GradScaler)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "lion", "recipe"),
                    help="training step's optimizer; recipe: Lion for CBT, AdamW for ViT")
    ap.add_argument("--batch", type=int, default=None, help="images per step, the same for every model (default 8)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 224 512; quick 128)")
    ap.add_argument("--models", nargs="+", default=None, choices=tuple(MODELS),
                    help="default: the four CBT/ViT models (quick: the tiny pair); the MSSA, TSSA and "
                         "original-CRATE models of Table 7 on request")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps; the minimum is kept (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=None, help="override the depth of every model (quick: 2)")
    ap.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (inductor)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--timer", default="wall", choices=tuple(TIMERS),
                    help="wall clock, or process CPU time (CPU only; meaningful with --threads 1 on a busy machine)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny pair, 2 layers, 128², batch 2, 1 step")
    ap.add_argument("--out", type=Path, default=Path("runs/benchmark_models"))
    args = ap.parse_args(argv)
    args.sizes = args.sizes or ([128] if args.quick else [224, 512])
    args.models = args.models or (["cbt_tiny", "vit_tiny"] if args.quick else
                                  [m for m in MODELS if m not in EXTRA_MODELS])
    args.batch = args.batch or (2 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick and args.depth is None:
        args.depth = 2
    for s in args.sizes:
        if s % 16 or s < 128:
            ap.error(f"--sizes {s}: image sizes must be multiples of 16 and >= 128 (CBT's 8x8 representative grid)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.dtype == "fp16" and args.device != "cuda":
        ap.error("--dtype fp16 needs --device cuda (CPU autocast trains in bf16)")
    if args.timer == "cpu" and args.device == "cuda":
        ap.error("--timer cpu measures host CPU time; use the wall clock with --device cuda")
    if args.batch <= 0 or args.repeats <= 0 or args.warmup < 0:
        ap.error("--batch and --repeats must be positive, --warmup non-negative")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    with torch_threads(args.threads) if args.threads else contextlib.nullcontext():
        return run(args)


def run(args: argparse.Namespace) -> List[Dict]:
    device = torch.device(args.device)
    out = output_dir(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# model benchmark: {name}, {args.dtype}, optimizer {args.optimizer}, batch {args.batch}, "
          f"channels_last={args.channels_last}, "
          f"compile={args.compile}, repeats {args.repeats}, {args.timer} timer, torch {torch.__version__}", flush=True)
    rows = []
    for size in args.sizes:
        for model in args.models:
            row = measure(model, size, args, device)
            rows.append(row)
            peak = "" if row["train_peak_mem_mb"] is None else f", train peak {row['train_peak_mem_mb']:.0f} MiB"
            print(f"#   {model:10s} {size}: train {row['train_img_s']:.2f} img/s ({row['optimizer']}), "
                  f"infer {row['infer_img_s']:.2f} img/s{peak}", flush=True)
    add_ratios(rows)
    print(format_table(rows))
    for r in rows:
        if r.get("train_ratio_vs_vit") is not None:
            print(f"{r['model']} / ViT at {r['size']}²: training {r['train_ratio_vs_vit']:.2f}x, "
                  f"inference {r['infer_ratio_vs_vit']:.2f}x (paper, GPU 512²: CBT-T 1.9x / 1.5x, CBT-S 2.2x / 1.9x)")
    write_csv(out / CSV_NAME, rows, CSV_COLUMNS)
    print(f"wrote {out / CSV_NAME}")
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main))
