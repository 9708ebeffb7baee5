"""Fine-tune a pretrained timm ViT whose attention was converted to CBSA^∨, CBSA* or linear attention.

The seed's command (run inside ``finetune_vit/`` or as ``python -m finetune_vit.main``)::

    python main.py --data /path/to/imagenet --arch vit_small_patch16_224 --batch-size 512 --epochs 50 \\
        --optimizer AdamW --lr 5e-5 --weight-decay 0.01 --print-freq 50 \\
        --pretrained-file vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors

``--data`` is an ImageFolder root (``train/<class>/*`` and ``val/<class>/*``). Multi-GPU:
``torchrun --nproc_per_node=8 main.py ...`` (each rank binds ``cuda:LOCAL_RANK``; ``--batch-size`` is the
global batch, split evenly over the ranks).

Recipe of the release (docs/authors-release.md §1.2): all parameters fine-tuned, one AdamW/Lion param group, 10
warm-up epochs then cosine (``lr_e = lr·min((e+1)/10, ½(1+cos(πe/E)))``, stepped per epoch), label smoothing 0.1, fp16
autocast with ``GradScaler(init_scale=8192)`` on CUDA, fp32 evaluation, no gradient clipping. Here
``--precision auto`` keeps that fp16 recipe on GPUs without native bf16 and trains in bf16 on newer ones (no loss
scaling needed); TF32 is on for the remaining fp32 maths unless ``--no-tf32``. Transforms follow the arch's size:
RandomResizedCrop(S) + flip for training, Resize(⌊S/0.875⌋) + CenterCrop(S) for evaluation (224/256 and 384/438),
normalised with ImageNet statistics as released (``--norm inception`` uses the augreg weights' own 0.5/0.5).

Without ``--pretrained-file`` the weights are random (nothing is ever downloaded). The token layout follows the
core's one rule (:func:`cbsa_core.checkpoint.resolve_token_layout`): the authors' fine-tuned files
(``{'state_dict': {'module.' ...}, 'best_acc1', ...}``) switch on the legacy layout they were trained with, this
project's checkpoints record theirs, and ``--[no-]legacy-token-layout`` overrides what a file implies. A resumed
checkpoint that records its layout cannot be resumed with the other one (refused, naming the flag).

The run lifecycle is the engine's, shared with the other tracks (:func:`cbsa_core.engine.fit`): each epoch writes
``checkpoint.pth.tar`` (and ``model_best.pth.tar``) atomically, ``log.jsonl``, ``config.yaml`` and TensorBoard
scalars to ``--output-dir``, which is checked first; a resume must keep the run's seed, schedule, optimizer, learning
rate, weight decay and model variant; NaN/Inf stops the run without saving; exit codes are 1 for a refusal, 2 for a
bad flag, 130/143 for SIGINT/SIGTERM. Settings: argparse defaults, then ``--config <yaml>`` (keys are the long flags
with ``-`` or ``_``, checked like the flags), then the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

if not __package__:  # `python main.py` inside finetune_vit/: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402

from cbsa_core.checkpoint import read_checkpoint  # noqa: E402
from cbsa_core.data.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, build_imagefolder,  # noqa: E402
                                        classification_transforms)
from cbsa_core.engine import (PRECISIONS, ConfigError, MustMatch, NonFiniteOutputError, RunFiles, WarmupCosineLambda,
                              build_lambda_scheduler, build_optimizer, check_output_dir, check_resume_consistency,
                              cleanup_distributed, evaluate_classifier, finite_float, fit, init_distributed,
                              load_training_checkpoint, make_eval_loader, make_grad_scaler, make_train_loader,
                              model_settings_error, non_negative_float, non_negative_int, parse_args_with_config,
                              positive_float, positive_int, resolve_precision, run_cli, schedule_settings,
                              seed_everything, set_tf32, setup_logging, token_layout_setting, unwrap_model,
                              warn_if_single_class, wrap_ddp)  # noqa: E402
from finetune_vit.attention import BROADCAST_CHOICES  # noqa: E402
from finetune_vit.convert import ATTENTION_CHOICES, set_legacy_token_layout  # noqa: E402
from finetune_vit.flops import model_flops  # noqa: E402
from finetune_vit.models import VIT_ARCHS, create_vit, image_size_of  # noqa: E402

__all__ = ["build_parser", "parse_args", "main", "cli", "NORMS"]

_LOG = logging.getLogger("finetune_vit")

NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# The release's evaluation crop ratio: 224/256 and 384/438 are both ⌊S/0.875⌋.
EVAL_CROP_PCT = 0.875
# Settings a resumed or evaluated checkpoint must share with the run, and the flags that set them: its weights
# depend on them, and a checkpoint of another variant has the same keys, so it would load silently.
RESUME_MUST_MATCH = {"arch": "--arch", "attention": "--attention", "rep_grid": "--rep-grid", "layers": "--layers",
                     "broadcast": "--broadcast", "norm": "--norm"}
RUN_FILES = RunFiles()


def _json_object(value: Any) -> Dict[str, Any]:
    """``--model-kwargs``: a JSON object on the command line, or a mapping in a config file."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise argparse.ArgumentTypeError(f"expected a JSON object (mapping), got {value!r}")
    return dict(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune timm ViTs converted to CBSA-style attention (paper Fig. 9)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file of option defaults (keys as the long flags, "
                                                  "with - or _); command-line flags override it")
    p.add_argument("--data", default=None, help="ImageFolder root with train/<class>/* and val/<class>/*")
    p.add_argument("-a", "--arch", default="vit_small_patch16_224", choices=VIT_ARCHS, help="timm ViT")
    p.add_argument("--attention", default="cbsa_vee", choices=ATTENTION_CHOICES,
                   help="cbsa_vee (released CBSA^v), cbsa_star (CBSA*), linear, or mhsa (keep timm's)")
    p.add_argument("--pretrained-file", default=None,
                   help="local timm weights (.npz, .safetensors or .pth); without it the weights are random")
    p.add_argument("--rep-grid", type=positive_int, nargs=2, default=[8, 8], metavar=("RH", "RW"),
                   help="grid of pooled representatives (m = RH*RW)")
    p.add_argument("--legacy-token-layout", action=argparse.BooleanOptionalAction, default=None,
                   help="pool the first h*w tokens like the release's X_q[:, :-1] (off-by-one incl. [CLS]); "
                        "default: on for the authors' fine-tuned files, off otherwise")
    p.add_argument("--layers", type=non_negative_int, nargs="+", default=None,
                   help="block indices to convert (default: all)")
    p.add_argument("--broadcast", default="transpose", choices=BROADCAST_CHOICES,
                   help="CBSA* broadcast: transposed extraction matrix, or the release's separate softmax")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="JSON object passed to timm.create_model, e.g. '{\"drop_path_rate\": 0.1}'")
    p.add_argument("--norm", default="imagenet", choices=tuple(NORMS),
                   help="input normalisation: ImageNet mean/std (as released) or 0.5/0.5 (the augreg weights')")
    p.add_argument("-j", "--workers", type=non_negative_int, default=8, help="data-loading workers per process")
    p.add_argument("--epochs", type=positive_int, default=50)
    p.add_argument("--warmup-epochs", type=non_negative_int, default=10)
    p.add_argument("--stop-epoch", type=positive_int, default=None,
                   help="stop before this epoch without changing the schedule (e.g. a job time limit)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=512, help="global batch size (all processes)")
    p.add_argument("--optimizer", default="adamw", type=str.lower, choices=("adamw", "lion", "sgd"))
    p.add_argument("--lr", "--learning-rate", type=non_negative_float, default=5e-5, dest="lr")
    p.add_argument("--wd", "--weight-decay", type=non_negative_float, default=0.01, dest="weight_decay")
    p.add_argument("--label-smooth", "--label_smooth", type=finite_float, default=0.1, dest="label_smooth")
    p.add_argument("--clip-grad", type=positive_float, default=None, help="gradient-norm clipping (the release: none)")
    p.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="auto = bf16 autocast on GPUs with native bf16, fp16 + GradScaler (as released) on older "
                        "GPUs, fp32 on the CPU")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="let fp32 matrix products and convolutions on CUDA use TF32 tensor cores (evaluation, fp32 "
                        "training); --no-tf32 keeps full fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-p", "--print-freq", type=positive_int, default=50)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--output-dir", default=None, help="default: runs/finetune_vit/<arch>_<attention>")
    p.add_argument("--resume", default=None, help="checkpoint to resume training from (or to --evaluate)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on the val split")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="let a training run replace another run in --output-dir (its files are removed)")
    p.add_argument("--bad-images", default="fail", choices=("fail", "skip"))
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Defaults, then ``--config`` file, then command line. Bad settings exit through ``parser.error`` (status 2),
    before anything is read or written; the converted model is built (and run once) on the meta device, so an
    image size or representative grid it refuses is a usage error too."""
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if args.data is None:
        parser.error("--data is required (an ImageFolder root with train/ and val/)")
    if not 0.0 <= args.label_smooth < 1.0:
        parser.error(f"--label-smooth must lie in [0, 1), got {args.label_smooth}")

    def build():
        return create_vit(args.arch, attention=args.attention, rep_grid=args.rep_grid,
                          legacy_token_layout=args.legacy_token_layout, layers=args.layers, broadcast=args.broadcast,
                          model_kwargs=args.model_kwargs)

    size = _meta_image_size(build)
    error = model_settings_error(build, None if size is None else (1, 3, *size))
    if error:
        parser.error(f"--arch {args.arch} with --model-kwargs {json.dumps(args.model_kwargs)}, --rep-grid "
                     f"{' '.join(map(str, args.rep_grid))} and --layers {args.layers or 'all'}: {error}")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", "finetune_vit", f"{args.arch}_{args.attention}")
    return args


def _meta_image_size(build) -> Optional[tuple]:
    """The training resolution of the model ``build()`` makes, read on the meta device; None if it does not build
    (``model_settings_error`` then reports why)."""
    import torch

    try:
        with torch.device("meta"):
            return image_size_of(build())
    except (ValueError, TypeError):
        return None


def _transforms(image_size, norm: str):
    h, w = image_size
    mean, std = NORMS[norm]
    # Square sizes give exactly the release's 224/256 and 384/438.
    return classification_transforms(train_size=(h, w), eval_resize=int(min(h, w) / EVAL_CROP_PCT),
                                     eval_crop=(h, w), mean=mean, std=std)


def _model_config(args: argparse.Namespace, num_classes: int, model) -> Dict[str, Any]:
    """What the weights were trained with, read from the converted model (not from the flags)."""
    adaptation = model.vit_adaptation
    return dict(arch=args.arch, attention=adaptation["attention"], rep_grid=list(adaptation["rep_grid"]),
                legacy_token_layout=bool(adaptation["legacy_token_layout"]), layers=list(adaptation["layers"]),
                broadcast=adaptation["broadcast"], model_kwargs=dict(args.model_kwargs), num_classes=num_classes,
                norm=args.norm)


def _comparable(key: str, value: Any, depth: int) -> Any:
    if key == "layers":  # None means every block; the order of the indices does not matter
        return sorted(range(depth) if value is None else value)
    if key == "rep_grid":
        return list(value)
    return value


def _variant_settings(saved: Dict[str, Any], config: Dict[str, Any], depth: int) -> List[MustMatch]:
    """The model variant a checkpoint was trained as: another one has the same keys and would load silently."""
    recorded = saved.get("model_config") or {}
    return [MustMatch(flag, _comparable(key, config[key], depth), _comparable(key, recorded[key], depth))
            for key, flag in RESUME_MUST_MATCH.items() if key in recorded]


def _resume_settings(args: argparse.Namespace, saved: Dict[str, Any], config: Dict[str, Any],
                     depth: int) -> List[MustMatch]:
    """What a resumed run must share with its checkpoint (engine rule, :mod:`cbsa_core.engine.resume`)."""
    return (schedule_settings(args, saved) + _variant_settings(saved, config, depth)
            + token_layout_setting(args.legacy_token_layout, saved))


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
    # Before any work: an evaluation writes nothing, a training run follows the engine's output folder rule.
    out_dir = None if args.evaluate else check_output_dir(
        args.output_dir, flag="--output-dir", run_files=RUN_FILES.run_markers, resume_from=args.resume,
        overwrite=args.overwrite, also_replaced=RUN_FILES.run_companions)
    device = dist_info.device
    try:
        precision = resolve_precision(args.precision, device)  # refuses fp16 on CPU, bf16 on old GPUs
    except ValueError as e:
        raise ConfigError(f"--precision {args.precision}: {e}") from None
    set_tf32(args.tf32)
    if args.batch_size % dist_info.world_size:
        raise ConfigError(f"--batch-size {args.batch_size} does not divide over {dist_info.world_size} processes")
    seed_everything(args.seed, dist_info.rank)

    # The class folders fix the classifier size; the transforms are set once the model gives the image size.
    train_ds, val_ds = build_imagefolder(args.data, bad_images=args.bad_images)
    num_classes = len(train_ds.classes)
    if dist_info.is_main:
        warn_if_single_class(num_classes, f"--data {args.data}")
    saved = read_checkpoint(args.resume) if args.resume else None
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
    gflops = model_flops(model, image_size)["total"] / 1e9
    n_params = sum(p.numel() for p in model.parameters())
    _LOG.info("%s with %s attention: %.3gM parameters, %.3g GFLOPs (2xMACs) at %dx%d, %d classes, %s",
              args.arch, args.attention, n_params / 1e6, gflops, *image_size, num_classes, precision)

    per_rank_batch = args.batch_size // dist_info.world_size
    val_loader = make_eval_loader(val_ds, dist_info, batch_size=per_rank_batch, workers=args.workers)
    model = wrap_ddp(model, dist_info, sync_bn=False)
    net = unwrap_model(model)
    criterion = LabelSmoothingCrossEntropy(smoothing=args.label_smooth)
    optimizer = build_optimizer(args.optimizer, model, lr=args.lr, weight_decay=args.weight_decay)
    # The ViT release divides by exactly 10 (eps=0): its peak factor is 0.922 at epoch 9 of 50.
    scheduler = build_lambda_scheduler(optimizer, WarmupCosineLambda(args.warmup_epochs, args.epochs, eps=0.0))
    scaler = make_grad_scaler(device, precision, init_scale=8192)

    start_epoch, best = 0, None
    if args.resume:
        variant = _model_config(args, num_classes, net)
        if args.evaluate:
            check_resume_consistency(args.resume, _variant_settings(saved, variant, len(net.blocks)), args,
                                     why="evaluating it needs the model variant it was trained as",
                                     alternative="evaluate another checkpoint")
        else:  # refused before any state is loaded or any file written
            check_resume_consistency(args.resume, _resume_settings(args, saved, variant, len(net.blocks)), args)
            pretrained = (saved.get("config") or {}).get("pretrained_file")  # what the resumed weights came from
        ckpt = load_training_checkpoint(args.resume, model=net, optimizer=None if args.evaluate else optimizer,
                                        scheduler=None if args.evaluate else scheduler,
                                        scaler=None if args.evaluate else scaler, restore_rng=not args.evaluate,
                                        legacy_token_layout=args.legacy_token_layout, checkpoint=saved)
        # The core's one layout rule, applied to the converted blocks (load_checkpoint cannot reach them).
        legacy, reason = ckpt["token_layout"]
        set_legacy_token_layout(net, legacy)
        _LOG.info("%s: %s token layout (%s)", args.resume, "legacy" if legacy else "corrected", reason)
        start_epoch, best = ckpt["epoch"], ckpt["best_metric"]
        _LOG.info("resumed from %s at epoch %d (best top-1 so far: %s)", args.resume, start_epoch, best)
    saved = None

    if args.evaluate:
        try:
            metrics = evaluate_classifier(model, val_loader, criterion, device=device, dist_info=dist_info)
        except NonFiniteOutputError as e:
            raise NonFiniteOutputError(f"evaluation of {args.resume or 'the model'}", e.count, e.total,
                                       loss=e.loss) from None
        if dist_info.is_main:
            print(f" * Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}",
                  flush=True)
        return dict(val=metrics, best_top1=best, epochs_run=0)

    # Recorded from the model, after any resume switched its token layout, so the files say what was trained.
    model_config = _model_config(args, num_classes, net)
    config = dict(vars(args), legacy_token_layout=model_config["legacy_token_layout"], precision=precision,
                  world_size=dist_info.world_size, num_classes=num_classes, pretrained_file=pretrained,
                  start_epoch=start_epoch)
    train_loader = make_train_loader(train_ds, dist_info, batch_size=per_rank_batch, workers=args.workers,
                                     seed=args.seed, epoch=start_epoch)
    return fit(model, train_loader=train_loader, val_loader=val_loader, criterion=criterion, optimizer=optimizer,
               scheduler=scheduler, scaler=scaler, dist_info=dist_info, output_dir=out_dir, seed=args.seed,
               epochs=args.epochs, start_epoch=start_epoch, stop_epoch=args.stop_epoch, best_metric=best,
               precision=precision, clip_grad=args.clip_grad, print_freq=args.print_freq,
               tensorboard=not args.no_tensorboard, arch=args.arch, model_config=model_config, config=config,
               files=RUN_FILES, start_info={"attention": args.attention, "params": n_params, "resume": args.resume,
                                            "pretrained_file": pretrained})


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: the engine's exit codes (:mod:`cbsa_core.engine.cli`): 0 done, 1 refused (one
    ``error:`` line), 2 bad flags, 130/143 interrupted."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
