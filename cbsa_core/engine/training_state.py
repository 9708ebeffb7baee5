"""Checkpointing a whole training run (model, optimizer, scheduler, scaler, RNG, epoch) for bit-exact resume.

Everything stored is a tensor or a plain Python value, so the file loads with ``torch.load(weights_only=True)``.

What makes a resume bit-exact (checked on CPU by the tests):

* the model, optimizer, LR-scheduler (incl. its lambda's parameters) and GradScaler states are restored;
* the RNG state of python ``random``, numpy and torch (CPU, CUDA) at the save point is restored;
* the training order depends only on ``(seed, epoch)``: build the train sampler with :func:`make_train_sampler`
  (or call ``sampler.set_epoch(epoch)`` on it every epoch) and pass ``shuffle=False`` to the ``DataLoader``.
  The loader's worker seeds are drawn from the global torch RNG when each epoch's iterator is created, so they are
  covered by the restored RNG state.

The loop order callers must follow: train epoch ``e`` -> validate -> ``scheduler.step()`` ->
``save_training_checkpoint(..., epoch=e)``. Nothing may draw random numbers between the save and the next epoch.

Distributed runs: the file holds rank 0's RNG state only, and it is not restored on other ranks (giving every rank
the same stream would correlate augmentations). For a reproducible distributed resume, re-seed at each epoch start
with ``seed_everything(epoch_seed(seed, epoch, rank))``.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, DistributedSampler

from ..checkpoint import (CheckpointError, CheckpointMismatchError, atomic_save, load_checkpoint, make_checkpoint,
                          resolve_token_layout)
from .distributed import DistInfo, get_rank, get_world_size, is_dist_initialized, unwrap_model
from .finite import NonFiniteParametersError, non_finite_parameters

__all__ = [
    "capture_rng_state",
    "restore_rng_state",
    "to_weights_only_safe",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "make_train_sampler",
]

_LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """RNG states of python ``random``, numpy's global generator and torch (CPU and every CUDA device), as
    tensors and plain values only (``random.getstate()`` tuples become lists, numpy's key array a tensor)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": [int(x) for x in py_state],
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
        # MT19937 keys are uint32; int64 holds them losslessly and torch serialises it everywhere.
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when the GPU count matches."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = npst["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((npst["name"], keys.astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]),
                         float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([c.cpu().to(torch.uint8) for c in cuda])
        else:
            _LOG.warning("checkpoint holds CUDA RNG states for %d device(s), this machine has %d: not restored",
                         len(cuda), torch.cuda.device_count())


# ------------------------------------------------------------------------------------------- plain-value config
def to_weights_only_safe(obj: Any, *, strict: bool = False, _where: str = "value") -> Any:
    """Recursively convert ``obj`` to what ``torch.load(weights_only=True)`` accepts.

    Tensors, str/int/float/bool/None stay; dicts (str keys), lists and tuples (as lists) recurse; paths and numpy
    scalars/arrays become str / Python numbers / lists. Anything else becomes ``str(obj)`` or, with ``strict``,
    raises ``TypeError`` naming where it was found.
    """
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_weights_only_safe(v, strict=strict, _where=f"{_where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_weights_only_safe(v, strict=strict, _where=f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (PurePath, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":  # argparse.Namespace
        return to_weights_only_safe(vars(obj), strict=strict, _where=_where)
    if strict:
        raise TypeError(f"{_where} has type {type(obj).__name__}, which torch.load(weights_only=True) "
                        f"cannot read back; convert it to a tensor or plain value")
    return str(obj)


# ----------------------------------------------------------------------------------------------------- save / load
def save_training_checkpoint(path: str | os.PathLike, *, model: nn.Module, arch: str,
                             model_config: Mapping[str, Any], optimizer: torch.optim.Optimizer | None,
                             scheduler: Any | None, scaler: torch.amp.GradScaler | None, epoch: int,
                             best_metric: float | torch.Tensor | None, config: Mapping[str, Any] | Any,
                             rng_state: Mapping[str, Any] | None = None, **extra: Any) -> Path | None:
    """Write the run state atomically in this project's checkpoint format; only rank 0 writes.

    ``epoch`` is the 0-based index of the epoch just completed; the file stores ``epoch + 1``, the next epoch to
    run (as the release does). ``config`` (the run's settings, e.g. a dict or argparse Namespace) is made
    weights-only-safe (paths and other objects become str). ``extra`` entries must be tensors or plain values.
    Returns the path written, or ``None`` on ranks other than 0 (no collective: call it on rank 0 only if you like).

    A model holding NaN/inf is refused (:class:`~cbsa_core.engine.finite.NonFiniteParametersError`), the file at
    ``path`` is left as it was: a non-finite model is never saved. (:func:`~cbsa_core.engine.runner.fit` checks
    first on every rank, so that all ranks stop together.)
    """
    if is_dist_initialized() and get_rank() != 0:
        return None
    bad = non_finite_parameters(unwrap_model(model))
    if bad:
        raise NonFiniteParametersError(int(epoch), bad, f"{path} was not written")
    if best_metric is not None:
        best_metric = float(best_metric)
    ckpt = make_checkpoint(
        unwrap_model(model).state_dict(),
        arch=arch,
        model_config=to_weights_only_safe(dict(model_config)),
        epoch=int(epoch) + 1,
        best_metric=best_metric,
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        scaler=scaler.state_dict() if scaler is not None else None,
        rng_state=dict(rng_state) if rng_state is not None else capture_rng_state(),
        world_size=get_world_size(),
        config=to_weights_only_safe(config),
        **{k: to_weights_only_safe(v, strict=True, _where=k) for k, v in extra.items()},
    )
    return atomic_save(ckpt, path)


def load_training_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                             optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                             scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True,
                             strict: bool = True, legacy_token_layout: bool | None = None,
                             adapt_optimizer_state: Callable[[dict], dict] | None = None,
                             checkpoint: Mapping[str, Any] | None = None) -> dict:
    """Load a run state written by :func:`save_training_checkpoint`, or an authors' release file.

    Model weights go through :func:`cbsa_core.checkpoint.load_checkpoint` (strict key/shape check, ``module.``
    stripping, and the token layout of :func:`~cbsa_core.checkpoint.resolve_token_layout`: ``legacy_token_layout``
    True/False overrides what the file implies, None follows the file). Optimizer, scheduler and scaler states are
    loaded when the file has them; a file without them (e.g. weights only) just loads the weights, with a log line.
    ``adapt_optimizer_state(state) -> state`` rewrites the saved optimizer state before it is loaded (a track whose
    parameter groups changed layout keeps its older runs resumable).
    Returns the checkpoint dict with ``epoch`` (next epoch to run; 0 when absent) and ``best_metric`` (float or None,
    read from ``best_acc1`` in the release's files) normalised, and ``token_layout``: ``(legacy, reason)``, the
    layout the weights are to be run with (for models whose switch ``load_checkpoint`` cannot reach, such as the
    converted timm ViTs).

    ``checkpoint``: the file's contents when the caller has already read them (the tracks read a resumed file once to
    check its settings), so that a large run state is not read twice.

    Raises :class:`CheckpointError` naming the path when the file is missing or unreadable, and
    :class:`CheckpointMismatchError` when a state does not fit.
    """
    path = Path(path)
    if checkpoint is None and not path.is_file():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    ckpt = load_checkpoint(model, path, strict=strict, legacy_token_layout=legacy_token_layout,
                           checkpoint=checkpoint)
    ckpt["token_layout"] = resolve_token_layout(ckpt, requested=legacy_token_layout)

    # LambdaLR restores the lambda object's own fields too (warm-up length, epochs): the resumed run keeps its
    # original schedule, unlike the release, which dropped the warm-up on resume.
    optimizer_state = ckpt.get("optimizer")
    if optimizer is not None and optimizer_state and adapt_optimizer_state is not None:
        optimizer_state = adapt_optimizer_state(optimizer_state)
    _load_component(optimizer, optimizer_state, path, "optimizer state",
                    "another optimizer, or a model with other parameters?", "the optimizer starts fresh")
    _load_component(scheduler, ckpt.get("scheduler"), path, "scheduler state",
                    "another schedule?", "the schedule restarts from its first step")

    if scaler is not None:
        state = ckpt.get("scaler", ckpt.get("loss_scaler"))
        if state:
            scaler.load_state_dict(state)
        elif scaler.is_enabled():
            # Saved by a disabled scaler (fp32/bf16 run) or not at all: keep the fresh initial scale.
            _LOG.warning("%s has no GradScaler state: fp16 loss scaling starts from its initial scale", path)

    if restore_rng and ckpt.get("rng_state"):
        if is_dist_initialized() and get_world_size() > 1:
            _LOG.info("distributed run: the checkpoint's (rank-0) RNG state is not restored; per-epoch "
                      "reseeding makes the resume reproducible")
        else:
            restore_rng_state(ckpt["rng_state"])

    ckpt["epoch"] = int(ckpt.get("epoch") or 0)
    best = ckpt.get("best_metric", ckpt.get("best_acc1"))
    ckpt["best_metric"] = None if best is None else float(best)
    return ckpt


# ------------------------------------------------------------------------------------------------ train sampler
def make_train_sampler(dataset: Dataset, dist_info: DistInfo | None, seed: int, epoch: int,
                       shuffle: bool = True) -> DistributedSampler:
    """A shuffling sampler whose order depends only on ``(seed, epoch)`` (and the rank's shard).

    It is a ``DistributedSampler`` in both modes (one replica when not distributed), so the permutation is
    ``randperm(len, seed + epoch)`` either way and the global RNG is not consumed. Reuse it across epochs by calling
    ``sampler.set_epoch(epoch)`` before each one, and give it to the ``DataLoader`` with ``shuffle=False``. As in
    the release's distributed mode, the last shard is padded by repeating indices so that every rank runs the same
    number of steps (no ``drop_last``).
    """
    if dist_info is not None and dist_info.distributed:
        replicas, rank = dist_info.world_size, dist_info.rank
    else:
        replicas, rank = 1, 0
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return sampler


def _load_component(component: Any, state: Any, path: Path, what: str, hint: str, when_missing: str) -> None:
    """Load an optimizer's or scheduler's state dict; a state that does not fit raises
    :class:`CheckpointMismatchError`, a missing one is logged (the component keeps its fresh state)."""
    if component is None:
        return
    if not state:
        _LOG.warning("%s has no %s: %s", path, what, when_missing)
        return
    try:
        component.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointMismatchError(f"{what} in {path} does not fit {type(component).__name__} ({hint}): {e}") from e
