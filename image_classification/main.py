"""Train and evaluate CBT (and its same-framework baselines) on ImageNet-style data, the digits, or transfer sets.

The authors' commands work verbatim, from inside this folder or as a module::

    python main.py --arch Ours_small --batch-size 256 --epochs 150 --optimizer Lion --lr 2e-4 \\
        --weight-decay 0.05 --print-freq 50
    python main.py --arch Ours_small --evaluate --resume CKPT/CBT/cbt_small_best.pth.tar
    torchrun --nproc_per_node=8 main.py --config ../configs/classification/cbt_s.yaml --data /data/imagenet
    python -m image_classification.main --config configs/classification/digits.yaml --output-dir runs/demo

Recipe (the paper's Appendix C, docs/authors-release.md §1.1.5): label-smoothed CE, Lion with one parameter group
(weight decay on everything), the release's per-epoch warm-up/cosine ``LambdaLR`` stepped after validation, mixed
precision on CUDA, fp32 validation. The release's fp16 + GradScaler is used on GPUs without native bf16; newer GPUs
train in bf16 by default (same range as fp32: no loss scaling, no skipped steps), and TF32 is on for the remaining
fp32 maths (``--precision``, ``--no-tf32``). Departures from the release, all fixes of its bugs: the schedule (warm-up
included) is restored on ``--resume`` (item 13), outputs go to ``--output-dir`` instead of the CWD (item 17),
validation is exact under DDP, the train metrics are all-reduced, and NaN/Inf stops the run without saving or scoring
the model. The run lifecycle (output folder rule, resume consistency, NaN/Inf policy, exit codes, signals), the epoch
loop, loaders and config file machinery are the engine's (:func:`cbsa_core.engine.fit`,
:mod:`cbsa_core.engine.config`), shared with the other two tracks. ``--legacy-token-layout/--no-legacy-token-layout``
overrides the token layout that the file given to ``--resume``, ``--evaluate`` or ``--finetune`` implies
(:func:`cbsa_core.checkpoint.resolve_token_layout`).

``--batch-size`` is the total batch per node, as released: each of the node's processes gets
``batch_size // LOCAL_WORLD_SIZE`` images per step (and ``ceil(workers / LOCAL_WORLD_SIZE)`` loader workers).

Settings come from argparse defaults (the release's), then ``--config <yaml>``, then the command line: the CLI
overrides the file. YAML keys are the flag names (``batch_size`` or ``batch-size``); ``model:`` holds
:func:`cbsa_core.create_model` overrides (also settable with ``--model-override key=value``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as ``python main.py`` from inside the folder: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from cbsa_core import create_model, list_models
from cbsa_core.atomic import atomic_write_json
from cbsa_core.checkpoint import (CheckpointError, CheckpointMismatchError, checkpoint_kind, extract_state_dict,
                                  load_checkpoint, read_checkpoint)
from cbsa_core.engine import (ConfigError, DistInfo, MustMatch, NonFiniteOutputError, OutputDir, RunFiles,
                              WarmupCosineLambda, broadcast_object, build_lambda_scheduler, build_optimizer,
                              check_output_dir, check_resume_consistency, cleanup_distributed, evaluate_classifier,
                              finite_float, fit, init_distributed, load_training_checkpoint, make_eval_loader,
                              make_grad_scaler, make_train_loader, model_settings_error, non_negative_float,
                              non_negative_int, parse_args_with_config, positive_float, positive_int,
                              resolve_precision, run_cli, schedule_settings, seed_everything, set_tf32, setup_logging,
                              token_layout_setting, unwrap_model, warn_if_single_class, wrap_ddp)
from cbsa_core.layers import check_rep_grid
from cbsa_core.models import recorded_model_config
from cbsa_core.registry import ALIASES
from image_classification.data import DATASETS, build_datasets

__all__ = ["ConfigError", "build_parser", "parse_args", "main", "cli", "build_criterion", "load_finetune_weights",
           "LAST_CHECKPOINT", "BEST_CHECKPOINT", "EVAL_JSON", "LOG_JSONL", "RUN_FILES"]

_LOG = logging.getLogger("image_classification")

RUN_FILES = RunFiles()
LAST_CHECKPOINT, BEST_CHECKPOINT, LOG_JSONL = RUN_FILES.checkpoint, RUN_FILES.best, RUN_FILES.log
EVAL_JSON = "eval.json"
OPTIMIZER_NAMES = {"lion": "Lion", "adamw": "AdamW"}
# Model overrides that create_model accepts (CBT constructor arguments other than num_classes).
MODEL_OVERRIDE_KEYS = ("image_size", "patch_size", "depth", "dim", "heads", "dim_head", "rep_grid", "in_chans",
                       "attn", "legacy_token_layout")


# ------------------------------------------------------------------------------------------------------- CLI
def _optimizer_name(value: str) -> str:
    key = str(value).lower()
    if key not in OPTIMIZER_NAMES:
        raise argparse.ArgumentTypeError(f"unknown optimizer {value!r}; valid: Lion, AdamW")
    return OPTIMIZER_NAMES[key]


def build_parser() -> argparse.ArgumentParser:
    """The release's flags with its defaults (docs/authors-release.md §1.1.2), plus this project's additions."""
    p = argparse.ArgumentParser(description="CBT image classification (CBSA, NeurIPS 2025)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    # --- the release's flags and defaults
    p.add_argument("--data", default="imagenet", help="dataset root (ImageFolder: <data>/{train,val}/<class>/*)")
    p.add_argument("-a", "--arch", default="CRATE_tiny", metavar="ARCH",
                   help="model name: " + ", ".join(list_models()))
    p.add_argument("-j", "--workers", type=non_negative_int, default=32, help="data-loading workers per node")
    p.add_argument("--epochs", type=positive_int, default=150, help="total epochs (the cosine schedule's length)")
    p.add_argument("--start-epoch", type=non_negative_int, default=0,
                   help="first epoch (0-based); --resume overrides it")
    p.add_argument("--label_smooth", "--label-smooth", dest="label_smooth", type=finite_float, default=0.1,
                   help="label smoothing of the cross-entropy (train and val), in [0, 1)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="total batch per node")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=non_negative_float, default=2e-4,
                   help="base learning rate")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=non_negative_float, default=0.05,
                   help="weight decay (applied to every parameter, as released)")
    p.add_argument("-p", "--print-freq", type=positive_int, default=50, help="progress line every N steps")
    p.add_argument("--resume", default="", help="checkpoint to continue from (or to evaluate with -e)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate on the validation split and exit")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed (default: random, recorded in the checkpoint; --resume continues with the recorded one)")
    p.add_argument("--optimizer", type=_optimizer_name, default="Lion", choices=("Lion", "AdamW"))
    # --- additions
    p.add_argument("--config", default=None, help="YAML file of defaults; flags on the command line win")
    p.add_argument("--output-dir", default=None, help="checkpoints, logs and eval.json (default runs/<arch>)")
    p.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    p.add_argument("--finetune", default="", help="initialise from this checkpoint, head re-initialised")
    p.add_argument("--legacy-token-layout", action=argparse.BooleanOptionalAction, default=None,
                   help="token layout of the weights loaded by --resume, --evaluate or --finetune: the release's "
                        "tokens[:, :-1] pooling, or the corrected one (default: from the file; only the release's "
                        "own checkpoints imply the legacy layout)")
    p.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                   help="training autocast (default: bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, "
                        "fp32 on the CPU); validation is always fp32")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="let fp32 matrix products and convolutions on CUDA use TF32 tensor cores (validation, fp32 "
                        "training); --no-tf32 keeps full fp32")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="multi-GPU runs: SyncBatchNorm in the convolutional stem, as released (global batch "
                        "statistics; torch's SyncBatchNorm waits for the GPU once per BatchNorm layer and step, 4 "
                        "times for CBT); --no-sync-bn keeps per-GPU statistics")
    p.add_argument("--clip-grad", type=positive_float, default=None, help="max grad norm (off by default, as released)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dist-backend", default=None, help="process-group backend (default nccl on CUDA, gloo on CPU)")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=20,
                   help="warm-up length of the per-epoch schedule")
    p.add_argument("--stop-epoch", type=positive_int, default=None,
                   help="stop before this epoch without changing the schedule (e.g. a job time limit)")
    p.add_argument("--input-size", type=positive_int, default=224, help="train crop / eval crop")
    p.add_argument("--eval-resize", type=positive_int, default=256, help="short side before the eval centre crop")
    p.add_argument("--mean", type=finite_float, nargs=3, default=[0.485, 0.456, 0.406])
    p.add_argument("--std", type=positive_float, nargs=3, default=[0.229, 0.224, 0.225])
    p.add_argument("--randaugment", type=non_negative_int, nargs=2, default=None, metavar=("N", "M"),
                   help="RandAugment(N, M) for the transfer datasets (CRATE's fine-tuning uses 2 14)")
    p.add_argument("--bad-images", default="fail", choices=("fail", "skip"),
                   help="unreadable image: fail naming its path, or skip it (substitute the next one, counted)")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model override, value parsed as YAML, e.g. rep_grid=[4,4]; repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="let a training run replace another run in --output-dir (its files are removed)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard scalars to <output-dir>/tensorboard")
    p.set_defaults(model={})
    return p


def _check_model_overrides(value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of create_model overrides, got {value!r}")
    unknown = sorted(set(value) - set(MODEL_OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown model override(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(MODEL_OVERRIDE_KEYS)}")
    out = dict(value)
    if "rep_grid" in out:
        grid = out["rep_grid"]
        try:  # one int means a square grid
            out["rep_grid"] = check_rep_grid((grid, grid) if isinstance(grid, int) and not isinstance(grid, bool)
                                             else grid)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults, then ``--config`` file, then command line. Bad settings exit through ``parser.error`` (status 2),
    before anything is read or written: value ranges, and the model's own checks of the architecture overrides and
    of ``--input-size`` (the model is built on the meta device)."""
    parser = build_parser()
    # `model:` holds create_model overrides; --model-override is the command line's way to add to them.
    args = parse_args_with_config(parser, argv, sections={"model": _check_model_overrides},
                                  exclude=("model_override",))

    if args.arch not in list_models():
        parser.error(f"unknown --arch {args.arch!r}; valid names: {', '.join(list_models())}")
    model = dict(args.model or {})
    for item in args.model_override:
        key, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--model-override expects KEY=VALUE, got {item!r}")
        try:
            model.update(_check_model_overrides({key.strip(): yaml.safe_load(raw)}, "--model-override"))
        except (ConfigError, yaml.YAMLError) as e:
            parser.error(str(e))
    args.model = model
    if not 0.0 <= args.label_smooth < 1.0:
        parser.error(f"--label_smooth must lie in [0, 1), got {args.label_smooth}")
    if args.stop_epoch is not None and args.stop_epoch <= args.start_epoch and not args.resume:
        parser.error(f"--stop-epoch {args.stop_epoch} leaves nothing to train after --start-epoch {args.start_epoch}")
    arch = canonical_arch(args.arch)
    error = model_settings_error(lambda: create_model(arch, **model))
    if error:
        parser.error(f"--arch {args.arch} with model overrides {model}: {error}")
    size = args.input_size
    error = model_settings_error(lambda: create_model(arch, **{**model, "image_size": size}),
                                 (1, int(model.get("in_chans", 3)), size, size))
    if error:
        parser.error(f"--input-size {size} does not fit --arch {args.arch}: {error}")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.arch)
    return args


