"""Mixed precision: an autocast context for the forward + loss, and a GradScaler for CUDA fp16.

The release trains in fp16 autocast with a GradScaler and validates in fp32 (official-code.md item 16).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["PRECISIONS", "check_precision", "autocast_context", "make_grad_scaler"]

PRECISIONS = ("fp32", "fp16", "bf16")


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
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} does not support bf16; use fp16 or fp32")
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
