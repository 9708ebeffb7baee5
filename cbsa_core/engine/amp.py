"""Numeric modes of training: the autocast precision, the GradScaler for CUDA fp16, and TF32 for fp32 maths.

The release trains in fp16 autocast with a GradScaler and validates in fp32 (docs/authors-release.md item 16).
Defaults here (:func:`default_precision`): bf16 on GPUs with native bf16 (compute capability 8.0 and later: A100,
H100, H200, L40, RTX 30xx and newer), whose range is fp32's, so no loss scaling is needed and no step is skipped;
fp16 + GradScaler on older GPUs; fp32 on the CPU. TF32 (:func:`set_tf32`, on by default in every track) lets the
fp32 matrix products and convolutions that remain (validation, the fp32 segmentation recipe, autocast's fp32 ops)
use the tensor cores with a 10-bit mantissa; ``--no-tf32`` restores full fp32.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Optional

import torch

__all__ = ["PRECISIONS", "check_precision", "native_bf16", "default_precision", "resolve_precision",
           "autocast_context", "make_grad_scaler", "set_tf32"]

PRECISIONS = ("fp32", "fp16", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: the CPU, and CUDA devices of compute capability 8.0 and later
    (A100, H100/H200, L4/L40, RTX 30xx and newer). The one answer both the default precision and the refusal of
    bf16 use; torch's ``is_bf16_supported()`` also counts emulation, which is slow, and asks the current device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu"


def default_precision(device: torch.device | str) -> str:
    """The training precision used when none is asked for: ``bf16`` on a CUDA device with native bf16
    (:func:`native_bf16`), ``fp16`` on other CUDA devices, ``fp32`` elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def resolve_precision(requested: Optional[str], device: torch.device | str) -> str:
    """``requested`` (``None``/``"auto"``: :func:`default_precision`) checked against ``device``; raises
    ``ValueError`` for fp16 on the CPU and bf16 on a GPU without it."""
    precision = default_precision(device) if requested in (None, "auto") else check_precision(requested)
    autocast_context(device, precision)  # refuses what the device cannot run
    return precision


def set_tf32(enabled: bool) -> Dict[str, bool]:
    """Allow (or forbid) TF32 in CUDA matrix products and cuDNN convolutions for this process; returns the
    settings as recorded in a run's config.

    Uses the ``allow_tf32`` switches (``torch.set_float32_matmul_precision("high")`` is the same thing for matmuls).
    Nothing changes on the CPU, where the switches have no effect.
    """
    enabled = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return {"tf32": enabled, "cuda_matmul_allow_tf32": enabled, "cudnn_allow_tf32": enabled}


def check_precision(precision: str) -> str:
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return p


def autocast_context(device: torch.device | str, precision: str) -> ContextManager:
    """``nullcontext`` for fp32, ``torch.autocast`` otherwise.

    fp16 needs CUDA (CPU fp16 autocast is slow and has no scaler support here); bf16 works on CPU and CUDA.
    """
    p = check_precision(precision)
    device = torch.device(device)
    if p == "fp32":
        return contextlib.nullcontext()
    if p == "fp16":
        if device.type != "cuda":
            raise ValueError(f"fp16 autocast needs a CUDA device (got {device}); use bf16 or fp32")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if not native_bf16(device):
        raise ValueError(f"{device} has no native bf16 (CUDA compute capability 8.0 or later); use fp16 or fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_grad_scaler(device: torch.device | str, precision: str, init_scale: float = 65536.0) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is enabled only for CUDA fp16 (bf16 and fp32 need no loss scaling).

    A disabled scaler is still returned, so the loop and the checkpoint code need no special case: its
    ``state_dict()`` is ``{}`` and loading that into a disabled scaler is a no-op. The release used
    ``init_scale=65536`` (classification) and ``8192`` (ViT fine-tuning).
    """
    p = check_precision(precision)
    device = torch.device(device)
    enabled = device.type == "cuda" and p == "fp16"
    return torch.amp.GradScaler(device=device.type, init_scale=init_scale, enabled=enabled)
