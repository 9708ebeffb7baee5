"""Shared training machinery: config files, distributed set-up, checkpoints, logging, schedules, meters, optimizers
(a multi-tensor Lion), numeric modes (precision, TF32), a training step that reads the GPU only at its progress
lines, and the run lifecycle of every track (output folder, resume consistency, NaN/Inf policy, exit codes and
signals)."""
from .amp import (PRECISIONS, autocast_context, check_precision, default_precision, make_grad_scaler,
                  resolve_precision, set_tf32)
from .cli import (EXIT_OK, EXIT_REFUSED, EXIT_USAGE, RUNTIME_REFUSALS, RunInterrupted, exit_code_of, run_cli,
                  stop_on_sigterm)
from .config import ConfigError, ParsedSettings, load_config_file, parse_args_with_config, setting_source
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
from .host_reads import CudaSyncCounter, HostReadCounter
from .logging import JsonlLogger, TensorBoardLogger, setup_logging, to_jsonable
from .finite import (NonFiniteError, NonFiniteLossError, NonFiniteOutputError, NonFiniteParametersError,
                     count_non_finite_rows, kept_checkpoint_note, non_finite_parameters)
from .loop import default_unpack_batch, evaluate_classifier, train_one_epoch
from .meters import AverageMeter, MetricLogger, accuracy, format_eta
from .lion import Lion
from .optim import OPTIMIZERS, build_optimizer
from .resume import (MustMatch, ResumeMismatchError, check_resume_consistency, schedule_settings,
                     token_layout_setting)
from .run_dir import OutputDir, OutputDirError, check_output_dir, check_output_file
from .runner import (BEST_CHECKPOINT, LAST_CHECKPOINT, LOG_JSONL, RUN_CONFIG, Evaluator, RunFiles,
                     classifier_evaluator, fit, make_eval_loader, make_train_loader)
from .schedules import PolynomialLambda, WarmupCosineLambda, build_lambda_scheduler
from .step_stats import StepRecord, StepWindow
from .training_state import (
    capture_rng_state,
    load_training_checkpoint,
    make_train_sampler,
    restore_rng_state,
    save_training_checkpoint,
    to_weights_only_safe,
)
from .validation import (finite_float, model_settings_error, non_negative_float, non_negative_int, positive_float,
                         positive_int, warn_if_single_class)

__all__ = [
    # amp
    "PRECISIONS", "autocast_context", "check_precision", "default_precision", "make_grad_scaler",
    "resolve_precision", "set_tf32",
    # cli: exit codes and signals
    "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "RUNTIME_REFUSALS", "RunInterrupted", "exit_code_of", "run_cli",
    "stop_on_sigterm",
    # config
    "ConfigError", "ParsedSettings", "load_config_file", "parse_args_with_config", "setting_source",
    # distributed
    "DistInfo", "ShardedEvalSampler", "all_reduce_sum", "barrier", "broadcast_buffers", "broadcast_object",
    "cleanup_distributed", "collective_device", "epoch_seed", "get_rank", "get_world_size", "init_distributed",
    "is_dist_initialized", "revert_sync_batchnorm", "seed_everything", "unwrap_model", "wrap_ddp",
    # host reads: counting what makes the host wait for the GPU
    "CudaSyncCounter", "HostReadCounter",
    # logging
    "JsonlLogger", "TensorBoardLogger", "setup_logging", "to_jsonable",
    # finite: the NaN/Inf policy
    "NonFiniteError", "NonFiniteLossError", "NonFiniteOutputError", "NonFiniteParametersError",
    "count_non_finite_rows", "kept_checkpoint_note", "non_finite_parameters",
    # loop
    "default_unpack_batch", "evaluate_classifier", "train_one_epoch",
    # meters
    "AverageMeter", "MetricLogger", "accuracy", "format_eta",
    # optim
    "Lion", "OPTIMIZERS", "build_optimizer",
    # resume consistency
    "MustMatch", "ResumeMismatchError", "check_resume_consistency", "schedule_settings", "token_layout_setting",
    # output folder
    "OutputDir", "OutputDirError", "check_output_dir", "check_output_file",
    # runner
    "BEST_CHECKPOINT", "LAST_CHECKPOINT", "LOG_JSONL", "RUN_CONFIG", "Evaluator", "RunFiles", "classifier_evaluator",
    "fit", "make_eval_loader", "make_train_loader",
    # schedules
    "PolynomialLambda", "WarmupCosineLambda", "build_lambda_scheduler",
    # step statistics kept on the device
    "StepRecord", "StepWindow",
    # training state
    "capture_rng_state", "load_training_checkpoint", "make_train_sampler", "restore_rng_state",
    "save_training_checkpoint", "to_weights_only_safe",
    # validation: parse-time checks
    "finite_float", "model_settings_error", "non_negative_float", "non_negative_int", "positive_float",
    "positive_int", "warn_if_single_class",
]
