#!/usr/bin/env python
"""GPU readiness in one shot: every question the first minutes on a CUDA node must answer, with PASS/FAIL lines.

    bash scripts/gpu_check.sh                                    # CUDA, the project's .venv -> runs/gpu_check
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gpu_check_dry      # CPU dry run (SKIP lines)

Steps, in order, each under its own time limit (``STEPS``), all within ``--budget`` (440 s: a step gets at most what
is left), so the whole check ends within 8 minutes:

===============  ==============================================================================================
env              versions, GPU, driver (against the minimum the CUDA build needs), bf16 support, the precision
                 the tracks pick by default, TF32
numerics         fp16 and bf16 autocast (and fp32 with TF32) against strict fp32, forward and backward: the CBSA
                 layer, CBT-S, the segmentation decoder and the ViT with CBSA* (limits: ``NUMERIC_LIMITS``)
syncs            CBT-S, batch 32, 20 steps of the real training loop under ``torch.cuda.set_sync_debug_mode``:
                 host synchronisations per step, by the line that caused them (bf16, and fp16 + GradScaler);
                 the multi-tensor Lion against lion-pytorch (same weights, step time; its Triton kernel too)
classification   the real loop on the digits config for one epoch in fp32, fp16 (GradScaler) and bf16, then
                 ``--evaluate --resume`` of the GPU checkpoint on the CPU
ddp              ``torchrun --nproc_per_node=2`` on one GPU (gloo, SyncBatchNorm): every validation image counted
                 once, the result equal to a one-process evaluation; SyncBatchNorm's host syncs measured
seg_vit          one segmentation step (ViT-S + CBT decoder, 512 crops, SGD) and one ViT-adaptation step (ViT-S
                 with CBSA^v, AdamW), each in the default precision and fp16; sliding-window inference
throughput       CBT-S against ViT-S at 224 and 512, training (each model's recipe optimizer, default precision)
                 and inference images/s, peak memory (``scripts/benchmark_models.py``)
compile          the CBSA layer under ``torch.compile`` (inductor, fullgraph) against eager: error and time
===============  ==============================================================================================

Writes to ``--out`` (default ``runs/gpu_check``): ``summary.txt`` (one line per check: PASS/FAIL/SKIP, step, check,
numbers), ``summary.json``, ``steps/<step>.json``, ``logs/<step>.log`` and each step's run folders. Nothing is
downloaded (models have random weights, data is the bundled digits or generated).

On CUDA each step runs in its own process (``--isolate``, the default there): a hang or a CUDA error ends only that
step, which is reported as FAIL. ``--no-isolate`` (the default on the CPU) runs the steps in this process, each
under a SIGALRM time limit. ``--quick`` shrinks every model and dataset (for the CPU dry run; the GPU check is never
quick).

Exit status: 0 every check passed (SKIPs allowed), 1 a check failed or a step ran out of time, 2 bad flags,
3 ``--device cuda`` on a machine without a CUDA device (one line; nothing is run or written).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/gpu_check.py` without an installed package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
DIGITS_CONFIG = REPO / "configs" / "classification" / "digits.yaml"
DIGITS_VAL_IMAGES = 359  # configs/classification/digits.yaml: 1,797 digits split 80/20

# Relative error ‖x_low − x_fp32‖ / ‖x_fp32‖ of outputs and of all gradients (input and parameters together),
# against strict fp32 (TF32 off), at the sizes below. Measured with bf16 autocast on the CPU (torch 2.14.1, seeds
# 0-2, 2026-11-30), largest of the three, out / grads: CBSA layer 2.4e-3 / 2.4e-3, CBT-S 3.7e-2 / 1.3e-1 (seeds
# vary: grads 4.3e-2 to 1.3e-1), segmentation decoder 3.3e-3 / 6.2e-3, ViT-S with CBSA* 9.2e-3 / 1.1e-2. The bf16
# limits are about 2-4x those. CBT-S's gradient error is large because its 12 ISTA blocks threshold with a ReLU:
# rounding moves activations across the threshold, and the dictionaries' gradients differ by ~40 % (one ISTA layer
# alone: 2.5 % in bf16, 0.7 % in fp16). fp16 and TF32 keep 11 significand bits to bf16's 8 (unit roundoff 2^-11
# against 2^-9), so their limits are half of bf16's; the loss scale covers fp16's narrower range.
NUMERIC_LIMITS: Dict[str, Dict[str, tuple]] = {
    "bf16": {"cbsa": (1e-2, 1e-2), "cbt_s": (1e-1, 3e-1), "seg_decoder": (1e-2, 2e-2), "vit_cbsa_star": (3e-2, 3e-2)},
}
NUMERIC_LIMITS["fp16"] = {k: (a / 2, b / 2) for k, (a, b) in NUMERIC_LIMITS["bf16"].items()}
NUMERIC_LIMITS["tf32"] = dict(NUMERIC_LIMITS["fp16"])
# torch.compile against eager in the same precision: fused kernels round in another order, which is expected to
# differ by a few units of the precision's roundoff per op, far below this; a wrong graph is off by O(1).
COMPILE_LIMIT = 5e-2
# --evaluate of a GPU checkpoint on the CPU (strict fp32) against the GPU's validation (fp32 with TF32, which rounds
# the products' inputs to 11 significand bits, 2^-11 = 4.9e-4 relative): the mean loss may move by a few 1e-4 and
# one borderline image may change class; anything more means the file or the evaluation differs.
EVAL_LOSS_RTOL = 5e-3


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Check:
    step: str
    check: str
    status: str  # PASS, FAIL or SKIP
    detail: str = ""
    numbers: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:4s}  {self.step:14s} {self.check:34s} {self.detail}"


def passed(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool
    out: Path
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        from cbsa_core.engine import default_precision
        return default_precision(self.device)

    def mixed_precisions(self) -> List[str]:
        """The autocast modes this device trains in: its default, and fp16 (the fallback of older GPUs)."""
        if not self.cuda:
            return ["bf16"]
        return [self.precision] + (["fp16"] if self.precision != "fp16" else [])

    def folder(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    from cbsa_core.engine import set_tf32
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _peak_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _fmt_mb(mb: Optional[float]) -> str:
    return "" if mb is None else f", peak {mb:.0f} MiB"


# ------------------------------------------------------------------------------------------------------ env
MIN_DRIVER = {"13": 580, "12": 525, "11": 450}  # NVIDIA CUDA Compatibility guide, minor version compatibility


def _nvidia_smi(fields: str) -> Optional[List[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return [s.strip() for s in out.stdout.splitlines()[0].split(",")] if out.returncode == 0 and out.stdout else None


def step_env(ctx: Context) -> List[Check]:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda_build=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                timm=version("timm"), lion_pytorch=version("lion-pytorch"), triton=version("triton"),
                cpus=os.cpu_count(), arch_list=torch.cuda.get_arch_list() if torch.cuda.is_available() else [])
    checks = [_tf32_check()]
    if not ctx.cuda:
        checks.insert(0, Check("env", "versions", "PASS", f"CPU dry run; torch {info['torch']} (built for CUDA "
                               f"{info['cuda_build']}), python {info['python']}, {info['cpus']} CPUs", info))
        checks.append(Check("env", "gpu", "SKIP", "no CUDA device in this run"))
        return checks
    props = torch.cuda.get_device_properties(ctx.device)
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                gpus=torch.cuda.device_count(), default_precision=ctx.precision,
                native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    x = torch.randn(512, 512, device=ctx.device)
    works = bool(torch.isfinite(x @ x).all())
    checks.insert(0, Check("env", "versions", "PASS", f"torch {info['torch']}, CUDA {info['cuda_build']}, cuDNN "
                        f"{info['cudnn']}, timm {info['timm']}, lion-pytorch {info['lion_pytorch']}, triton "
                        f"{info['triton']}, python {info['python']}, {info['cpus']} CPUs", info))
    sm = f"sm_{props.major}{props.minor}"
    in_build = sm in info["arch_list"] or any(a.startswith("compute_") for a in info["arch_list"])
    checks.append(Check("env", "gpu", passed(works and in_build),
                        f"{info['gpus']} x {props.name}, {sm} ({'in' if in_build else 'NOT in'} the build's "
                        f"{' '.join(info['arch_list'])}), {info['memory_gib']:.0f} GiB; native bf16 "
                        f"{info['native_bf16']} -> default precision {ctx.precision}", info))
    smi = _nvidia_smi("driver_version")
    if smi is None:
        checks.append(Check("env", "driver", "SKIP", "nvidia-smi not available: driver version unknown"))
    else:
        driver = smi[0]
        need = MIN_DRIVER.get(str(torch.version.cuda).split(".")[0])
        ok = need is None or int(driver.split(".")[0]) >= need
        checks.append(Check("env", "driver", passed(ok), f"driver {driver}; CUDA {torch.version.cuda} builds need "
                            f">= {need}" if need else f"driver {driver}", {"driver": driver, "min_major": need}))
    return checks


def _tf32_check() -> Check:
    """The tracks' TF32 switch reaches torch's matmul precision (and back)."""
    from cbsa_core.engine import set_tf32
    with _tf32(True):
        on = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        set_tf32(False)
        off = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    ok = on == ("high", True) and off == ("highest", False)
    return Check("env", "tf32 switch", passed(ok), f"--tf32 (default): matmul precision {on[0]!r}, cuDNN TF32 "
                 f"{on[1]}; --no-tf32: {off[0]!r}, {off[1]}", {"on": list(on), "off": list(off)})


# ------------------------------------------------------------------------------------------------- numerics
def _numeric_cases(ctx: Context) -> Dict[str, Callable[[], tuple]]:
    """name -> build(): (module, inputs requiring grad, run(module, inputs) -> output, loss(output) or None)."""
    import cbsa_core
    from finetune_vit.models import create_vit
    from semantic_segmentation.model import create_segmenter, default_model_config

    dev, q = ctx.device, ctx.quick

    def cbsa():
        layer = cbsa_core.CBSA(64, 4, 16, rep_grid=(4, 4)) if q else cbsa_core.CBSA(384, 6, 64)
        grid = (8, 8) if q else (32, 32)
        x = torch.randn(2 if q else 8, 1 + grid[0] * grid[1], layer.proj.in_features)
        return layer, [x], lambda m, xs: m(xs[0], grid_size=grid), None

    def cbt_s():
        size = 128 if q else 224
        model = cbsa_core.create_model("cbt_small", image_size=size, num_classes=1000, **({"depth": 2} if q else {}))
        x = torch.randn(2 if q else 8, 3, size, size)
        y = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(dev)
        return model, [x], lambda m, xs: m(xs[0]), lambda out: F.cross_entropy(out.float(), y)

    def seg_decoder():
        cfg = default_model_config("vit_tiny_patch16_384" if q else "vit_small_patch16_384", n_cls=150,
                                   crop_size=256 if q else 512)
        decoder = create_segmenter(cfg).decoder
        grid = (16, 16) if q else (32, 32)
        x = torch.randn(1 if q else 4, grid[0] * grid[1], cfg["d_model"])
        return decoder, [x], lambda m, xs: m(xs[0], grid), None

    def vit_cbsa_star():
        model = create_vit("vit_small_patch16_224", attention="cbsa_star", num_classes=1000,
                           model_kwargs={"depth": 2} if q else None)
        x = torch.randn(2 if q else 8, 3, 224, 224)
        y = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1)).to(dev)
        return model, [x], lambda m, xs: m(xs[0]), lambda out: F.cross_entropy(out.float(), y)

    return {"cbsa": cbsa, "cbt_s": cbt_s, "seg_decoder": seg_decoder, "vit_cbsa_star": vit_cbsa_star}


def _forward_backward(module: nn.Module, inputs: List[torch.Tensor], run, loss_fn, mode: str, device: torch.device,
                      grad_out: Optional[torch.Tensor]) -> tuple:
    """Output and all gradients (inputs, then parameters) in ``mode``: ``fp32`` (strict), ``tf32``, ``bf16`` or
    ``fp16`` (autocast; fp16 with a loss scale halved until the gradients are finite, as a GradScaler would)."""
    from cbsa_core.engine import autocast_context
    precision = mode if mode in ("bf16", "fp16") else "fp32"
    # A mean loss has small gradients that fp16 would flush to zero: scale it as the GradScaler does (its initial
    # 2^16). A unit-variance output gradient needs no scale.
    scale = 2.0 ** 16 if mode == "fp16" and loss_fn is not None else 1.0
    with _tf32(mode != "fp32"):
        for _ in range(17):
            module.zero_grad(set_to_none=True)
            leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
            with autocast_context(device, precision):
                out = run(module, leaves)
            target = loss_fn(out) if loss_fn is not None else (out.float() * grad_out).sum()
            params = [p for p in module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(target * scale, leaves + params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1) / scale
                              for g, p in zip(grads, leaves + params)])
            if bool(torch.isfinite(flat).all()) or scale <= 1.0:
                break
            scale /= 2.0
    return out.detach().float(), flat, (target.detach().float() if loss_fn is not None else None), scale


def step_numerics(ctx: Context) -> List[Check]:
    modes = (["fp16", "bf16", "tf32"] if ctx.cuda else ["bf16"])
    checks = []
    if not ctx.cuda:
        checks.append(Check("numerics", "fp16 and tf32", "SKIP", "fp16 autocast and TF32 need CUDA"))
    for name, build in _numeric_cases(ctx).items():
        torch.manual_seed(0)
        module, inputs, run, loss_fn = build()
        module = module.to(ctx.device).train()
        inputs = [x.to(ctx.device) for x in inputs]
        grad_out = None
        if loss_fn is None:
            with torch.no_grad():
                shape = run(module, inputs).shape
            grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(ctx.device)
        ref_out, ref_grads, ref_loss, _ = _forward_backward(module, inputs, run, loss_fn, "fp32", ctx.device, grad_out)
        for mode in modes:
            out, grads, loss, scale = _forward_backward(module, inputs, run, loss_fn, mode, ctx.device, grad_out)
            e_out, e_grad = _rel(out, ref_out), _rel(grads, ref_grads)
            lim_out, lim_grad = NUMERIC_LIMITS[mode][name]
            finite = bool(torch.isfinite(out).all() and torch.isfinite(grads).all())
            ok = finite and e_out <= lim_out and e_grad <= lim_grad
            extra = ""
            numbers = {"out_rel": e_out, "grad_rel": e_grad, "limit_out": lim_out, "limit_grad": lim_grad}
            if loss is not None:
                numbers["loss_rel"] = _rel(loss, ref_loss)
                extra += f", loss {numbers['loss_rel']:.1e}"
            if mode == "fp16":
                numbers["loss_scale"] = scale
                extra += f", loss scale 2^{int(math.log2(scale))}"
            checks.append(Check("numerics", f"{mode} {name}", passed(ok),
                                f"out {e_out:.1e} (<= {lim_out:.0e}), grads {e_grad:.1e} (<= {lim_grad:.0e})"
                                f"{extra}{'' if finite else ', NON-FINITE'}", numbers))
        del module, inputs
        if ctx.cuda:
            torch.cuda.empty_cache()
    return checks


# ------------------------------------------------------------------------------------------------------ syncs
def _expected_reads(steps: int, print_freq: int) -> int:
    """Host reads of :func:`cbsa_core.engine.train_one_epoch`: one per progress line (steps 0, k, 2k, ..., last)."""
    return len(range(0, steps, print_freq)) + ((steps - 1) % print_freq != 0)


def step_syncs(ctx: Context) -> List[Check]:
    import cbsa_core
    from cbsa_core.engine import build_optimizer, make_grad_scaler, train_one_epoch
    from cbsa_core.engine.host_reads import CudaSyncCounter, HostReadCounter

    size, batch, steps, freq = (64, 4, 6, 3) if ctx.quick else (224, 32, 20, 10)
    torch.manual_seed(0)
    kwargs = dict(image_size=size, num_classes=1000, **({"depth": 1, "rep_grid": (4, 4)} if ctx.quick else {}))
    model = cbsa_core.create_model("cbt_small", **kwargs).to(ctx.device)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    if ctx.cuda:  # as a DataLoader with pin_memory gives them: copies to the GPU need no sync
        x, y = x.pin_memory(), y.pin_memory()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    checks = []
    for precision in ctx.mixed_precisions():
        optimizer = build_optimizer("lion", model, lr=2e-4, weight_decay=0.05)
        scaler = make_grad_scaler(ctx.device, precision)
        run = dict(criterion=criterion, optimizer=optimizer, epoch=0, device=ctx.device, scaler=scaler,
                   precision=precision, print_freq=freq)
        train_one_epoch(model, [(x, y)] * 3, **run)  # warm-up: cuBLAS/cuDNN handles, optimizer state
        _sync(ctx.device)
        counter = CudaSyncCounter() if ctx.cuda else HostReadCounter()
        with counter:
            stats = train_one_epoch(model, [(x, y)] * steps, **run)
            _sync(ctx.device)
        expected = _expected_reads(steps, freq)
        allowed = expected + (steps if scaler.is_enabled() else 0)  # GradScaler.step reads found_inf every step
        where = counter.by_caller.most_common(4)
        kind = "host syncs" if ctx.cuda else "Python-level host reads (CPU proxy)"
        note = " (+1 per step: torch's GradScaler.step reads its inf flag)" if scaler.is_enabled() else ""
        checks.append(Check("syncs", f"{precision} CBT-S batch {batch}", passed(counter.total <= allowed),
                            f"{counter.total} {kind} in {steps} steps ({counter.total / steps:.2f}/step; progress "
                            f"reads every {freq} steps: {expected}{note}); {1e3 * stats['epoch_time'] / steps:.1f} "
                            f"ms/step; from {', '.join(f'{c} x{n}' for c, n in where) or 'nowhere'}",
                            {"syncs": counter.total, "steps": steps, "expected": expected, "allowed": allowed,
                             "ms_per_step": 1e3 * stats["epoch_time"] / steps, "by_caller": dict(counter.by_caller)}))
    return checks + _lion_checks(ctx)


def _lion_checks(ctx: Context) -> List[Check]:
    """This project's multi-tensor Lion against lion-pytorch's per-parameter one (and its Triton kernel on CUDA):
    the same updates, and the optimizer step's time, on CBT-S's 138 parameter tensors."""
    import cbsa_core
    from lion_pytorch import Lion as ReferenceLion

    from cbsa_core.engine import Lion

    lr, steps = 2e-4, 5
    torch.manual_seed(0)
    start = [p.detach().to(ctx.device) for p in cbsa_core.create_model("cbt_small", num_classes=1000).parameters()]
    grads = [[torch.randn_like(p) * 1e-3 for p in start] for _ in range(steps)]

    def run(factory) -> tuple:
        params = [nn.Parameter(p.clone()) for p in start]
        opt = factory(params)
        best = math.inf
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            _sync(ctx.device)
            t0 = time.perf_counter()
            opt.step()
            _sync(ctx.device)
            best = min(best, time.perf_counter() - t0)
        return [p.detach() for p in params], 1e3 * best

    ours, t_ours = run(lambda ps: Lion(ps, lr=lr, weight_decay=0.05))
    ref, t_ref = run(lambda ps: ReferenceLion(ps, lr=lr, weight_decay=0.05))

    def compare(a: List[torch.Tensor], b: List[torch.Tensor]) -> tuple:
        unequal = sum(int((x != y).sum()) for x, y in zip(a, b))
        return unequal / sum(x.numel() for x in a), max(float((x - y).abs().max()) for x, y in zip(a, b))

    frac, worst = compare(ours, ref)
    exact = frac == 0.0
    ok = exact if not ctx.cuda else (frac <= 1e-3 and worst <= 2 * lr * steps)
    checks = [Check("syncs", "Lion CBT-S step", passed(ok),
                    f"{steps} steps: "
                    f"{'bit-identical to' if exact else f'{100 * frac:.4f} % of the weights differ from'} "
                    f"lion-pytorch (max {worst:.1e}); optimizer step {t_ours:.2f} ms (7 multi-tensor ops) vs "
                    f"{t_ref:.2f} ms (lion-pytorch, 8 ops per tensor)",
                    {"unequal_fraction": frac, "max_abs_diff": worst, "ms_ours": t_ours, "ms_lion_pytorch": t_ref})]
    if not ctx.cuda:
        checks.append(Check("syncs", "lion-pytorch Triton kernel", "SKIP", "needs CUDA"))
        return checks
    try:
        tri, t_tri = run(lambda ps: ReferenceLion(ps, lr=lr, weight_decay=0.05, use_triton=True))
    except Exception as e:  # noqa: BLE001 -- optional path: report why it does not run
        checks.append(Check("syncs", "lion-pytorch Triton kernel", "SKIP",
                            f"does not run with the pinned versions: {type(e).__name__}: {str(e)[:120]}"))
        return checks
    frac, worst = compare(tri, ref)
    checks.append(Check("syncs", "lion-pytorch Triton kernel", "PASS",
                        f"runs (not used by the tracks): {t_tri:.2f} ms per step, {100 * frac:.4f} % of the weights "
                        f"differ from lion-pytorch's reference (max {worst:.1e})",
                        {"ms": t_tri, "unequal_fraction": frac, "max_abs_diff": worst}))
    return checks


# ------------------------------------------------------------------------------------------- classification
def _write_tiny_imagefolder(root: Path, n_train: int = 12, n_val: int = 6, classes: int = 2, size: int = 32) -> Path:
    """A learnable ImageFolder (each class a colour) for the quick runs: PNGs under root/{train,val}/<class>/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = np.array([255 * (c % 2), 255 * ((c // 2) % 2), 128], dtype=np.float64)
                img = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _classification_args(ctx: Context) -> List[str]:
    """The digits config (or, quick, a tiny generated ImageFolder with the same model settings)."""
    args = ["--config", str(DIGITS_CONFIG), "--no-tensorboard", "--overwrite"]
    if ctx.quick:
        data = ctx.out / "data" / "imagefolder"
        if not (data / "val").is_dir():
            _write_tiny_imagefolder(data)
        args += ["--dataset", "imagefolder", "--data", str(data), "--eval-resize", "32", "--batch-size", "8",
                 "--model-override", "depth=1"]
    return args


def _last_epoch_record(run: Path) -> Dict[str, Any]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r][-1]


def step_classification(ctx: Context) -> List[Check]:
    from image_classification import main as cls_main

    base = _classification_args(ctx)
    checks, records = [], {}
    for precision in (["fp32", "fp16", "bf16"] if ctx.cuda else ["fp32", "bf16"]):
        run = ctx.out / f"cls_{precision}"
        rc = cls_main.cli(base + ["--stop-epoch", "1", "--precision", precision, "--device", ctx.device.type,
                                  "--output-dir", str(run)])
        if rc != 0:
            checks.append(Check("classification", f"{precision} 1 epoch", "FAIL", f"exit status {rc}"))
            continue
        rec = records[precision] = _last_epoch_record(run)
        ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True, map_location="cpu")
        scale = (ckpt.get("scaler") or {}).get("scale")
        learned = rec["val_loss"] < math.log(10) or ctx.quick  # below the uniform guess's loss (10 classes)
        checks.append(Check("classification", f"{precision} 1 epoch", passed(math.isfinite(rec["train_loss"]) and
                                                                             learned),
                            f"train loss {rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f} (uniform "
                            f"{math.log(10):.4f}), val top-1 {rec['val_top1']:.2f} %, "
                            f"{rec['train_images_per_sec']:.0f} img/s"
                            + (f", GradScaler scale after the epoch {scale:g}" if scale else ""),
                            dict(rec, grad_scaler_scale=scale)))
    if not ctx.cuda:
        checks.append(Check("classification", "fp16 1 epoch", "SKIP", "fp16 + GradScaler needs CUDA"))
    if "fp32" in records:
        for precision in ("fp16", "bf16"):
            if precision in records:
                ref, got = records["fp32"]["val_loss"], records[precision]["val_loss"]
                diff = abs(got - ref) / ref
                checks.append(Check("classification", f"{precision} vs fp32 val loss", passed(diff <= 0.05),
                                    f"{got:.4f} vs {ref:.4f}: {100 * diff:.2f} % apart (<= 5 %)",
                                    {"rel_diff": diff}))
    source = next((p for p in ("bf16", "fp16", "fp32") if p in records), None)
    if source is None:
        return checks
    run, evaluated = ctx.out / f"cls_{source}", ctx.out / "cls_eval_cpu"
    rc = cls_main.cli(base + ["--evaluate", "--resume", str(run / "checkpoint.pth.tar"), "--device", "cpu",
                              "--output-dir", str(evaluated)])
    if rc != 0:
        checks.append(Check("classification", "--evaluate on the CPU", "FAIL", f"exit status {rc}"))
        return checks
    result = json.loads((evaluated / "eval.json").read_text())
    rec = records[source]
    one_image = 100.0 / result["num_images"]
    loss_diff = abs(result["loss"] - rec["val_loss"]) / rec["val_loss"]
    ok = (result["num_images"] == rec["val_num_images"] and abs(result["top1"] - rec["val_top1"]) <= one_image + 1e-9
          and loss_diff <= EVAL_LOSS_RTOL)
    checks.append(Check("classification", f"{source} checkpoint, --evaluate on CPU", passed(ok),
                        f"top-1 {result['top1']:.2f} % vs {rec['val_top1']:.2f} % on {ctx.device.type} (within one "
                        f"image), loss {100 * loss_diff:.3f} % apart (<= {100 * EVAL_LOSS_RTOL:.1f} %), "
                        f"{result['num_images']} images", {"cpu": result, "device_val": rec}))
    return checks


# ------------------------------------------------------------------------------------------------ processes
_CHILD_GROUPS: set = set()  # process groups started here, stopped with us (SIGTERM) or at their time limit


def _run_child(cmd: Sequence[str], timeout: float, log: Path, env: Optional[Dict[str, str]] = None) -> Optional[int]:
    """Run ``cmd`` in its own process group, output to ``log``; its exit status, or None when it ran past
    ``timeout`` (then the whole group is stopped: SIGTERM, and SIGKILL 5 s later)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _CHILD_GROUPS.add(proc.pid)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc.pid)
            proc.wait()
            return None
        finally:
            _CHILD_GROUPS.discard(proc.pid)


def _stop_group(pgid: int, grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001 -- signal handler signature (SIGTERM, SIGINT)
    for pgid in list(_CHILD_GROUPS):
        _stop_group(pgid, grace=2.0)
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------------ ddp
def _torchrun(args: Sequence[str], timeout: float, log: Path) -> Optional[int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return _run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                      timeout, log, env)


def _tail(path: Path, n: int = 3) -> str:
    lines = [s for s in path.read_text(errors="replace").splitlines() if s.strip()] if path.is_file() else []
    return " | ".join(lines[-n:])


def step_ddp(ctx: Context) -> List[Check]:
    from image_classification import main as cls_main

    run, logs = ctx.out / "ddp", ctx.folder("logs")
    base = _classification_args(ctx)
    rc = _torchrun(["-m", "image_classification.main", *base, "--stop-epoch", "1", "--dist-backend", "gloo",
                    "--device", ctx.device.type, "--output-dir", str(run)], DDP_TORCHRUN_LIMITS[0],
                   logs / "ddp_torchrun.log")
    checks = []
    if rc != 0:
        why = f"ran past {DDP_TORCHRUN_LIMITS[0]} s" if rc is None else f"exit status {rc}"
        return [Check("ddp", "torchrun 2 processes, gloo", "FAIL", f"{why}: {_tail(logs / 'ddp_torchrun.log')}")]
    rec = _last_epoch_record(run)
    ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True, map_location="cpu")
    n_val = 12 if ctx.quick else DIGITS_VAL_IMAGES
    checks.append(Check("ddp", "torchrun 2 processes, gloo", passed(ckpt["world_size"] == 2),
                        f"{ctx.precision if ctx.cuda else 'fp32'}, SyncBatchNorm {'on' if ctx.cuda else 'off (CPU)'}; "
                        f"train {rec['train_num_images']} images, val top-1 {rec['val_top1']:.2f} %", rec))
    evaluated = ctx.out / "ddp_eval_1proc"
    rc = cls_main.cli(base + ["--evaluate", "--resume", str(run / "checkpoint.pth.tar"), "--device", ctx.device.type,
                              "--output-dir", str(evaluated)])
    if rc != 0:
        checks.append(Check("ddp", "exact validation", "FAIL", f"one-process --evaluate: exit status {rc}"))
    else:
        one = json.loads((evaluated / "eval.json").read_text())
        loss_diff = abs(one["loss"] - rec["val_loss"]) / rec["val_loss"]
        ok = (rec["val_num_images"] == one["num_images"] == n_val
              and abs(one["top1"] - rec["val_top1"]) <= 100.0 / n_val + 1e-9 and loss_diff <= EVAL_LOSS_RTOL)
        checks.append(Check("ddp", "exact validation", passed(ok),
                            f"2 processes counted {rec['val_num_images']} of {n_val} images once each; top-1 "
                            f"{rec['val_top1']:.2f} % vs one process {one['top1']:.2f} %, loss {100 * loss_diff:.3f} %"
                            f" apart", {"two": rec, "one": one}))
    if not ctx.cuda:
        checks.append(Check("ddp", "SyncBatchNorm host syncs", "SKIP", "SyncBatchNorm trains on GPUs only"))
        return checks
    result = ctx.out / "steps" / "syncbn_worker.json"
    rc = _torchrun([str(Path(__file__).resolve()), "--worker", "syncbn", "--out", str(ctx.out)],
                   DDP_TORCHRUN_LIMITS[1], logs / "syncbn_torchrun.log")
    if rc != 0 or not result.is_file():
        why = f"ran past {DDP_TORCHRUN_LIMITS[1]} s" if rc is None else f"exit status {rc}"
        checks.append(Check("ddp", "SyncBatchNorm host syncs", "FAIL",
                            f"{why}: {_tail(logs / 'syncbn_torchrun.log')}"))
        return checks
    w = json.loads(result.read_text())
    extra = w["syncbn"]["per_step"] - w["plain"]["per_step"]
    checks.append(Check("ddp", "SyncBatchNorm host syncs", "PASS",
                        f"{w['syncbn']['per_step']:.1f} syncs/step with SyncBatchNorm vs {w['plain']['per_step']:.1f} "
                        f"without ({extra:.1f} more for {w['bn_layers']} BatchNorm layers; torch.distributed's own waits are not "
                        f"counted by the sync debug mode); "
                        f"{w['syncbn']['ms_per_step']:.1f} vs {w['plain']['ms_per_step']:.1f} ms/step", w))
    return checks


def worker_syncbn(out: Path) -> None:
    """torchrun target (2 ranks, one GPU, gloo): CBT-S training steps with and without SyncBatchNorm, counting the
    host syncs of each; rank 0 writes steps/syncbn_worker.json."""
    import cbsa_core
    from cbsa_core.engine import (build_optimizer, cleanup_distributed, default_precision, init_distributed,
                                  make_grad_scaler, train_one_epoch, wrap_ddp)
    from cbsa_core.engine.host_reads import CudaSyncCounter

    info = init_distributed("cuda", "gloo")
    precision = default_precision(info.device)
    report: Dict[str, Any] = {"precision": precision}
    try:
        for name, sync_bn in (("syncbn", True), ("plain", False)):
            torch.manual_seed(0)
            model = wrap_ddp(cbsa_core.create_model("cbt_small", num_classes=1000), info, sync_bn=sync_bn)
            report["bn_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            opt = build_optimizer("lion", model, lr=2e-4, weight_decay=0.05)
            batch = [(torch.randn(16, 3, 224, 224).pin_memory(), torch.randint(0, 1000, (16,)).pin_memory())]
            run = dict(criterion=nn.CrossEntropyLoss(), optimizer=opt, epoch=0, device=info.device, precision=precision,
                       scaler=make_grad_scaler(info.device, precision), print_freq=1000, dist_info=info)
            train_one_epoch(model, batch * 2, **run)
            torch.cuda.synchronize()
            with CudaSyncCounter() as counter:
                stats = train_one_epoch(model, batch * 6, **run)
                torch.cuda.synchronize()
            report[name] = {"per_step": counter.total / 6, "ms_per_step": 1e3 * stats["epoch_time"] / 6,
                            "by_caller": dict(counter.by_caller)}
        if info.is_main:
            path = out / "steps" / "syncbn_worker.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------------------- seg_vit
def step_seg_vit(ctx: Context) -> List[Check]:
    from timm.loss import LabelSmoothingCrossEntropy

    from cbsa_core.engine import build_optimizer, make_grad_scaler, train_one_epoch
    from finetune_vit.models import create_vit
    from semantic_segmentation import main as seg_main
    from semantic_segmentation.inference import sliding_window_logits
    from semantic_segmentation.model import create_segmenter, default_model_config

    dev, q = ctx.device, ctx.quick
    checks = []
    for precision in (ctx.mixed_precisions() if ctx.cuda else ["fp32", "bf16"]):
        # Segmentation: ViT-S/16 encoder + CBT decoder, 512 crops, the release's SGD (Nesterov, momentum 0.9).
        torch.manual_seed(0)
        cfg = (default_model_config("test", n_cls=150, crop_size=64, d_model=32, n_heads=2, n_layers=1,
                                    decoder=dict(n_layers=1, n_heads=2, dim_head=16, rep_grid=[2, 2])) if q
               else default_model_config("vit_small_patch16_384", n_cls=150, crop_size=512))
        model = create_segmenter(cfg).to(dev)
        head = model.encoder.head.weight.detach().clone()
        opt = build_optimizer("sgd", seg_main.optimizer_param_groups(model, 0.0), 1e-3, 0.0, momentum=0.9,
                              nesterov=True)
        crop, b = cfg["image_size"][0], (1 if q else 4)
        labels = torch.randint(0, 150, (b, crop, crop))
        labels[:, :8] = 255  # ignored pixels, as ADE20K's label 0 becomes
        batches = [(torch.randn(b, 3, crop, crop), labels)] * 2
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        stats = train_one_epoch(model, batches, nn.CrossEntropyLoss(ignore_index=255), opt, epoch=0, device=dev,
                                precision=precision, scaler=make_grad_scaler(dev, precision), print_freq=1000)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        ok = (math.isfinite(stats["loss"]) and not missing and model.encoder.head.weight.grad is None
              and torch.equal(model.encoder.head.weight.detach(), head))
        model.eval()
        with torch.no_grad():
            logits = sliding_window_logits(model, torch.randn(1, 3, crop, crop + crop // 3, device=dev), crop,
                                           crop - crop // 16, precision=precision)
        ok = ok and logits.shape == (150, crop, crop + crop // 3) and bool(torch.isfinite(logits).all())
        checks.append(Check("seg_vit", f"{precision} segmentation step", passed(ok),
                            f"{'tiny' if q else 'ViT-S + CBT decoder'}, batch {b} at {crop}: loss "
                            f"{stats['loss']:.3f}, {1e3 * stats['epoch_time'] / 2:.0f} ms/step"
                            f"{_fmt_mb(_peak_mb(dev))}; every trained parameter got a gradient"
                            f"{'' if not missing else ' EXCEPT ' + ', '.join(missing[:3])}; frozen head unchanged; "
                            f"sliding-window inference {tuple(logits.shape)}", {"loss": stats["loss"]}))
        del model, opt, batches
        # ViT adaptation: ViT-S/16 with CBSA^v attention, AdamW, label smoothing, GradScaler(init_scale=8192).
        torch.manual_seed(0)
        vit = create_vit("vit_small_patch16_224", attention="cbsa_vee", num_classes=1000,
                         model_kwargs={"depth": 2} if q else None).to(dev)
        opt = build_optimizer("adamw", vit, lr=5e-5, weight_decay=0.01)
        b = 2 if q else 32
        batches = [(torch.randn(b, 3, 224, 224), torch.randint(0, 1000, (b,)))] * 2
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        stats = train_one_epoch(vit, batches, LabelSmoothingCrossEntropy(0.1), opt, epoch=0, device=dev,
                                precision=precision, scaler=make_grad_scaler(dev, precision, init_scale=8192),
                                print_freq=1000)
        missing = [n for n, p in vit.named_parameters() if p.requires_grad and p.grad is None]
        checks.append(Check("seg_vit", f"{precision} ViT-S CBSA^v step", passed(math.isfinite(stats["loss"])
                                                                                and not missing),
                            f"batch {b} at 224: loss {stats['loss']:.3f}, {1e3 * stats['epoch_time'] / 2:.0f} ms/step"
                            f"{_fmt_mb(_peak_mb(dev))}", {"loss": stats["loss"]}))
        del vit, opt, batches
        if ctx.cuda:
            torch.cuda.empty_cache()
    return checks


# ------------------------------------------------------------------------------------------------ throughput
def step_throughput(ctx: Context) -> List[Check]:
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_models

    out = ctx.folder("throughput")
    if ctx.quick:
        argv = ["--quick", "--optimizer", "recipe", "--device", ctx.device.type, "--out", str(out)]
    else:
        argv = ["--device", ctx.device.type, "--dtype", ctx.precision, "--optimizer", "recipe", "--models",
                "cbt_small", "vit_small", "--sizes", "224", "512", "--batch", "32", "--repeats", "5", "--warmup", "2",
                "--out", str(out)]
    rows = benchmark_models.main(argv)
    checks = []
    for r in rows:
        if r.get("train_ratio_vs_vit") is None:
            continue
        vit = next(v for v in rows if v["size"] == r["size"] and v["model"] != r["model"]
                   and v["model"].split("_")[1] == r["model"].split("_")[1])
        ratio = r["train_ratio_vs_vit"]
        gated = ctx.cuda and r["size"] >= 512  # linear attention must win where the tokens are many
        status = passed(ratio > 1.0) if gated else "PASS"
        checks.append(Check("throughput", f"{r['model']} vs {vit['model']} at {r['size']}", status,
                            f"train {r['train_img_s']:.1f} vs {vit['train_img_s']:.1f} img/s ({ratio:.2f}x, "
                            f"{r['optimizer']} vs {vit['optimizer']}, {r['dtype']}), infer {r['infer_img_s']:.1f} vs "
                            f"{vit['infer_img_s']:.1f} img/s ({r['infer_ratio_vs_vit']:.2f}x)"
                            + (f", train peak {r['train_peak_mem_mb']:.0f} vs {vit['train_peak_mem_mb']:.0f} MiB"
                               if r.get("train_peak_mem_mb") is not None else "")
                            + (" (must exceed 1x; paper Table 7: 2.2x training at 512)" if gated else ""),
                            {"cbt": r, "vit": vit}))
    return checks


# --------------------------------------------------------------------------------------------------- compile
def step_compile(ctx: Context) -> List[Check]:
    import cbsa_core
    from cbsa_core.engine import autocast_context

    dev = ctx.device
    torch.manual_seed(0)
    layer = (cbsa_core.CBSA(64, 4, 16, rep_grid=(4, 4)) if ctx.quick else cbsa_core.CBSA(384, 6, 64)).to(dev)
    grid = (8, 8) if ctx.quick else (32, 32)
    x = torch.randn(2 if ctx.quick else 8, 1 + grid[0] * grid[1], layer.proj.in_features, device=dev,
                    requires_grad=True)
    g = torch.randn(x.shape, device=dev)
    precision = ctx.precision if ctx.cuda else "bf16"

    def run(module):
        with autocast_context(dev, precision):
            out = module(x, grid_size=grid)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], g.to(out.dtype))
        return out.float(), torch.cat([gr.float().reshape(-1) for gr in grads])

    def best_ms(module, repeats=10):
        best = math.inf
        for _ in range(repeats):
            _sync(dev)
            start = time.perf_counter()
            run(module)
            _sync(dev)
            best = min(best, time.perf_counter() - start)
        return 1e3 * best

    compiled = torch.compile(layer, fullgraph=True, backend=ctx.compile_backend)
    start = time.perf_counter()
    out_c, grads_c = run(compiled)
    _sync(dev)
    cold = time.perf_counter() - start
    out_e, grads_e = run(layer)
    err = max(_rel(out_c, out_e), _rel(grads_c, grads_e))
    eager_ms, compiled_ms = best_ms(layer), best_ms(compiled)
    return [Check("compile", f"CBSA {precision}, {ctx.compile_backend} fullgraph", passed(err <= COMPILE_LIMIT),
                  f"vs eager: max relative error {err:.1e} (<= {COMPILE_LIMIT:.0e}); fwd+bwd {compiled_ms:.2f} ms "
                  f"compiled vs {eager_ms:.2f} ms eager ({eager_ms / compiled_ms:.2f}x); first call {cold:.1f} s",
                  {"error": err, "compiled_ms": compiled_ms, "eager_ms": eager_ms, "cold_s": cold})]


# ------------------------------------------------------------------------------------------------------ driver
@dataclasses.dataclass(frozen=True)
class Step:
    run: Callable[[Context], List[Check]]
    limit_s: int


# Limits (s): about twice the expected time on one H100/H200-class GPU with 16 CPU cores, process start included
# (460 s in all; DEFAULT_BUDGET_S caps the sum). ddp holds two torchrun launches (classification, then the SyncBatchNorm measurement).
STEPS: Dict[str, Step] = {
    "env": Step(step_env, 20),
    "numerics": Step(step_numerics, 45),
    "syncs": Step(step_syncs, 35),
    "classification": Step(step_classification, 60),
    "ddp": Step(step_ddp, 100),
    "seg_vit": Step(step_seg_vit, 40),
    "throughput": Step(step_throughput, 70),
    "compile": Step(step_compile, 90),
}
DDP_TORCHRUN_LIMITS = (55, 35)  # the classification run, the SyncBatchNorm measurement
# All steps together: under 8 minutes with the time a step needs to stop at its limit (at most ~10 s).
DEFAULT_BUDGET_S = 440.0


class StepTimeout(Exception):
    pass


def _write_json(path: Path, value: Any) -> None:
    from cbsa_core.atomic import atomic_write_json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, value)


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_step(name: str, ctx: Context, limit: Optional[float] = None) -> List[Check]:
    """Run one step here (under a SIGALRM limit when given), write steps/<name>.json, return its checks."""
    start = time.perf_counter()

    def expire(signum, frame):  # noqa: ANN001 -- signal handler signature
        raise StepTimeout()

    previous = None
    if limit:
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        checks = STEPS[name].run(ctx)
    except StepTimeout:
        checks = [Check(name, "time limit", "FAIL", f"ran out of its {limit:.0f} s limit")]
    except Exception as e:  # noqa: BLE001 -- a step's error is its FAIL line; the traceback goes to the log
        traceback.print_exc()
        checks = [Check(name, "error", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                               f" (traceback in logs/{name}.log)")]
    finally:
        if limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    _write_json(ctx.out / "steps" / f"{name}.json", {"step": name, "elapsed_s": time.perf_counter() - start,
                                                      "checks": _to_json([dataclasses.asdict(c) for c in checks])})
    return checks


def run_isolated(name: str, args: argparse.Namespace, limit: float) -> List[Check]:
    """Run one step in a fresh process with a hard time limit (its whole process group is killed after it)."""
    result = args.out / "steps" / f"{name}.json"
    result.unlink(missing_ok=True)
    log = args.out / "logs" / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--device", args.device, "--out",
           str(args.out), "--compile-backend", args.compile_backend] + (["--quick"] if args.quick else [])
    rc = _run_child(cmd, limit, log, dict(os.environ, PYTHONUNBUFFERED="1"))  # the log survives a kill
    if rc is None:
        return [Check(name, "time limit", "FAIL", f"ran out of its {limit:.0f} s limit (logs/{name}.log: "
                                                  f"{_tail(log, 2)})")]
    if not result.is_file():
        return [Check(name, "error", "FAIL", f"the step's process ended with status {rc} without a result: "
                                             f"{_tail(log, 2)}")]
    return [Check(**c) for c in json.loads(result.read_text())["checks"]]


def write_summary(out: Path, checks: List[Check], header: List[str], elapsed: float,
                  pending: Sequence[str] = ()) -> str:
    """summary.txt and summary.json; rewritten after every step, so a run stopped from outside leaves the steps
    done so far (and ``overall: INCOMPLETE`` naming the ones not run)."""
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    overall = "INCOMPLETE" if pending else ("FAIL" if counts["FAIL"] else "PASS")
    footer = (f"overall: {overall}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
              f"{elapsed:.0f} s" + (f"; not run yet: {', '.join(pending)}" if pending else ""))
    text = "\n".join(header + [c.line() for c in checks] + [footer]) + "\n"
    from cbsa_core.atomic import atomic_write_text
    atomic_write_text(out / "summary.txt", text)
    _write_json(out / "summary.json", {"header": header, "overall": overall, "counts": counts, "elapsed_s": elapsed,
                                       "checks": _to_json([dataclasses.asdict(c) for c in checks])})
    return footer


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the check); cpu for a dry run of every step that can run there")
    p.add_argument("--quick", action="store_true", help="tiny models and data (the CPU dry run)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="output folder")
    p.add_argument("--only", nargs="+", choices=tuple(STEPS), default=None, help="run these steps only")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each step in its own process (default on CUDA)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all steps together; a step gets min(its limit, what is left)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compile step (default inductor; eager with --quick on CPU)")
    p.add_argument("--step", choices=tuple(STEPS), default=None, help=argparse.SUPPRESS)  # one isolated step
    p.add_argument("--worker", choices=("syncbn",), default=None, help=argparse.SUPPRESS)  # torchrun target
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # steps run from the repository root
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.quick and args.device == "cpu" else "inductor"
    if args.isolate is None:
        args.isolate = args.device == "cuda"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop the steps' process groups (their own sessions) with us
        signal.signal(sig, _on_sigterm)
    if args.worker == "syncbn":
        worker_syncbn(args.out)
        return EXIT_OK
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing was run; for a CPU dry run: "
              "scripts/gpu_check.sh --device cpu --quick", file=sys.stderr, flush=True)
        return EXIT_NO_CUDA
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    ctx = Context(device=device, quick=args.quick, out=args.out, compile_backend=args.compile_backend)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    if args.step is not None:  # inside an isolated step's process
        run_step(args.step, ctx)
        return EXIT_OK
    names = args.only or list(STEPS)
    header = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}: device {args.device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
              f"{torch.__version__}, quick {args.quick}, {'isolated' if args.isolate else 'in-process'} steps, "
              f"budget {args.budget:.0f} s, out {args.out}"]
    print(header[0], flush=True)
    start = time.perf_counter()
    checks: List[Check] = []
    for i, name in enumerate(names):
        write_summary(args.out, checks, header, time.perf_counter() - start, pending=names[i:])
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            checks.append(Check(name, "time budget", "FAIL", f"not run: the check's {args.budget:.0f} s are spent"))
            print(checks[-1].line(), flush=True)
            continue
        limit = min(STEPS[name].limit_s, left)
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        step_checks = run_isolated(name, args, limit) if args.isolate else run_step(name, ctx, limit)
        for c in step_checks:
            print(c.line(), flush=True)
        checks += step_checks
    footer = write_summary(args.out, checks, header, time.perf_counter() - start)
    print(f"{footer}; {args.out / 'summary.txt'}", flush=True)
    return EXIT_FAILED if any(c.status == "FAIL" for c in checks) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
