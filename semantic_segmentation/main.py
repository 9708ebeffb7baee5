"""Train a Segmenter ViT + CBT decoder (the release's ``segm.train``, docs/authors-release.md §1.3).

Run inside ``semantic_segmentation/`` or as a module, on one process or under torchrun::

    DATASET=/data python main.py --log-dir log/CBT-Small --dataset ade20k --backbone vit_small_patch16_384 \\
        --decoder mask_transformer --pretrained-file vit_small_patch16_384.augreg.npz
    torchrun --nproc_per_node=8 -m semantic_segmentation.main --config configs/segmentation/cbt_s.yaml \\
        --log-dir log/CBT-Small --data-root /data --pretrained-file vit_small_patch16_384.augreg.npz

Recipe (the release's config.yml, docs/authors-release.md §1.3.4): SGD lr 1e-3, momentum 0.9 (Nesterov, as timm's
'sgd'), weight decay 0 (a positive ``--weight-decay`` spares norms, biases, pos_embed/cls_token/cls_emb, as timm's
create_optimizer), polynomial decay (power 0.9) to 1e-5 stepped every iteration, 64 epochs, global batch 8, drop-path
0.1, cross-entropy ignoring 255, evaluation every 2 epochs with 512 windows and stride 512 (variants below the window
upscaled to it, as in the release), fp32 training (``--amp``: the GPU's mixed precision, bf16 where native, else fp16
+ GradScaler; ``--precision`` chooses) with TF32 on (``--no-tf32``). The encoder's unused classifier head is frozen,
so DDP runs without ``find_unused_parameters``.

``log_dir`` receives ``checkpoint.pth`` (atomic, every epoch; ``--resume``, the default, continues from it exactly
with the same settings), ``variant.yml`` (the release's description of the run), ``config.yaml`` (the settings
used), ``log.txt`` (one JSON line per epoch) and ``tensorboard/``. The epoch loop and the run lifecycle are the
engine's (:func:`cbsa_core.engine.fit` with an mIoU evaluator and the per-iteration schedule): the log folder is
checked first (``--no-resume`` into a folder holding a run needs ``--overwrite``), a resume with another schedule,
learning rate, optimizer, seed or model is refused naming the flag, NaN/Inf stops the run without saving, the
validation labels are checked before training, and exit codes are 1 (refusal), 2 (bad flag), 130/143 (signals).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    # Run as a script from inside the folder: import the package from the repository root, and keep the
    # folder's own module names (data, model, ...) from shadowing anything.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.nn as nn

from cbsa_core.atomic import atomic_write_yaml
from cbsa_core.checkpoint import read_checkpoint
from cbsa_core.engine import (ConfigError, MustMatch, PolynomialLambda, RunFiles, ShardedEvalSampler,
                              build_lambda_scheduler, build_optimizer, check_output_dir, check_resume_consistency,
                              cleanup_distributed, finite_float, fit, init_distributed, load_training_checkpoint,
                              make_grad_scaler, make_train_loader, model_settings_error, non_negative_float,
                              non_negative_int, parse_args_with_config, positive_float, positive_int,
                              resolve_precision, run_cli, seed_everything, set_tf32, setup_logging, unwrap_model,
                              wrap_ddp)
from semantic_segmentation.data import DATASET_DEFAULTS, build_dataset, resolve_data_root
from semantic_segmentation.decoders import DECODER_SUMMARIES, DECODERS
from semantic_segmentation.encoder import BACKBONES, pretrained_weights_hint
from semantic_segmentation.inference import evaluate_miou
from semantic_segmentation.model import ARCH, create_segmenter, default_model_config
from semantic_segmentation.transforms import IGNORE_INDEX

_LOG = logging.getLogger("semantic_segmentation.main")

# The release's run folder: checkpoint.pth (no best checkpoint), log.txt; config.yaml and tensorboard/ are this
# project's, as in the other tracks.
RUN_FILES = RunFiles(checkpoint="checkpoint.pth", best=None, log="log.txt")
CHECKPOINT_NAME = RUN_FILES.checkpoint
VARIANT_NAME = "variant.yml"
SCORE_FILES = ("scores_ss.yml", "scores_ms.yml")
# model_config entries and the flags that set them, for the resume check's messages.
MODEL_FLAGS = {"backbone": "--backbone", "n_cls": "--n-cls", "image_size": "--crop-size", "patch_size": "--patch-size",
               "d_model": "--d-model", "n_heads": "--enc-heads", "n_layers": "--enc-layers",
               "normalization": "--normalization", "dropout": "--dropout", "drop_path_rate": "--drop-path",
               "decoder.name": "--decoder"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Segmenter ViT encoder + a segmentation decoder (CBT by "
                                "default; --decoder picks the baselines)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file of defaults (keys = option names with underscores); "
                   "command-line options override it")
    p.add_argument("--log-dir", default=None, help="run folder: checkpoint.pth, variant.yml, log.txt, TensorBoard")
    p.add_argument("--dataset", default="ade20k", choices=sorted(DATASET_DEFAULTS))
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATASET)")
    p.add_argument("--n-cls", type=positive_int, default=None, help="number of classes (default: the dataset's; "
                   "required for --dataset folder)")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=False,
                   help="--dataset folder only: map label 0 to ignore and k to k-1 (ADE20K always does)")
    p.add_argument("--backbone", default=None, help=f"encoder: {', '.join(BACKBONES)}")
    p.add_argument("--decoder", default="mask_transformer", choices=list(DECODERS), metavar="NAME",
                   help="decoder, with its released settings as defaults: "
                   + "; ".join(f"{name} = {summary}" for name, summary in DECODER_SUMMARIES.items()))
    p.add_argument("--im-size", type=positive_int, default=None,
                   help="short side of the base scale (dataset default 512)")
    p.add_argument("--crop-size", type=positive_int, default=None, help="training crop (dataset default 512)")
    p.add_argument("--window-size", type=positive_int, default=None, help="validation window (default: crop size)")
    p.add_argument("--window-stride", type=positive_int, default=None, help="validation stride (dataset default 512)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch, split over ranks (default 8)")
    p.add_argument("--epochs", type=positive_int, default=None, help="default 64")
    p.add_argument("-lr", "--learning-rate", type=positive_float, default=None, help="default 1e-3")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--poly-power", type=non_negative_float, default=0.9)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "lion"])
    p.add_argument("--momentum", type=non_negative_float, default=0.9)
    p.add_argument("--scheduler", default="polynomial", choices=["polynomial"])
    p.add_argument("--dropout", type=finite_float, default=0.0, help="encoder dropout")
    p.add_argument("--drop-path", type=finite_float, default=0.1, help="encoder stochastic depth")
    p.add_argument("--eval-freq", type=positive_int, default=None,
                   help="evaluate every N epochs and at the end (default 2)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision (off, as released): bf16 on GPUs with native bf16, fp16 + GradScaler on "
                        "older GPUs, bf16 on the CPU")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "fp16", "bf16"),
                   help="training precision, overriding --amp (auto: the --amp choice)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="let fp32 matrix products and convolutions on CUDA use TF32 tensor cores (the fp32 training "
                        "of the release's recipe, evaluation); --no-tf32 keeps full fp32")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from LOG_DIR/checkpoint.pth when it exists (with the same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --no-resume: replace the run in --log-dir (its files are removed)")
    p.add_argument("--pretrained-file", default=None,
                   help="local ImageNet weights of the backbone (.npz, .safetensors or .pth); nothing downloads")
    p.add_argument("--from-scratch", action="store_true", help="train without pretrained encoder weights")
    # Decoder settings; unset ones take the chosen decoder's released value, and a setting the decoder does
    # not have is refused.
    p.add_argument("--dec-layers", type=int, default=None, help="decoder layers (CBT, DEPICT, ToST: 3; Segmenter: "
                   "2; DEPICT-CA: its snet)")
    p.add_argument("--dec-heads", type=int, default=None, help="decoder heads (3; Segmenter: width // 64)")
    p.add_argument("--dec-dim-head", type=int, default=None, help="head width (CBT, DEPICT: 100)")
    p.add_argument("--rep-grid", type=int, nargs=2, default=None, metavar=("RH", "RW"),
                   help="CBT: representative grid (10 10)")
    p.add_argument("--tied-output", action=argparse.BooleanOptionalAction, default=None,
                   help="CBT-dagger decoder: project back with the basis")
    p.add_argument("--dec-dropout", type=float, default=None,
                   help="decoder dropout (Segmenter: 0.1; DEPICT: 0.0, on the attention weights)")
    p.add_argument("--dec-drop-path", type=float, default=None, help="Segmenter decoder stochastic depth (0.0)")
    p.add_argument("--dec-d-model", type=int, default=None, help="Segmenter decoder width (the encoder's)")
    p.add_argument("--dec-d-ff", type=int, default=None, help="Segmenter decoder MLP width (4 x its width)")
    p.add_argument("--dec-cross-layers", type=int, default=None, help="DEPICT-CA cross-attention layers (3)")
    p.add_argument("--dec-cross-dim-head", type=int, default=None, help="DEPICT-CA cross-attention head width (50)")
    # Encoder shape overrides (small test models; the named backbones set these).
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--enc-heads", type=int, default=None)
    p.add_argument("--enc-layers", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--normalization", default=None, choices=["vit", "deit"], help="default: the backbone's")
    # Run control.
    p.add_argument("--num-workers", type=non_negative_int, default=4)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--print-freq", type=positive_int, default=50)
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None, help="debug: cut every epoch short")
    p.add_argument("--eval-max-images", type=positive_int, default=None, help="debug: evaluate a prefix of the val set")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="leave after this many epochs of this invocation (time-limited jobs; --resume continues)")
    p.add_argument("--window-batch-size", type=positive_int, default=4)
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--verify-data", action="store_true",
                   help="check every image/label pair of both splits (sizes, label values) before training")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line over the ``--config`` YAML values (checked by the engine's loader: unknown keys,
    values a flag would refuse and YAML syntax errors exit through ``parser.error``, status 2). The resolved
    settings and the model they describe are checked here too (the model is built on the meta device), so an
    impossible combination is a usage error before anything is read or written."""
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not args.log_dir:
        parser.error("--log-dir is required")
    for flag, value in (("--dropout", args.dropout), ("--drop-path", args.drop_path)):
        if not 0.0 <= value < 1.0:
            parser.error(f"{flag} must lie in [0, 1), got {value}")
    try:
        settings = resolve_settings(args)
        model_config = model_config_from_args(args, settings)
    except ConfigError as e:
        parser.error(str(e))
    if args.min_lr > settings["learning_rate"]:
        parser.error(f"--min-lr {args.min_lr} exceeds the learning rate {settings['learning_rate']}")
    crop = settings["crop_size"]
    error = model_settings_error(lambda: create_segmenter(model_config), (1, 3, crop, crop))
    if error:
        parser.error(f"--backbone {args.backbone} with the model flags: {error}")
    return args


def resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Dataset defaults (config.yml) filled in for the options left unset."""
    d = dict(DATASET_DEFAULTS[args.dataset])
    s = dict(
        epochs=args.epochs or d["epochs"], eval_freq=args.eval_freq or d["eval_freq"],
        batch_size=args.batch_size or d["batch_size"], learning_rate=args.learning_rate or d["learning_rate"],
        im_size=args.im_size or d["im_size"], crop_size=args.crop_size or d["crop_size"],
        window_stride=args.window_stride or d["window_stride"], n_cls=args.n_cls or d["n_cls"],
    )
    s["window_size"] = args.window_size or s["crop_size"]
    if not s["n_cls"]:
        raise ConfigError(f"--dataset {args.dataset} needs --n-cls")
    return s


# Decoder setting -> the flag that sets it (decoders.resolve_decoder_config names these in its errors).
DECODER_FLAGS = dict(n_layers="--dec-layers", n_heads="--dec-heads", dim_head="--dec-dim-head",
                     rep_grid="--rep-grid", tied_output="--tied-output", dropout="--dec-dropout",
                     drop_path_rate="--dec-drop-path", d_model="--dec-d-model", d_ff="--dec-d-ff",
                     cross_layers="--dec-cross-layers", cross_dim_head="--dec-cross-dim-head")


def model_config_from_args(args: argparse.Namespace, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The model config of the command line, checked before any data is read or a model built."""
    if not args.backbone:
        raise ConfigError(f"--backbone is required; valid: {', '.join(BACKBONES)}")
    decoder = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in DECODER_FLAGS.items()}
    try:
        return default_model_config(args.backbone, n_cls=settings["n_cls"], crop_size=settings["crop_size"],
                                    drop_path_rate=args.drop_path, dropout=args.dropout,
                                    decoder=dict(name=args.decoder, **decoder), decoder_setting_names=DECODER_FLAGS,
                                    d_model=args.d_model, n_heads=args.enc_heads, n_layers=args.enc_layers,
                                    patch_size=args.patch_size, normalization=args.normalization)
    except ValueError as e:
        raise ConfigError(f"--backbone {args.backbone} --decoder {args.decoder}: {e}") from None


