"""Process-group set-up for single-process and ``torchrun`` launches, and the small collectives the loops need.

The release's launch logic is broken in several ways (docs/authors-release.md §1.2.4 and item 25): a plain
``python main.py`` dies with ``KeyError: 'WORLD_SIZE'``, and under torchrun no ``set_device`` is called, so every
rank lands on GPU 0. Here the torchrun environment is optional, and each rank binds its own GPU first.

Validation is sharded with :class:`ShardedEvalSampler` (no padding, no dropping) and the per-rank sums are
all-reduced, which counts every validation image exactly once.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import unwrap_model
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_dist_initialized",
    "get_rank",
    "get_world_size",
    "collective_device",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "broadcast_buffers",
    "seed_everything",
    "epoch_seed",
    "unwrap_model",
    "revert_sync_batchnorm",
    "wrap_ddp",
    "ShardedEvalSampler",
]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``distributed`` is True only when a process group is in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank in the process group, or ``$RANK`` (default 0) before/without one."""
    return dist.get_rank() if is_dist_initialized() else _env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistInfo:
    """Read the torchrun environment and, when ``WORLD_SIZE > 1``, join the process group.

    * No ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (plain ``python main.py``): one process, no process group.
    * ``WORLD_SIZE > 1``: ``init_process_group(init_method="env://")``; ``MASTER_ADDR``/``MASTER_PORT`` come from
      torchrun, on one node or many (``--nnodes``, ``--rdzv-endpoint``). The backend is NCCL on CUDA and gloo on CPU
      unless ``backend`` says otherwise.
    * ``device``: ``None`` picks CUDA when available; ``"cpu"`` forces the CPU. Under DDP the CUDA device is always
      ``cuda:LOCAL_RANK``.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    distributed = world_size > 1

    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
        if distributed or dev.index is None:
            if dev.index is not None and dev.index != local_rank:
                _LOG.warning("ignoring device index %s under DDP: rank %d uses cuda:%d (LOCAL_RANK)",
                             dev.index, rank, local_rank)
            # A launcher that binds one GPU per process (SLURM --gpus-per-task=1) leaves one visible device.
            dev = torch.device("cuda", local_rank if torch.cuda.device_count() > 1 else 0)
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"cuda:{dev.index} requested (LOCAL_RANK={local_rank}) but only {torch.cuda.device_count()} "
                f"GPU(s) are visible; launch at most that many processes per node"
            )
        # Bind this process to its GPU before any CUDA work or NCCL init; otherwise every rank creates a context
        # on GPU 0 (the release bug, item 25).
        torch.cuda.set_device(dev)

    if distributed and not is_dist_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set: launch with torchrun "
                f"(e.g. `torchrun --nproc_per_node={world_size} ...`), which sets the rendezvous variables"
            )
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        _LOG.info("process group initialised: backend=%s rank=%d/%d local_rank=%d device=%s",
                  backend, rank, world_size, local_rank, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, distributed=distributed)


def cleanup_distributed() -> None:
    if is_dist_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU under NCCL (it reduces CUDA tensors only),
    the CPU otherwise."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not is_dist_initialized():
        return
    if dist.get_backend() == "nccl":
        # Naming the device avoids NCCL guessing (and warning about) which GPU this rank uses.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place, and return it; returns ``t`` untouched without a process group."""
    if is_dist_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank receives rank ``src``'s (picklable) ``obj``; identity without a process group."""
    if not is_dist_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: nn.Module, dist_info: DistInfo | None = None, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics), in place; a no-op when not distributed.

    Without SyncBatchNorm (gloo on the CPU, or ``sync_bn=False``) each rank updates its running statistics from its
    own batches, and DDP only re-broadcasts buffers at the start of the next training forward, so after an epoch
    the ranks hold different statistics. Validation must use rank 0's, the ones that are saved, or the distributed
    metric would not describe the checkpoint. Under SyncBatchNorm the broadcast changes nothing. A collective:
    every rank must call it.
    """
    distributed = dist_info.distributed if dist_info is not None else is_dist_initialized()
    if not distributed or not is_dist_initialized() or dist.get_world_size() == 1:
        return
    for buf in unwrap_model(model).buffers():
        dist.broadcast(buf.data, src=src)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy and torch (CPU and all GPUs) with ``seed + rank``; returns that seed.

    The rank offset gives each process its own augmentation stream; identical streams would apply the same
    random crops to different images on every rank.
    """
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed that depends only on ``(seed, epoch, rank)`` without collisions such as seed+epoch+rank.

    Re-seeding with ``seed_everything(epoch_seed(seed, epoch, rank))`` at each epoch start makes the augmentation
    stream of every rank independent of what happened before, so a distributed resume needs no per-rank RNG
    snapshot (the checkpoint holds rank 0's only).
    """
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


class _BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """Plain BatchNorm that, like SyncBatchNorm, accepts 2-D to 5-D input (same parameters and buffers)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``SyncBatchNorm`` by a plain BatchNorm sharing its parameters, buffers and state-dict keys.

    Needed on CPU: torch's SyncBatchNorm raises in training mode whenever a process group is initialised and the
    input is not on a GPU.
    """
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        out = _BatchNormXd(module.num_features, module.eps, module.momentum, module.affine,
                           module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out


def wrap_ddp(model: nn.Module, dist_info: DistInfo, sync_bn: bool = True,
             find_unused_parameters: bool = False) -> nn.Module:
    """Move ``model`` to the device and, in a distributed run, wrap it in DDP.

    * CUDA + ``sync_bn``: BatchNorm layers become SyncBatchNorm, so the conv stem's statistics are global
      (docs/authors-release.md item 10).
    * CPU (gloo): torch only implements SyncBatchNorm's training forward for GPU inputs, so no conversion is done
      and any SyncBatchNorm already in the model is turned back into BatchNorm: each process then keeps its own
      batch statistics, as DataParallel did in the release. Buffers are still broadcast from rank 0 by DDP
      (at each training forward) and by ``evaluate_classifier`` (before validation, :func:`broadcast_buffers`).
    * Not distributed: the model is returned (on the device) unwrapped.
    """
    model = model.to(dist_info.device)
    if not dist_info.distributed:
        return model
    if dist_info.device.type == "cuda":
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.device.index],
                                                   output_device=dist_info.device.index,
                                                   find_unused_parameters=find_unused_parameters)
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        _LOG.warning("SyncBatchNorm is not supported on %s; using per-process BatchNorm statistics",
                     dist_info.device)
        model = revert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every index on exactly one rank, no padding, no dropping.

    Shards differ in length by at most one, so summing per-rank (correct, loss, count) with ``all_reduce`` gives the
    metric over exactly the whole dataset. The release reaches the same totals differently: a
    ``DistributedSampler(drop_last=True)`` for the divisible part, then the leftover tail on every rank through an
    auxiliary loader. Both count each image once; eval-mode outputs do not depend on batch composition (BatchNorm
    uses running statistics), so the metric is the same up to float summation order.

    Ranks then run different numbers of batches, so the eval forward must issue no collectives: evaluate the
    unwrapped model (``unwrap_model``), not the DDP wrapper.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(dataset_len, int):
            dataset_len = len(dataset_len)  # type: ignore[arg-type]  # a dataset is accepted too
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
