#!/usr/bin/env python
"""Robustness to parameter perturbation (paper Fig. 8 middle and right).

Zero-mean Gaussian noise of standard deviation σ (absolute, not relative to the weights) is added
independently to every parameter of a chosen module set, the metric is re-evaluated, and the weights are
restored; this is repeated for every σ and seed and the curve is the mean over the seeds.

Module set (``--modules``):
    ``attention`` (default): every attention layer, i.e. ``model.attention_layers`` of a CBT classifier
    (projection, output projection with its bias unless tied as in CBSA†, the step sizes η and κ) or the
    attention layers of a segmentation model's decoder (``model.decoder.attention_layers``), as in the paper:
    CBSA for CBT/CBT† (``proj``, ``to_out``, ``step_x``, ``step_rep``), DEPICT's tied MSSA (``proj``,
    ``step_size``; DEPICT-CA: snet and cnet), TSSA for ToST (``qkv``, ``to_out``, ``temp``), and MHSA for
    Segmenter's mask transformer (``attn.qkv``, ``attn.proj``; not its MLPs). Segmenter's linear decoder has
    no attention layer (pass patterns);
    otherwise comma-separated shell patterns over parameter names, e.g. ``'transformer.layers.*.0.fn.*'``.

Noise: for seed s, one ``torch.Generator`` seeded with s draws N(0, 1) for the selected parameters in
``named_parameters`` order (float32, on the CPU), scaled by σ. The same seed gives the same unit noise at
every σ (common random numbers), so the curve is smooth in σ; σ = 0 adds nothing and must reproduce the clean
metric exactly.

Tasks:
    ``classifier`` (default): top-1 (percent) of a CBT on the validation split it was trained for. A
        checkpoint of this project carries its run settings (dataset, input size, normalisation), which rebuild
        that split through the classification track (``image_classification.data.build_datasets``); for the
        ``make demo`` checkpoint that is the bundled scikit-learn digits (359 validation images). An authors'
        checkpoint is evaluated on ``--data`` (ImageFolder, 224 centre crop). Without a checkpoint: random
        weights of the demo's model (``configs/classification/digits.yaml``) on the digits; a random model
        is near chance (about 10 %), so only the demo checkpoint gives a meaningful curve.
    ``segmentation``: mIoU of ``semantic_segmentation.load_model(--checkpoint)`` (any decoder: this project's
        checkpoints, pretrained folders, CBSA's, Segmenter's and DEPICT's files) on ``--data`` (``--dataset
        ade20k`` or ``folder``, validation split; ``--max-images`` evaluates a prefix), lazily imported. The
        test scale, window and stride default to those ``eval.py`` uses for the checkpoint.

Outputs (``--out``): ``robustness.csv`` (sigma, seed, metric), ``curve.csv`` (sigma, mean, std, min, max),
``robustness.json`` and ``robustness.png`` (mean ± std against σ, log axis; the clean metric as a line).

Example::

    python scripts/robustness.py --checkpoint runs/demo/model_best.pth.tar --seeds 0 1 2
    python scripts/robustness.py --task segmentation --checkpoint seg.pth --data /data/ade20k --max-images 50
    python scripts/robustness.py --task segmentation --checkpoint log/DEPICT-SA-Tiny/checkpoint.pth --data ADE
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (IMAGENET_MEAN, IMAGENET_STD, build_model, model_label, output_dir,  # noqa: E402
                     parse_overrides, plt, run_script, script_parser, write_csv, write_json)

__all__ = ["DEFAULT_SIGMAS", "select_parameters", "perturbed", "robustness_curve", "main"]

DEFAULT_SIGMAS = (1e-3, 1e-2, 2e-2, 3e-2, 4e-2, 5e-2, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
Params = List[Tuple[str, nn.Parameter]]
MetricFn = Callable[[nn.Module], float]


def select_parameters(model: nn.Module, modules: str = "attention") -> Params:
    """The (name, parameter) pairs to perturb, in ``named_parameters`` order."""
    if modules == "attention":
        owner = model.decoder if hasattr(model, "decoder") and hasattr(model.decoder, "attention_layers") else model
        if not hasattr(owner, "attention_layers"):
            raise ValueError(f"{type(model).__name__} has no attention_layers; pass --modules PATTERNS")
        wanted = {id(p) for layer in owner.attention_layers for p in layer.parameters()}
        params = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
        if not params:
            raise ValueError(f"{type(owner).__name__} has no attention layers to perturb; pass --modules PATTERNS")
    else:
        patterns = [p.strip() for p in modules.split(",") if p.strip()]
        params = [(n, p) for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not params:
            names = [n for n, _ in model.named_parameters()][:12]
            raise ValueError(f"--modules {modules!r} matches no parameter; names look like: {', '.join(names)}")
    return params


@contextlib.contextmanager
def perturbed(params: Params, sigma: float, seed: int) -> Iterator[None]:
    """Add σ·N(0, 1) noise (generator seeded with ``seed``) to ``params``; restore them on exit, also on error."""
    backup = [p.detach().clone() for _, p in params]
    try:
        if sigma:
            gen = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                for _, p in params:
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                    p.add_(noise.to(device=p.device, dtype=p.dtype), alpha=float(sigma))
        yield
    finally:
        with torch.no_grad():
            for (_, p), saved in zip(params, backup):
                p.copy_(saved)


def robustness_curve(model: nn.Module, params: Params, sigmas: Sequence[float], seeds: Sequence[int],
                     metric_fn: MetricFn) -> Dict[str, Any]:
    """Evaluate ``metric_fn`` clean and under every (σ, seed); the curve is the mean (and spread) over seeds."""
    clean = float(metric_fn(model))
    rows = []
    for sigma in sigmas:
        for seed in seeds:
            with perturbed(params, sigma, seed):
                rows.append(dict(sigma=float(sigma), seed=int(seed), metric=float(metric_fn(model))))
    curve = []
    for sigma in sigmas:
        vals = [r["metric"] for r in rows if r["sigma"] == float(sigma)]
        # statistics works in exact arithmetic: equal values give std 0, not a rounding residue
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        curve.append(dict(sigma=float(sigma), mean=statistics.fmean(vals), std=std, min=min(vals), max=max(vals)))
    return dict(clean=clean, rows=rows, curve=curve)


# ---------------------------------------------------------------------------------------------------
# tasks
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "classification" / "digits.yaml"


def classifier_task(args: argparse.Namespace) -> Tuple[nn.Module, MetricFn, str, str]:
    """A CBT and its top-1 on the validation split it was trained for.

    With a checkpoint of this project the run settings stored in it (dataset, input size, normalisation)
    rebuild the exact evaluation data; an authors' checkpoint is an ImageNet model (``--data`` ImageFolder,
    224 centre crop). Without a checkpoint: random weights of the ``make demo`` model on the digits.
    Data and evaluation come from the classification track and ``cbsa_core.engine``.
    """
    from torch.utils.data import DataLoader

    from cbsa_core.checkpoint import checkpoint_kind, read_checkpoint
    from cbsa_core.engine.loop import evaluate_classifier
    from image_classification.data import build_datasets

    overrides = parse_overrides(args.overrides)
    if args.checkpoint is None:
        demo = yaml.safe_load(DEMO_CONFIG.read_text())
        model = build_model(args.arch or demo["arch"], None, {**demo["model"], "num_classes": 10, **overrides})
        run = dict(dataset=demo["dataset"], input_size=demo["input_size"], mean=demo["mean"], std=demo["std"])
    else:
        ckpt = read_checkpoint(args.checkpoint)
        run = dict(ckpt.get("config") or {}) if checkpoint_kind(ckpt) == "cbsa" else {}
        run.setdefault("dataset", "imagefolder")
        model = build_model(args.arch, args.checkpoint, overrides)
    data = args.data or run.get("data")
    if run["dataset"] != "digits" and not data:
        raise ValueError(f"--checkpoint {args.checkpoint} was trained on {run['dataset']}: give its root with --data")
    bundle = build_datasets(run["dataset"], data or ".", input_size=int(run.get("input_size", 224)),
                            eval_resize=int(run.get("eval_resize", 256)),
                            mean=run.get("mean", IMAGENET_MEAN), std=run.get("std", IMAGENET_STD))
    loader = DataLoader(bundle.val, batch_size=args.batch_size, shuffle=False, num_workers=0)
    criterion = nn.CrossEntropyLoss()

    def top1(net: nn.Module) -> float:
        return float(evaluate_classifier(net, loader, criterion, device="cpu", topk=(1,))["top1"])

    return model, top1, f"top-1 (%) on {run['dataset']} val", model_label(args.arch or model.arch, args.checkpoint)


def segmentation_task(args: argparse.Namespace) -> Tuple[nn.Module, MetricFn, str, str]:
    """A Segmenter checkpoint and its mIoU on a validation split (semantic_segmentation imported lazily)."""
    try:
        from semantic_segmentation.data import build_dataset
        from semantic_segmentation.inference import evaluate_miou
        from semantic_segmentation.model import load_model
    except ImportError as e:
        raise RuntimeError(f"--task segmentation needs the semantic_segmentation track: {e}") from e
    if args.checkpoint is None or args.data is None:
        raise ValueError("--task segmentation needs --checkpoint (a segmentation checkpoint) and --data")
    from semantic_segmentation.pretrained import inference_settings

    model = load_model(args.checkpoint)
    defaults = inference_settings(model)  # what eval.py uses for this checkpoint
    window = args.window_size or defaults["window_size"]
    stride = args.window_stride or (window - 32 if args.window_size else defaults["window_stride"])
    dataset = build_dataset(args.dataset, args.data, "val", mode="eval", n_cls=model.n_cls,
                            im_size=args.im_size or defaults["im_size"],
                            normalization=model.model_config["normalization"])

    def miou(net: nn.Module) -> float:
        return float(evaluate_miou(net, dataset, window_size=window, window_stride=max(stride, 1),
                                   max_images=args.max_images)["mean_iou"])

    return model, miou, "mIoU (%)", Path(args.checkpoint).name


def plot_curve(result: Dict[str, Any], path: Path, metric_name: str, title: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.6))
    curve = [c for c in result["curve"] if c["sigma"] > 0]
    ax.errorbar([c["sigma"] for c in curve], [c["mean"] for c in curve], yerr=[c["std"] for c in curve],
                marker="o", capsize=2, label="perturbed (mean ± std over seeds)")
    ax.axhline(result["clean"], color="gray", ls="--", lw=0.8, label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("noise std σ")
    ax.set_ylabel(metric_name)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--task", choices=("classifier", "segmentation"), default="classifier")
    parser.add_argument("--arch", default=None,
                        help="CBT arch (classifier; needed for an authors' checkpoint; without a checkpoint the "
                             "demo's cbt_tiny from configs/classification/digits.yaml)")
    parser.add_argument("--checkpoint", default=None,
                        help="local checkpoint (classifier: e.g. runs/demo/model_best.pth.tar from make demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model override for random weights, e.g. --set depth=4 (repeatable)")
    parser.add_argument("--modules", default="attention",
                        help="'attention' or comma-separated parameter-name patterns (default: %(default)s)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(DEFAULT_SIGMAS), help="(default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="classifier evaluation batch (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="dataset root (segmentation; classifier: an ImageFolder when the model was not "
                             "trained on the bundled digits)")
    parser.add_argument("--dataset", choices=("ade20k", "folder"), default="ade20k")
    parser.add_argument("--max-images", type=int, default=None, help="segmentation: evaluate the first N images")
    parser.add_argument("--im-size", type=int, default=None, help="segmentation: short side of the test scale "
                        "(default: the checkpoint's run, else its crop; 512 for ADE20K)")
    parser.add_argument("--window-size", type=int, default=None,
                        help="segmentation: sliding window (default: the checkpoint's crop, 512)")
    parser.add_argument("--window-stride", type=int, default=None,
                        help="segmentation: window stride (default: window - 32, 480)")
    parser.add_argument("--out", default="runs/robustness", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.sigmas):
        parser.error("--sigmas must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None, metric_fn: Optional[MetricFn] = None) -> Dict[str, Any]:
    """Run the sweep. ``metric_fn`` replaces the task's metric (tests use a deterministic one)."""
    args = parse_args(argv)
    out = output_dir(args.out)
    task = classifier_task if args.task == "classifier" else segmentation_task
    model, task_metric, metric_name, label = task(args)
    model.eval()
    params = select_parameters(model, args.modules)
    n_params = sum(p.numel() for _, p in params)
    print(f"{label}: perturbing {len(params)} tensors ({n_params:,} values) of --modules {args.modules!r}")
    result = robustness_curve(model, params, args.sigmas, args.seeds, metric_fn or task_metric)
    write_csv(out / "robustness.csv", result["rows"])
    write_csv(out / "curve.csv", result["curve"])
    write_json(out / "robustness.json", dict(
        model=label, task=args.task, metric=metric_name, modules=args.modules,
        parameters=[n for n, _ in params], num_values=n_params, seeds=args.seeds, clean=result["clean"],
        curve=result["curve"], rows=result["rows"]))
    plot_curve(result, out / "robustness.png", metric_name, f"{label}: noise on {args.modules}")
    for c in result["curve"]:
        print(f"sigma {c['sigma']:<6g} {metric_name}: {c['mean']:.2f} ± {c['std']:.2f} (clean {result['clean']:.2f})")
    return dict(out=out, model=model, parameters=params, **result)


if __name__ == "__main__":
    sys.exit(run_script(main))
