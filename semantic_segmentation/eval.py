"""mIoU of a segmentation checkpoint (the release's ``segm.eval.miou``, docs/authors-release.md §4.3).

    python eval.py log/CBT-Small/checkpoint.pth ade20k --singlescale [--data-root /data]
    torchrun --nproc_per_node=8 -m semantic_segmentation.eval ckpt.pth ade20k --multiscale

Sliding windows of ``--window-size`` (default: the checkpoint's crop, 512) with ``--window-stride`` (default
window - 32 = 480, the release's eval default; its training-time eval used 512). ``--multiscale`` averages the
ratios {0.5, 0.75, 1.0, 1.25, 1.5, 1.75} with flips. As in the release, every variant whose short side is below
the window is first upscaled to it (the ms ratios < 1, and single-scale images of aspect ratio > 4, whose short
side the 4·im_size cap on the long side leaves below im_size); ``--no-upscale-small`` keeps such variants at their
own size. Works with this project's checkpoints and the authors' files (``variant.yml`` beside them). Scores and
per-class IoU are printed, then written to ``scores_{ss|ms}.yml`` beside the checkpoint (rank 0); the file's folder
is checked before the evaluation starts. Exit codes are the engine's (:mod:`cbsa_core.engine.cli`): 1 with one
``error:`` line for a refusal (missing data or checkpoint, non-finite outputs, unwritable output), 2 for bad flags.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # see main.py

from cbsa_core.engine import (PRECISIONS, ConfigError, NonFiniteOutputError, check_output_file, check_precision,
                              cleanup_distributed, init_distributed, non_negative_int, positive_int, run_cli,
                              setup_logging)
from semantic_segmentation.data import DATASET_DEFAULTS, build_dataset, resolve_data_root
from semantic_segmentation.inference import MS_RATIOS, evaluate_miou
from semantic_segmentation.model import load_model
from semantic_segmentation.yaml_files import write_yaml_atomic

_LOG = logging.getLogger("semantic_segmentation.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a segmentation checkpoint (mIoU)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("model_path", help="checkpoint (this project's, or the authors' with variant.yml beside it)")
    p.add_argument("dataset_name", choices=sorted(DATASET_DEFAULTS))
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATASET)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--singlescale", dest="multiscale", action="store_false", help="(default)")
    scale.add_argument("--multiscale", dest="multiscale", action="store_true",
                       help=f"ratios {MS_RATIOS} with horizontal flips")
    p.set_defaults(multiscale=False)
    p.add_argument("--im-size", type=positive_int, default=None, help="short side at ratio 1 (default: the run's, 512)")
    p.add_argument("--window-size", type=positive_int, default=None, help="default: the checkpoint's crop size")
    p.add_argument("--window-stride", type=positive_int, default=None, help="default: window size - 32")
    p.add_argument("--window-batch-size", type=positive_int, default=4)
    p.add_argument("--n-cls", type=positive_int, default=None, help="--dataset folder: must equal the model's classes")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=False,
                   help="folder dataset only")
    p.add_argument("--upscale-small", action=argparse.BooleanOptionalAction, default=True,
                   help="upscale variants whose short side is below the window to the window (the release's "
                   "resize(); item 38); --no-upscale-small runs them at their own size, e.g. multi-scale ratios < 1")
    p.add_argument("--verify-data", action="store_true",
                   help="check every image/label pair (sizes, label values) before evaluating")
    p.add_argument("--max-images", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp32 is the release's")
    p.add_argument("--num-workers", type=non_negative_int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="scores file (default: scores_{ss|ms}.yml beside the checkpoint)")
    return p


def scores_path(args: argparse.Namespace) -> Path:
    """``--output``, or ``scores_{ss|ms}.yml`` beside the checkpoint."""
    if args.output:
        return Path(args.output)
    return Path(args.model_path).parent / f"scores_{'ms' if args.multiscale else 'ss'}.yml"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    precision = check_precision(args.precision)
    # Checked before the evaluation, which may take hours: its result must not be lost to an unwritable file.
    out = check_output_file(scores_path(args), flag="--output")
    data_root = resolve_data_root(args.data_root)
    dist_info = init_distributed(args.device)
    setup_logging(dist_info.rank)
    try:
        model = load_model(args.model_path).to(dist_info.device)
        cfg, variant = model.model_config, getattr(model, "variant", {}) or {}
        inference_kwargs = variant.get("inference_kwargs") or {}
        dataset_kwargs = variant.get("dataset_kwargs") or {}
        im_size = args.im_size or inference_kwargs.get("im_size") or dataset_kwargs.get("image_size") or 512
        window_size = args.window_size or int(cfg["image_size"][0])
        window_stride = args.window_stride or window_size - 32
        if window_stride <= 0:
            raise ConfigError(f"--window-size {window_size} needs an explicit --window-stride (the default, window "
                              f"- 32, is not positive)")
        n_cls = args.n_cls or model.n_cls
        if n_cls != model.n_cls:
            raise ConfigError(f"--n-cls {n_cls} but {args.model_path} predicts {model.n_cls} classes")
        dataset = build_dataset(args.dataset_name, data_root, args.split, mode="eval", n_cls=n_cls,
                                im_size=int(im_size), normalization=cfg["normalization"],
                                reduce_zero_label=args.reduce_zero_label,
                                test_ratios=MS_RATIOS if args.multiscale else (1.0,), test_flip=args.multiscale)
        if args.verify_data:
            dataset.verify()
        _LOG.info("%s on %s/%s: %d images, %s, window %d stride %d, im_size %d", args.model_path,
                  args.dataset_name, args.split, len(dataset), "multi-scale" if args.multiscale else "single-scale",
                  window_size, window_stride, im_size)
        try:
            scores = evaluate_miou(model, dataset, window_size=window_size, window_stride=window_stride,
                                   window_batch_size=args.window_batch_size, precision=precision,
                                   upscale_small=args.upscale_small, num_workers=args.num_workers,
                                   max_images=args.max_images, log_every=100)
        except NonFiniteOutputError as e:
            raise NonFiniteOutputError(f"evaluation of {args.model_path}", e.count, e.total,
                                       "no scores file was written") from None
    finally:
        cleanup_distributed()
    report = dict(
        mean_iou=round(scores["mean_iou"], 2), pixel_accuracy=round(scores["pixel_accuracy"], 2),
        mean_accuracy=round(scores["mean_accuracy"], 2), num_images=scores["num_images"],
        settings=dict(dataset=args.dataset_name, split=args.split, multiscale=bool(args.multiscale),
                      window_size=window_size, window_stride=window_stride, im_size=int(im_size),
                      upscale_small=bool(args.upscale_small), precision=precision),
        per_class_iou={name: round(v, 2) for name, v in zip(scores["class_names"], scores["per_class_iou"])},
        per_class_accuracy={name: round(v, 2) for name, v in zip(scores["class_names"],
                                                                  scores["per_class_accuracy"])},
    )
    if dist_info.is_main:  # results first, then the file
        print(f"mIoU {report['mean_iou']:.2f}  pixel acc {report['pixel_accuracy']:.2f}  "
              f"mean acc {report['mean_accuracy']:.2f}  ({report['num_images']} images) -> {out}", flush=True)
        write_yaml_atomic(out, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: the engine's exit codes (0 done, 1 refused with one ``error:`` line, 2 bad flags)."""
    return run_cli(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