def _param_group_names(model: nn.Module, weight_decay: float, include_frozen: bool = False) -> List[List[str]]:
    """The parameter names of each group of :func:`optimizer_param_groups` (``include_frozen``: the layout from
    before the encoder's unused heads were frozen, which holds them too)."""
    params = [(n, p) for n, p in model.named_parameters() if include_frozen or p.requires_grad]
    if not weight_decay:
        return [[n for n, _ in params]]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    no_decay = [n for n, p in params if p.ndim <= 1 or n.endswith(".bias") or n in skip]
    exempt = set(no_decay)
    return [no_decay, [n for n, _ in params if n not in exempt]]


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """The release's parameter groups (timm 0.4.12 ``create_optimizer`` with ``filter_bias_and_bn``), without the
    frozen parameters (the encoder's unused classifier head).

    With ``weight_decay > 0``: 1-D parameters (norms, biases), ``*.bias`` and the model's ``no_weight_decay()``
    names (``encoder.pos_embed``, ``encoder.cls_token``, ``decoder.cls_emb``) go into a first group without decay,
    everything else (weights, the CBSA step sizes (H, 1, 1)) into a second with ``weight_decay``. With
    ``weight_decay == 0`` one group of all trained parameters, as timm builds it.
    """
    by_name = dict(model.named_parameters())
    groups = _param_group_names(model, weight_decay)
    decays = [0.0] if len(groups) == 1 else [0.0, float(weight_decay)]
    return [dict(params=[by_name[n] for n in names], weight_decay=wd) for names, wd in zip(groups, decays)]


