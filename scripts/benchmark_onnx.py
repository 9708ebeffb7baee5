#!/usr/bin/env python
"""Latency of onnxruntime against eager PyTorch (CPU, fp32) for exported CBT classifiers and a segmentation model.

    python scripts/benchmark_onnx.py --threads 2 --csv runs/bench_onnx/onnx_benchmark.csv
    python scripts/benchmark_onnx.py --models cbt_small --sizes 512 --batches 2 --repeats 20
    python scripts/benchmark_onnx.py --quick          # smoke test: a 1-layer CBT-T at 128², batch 1 and 2

Models have random weights (latency does not depend on the values): CBT-T and CBT-S classifiers built at each
--sizes (default 224 and 512), and Segmenter CBT-S (ViT-S/16 encoder + the release's CBT decoder, 3 layers of
3 heads x 100, 10x10 representatives, 150 classes) at its 512² crop (seg_cbt_tiny is the ViT-T/16 version).
Each is exported once with scripts/export_onnx.py (dynamic batch, checked against eager) and timed at every
--batches:

* eager: ``model.eval()`` under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``;
* onnxruntime: CPUExecutionProvider, ``intra_op_num_threads = --threads``, one inter-op thread, all graph
  optimisations (onnxruntime's defaults otherwise).

After --warmup untimed calls of each, eager and onnxruntime calls alternate (a change of load on the machine
hits both alike) and the median wall-clock time of --repeats calls per engine is reported, with the speed-up
eager / onnxruntime (> 1: onnxruntime is faster) and the largest absolute difference of their outputs. The
load average before and after the run is printed: on a shared machine, measure when it is low.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import cbsa_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import torch_threads, write_csv  # noqa: E402
from export_onnx import export_model  # noqa: E402

CLASSIFIERS = ("cbt_tiny", "cbt_small")
SEGMENTERS = {"seg_cbt_tiny": "vit_tiny_patch16_384", "seg_cbt_small": "vit_small_patch16_384"}
SEG_CROP = 512
CSV_COLUMNS = ("model", "task", "image_size", "batch", "threads", "repeats", "eager_ms", "onnxruntime_ms", "speedup",
               "eager_min_ms", "onnxruntime_min_ms", "max_abs_diff", "export_s")


def build_model(name: str, size: int, depth: Optional[int] = None) -> Tuple[nn.Module, int]:
    """Random-weight eval-mode model and the image size it runs at."""
    torch.manual_seed(0)
    if name in CLASSIFIERS:
        extra = {} if depth is None else dict(depth=depth)
        return cbsa_core.create_model(name, image_size=size, **extra).eval(), size
    from semantic_segmentation import create_segmenter, default_model_config

    extra = {} if depth is None else dict(n_layers=depth)
    config = default_model_config(SEGMENTERS[name], n_cls=150, crop_size=SEG_CROP, drop_path_rate=0.0, **extra)
    return create_segmenter(config).eval(), SEG_CROP


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def alternate_medians(fns: Sequence[Callable[[], object]], repeats: int, warmup: int) -> List[Tuple[float, float]]:
    """(median, min) wall-clock seconds of each function, their calls interleaved repeat by repeat."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def measure(name: str, size: int, args: argparse.Namespace, workdir: Path) -> List[Dict]:
    model, size = build_model(name, size, args.depth)
    start = time.perf_counter()
    exported = export_model(model, workdir / f"{name}_{size}.onnx", image_size=(size, size))
    export_s = time.perf_counter() - start
    session = ort_session(exported.path, args.threads)
    input_name = session.get_inputs()[0].name
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        feed = {input_name: images.numpy()}
        outputs: Dict[str, np.ndarray] = {}

        def run_eager():
            with torch.inference_mode():
                outputs["eager"] = model(images).numpy()

        def run_ort():
            outputs["ort"] = session.run(None, feed)[0]

        (eager_med, eager_min), (ort_med, ort_min) = alternate_medians((run_eager, run_ort), args.repeats, args.warmup)
        diff = float(np.abs(outputs["eager"].astype(np.float64) - outputs["ort"]).max())
        rows.append(dict(model=name, task="classification" if name in CLASSIFIERS else "segmentation", image_size=size,
                         batch=batch, threads=args.threads, repeats=args.repeats, eager_ms=1e3 * eager_med,
                         onnxruntime_ms=1e3 * ort_med, speedup=eager_med / ort_med, eager_min_ms=1e3 * eager_min,
                         onnxruntime_min_ms=1e3 * ort_min, max_abs_diff=diff, export_s=export_s))
        print(f"#   {name} {size}² batch {batch}: eager {1e3 * eager_med:.1f} ms, onnxruntime {1e3 * ort_med:.1f} ms "
              f"({eager_med / ort_med:.2f}x), max |diff| {diff:.2g}", flush=True)
    return rows


def format_table(rows: List[Dict]) -> str:
    head = (f"{'model':14s} {'size':>5s} {'batch':>5s} {'eager ms':>9s} {'ORT ms':>9s} {'eager/ORT':>9s} "
            f"{'max |diff|':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:14s} {r['image_size']:>5d} {r['batch']:>5d} {r['eager_ms']:9.1f} "
                     f"{r['onnxruntime_ms']:9.1f} {r['speedup']:8.2f}x {r['max_abs_diff']:10.2g}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=summary, epilog=details,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, choices=(*CLASSIFIERS, *SEGMENTERS),
                    help="default: cbt_tiny cbt_small seg_cbt_small (quick: cbt_tiny)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="classifier image sizes (default 224 512; quick 128); segmentation runs at its 512 crop")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes (default: 1 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of both engines (default: torch.get_num_threads())")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per engine; the median is kept (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per engine first (default 2)")
    ap.add_argument("--depth", type=int, default=None, help="override every model's depth (quick: 1)")
    ap.add_argument("--keep-onnx", type=Path, default=None, help="folder to keep the exported files in (default: "
                                                                   "a temporary folder, deleted afterwards)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1-layer CBT-T at 128², 2 repeats")
    args = ap.parse_args(argv)
    args.models = args.models or (["cbt_tiny"] if args.quick else ["cbt_tiny", "cbt_small", "seg_cbt_small"])
    args.sizes = args.sizes or ([128] if args.quick else [224, 512])
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.threads = args.threads or torch.get_num_threads()
    if args.quick and args.depth is None:
        args.depth = 1
    for s in args.sizes:
        if s % 16 or s < 128:
            ap.error(f"--sizes {s}: classifier sizes must be multiples of 16 and >= 128 (CBT's 8x8 representative "
                     "grid at patch 16)")
    if min(args.batches) <= 0 or args.repeats <= 0 or args.warmup < 0 or args.threads <= 0:
        ap.error("--batches, --repeats and --threads must be positive, --warmup non-negative")
    if args.depth is not None and args.depth <= 0:
        ap.error("--depth must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    import onnxruntime

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"# onnxruntime {onnxruntime.__version__} vs eager torch {torch.__version__}: CPU ({cpu}, {os.cpu_count()} "
          f"cores), fp32, {args.threads} threads each, median of {args.repeats} alternating calls after {args.warmup} "
          f"warm-up, {datetime.date.today().isoformat()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    rows: List[Dict] = []
    with torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        workdir = args.keep_onnx or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            for size in (args.sizes if name in CLASSIFIERS else [SEG_CROP]):
                rows.extend(measure(name, size, args, workdir))
    print(format_table(rows))
    load = os.getloadavg()
    print(f"# load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(args.csv, rows, CSV_COLUMNS)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
