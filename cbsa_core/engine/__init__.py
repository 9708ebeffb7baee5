"""Shared training machinery: distributed set-up, checkpoints, logging, schedules, meters."""
from .amp import PRECISIONS, autocast_context, check_precision, make_grad_scaler
from .distributed import (
    DistInfo,
    ShardedEvalSampler,
    all_reduce_sum,
    barrier,
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
    # distributed
    "DistInfo", "ShardedEvalSampler", "all_reduce_sum", "barrier", "broadcast_object", "cleanup_distributed",
    "collective_device", "epoch_seed", "get_rank", "get_world_size", "init_distributed", "is_dist_initialized",
    "revert_sync_batchnorm", "seed_everything", "unwrap_model", "wrap_ddp",
    # logging
    "JsonlLogger", "TensorBoardLogger", "setup_logging", "to_jsonable",
    # loop
    "NonFiniteLossError", "default_unpack_batch", "evaluate_classifier", "train_one_epoch",
    # meters
    "AverageMeter", "MetricLogger", "accuracy", "format_eta",
    # optim
    "OPTIMIZERS", "build_optimizer",
    # schedules
    "PolynomialLambda", "WarmupCosineLambda", "build_lambda_scheduler",
    # training state
    "capture_rng_state", "load_training_checkpoint", "make_train_sampler", "restore_rng_state",
    "save_training_checkpoint", "to_weights_only_safe",
]