def adapt_optimizer_state(model: nn.Module, weight_decay: float) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """For :func:`~cbsa_core.engine.load_training_checkpoint`: an optimizer state saved before the encoder's unused
    heads were frozen (its groups hold them; their entries are empty, as they never had a gradient) is renumbered to
    the current groups, so such runs resume. A state of the current layout, or of neither, is returned unchanged
    (loading then reports any mismatch)."""
    now = _param_group_names(model, weight_decay)
    before = _param_group_names(model, weight_decay, include_frozen=True)

    def adapt(state: Dict[str, Any]) -> Dict[str, Any]:
        sizes = [len(g.get("params", [])) for g in state.get("param_groups", [])]
        if sizes == [len(g) for g in now] or sizes != [len(g) for g in before] or now == before:
            return state
        old_names = [n for group in before for n in group]
        new_index = {n: i for i, n in enumerate(n for group in now for n in group)}
        groups = [dict(g, params=[new_index[n] for n in names if n in new_index])
                  for g, names in zip(state["param_groups"], before)]
        kept = {new_index[old_names[int(k)]]: v for k, v in state.get("state", {}).items()
                if old_names[int(k)] in new_index}
        _LOG.info("optimizer state written before the encoder's unused heads were frozen: renumbered without them")
        return dict(state, state=kept, param_groups=groups)

    return adapt


