"""Shared training machinery: config files, distributed set-up, checkpoints, logging, schedules, meters."""
from .amp import PRECISIONS, autocast_context, check_precision, make_grad_scaler
from .config import ConfigError, load_config_file, parse_args_with_config
from .distributed import (
    DistInfo,
    ShardedEvalSampler,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup_distributed,
    collective_device,
    epoch_seed,
    get_rank,
    get_world_size,
    init_distributed,
    is_dist_initialized,
    revert_sync_batchnorm,
    seed_everything,
    unwrap_model,
    wrap_ddp,
)
from .logging import JsonlLogger, TensorBoardLogger, setup_logging, to_jsonable
from .loop import NonFiniteLossError, default_unpack_batch, evaluate_classifier, train_one_epoch
from .meters import AverageMeter, MetricLogger, accuracy, format_eta
from .optim import OPTIMIZERS, build_optimizer
from .runner import BEST_CHECKPOINT, LAST_CHECKPOINT, LOG_JSONL, RUN_CONFIG, fit, make_eval_loader, make_train_loader
from .schedules import PolynomialLambda, WarmupCosineLambda, build_lambda_scheduler
from .training_state import (
    capture_rng_state,
    load_training_checkpoint,
    make_train_sampler,
    restore_rng_state,
    save_training_checkpoint,
    to_weights_only_safe,
)

__all__ = [
    # amp
    "PRECISIONS", "autocast_context", "check_precision", "make_grad_scaler",
    # config
    "ConfigError", "load_config_file", "parse_args_with_config",
    # distributed
    "DistInfo", "ShardedEvalSampler", "all_reduce_sum", "barrier", "broadcast_buffers", "broadcast_object",
    "cleanup_distributed", "collective_device", "epoch_seed", "get_rank", "get_world_size", "init_distributed",
    "is_dist_initialized", "revert_sync_batchnorm", "seed_everything", "unwrap_model", "wrap_ddp",
    # logging
    "JsonlLogger", "TensorBoardLogger", "setup_logging", "to_jsonable",
    # loop
    "NonFiniteLossError", "default_unpack_batch", "evaluate_classifier", "train_one_epoch",
    # meters
    "AverageMeter", "MetricLogger", "accuracy", "format_eta",
    # optim
    "OPTIMIZERS", "build_optimizer",
    # runner
    "BEST_CHECKPOINT", "LAST_CHECKPOINT", "LOG_JSONL", "RUN_CONFIG", "fit", "make_eval_loader", "make_train_loader",
    # schedules
    "PolynomialLambda", "WarmupCosineLambda", "build_lambda_scheduler",
    # training state
    "capture_rng_state", "load_training_checkpoint", "make_train_sampler", "restore_rng_state",
    "save_training_checkpoint", "to_weights_only_safe",
]