# --------------------------------------------------------------------------------------------------- helpers
def canonical_arch(name: str) -> str:
    """The registry's lowercase name for an authors' alias (``Ours_small`` -> ``cbt_small``), so checkpoints
    record one name per model whichever spelling trained them."""
    return ALIASES.get(name, name)


def _local_world_size(dist_info: DistInfo) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size)) if dist_info.distributed else 1


def _resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    try:
        return resolve_precision(args.precision, device)  # refuses fp16 on CPU, bf16 on old GPUs
    except ValueError as e:
        raise ConfigError(f"--precision {args.precision}: {e}") from None


def _check_output_dir(args: argparse.Namespace) -> OutputDir:
    """The engine's output folder rule: before any work, a fresh run must not replace another run by accident,
    and a resumed run writes only into its checkpoint's folder or a fresh one."""
    return check_output_dir(args.output_dir, flag="--output-dir", run_files=RUN_FILES.run_markers,
                            evaluate=args.evaluate, resume_from=args.resume or None, overwrite=args.overwrite,
                            also_replaced=RUN_FILES.run_companions + (EVAL_JSON,))


def load_finetune_weights(model: nn.Module, path: str, num_classes: int,
                          legacy_token_layout: Optional[bool] = None) -> None:
    """Load a pretrained checkpoint (this project's or the authors') strictly, then re-initialise the head for
    ``num_classes``. The head is sized to the checkpoint first, so every other key and shape is still checked.
    ``legacy_token_layout`` overrides the layout the file implies
    (:func:`cbsa_core.checkpoint.resolve_token_layout`)."""
    ckpt = read_checkpoint(path)
    head = extract_state_dict(ckpt).get("mlp_head.1.weight")
    if head is None:
        raise CheckpointMismatchError(f"--finetune checkpoint {path} has no classifier 'mlp_head.1.weight': "
                                      f"it is not a CBT-family classification checkpoint")
    model.reset_classifier(int(head.shape[0]))
    load_checkpoint(model, path, legacy_token_layout=legacy_token_layout, checkpoint=ckpt)
    model.reset_classifier(num_classes)
    _LOG.info("fine-tuning from %s: classifier re-initialised for %d classes (was %d)", path, num_classes,
              head.shape[0])