def resolve_training_precision(args: argparse.Namespace, device: torch.device) -> str:
    """``--precision`` when given; otherwise ``--amp``: the device's default mixed precision (bf16 on GPUs with
    native bf16, fp16 + GradScaler on older GPUs, bf16 on the CPU), or fp32 without it (the release's default)."""
    if args.precision == "auto" or (args.precision is None and args.amp):
        requested = "auto" if device.type == "cuda" else "bf16"
    else:
        requested = args.precision or "fp32"
    try:
        return resolve_precision(requested, device)
    except ValueError as e:
        flag = f"--precision {args.precision}" if args.precision is not None else "--amp"
        raise ConfigError(f"{flag}: {e}") from None


def _recorded_settings(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a checkpoint's run used: its resolved ``variant.settings`` under the recorded flags."""
    variant = saved.get("variant") or {}
    recorded = {k: v for k, v in (saved.get("config") or {}).items() if v is not None}
    recorded.update(variant.get("settings") or {})
    return recorded


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resume_settings(args: argparse.Namespace, settings: Dict[str, Any], model_config: Dict[str, Any],
                     saved: Dict[str, Any], max_iters: int, steps_per_epoch: int) -> List[MustMatch]:
    """What a resumed run must share with its checkpoint (engine rule: :mod:`cbsa_core.engine.resume`): the
    polynomial schedule (length in iterations, learning rates, power), the optimizer, the seed and the model."""
    recorded = _recorded_settings(saved)
    lambdas = (saved.get("scheduler") or {}).get("lr_lambdas") or [None]
    schedule = lambdas[0] if isinstance(lambdas[0], dict) else {}
    checks = [
        MustMatch("--seed", args.seed, recorded.get("seed")),
        MustMatch("--epochs", settings["epochs"], recorded.get("epochs")),
        MustMatch("--batch-size", settings["batch_size"], recorded.get("batch_size")),
        MustMatch("--learning-rate", settings["learning_rate"], recorded.get("learning_rate")),
        MustMatch("--min-lr", args.min_lr, schedule.get("min_lr", recorded.get("min_lr"))),
        MustMatch("--poly-power", args.poly_power, schedule.get("power", recorded.get("poly_power"))),
        MustMatch("--optimizer", args.optimizer, recorded.get("optimizer")),
        MustMatch("--momentum", args.momentum, recorded.get("momentum")),
        MustMatch("--weight-decay", args.weight_decay, recorded.get("weight_decay")),
        # Same flags, another training set size (or --max-steps-per-epoch): the decay would end elsewhere.
        MustMatch("--epochs", max_iters, schedule.get("max_iters"),
                  what="the polynomial schedule's length (iterations)",
                  fix=f"resume with the run's --epochs, --batch-size and --max-steps-per-epoch on the same training "
                      f"set (this command gives {steps_per_epoch} steps per epoch)"),
    ]
    saved_model = _flatten(saved.get("model_config") or {})
    current = _flatten(model_config)
    flags = dict(MODEL_FLAGS, **{f"decoder.{k}": v for k, v in DECODER_FLAGS.items()})
    for key in sorted(set(saved_model) & set(current)):
        flag = flags.get(key)
        checks.append(MustMatch(flag or "--backbone", current[key], saved_model[key], dest=(flag or "").lstrip("-"),
                                what=f"model setting {key}",
                                fix=None if flag else "resume with the model flags of the run"))
    return checks


def _run_config(args: argparse.Namespace, settings: Dict[str, Any], **resolved: Any) -> Dict[str, Any]:
    """The settings this run really uses: the flags, with the dataset defaults filled in."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config.update(settings)
    config.update(resolved)
    return config


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run training as configured by ``args`` through the engine's :func:`~cbsa_core.engine.fit`; returns its
    result (the last epoch's metrics and the best mIoU)."""
    settings = resolve_settings(args)
    model_config = model_config_from_args(args, settings)
    log_dir = Path(args.log_dir)
    ckpt_path = log_dir / CHECKPOINT_NAME
    resuming = bool(args.resume) and ckpt_path.is_file()
    out = check_output_dir(log_dir, flag="--log-dir", run_files=RUN_FILES.run_markers,
                           resume_from=ckpt_path if resuming else None, overwrite=args.overwrite,
                           also_replaced=RUN_FILES.run_companions + (VARIANT_NAME,) + SCORE_FILES,
                           continue_hint="--resume (the default)")
    data_root = resolve_data_root(args.data_root)  # the dataset is checked before the weights
    common = dict(n_cls=settings["n_cls"], im_size=settings["im_size"], normalization=model_config["normalization"],
                  reduce_zero_label=args.reduce_zero_label)
    train_set = build_dataset(args.dataset, data_root, "train", mode="train", crop_size=settings["crop_size"],
                              seed=args.seed, **common)
    val_set = build_dataset(args.dataset, data_root, "val", mode="eval", **common)
    if args.verify_data:
        train_set.verify()
        val_set.verify()
    if not resuming and not args.pretrained_file and not args.from_scratch:
        raise ConfigError(f"no encoder weights: pass --pretrained-file PATH, "
                          f"{pretrained_weights_hint(model_config['backbone'])}; nothing is downloaded. "
                          "Or pass --from-scratch to train the encoder from random initialisation.")

    dist_info = init_distributed(args.device)
    setup_logging(dist_info.rank)
    try:
        return _train(args, settings, model_config, dist_info, out, resuming, train_set, val_set)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, settings: Dict[str, Any], model_config: Dict[str, Any], dist_info, out,
           resuming: bool, train_set, val_set) -> Dict[str, Any]:
    device = dist_info.device
    ckpt_path = out.path / CHECKPOINT_NAME
    n_eval = len(val_set) if args.eval_max_images is None else min(args.eval_max_images, len(val_set))
    # The labels the evaluations will score, read now: a bad one would otherwise surface after a training epoch.
    val_set.check_labels(ShardedEvalSampler(n_eval, dist_info.rank, dist_info.world_size))
    precision = resolve_training_precision(args, device)
    set_tf32(args.tf32)
    if settings["batch_size"] % dist_info.world_size:
        raise ConfigError(f"--batch-size {settings['batch_size']} does not divide over "
                          f"{dist_info.world_size} processes")
    per_rank_batch = settings["batch_size"] // dist_info.world_size

    seed_everything(args.seed, dist_info.rank)
    model = create_segmenter(model_config, pretrained_file=None if resuming or args.from_scratch
                             else args.pretrained_file)
    # The encoder's unused heads are frozen (Segmenter): every trained parameter gets a gradient, so DDP needs no
    # find_unused_parameters (a graph traversal per step).
    model = wrap_ddp(model, dist_info, sync_bn=False)
    net = unwrap_model(model)
    # Each group carries its own weight decay (timm likewise passes 0 as the optimizer default).
    optimizer = build_optimizer(args.optimizer, optimizer_param_groups(net, args.weight_decay),
                                settings["learning_rate"], 0.0, momentum=args.momentum, nesterov=True)
    loader = make_train_loader(train_set, dist_info, batch_size=per_rank_batch, workers=args.num_workers,
                               seed=args.seed)
    steps_per_epoch = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    max_iters = steps_per_epoch * settings["epochs"]
    scheduler = build_lambda_scheduler(optimizer, PolynomialLambda(settings["learning_rate"], max_iters,
                                                                   args.poly_power, args.min_lr))
    scaler = make_grad_scaler(device, precision)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    start_epoch, best = 0, None
    pretrained = None if args.from_scratch else args.pretrained_file
    if resuming:
        saved = read_checkpoint(ckpt_path)
        check_resume_consistency(ckpt_path, _resume_settings(args, settings, model_config, saved, max_iters,
                                                             steps_per_epoch), args)
        pretrained = (saved.get("config") or {}).get("pretrained_file")  # what the resumed weights came from
        ckpt = load_training_checkpoint(ckpt_path, model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                        adapt_optimizer_state=adapt_optimizer_state(net, args.weight_decay),
                                        checkpoint=saved)   # the file read above: one read per resume
        del saved
        start_epoch, best = ckpt["epoch"], ckpt["best_metric"]
        _LOG.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    config = _run_config(args, settings, pretrained_file=pretrained, precision=precision,
                         world_size=dist_info.world_size)
    variant = dict(net_kwargs=model_config, dataset=args.dataset, settings=settings, precision=precision,
                   inference_kwargs=dict(im_size=settings["im_size"], window_size=settings["window_size"],
                                         window_stride=settings["window_stride"]),
                   world_size=dist_info.world_size, args=config)
    if dist_info.is_main:
        out.claim()
        atomic_write_yaml(out.path / VARIANT_NAME, variant)
        n_params = sum(p.numel() for p in net.parameters())
        n_dec = sum(p.numel() for p in net.decoder.parameters())
        _LOG.info("model: %s encoder + CBT decoder, %.2fM parameters (decoder %.3fM); %d train / %d val images; "
                  "%d steps/epoch, %d epochs, precision %s", model_config["backbone"], n_params / 1e6, n_dec / 1e6,
                  len(train_set), len(val_set), steps_per_epoch, settings["epochs"], precision)

    def evaluate(model: nn.Module) -> Dict[str, Any]:
        scores = evaluate_miou(unwrap_model(model), val_set, window_size=settings["window_size"],
                               window_stride=settings["window_stride"], window_batch_size=args.window_batch_size,
                               max_images=args.eval_max_images, num_workers=min(args.num_workers, 2))
        return {k: scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "num_images")}

    return fit(model, train_loader=loader, criterion=criterion, optimizer=optimizer, dist_info=dist_info,
               output_dir=out, seed=args.seed, epochs=settings["epochs"], arch=ARCH, model_config=model_config,
               config=config, evaluator=evaluate, best_metric_name="mean_iou", eval_freq=settings["eval_freq"],
               scheduler=scheduler, scheduler_interval="iteration", start_epoch=start_epoch,
               stop_epoch=None if args.stop_after is None else start_epoch + args.stop_after, best_metric=best,
               scaler=scaler, precision=precision, print_freq=args.print_freq,
               max_steps_per_epoch=args.max_steps_per_epoch, tensorboard=args.tensorboard, files=RUN_FILES,
               record_extra=lambda epoch, stats: dict(num_updates=(epoch + 1) * steps_per_epoch,
                                                      train_learning_rate=stats["lr"]),
               start_info={"resume": str(ckpt_path) if resuming else None, "pretrained_file": pretrained},
               checkpoint_extra=dict(variant=variant, n_cls=settings["n_cls"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: the engine's exit codes (:mod:`cbsa_core.engine.cli`): 0 done, 1 refused (one ``error:``
    line), 2 bad flags, 130/143 interrupted."""
    return run_cli(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
