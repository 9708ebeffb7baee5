"""Fine-tune a pretrained timm ViT whose attention was converted to CBSA^∨, CBSA* or linear attention.

The seed's command (run inside ``finetune_vit/`` or as ``python -m finetune_vit.main``)::

    python main.py --data /path/to/imagenet --arch vit_small_patch16_224 --batch-size 512 --epochs 50 \\
        --optimizer AdamW --lr 5e-5 --weight-decay 0.01 --print-freq 50 \\
        --pretrained-file vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors

``--data`` is an ImageFolder root (``train/<class>/*`` and ``val/<class>/*``). Multi-GPU:
``torchrun --nproc_per_node=8 main.py ...`` (each rank binds ``cuda:LOCAL_RANK``; ``--batch-size`` is the
global batch, split evenly over the ranks).

Recipe of the release (official-code.md §1.2): all parameters fine-tuned, one AdamW/Lion param group,
10 warm-up epochs then cosine (``lr_e = lr·min((e+1)/10, ½(1+cos(πe/E)))``, stepped per epoch), label
smoothing 0.1, fp16 autocast with ``GradScaler(init_scale=8192)`` on CUDA, fp32 evaluation, no gradient
clipping. Transforms follow the arch's size: RandomResizedCrop(S) + flip for training, Resize(⌊S/0.875⌋)
+ CenterCrop(S) for evaluation (224/256 and 384/438), normalised with ImageNet statistics as released
(``--norm inception`` uses the augreg weights' own 0.5/0.5).

Without ``--pretrained-file`` the weights are random (nothing is ever downloaded). Each epoch writes
``checkpoint.pth.tar`` (and ``model_best.pth.tar``) atomically, ``log.jsonl`` and TensorBoard scalars to
``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if not __package__:  # `python main.py` inside finetune_vit/: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cbsa_core.checkpoint import CheckpointError  # noqa: E402
from cbsa_core.data.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, DatasetError,  # noqa: E402
                                        build_imagefolder, classification_transforms)
from cbsa_core.engine import (PRECISIONS, JsonlLogger, ShardedEvalSampler, TensorBoardLogger,  # noqa: E402
                              WarmupCosineLambda, build_lambda_scheduler, build_optimizer, capture_rng_state,
                              cleanup_distributed, epoch_seed, evaluate_classifier, init_distributed,
                              load_training_checkpoint, make_grad_scaler, make_train_sampler,
                              save_training_checkpoint, seed_everything, setup_logging, train_one_epoch,
                              unwrap_model, wrap_ddp)
from finetune_vit.attention import BROADCAST_CHOICES  # noqa: E402
from finetune_vit.convert import ATTENTION_CHOICES, set_legacy_token_layout  # noqa: E402
from finetune_vit.flops import model_flops  # noqa: E402
from finetune_vit.models import VIT_ARCHS, create_vit, image_size_of  # noqa: E402

__all__ = ["build_parser", "parse_args", "main", "cli", "NORMS"]

_LOG = logging.getLogger("finetune_vit")

NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# The release's evaluation crop ratio: 224/256 and 384/438 are both ⌊S/0.875⌋.
EVAL_CROP_PCT = 0.875


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune timm ViTs converted to CBSA-style attention (paper Fig. 9)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option defaults (keys as the long flags, "
                                                  "with - or _); command-line flags override it")
    p.add_argument("--data", default=None, help="ImageFolder root with train/<class>/* and val/<class>/*")
    p.add_argument("-a", "--arch", default="vit_small_patch16_224", choices=VIT_ARCHS, help="timm ViT")
    p.add_argument("--attention", default="cbsa_vee", choices=ATTENTION_CHOICES,
                   help="cbsa_vee (released CBSA^v), cbsa_star (CBSA*), linear, or mhsa (keep timm's)")
    p.add_argument("--pretrained-file", default=None,
                   help="local timm weights (.npz, .safetensors or .pth); without it the weights are random")
    p.add_argument("--rep-grid", type=int, nargs=2, default=[8, 8], metavar=("RH", "RW"),
                   help="grid of pooled representatives (m = RH*RW)")
    p.add_argument("--legacy-token-layout", action="store_true",
                   help="pool the first h*w tokens like the release's X_q[:, :-1] (off-by-one incl. [CLS])")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="block indices to convert (default: all)")
    p.add_argument("--broadcast", default="transpose", choices=BROADCAST_CHOICES,
                   help="CBSA* broadcast: transposed extraction matrix, or the release's separate softmax")
    p.add_argument("--model-kwargs", default=None,
                   help="JSON object passed to timm.create_model, e.g. '{\"drop_path_rate\": 0.1}'")
    p.add_argument("--norm", default="imagenet", choices=tuple(NORMS),
                   help="input normalisation: ImageNet mean/std (as released) or 0.5/0.5 (the augreg weights')")
    p.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=512, help="global batch size (all processes)")
    p.add_argument("--optimizer", default="adamw", type=str.lower, choices=("adamw", "lion", "sgd"))
    p.add_argument("--lr", "--learning-rate", type=float, default=5e-5, dest="lr")
    p.add_argument("--wd", "--weight-decay", type=float, default=0.01, dest="weight_decay")
    p.add_argument("--label-smooth", "--label_smooth", type=float, default=0.1, dest="label_smooth")
    p.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clipping (the release: none)")
    p.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="auto = fp16 autocast on CUDA (as released), fp32 on the CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-p", "--print-freq", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: runs/finetune_vit/<arch>_<attention>")
    p.add_argument("--resume", default=None, help="checkpoint to resume training from (or to --evaluate)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on the val split")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--bad-images", default="fail", choices=("fail", "skip"))
    return p


def _load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    with open(file, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {file} must hold a mapping of option names to values")
    dests = {a.dest for a in parser._actions}
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        dest = {"learning_rate": "lr"}.get(dest, dest)
        if dest not in dests or dest in ("help", "config"):
            raise ValueError(f"config file {file}: unknown option {key!r}")
        if dest == "model_kwargs" and isinstance(value, dict):
            value = json.dumps(value)
        out[dest] = value
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_config(parser, pre.config))
    args = parser.parse_args(argv)
    # argparse checks choices of command-line values only; config values are checked here.
    for dest, valid in (("arch", VIT_ARCHS), ("attention", ATTENTION_CHOICES), ("norm", tuple(NORMS)),
                        ("broadcast", BROADCAST_CHOICES), ("precision", ("auto",) + PRECISIONS)):
        if getattr(args, dest) not in valid:
            parser.error(f"invalid --{dest.replace('_', '-')} {getattr(args, dest)!r}; valid: {', '.join(valid)}")
    args.optimizer = str(args.optimizer).lower()
    if args.model_kwargs is None:
        args.model_kwargs = {}
    elif isinstance(args.model_kwargs, str):
        try:
            args.model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            parser.error(f"--model-kwargs is not valid JSON: {e}")
    if not isinstance(args.model_kwargs, dict):
        parser.error("--model-kwargs must be a JSON object")
    if args.data is None:
        parser.error("--data is required (an ImageFolder root with train/ and val/)")
    for dest in ("epochs", "batch_size", "print_freq"):
        if getattr(args, dest) <= 0:
            parser.error(f"--{dest.replace('_', '-')} must be positive")
    if args.warmup_epochs < 0 or args.workers < 0:
        parser.error("--warmup-epochs and --workers must be >= 0")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", "finetune_vit", f"{args.arch}_{args.attention}")
    return args


def _transforms(image_size, norm: str):
    h, w = image_size
    mean, std = NORMS[norm]
    # Square sizes give exactly the release's 224/256 and 384/438.
    return classification_transforms(train_size=(h, w), eval_resize=int(min(h, w) / EVAL_CROP_PCT),
                                     eval_crop=(h, w), mean=mean, std=std)


def _model_config(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    return dict(arch=args.arch, attention=args.attention, rep_grid=list(args.rep_grid),
                legacy_token_layout=bool(args.legacy_token_layout), layers=args.layers, broadcast=args.broadcast,
                model_kwargs=dict(args.model_kwargs), num_classes=num_classes, norm=args.norm)


def _check_resumed_config(ckpt: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    """A checkpoint of another attention variant has the same keys and would load silently: refuse it."""
    saved = ckpt.get("model_config") or {}
    for key in ("arch", "attention", "rep_grid", "layers", "broadcast"):
        if key in saved and saved[key] != config[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved[key]!r}, but this run uses "
                                  f"{key}={config[key]!r}; pass the same options to resume or evaluate it")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the fine-tuning (or the evaluation); returns the last validation metrics and the best top-1."""
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    setup_logging(dist_info.rank)
    try:
        return _run(args, dist_info)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, dist_info) -> Dict[str, Any]:
    device = dist_info.device
    precision = ("fp16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    if args.batch_size % dist_info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over {dist_info.world_size} processes")
    seed_everything(args.seed, dist_info.rank)
    out_dir = Path(args.output_dir)

    # The class folders fix the classifier size; the transforms are set once the model gives the image size.
    train_ds, val_ds = build_imagefolder(args.data, bad_images=args.bad_images)
    num_classes = len(train_ds.classes)
    pretrained = None if args.resume else args.pretrained_file
    if args.resume and args.pretrained_file:
        _LOG.info("--resume given: the weights come from %s, not from %s", args.resume, args.pretrained_file)
    elif not args.resume and not args.pretrained_file:
        _LOG.warning("no --pretrained-file: %s starts from RANDOM weights (nothing is downloaded)", args.arch)
    model = create_vit(args.arch, attention=args.attention, num_classes=num_classes, pretrained_file=pretrained,
                       rep_grid=args.rep_grid, legacy_token_layout=args.legacy_token_layout, layers=args.layers,
                       broadcast=args.broadcast, model_kwargs=args.model_kwargs)
    image_size = image_size_of(model)
    train_ds.transform, val_ds.transform = _transforms(image_size, args.norm)
    config = _model_config(args, num_classes)
    gflops = model_flops(model, image_size)["total"] / 1e9
    n_params = sum(p.numel() for p in model.parameters())
    _LOG.info("%s with %s attention: %.3gM parameters, %.3g GFLOPs (2xMACs) at %dx%d, %d classes, %s",
              args.arch, args.attention, n_params / 1e6, gflops, *image_size, num_classes, precision)

    per_rank_batch = args.batch_size // dist_info.world_size
    pin = device.type == "cuda"
    train_sampler = make_train_sampler(train_ds, dist_info, args.seed, epoch=0)
    train_loader = DataLoader(train_ds, batch_size=per_rank_batch, sampler=train_sampler, shuffle=False,
                              num_workers=args.workers, pin_memory=pin, drop_last=False,
                              persistent_workers=args.workers > 0)
    val_loader = DataLoader(val_ds, batch_size=per_rank_batch, shuffle=False, num_workers=args.workers,
                            pin_memory=pin, sampler=ShardedEvalSampler(len(val_ds), dist_info.rank,
                                                                       dist_info.world_size))

    model = wrap_ddp(model, dist_info, sync_bn=False)
    net = unwrap_model(model)
    criterion = LabelSmoothingCrossEntropy(smoothing=args.label_smooth)
    optimizer = build_optimizer(args.optimizer, model, lr=args.lr, weight_decay=args.weight_decay)
    # The ViT release divides by exactly 10 (eps=0): its peak factor is 0.922 at epoch 9 of 50.
    scheduler = build_lambda_scheduler(optimizer, WarmupCosineLambda(args.warmup_epochs, args.epochs, eps=0.0))
    scaler = make_grad_scaler(device, precision, init_scale=8192)

    start_epoch, best = 0, None
    if args.resume:
        ckpt = load_training_checkpoint(args.resume, model=net, optimizer=None if args.evaluate else optimizer,
                                        scheduler=None if args.evaluate else scheduler,
                                        scaler=None if args.evaluate else scaler, restore_rng=not args.evaluate)
        _check_resumed_config(ckpt, config, args.resume)
        if ckpt.get("format") != "cbsa":
            # The authors' fine-tuned ViTs pooled X_q[:, :-1] (official-code.md item 28).
            _LOG.warning("%s is not in this project's format: treating it as the authors' release and switching "
                         "on the legacy token layout", args.resume)
            set_legacy_token_layout(net, True)
        else:
            set_legacy_token_layout(net, bool(ckpt["model_config"].get("legacy_token_layout", False)))
        start_epoch, best = ckpt["epoch"], ckpt["best_metric"]
        planned = getattr(scheduler.lr_lambdas[0], "epochs", args.epochs)
        if not args.evaluate and planned != args.epochs:
            _LOG.warning("the resumed LR schedule is the checkpoint's (cosine over %d epochs), not one over "
                         "--epochs %d", planned, args.epochs)
        _LOG.info("resumed from %s at epoch %d (best top-1 so far: %s)", args.resume, start_epoch, best)

    if args.evaluate:
        metrics = evaluate_classifier(model, val_loader, criterion, device=device, dist_info=dist_info)
        if dist_info.is_main:
            print(f" * Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}",
                  flush=True)
        return dict(val=metrics, best_top1=best, epochs_run=0)

    if start_epoch >= args.epochs:
        _LOG.warning("the checkpoint already finished epoch %d of %d: nothing to train", start_epoch, args.epochs)
    jsonl = JsonlLogger(out_dir / "log.jsonl", enabled=dist_info.is_main)
    tb = TensorBoardLogger(out_dir / "tensorboard", enabled=not args.no_tensorboard and dist_info.is_main)
    ckpt_path, best_path = out_dir / "checkpoint.pth.tar", out_dir / "model_best.pth.tar"
    metrics: Dict[str, Any] = {}
    epochs_run = 0
    try:
        for epoch in range(start_epoch, args.epochs):
            # The augmentation stream depends only on (seed, epoch, rank), so a resumed run repeats it exactly.
            seed_everything(epoch_seed(args.seed, epoch, dist_info.rank))
            train_sampler.set_epoch(epoch)
            train = train_one_epoch(model, train_loader, criterion, optimizer, epoch=epoch, epochs=args.epochs,
                                    device=device, scaler=scaler, precision=precision, clip_grad=args.clip_grad,
                                    print_freq=args.print_freq, dist_info=dist_info, checkpoint_path=ckpt_path,
                                    log_fn=lambda values, step: tb.scalars(values, step, prefix="train_step/"))
            metrics = evaluate_classifier(model, val_loader, criterion, device=device, dist_info=dist_info)
            scheduler.step()
            is_best = best is None or metrics["top1"] > best
            best = metrics["top1"] if is_best else best
            epochs_run += 1
            if dist_info.is_main:
                print(f" * epoch {epoch} Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} "
                      f"(best {best:.3f})", flush=True)
                record = dict(epoch=epoch, train=train, val=metrics, lr=train["lr"], best_top1=best)
                jsonl.log(record)
                tb.scalars(dict(loss=train["loss"], top1=train["top1"], lr=train["lr"]), epoch, prefix="train/")
                tb.scalars(metrics, epoch, prefix="val/")
                rng = capture_rng_state()
                state = dict(model=model, arch=args.arch, model_config=config, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, epoch=epoch, best_metric=best, config=args,
                             rng_state=rng)
                save_training_checkpoint(ckpt_path, **state)
                if is_best:
                    save_training_checkpoint(best_path, **state)
    finally:
        tb.close()
    return dict(val=metrics, best_top1=best, epochs_run=epochs_run)


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: user errors print one line and exit with status 2."""
    try:
        main(argv)
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