def build_criterion(label_smoothing: float) -> nn.Module:
    """Label-smoothed cross-entropy, mean over the batch.

    torch's ``CrossEntropyLoss(label_smoothing=s)`` equals the release's ``timm LabelSmoothingCrossEntropy(s)``,
    ``(1 - s) * NLL + s * mean_c(-log p_c)`` (both spread ``s`` uniformly over all classes; a test checks it), and
    also covers ``s = 0`` (plain CE, the transfer recipe).
    """
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _skipped(dataset) -> int:
    return int(getattr(dataset, "skipped_count", 0))


def _run_config(args: argparse.Namespace, **resolved: Any) -> Dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k != "model_override"}
    cfg.update(resolved)
    return cfg


def _resume_settings(args: argparse.Namespace, saved: Dict[str, Any], model: nn.Module) -> List[MustMatch]:
    """What a resumed run must share with ``saved`` (engine rule: :mod:`cbsa_core.engine.resume`): the recipe's
    schedule and optimizer settings, every recorded model setting, and an explicitly requested token layout."""
    checks = schedule_settings(args, saved)
    if checkpoint_kind(saved) == "cbsa":
        recorded = recorded_model_config(saved.get("model_config") or {})
        current = unwrap_model(model).model_config
        for key in sorted(set(recorded) & set(current) - {"legacy_token_layout"}):
            value = json.dumps(list(recorded[key]) if isinstance(recorded[key], tuple) else recorded[key])
            fix = ("resume on the dataset the run was trained on" if key == "num_classes" else
                   f"pass --model-override {key}={value.replace(' ', '')} (or set model: {{{key}: {value}}} in the "
                   f"config file)")
            checks.append(MustMatch("--model-override", current[key], recorded[key], dest="model",
                                    what=f"model setting {key}", fix=fix))
    return checks + token_layout_setting(args.legacy_token_layout, saved)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run training or evaluation; returns the final metrics. Raises on bad input (see :func:`cli`)."""
    args = parse_args(argv)
    dist_info = init_distributed(args.device, args.dist_backend)
    setup_logging(dist_info.rank)
    try:
        return _run(args, dist_info)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, dist_info: DistInfo) -> Dict[str, Any]:
    out_dir = _check_output_dir(args)  # before any work
    device = dist_info.device
    is_main = dist_info.is_main
    arch = canonical_arch(args.arch)
    precision = _resolve_precision(args, device)
    set_tf32(args.tf32)
    if args.resume and not Path(args.resume).is_file():
        raise CheckpointError(f"--resume checkpoint not found: {args.resume}")
    if args.finetune and not Path(args.finetune).is_file():
        raise CheckpointError(f"--finetune checkpoint not found: {args.finetune}")
    lws = _local_world_size(dist_info)
    per_process_batch = args.batch_size // lws
    if per_process_batch < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is the total per node; it must be >= the {lws} "
                          f"processes on this node")
    if args.batch_size % lws and is_main:
        _LOG.warning("--batch-size %d does not divide by %d processes: %d per process", args.batch_size, lws,
                     per_process_batch)
    workers = (args.workers + lws - 1) // lws

    # The seed must agree across ranks (the train sampler's permutation depends on it).
    seed = args.seed
    if seed is None:
        seed = broadcast_object(int.from_bytes(os.urandom(4), "little") if is_main else None)
    seed_everything(seed, dist_info.rank)

    bundle = build_datasets(args.dataset, args.data, input_size=args.input_size, eval_resize=args.eval_resize,
                            mean=args.mean, std=args.std, randaugment=args.randaugment, bad_images=args.bad_images)
    if is_main:
        warn_if_single_class(bundle.num_classes, bundle.description)
    try:
        model = create_model(arch, num_classes=bundle.num_classes, **args.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build --arch {args.arch} with model overrides {args.model}: {e}") from e
    image_size = model.model_config["image_size"]
    if image_size != args.input_size and is_main:
        _LOG.warning("--input-size %d differs from the model's image_size %d: the position embedding is resampled "
                     "at every step (set model.image_size in the config to match)", args.input_size, image_size)
    if args.finetune and not args.resume:
        load_finetune_weights(model, args.finetune, bundle.num_classes, args.legacy_token_layout)
    criterion = build_criterion(args.label_smooth)
    n_params = sum(p.numel() for p in model.parameters())
    if is_main:
        _LOG.info("%s (%s): %.2fM parameters, %d classes; data: %s (%d train / %d val images)", args.arch, arch,
                  n_params / 1e6, bundle.num_classes, bundle.description, len(bundle.train), len(bundle.val))

    if args.evaluate:
        return _evaluate_only(args, dist_info, model, bundle, criterion, per_process_batch, workers, out_dir)

    finetune = args.finetune
    start_epoch, best_acc1 = args.start_epoch, None
    if args.resume:
        saved = read_checkpoint(args.resume)
        # Refused before any state is loaded or any file written: a mismatch would continue another run.
        check_resume_consistency(args.resume, _resume_settings(args, saved, model), args)
        saved_config = saved.get("config") or {}
        if isinstance(saved_config.get("seed"), int):
            seed = saved_config["seed"]
        # The weights descend from what the resumed run was initialised with, not from this command's --finetune.
        finetune = saved_config.get("finetune", "") if isinstance(saved_config.get("finetune", ""), str) else ""
        if args.finetune and is_main:
            _LOG.warning("--finetune %s is not used: --resume %s provides the weights", args.finetune, args.resume)
    model = wrap_ddp(model, dist_info, sync_bn=args.sync_bn)
    optimizer = build_optimizer(args.optimizer, model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = build_lambda_scheduler(optimizer, WarmupCosineLambda(args.warmup_epochs, args.epochs))
    scaler = make_grad_scaler(device, precision)
    if args.resume:
        ckpt = load_training_checkpoint(args.resume, model=model, optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, restore_rng=True, legacy_token_layout=args.legacy_token_layout,
                                        checkpoint=saved)   # the file read above: one read per resume
        del saved
        start_epoch = ckpt["epoch"]
        best_acc1 = ckpt["best_metric"]
        if is_main:
            _LOG.info("resumed from %s: next epoch %d, best top-1 %s", args.resume, start_epoch, best_acc1)
    elif start_epoch:
        with warnings.catch_warnings():  # stepping before any optimizer.step() is intended here
            warnings.simplefilter("ignore")
            for _ in range(start_epoch):
                scheduler.step()

    train_loader = make_train_loader(bundle.train, dist_info, batch_size=per_process_batch, workers=workers,
                                     seed=seed, epoch=start_epoch)
    val_loader = make_eval_loader(bundle.val, dist_info, batch_size=per_process_batch, workers=workers)
    # What this run really uses: the resumed epoch and seed, the token layout the weights run with.
    config = _run_config(args, seed=seed, start_epoch=start_epoch, finetune=finetune, arch_canonical=arch,
                         precision=precision, per_process_batch=per_process_batch, world_size=dist_info.world_size,
                         num_classes=bundle.num_classes,
                         legacy_token_layout=bool(unwrap_model(model).model_config.get("legacy_token_layout", False)))
    return fit(model, train_loader=train_loader, val_loader=val_loader, criterion=criterion, optimizer=optimizer,
               scheduler=scheduler, scaler=scaler, dist_info=dist_info, output_dir=out_dir, seed=seed,
               epochs=args.epochs, start_epoch=start_epoch, stop_epoch=args.stop_epoch, best_metric=best_acc1,
               precision=precision, clip_grad=args.clip_grad, print_freq=args.print_freq,
               tensorboard=args.tensorboard, arch=arch, model_config=unwrap_model(model).model_config,
               config=config, files=RUN_FILES, start_info={"params": n_params, "resume": args.resume or None},
               record_extra=lambda epoch, train: {"skipped_images": _skipped(bundle.train) + _skipped(bundle.val)})


def _evaluate_only(args: argparse.Namespace, dist_info: DistInfo, model: nn.Module, bundle,
                   criterion: nn.Module, per_process_batch: int, workers: int, out_dir: OutputDir) -> Dict[str, Any]:
    """``--evaluate``: load the weights of ``--resume`` (any recognised layout), evaluate in fp32, print the result,
    then write eval.json. Non-finite outputs are refused (no eval.json is written): their argmax is class 0, a
    made-up accuracy."""
    if args.resume:
        # Weights only: the authors' files may lack optimizer/scheduler entries, and none are needed here.
        load_training_checkpoint(args.resume, model=model, restore_rng=False,
                                 legacy_token_layout=args.legacy_token_layout)
    elif dist_info.is_main:
        _LOG.warning("--evaluate without --resume evaluates randomly initialised weights")
    model = model.to(dist_info.device)
    val_loader = make_eval_loader(bundle.val, dist_info, batch_size=per_process_batch, workers=workers)
    try:
        stats = evaluate_classifier(model, val_loader, criterion, device=dist_info.device, dist_info=dist_info,
                                    print_freq=args.print_freq)
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(f"evaluation of {args.resume or 'the randomly initialised model'}", e.count,
                                   e.total, f"no {EVAL_JSON} was written", e.loss) from None
    result = {"top1": stats["top1"], "top5": stats["top5"], "loss": stats["loss"],
              "num_images": stats["num_images"], "arch": args.arch, "checkpoint": args.resume or None,
              "dataset": args.dataset, "label_smoothing": args.label_smooth,
              "legacy_token_layout": bool(unwrap_model(model).model_config.get("legacy_token_layout", False)),
              "skipped_images": _skipped(bundle.val)}
    if dist_info.is_main:
        path = out_dir.path / EVAL_JSON
        print(f" * Acc@1 {result['top1']:.3f} Acc@5 {result['top5']:.3f} loss {result['loss']:.4f} "
              f"({result['num_images']} images) -> {path}", flush=True)
        out_dir.claim()
        atomic_write_json(path, result)
    return result


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: the engine's exit codes (:mod:`cbsa_core.engine.cli`): 0 done, 1 refused (one ``error:``
    line), 2 bad flags, 130/143 interrupted."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
