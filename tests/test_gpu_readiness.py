"""GPU readiness, checked on the CPU: the multi-tensor Lion (bit-exact with lion-pytorch, state-compatible, few
launches), no host read in the steady-state training step, the numeric defaults, segmentation DDP without
find_unused_parameters, and a dry run of ``scripts/gpu_check.py`` so the GPU check cannot rot."""
from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import cbsa_core
from cbsa_core.engine import (Lion, NonFiniteLossError, build_optimizer, default_precision, resolve_precision,
                              set_tf32, train_one_epoch)
from cbsa_core.engine.host_reads import HostReadCounter

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------- Lion
def _lion_pytorch():
    from lion_pytorch import Lion as ReferenceLion
    return ReferenceLion


def _two_groups(params, lr=1e-3):
    # group 2: its own lr and no weight decay; group 1 inherits weight decay 0.1
    return [{"params": params[:2]}, {"params": params[2:], "lr": 3 * lr, "weight_decay": 0.0}]


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(5, generator=g), torch.randn(3, 4, 2, generator=g),
            torch.randn(1, generator=g)]


def _step_both(opts, params_lists, grads):
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()
    for o in opts:
        o.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_lion_equals_lion_pytorch_bit_for_bit(foreach):
    """Eight fp32 steps, weight decay, two parameter groups, a parameter without a gradient in some steps and a
    learning rate changed mid-way (as a scheduler does): every parameter and momentum bit-identical."""
    ref_params = [t.clone().requires_grad_() for t in _tensors()]
    our_params = [t.clone().requires_grad_() for t in _tensors()]
    ref = _lion_pytorch()(_two_groups(ref_params), lr=1e-3, weight_decay=0.1)
    ours = Lion(_two_groups(our_params), lr=1e-3, weight_decay=0.1, foreach=foreach)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g) for p in ref_params]
        if step == 4:
            for o in (ref, ours):
                o.param_groups[0]["lr"] = 2.5e-4
        _step_both([ref, ours], [ref_params, our_params], grads)
        if step in (2, 3):  # no gradient for the last parameter: both skip it
            ref_params[-1].grad = our_params[-1].grad = None
    for a, b in zip(ref_params, our_params):
        assert torch.equal(a, b)
        assert torch.equal(ref.state[a]["exp_avg"], ours.state[b]["exp_avg"])
    assert not torch.equal(ref_params[0], _tensors()[0])  # the steps did move the weights


def test_lion_update_is_the_released_formula():
    """One step from a known momentum, against the equations written out (lion-pytorch 0.2.5 update_fn)."""
    p0, m0, grad = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.2, -0.1, 0.0, 1.0]), \
        torch.tensor([-1.0, 0.5, 0.0, -20.0])
    lr, wd, b1, b2 = 0.1, 0.5, 0.9, 0.99
    p = p0.clone().requires_grad_()
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    opt.state[p]["exp_avg"] = m0.clone()
    p.grad = grad
    opt.step()
    direction = torch.sign(b1 * m0 + (1 - b1) * grad)  # [sign(0.08), sign(-0.04), 0, sign(-1.1)]
    assert direction.tolist() == [1.0, -1.0, 0.0, -1.0]
    torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd) - lr * direction, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], b2 * m0 + (1 - b2) * grad, rtol=0, atol=1e-7)


def test_lion_refuses_bad_hyperparameters():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr must be > 0"):
        Lion(p, lr=0.0)
    with pytest.raises(ValueError, match="betas must be two numbers in \\[0, 1\\]"):
        Lion(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        Lion(p, weight_decay=-0.1)


@pytest.mark.parametrize("direction", ["lion_pytorch_to_ours", "ours_to_lion_pytorch"])
def test_lion_state_dicts_are_interchangeable_and_resume_exactly(tmp_path, direction):
    """A run trained with lion-pytorch resumes with this Lion (and back) through a checkpoint file read with
    weights_only=True, and continues exactly as the uninterrupted run."""
    ReferenceLion = _lion_pytorch()
    first, second = (ReferenceLion, Lion) if direction == "lion_pytorch_to_ours" else (Lion, ReferenceLion)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(t.shape, generator=g) for t in _tensors()] for _ in range(6)]

    straight = [t.clone().requires_grad_() for t in _tensors()]
    opt = first(_two_groups(straight), lr=1e-3, weight_decay=0.1)
    for gr in grads:
        _step_both([opt], [straight], gr)

    params = [t.clone().requires_grad_() for t in _tensors()]
    opt = first(_two_groups(params), lr=1e-3, weight_decay=0.1)
    for gr in grads[:3]:
        _step_both([opt], [params], gr)
    torch.save({"optimizer": opt.state_dict(), "params": [p.detach() for p in params]}, tmp_path / "ckpt.pth")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    resumed = [t.clone().requires_grad_() for t in saved["params"]]
    opt2 = second(_two_groups(resumed, lr=0.5), lr=0.5, weight_decay=0.9)  # hyperparameters come from the file
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert set(opt2.state_dict()["state"][0]) == {"exp_avg"}
    for gr in grads[3:]:
        _step_both([opt2], [resumed], gr)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def _optimizer_step_ops(optimizer: torch.optim.Optimizer) -> collections.Counter:
    """The ops that ``optimizer.step()`` calls directly (children of its ``Optimizer.step#...`` profiler range): a
    multi-tensor op counts once, whatever it does per tensor inside."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.step()
    events = prof.events()
    (step,) = [e for e in events if e.name.startswith("Optimizer.step#")]
    return collections.Counter(e.name for e in events if e.cpu_parent is not None and e.cpu_parent.id == step.id)


def test_lion_step_of_cbt_small_launches_few_ops():
    """CBT-S has 138 parameter tensors. lion-pytorch calls 8 ops per tensor and step (1,104), plus zeros_like on the
    first step (1,242); this Lion calls zeros_like once per tensor on the first step and then 7 multi-tensor ops:
    at most 1/5 of lion-pytorch's first step, both on the first step and after."""
    model = cbsa_core.create_model("cbt_small", num_classes=1000)
    params = list(model.parameters())
    assert len(params) == 138
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    reference = _lion_pytorch()(params, lr=1e-4, weight_decay=0.05)
    ref_first, ref_next = _optimizer_step_ops(reference), _optimizer_step_ops(reference)
    ours = Lion(params, lr=1e-4, weight_decay=0.05)
    our_first, our_next = _optimizer_step_ops(ours), _optimizer_step_ops(ours)
    assert sum(ref_first.values()) == 1242 and ref_first["aten::zeros_like"] == 138
    assert sum(ref_next.values()) == 1104
    assert sum(our_first.values()) == 138 + 7 <= 1242 / 5 and our_first["aten::zeros_like"] == 138
    assert our_next == collections.Counter({"aten::_foreach_add_": 3, "aten::_foreach_mul_": 2,
                                            "aten::_foreach_mul": 1, "aten::_foreach_sign_": 1})
    print(f"Lion optimizer step of CBT-S, top-level ops: lion-pytorch {sum(ref_first.values())} (first step) / "
          f"{sum(ref_next.values())}; this project's {sum(our_first.values())} / {sum(our_next.values())}")


def test_build_optimizer_lion_is_the_multi_tensor_one():
    opt = build_optimizer("lion", nn.Linear(3, 2), lr=2e-4, weight_decay=0.05)
    assert isinstance(opt, Lion) and opt.foreach
    assert opt.state_dict()["param_groups"] == [{"lr": 2e-4, "betas": (0.9, 0.99), "weight_decay": 0.05,
                                                 "params": [0, 1]}]


# ------------------------------------------------------------------------------------------ host reads per step
def _cbt_batches(n_steps: int, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_steps)]


def _tiny_cbt():
    torch.manual_seed(0)
    return cbsa_core.create_model("cbt_tiny", image_size=32, patch_size=4, depth=1, rep_grid=(2, 2), num_classes=10)


@pytest.mark.parametrize("precision, print_freq, n_steps", [("fp32", 4, 10), ("bf16", 5, 10), ("fp32", 3, 7)])
def test_training_step_reads_the_host_once_per_print_interval(precision, print_freq, n_steps):
    """N steps of the real loop (CBT, Lion, a per-step schedule, gradient clipping) with --print-freq k read
    device values at most ceil(N/k) + 1 times (the progress lines: steps 0, k, 2k, ... and the last), whatever N;
    the statistics still come out right."""
    batches = _cbt_batches(n_steps)
    model = _tiny_cbt()
    opt = build_optimizer("lion", model, lr=1e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - 0.01 * it)
    logged = []
    with HostReadCounter() as reads:
        stats = train_one_epoch(model, batches, nn.CrossEntropyLoss(), opt, epoch=0, device="cpu",
                                precision=precision, print_freq=print_freq, clip_grad=1.0, scheduler_per_iter=sched,
                                log_fn=lambda values, step: logged.append(step))
    lines = len(range(0, n_steps, print_freq)) + ((n_steps - 1) % print_freq != 0)
    assert reads.total == lines <= math.ceil(n_steps / print_freq) + 1, reads.by_method
    assert logged == sorted(set(range(0, n_steps, print_freq)) | {n_steps - 1})
    assert stats["num_images"] == 4 * n_steps and stats["steps"] == n_steps and math.isfinite(stats["loss"])


def test_host_read_counter_sees_a_read_at_every_step():
    """Control: with --print-freq 1 every step is read, so the counter does see reads inside the loop."""
    batches = _cbt_batches(6)
    model = _tiny_cbt()
    opt = build_optimizer("lion", model, lr=1e-4, weight_decay=0.05)
    with HostReadCounter() as reads:
        train_one_epoch(model, batches, nn.CrossEntropyLoss(), opt, epoch=0, device="cpu", print_freq=1)
    assert reads.total == 6


def test_deferred_statistics_equal_the_per_step_values():
    """The epoch loss / top-1 computed from the device window equal the per-step values computed directly."""
    batches = _cbt_batches(5, batch=3) + [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]  # short last
    model = _tiny_cbt()
    opt = build_optimizer("sgd", model, lr=0.0, weight_decay=0.0)  # lr 0: the weights stay, so replay is exact
    ce = nn.CrossEntropyLoss()
    stats = train_one_epoch(model, batches, ce, opt, epoch=0, device="cpu", print_freq=4)
    with torch.no_grad():
        model.train()
        losses = [(ce(model(x), y).double() * len(y)).item() for x, y in batches]
        correct = [(model(x).argmax(1) == y).sum().item() for x, y in batches]
    assert stats["num_images"] == 17
    assert stats["loss"] == pytest.approx(sum(losses) / 17, rel=1e-12)
    assert stats["top1"] == pytest.approx(100.0 * sum(correct) / 17)


def test_nan_between_checks_is_found_at_the_next_check_and_named():
    batches = _cbt_batches(9)
    model = _tiny_cbt()
    opt = build_optimizer("lion", model, lr=1e-4, weight_decay=0.0)
    calls = {"n": 0}
    ce = nn.CrossEntropyLoss()

    def nan_at_step_5(out, y):
        calls["n"] += 1
        return ce(out, y) * (float("nan") if calls["n"] == 6 else 1.0)

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 5 \(found when steps 5-8 were "
                                                 r"checked\): stopping; no checkpoint is written") as e:
        train_one_epoch(model, batches, nan_at_step_5, opt, epoch=2, device="cpu", print_freq=4)
    assert e.value.checked == (5, 8) and calls["n"] == 9  # step 8's forward ran, its backward did not


# -------------------------------------------------------------------------------------------- numeric defaults
@pytest.mark.parametrize("capability,expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_one_answer_to_native_bf16_decides_the_default_and_the_refusal(monkeypatch, capability, expected):
    """A V100/T4 (7.x) trains in fp16 by default and an explicit bf16 request is refused there (torch's
    is_bf16_supported() would count its slow emulation); 8.0 and later default to bf16. No GPU needed: the
    device capability is the only thing asked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert default_precision("cuda") == expected
    if expected == "fp16":
        with pytest.raises(ValueError, match="no native bf16"):
            resolve_precision("bf16", "cuda")


def test_precision_defaults_and_tf32_switch():
    assert default_precision("cpu") == "fp32" and resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert set_tf32(False) == {"tf32": False, "cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert set_tf32(True)["tf32"] and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------- segmentation under DDP
def _tiny_segmenter(decoder: str = "mask_transformer"):
    from semantic_segmentation.model import create_segmenter, default_model_config
    extra = dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2]) if decoder == "mask_transformer" else {}
    cfg = default_model_config("test", n_cls=3, crop_size=32, d_model=16, n_heads=2, n_layers=1, patch_size=8,
                               decoder=dict(name=decoder, **extra))
    return create_segmenter(cfg)


@pytest.mark.parametrize("decoder", ["mask_transformer", "linear", "depict_ca"])
def test_segmenter_trains_every_parameter_but_the_frozen_encoder_heads(decoder):
    """Every parameter that requires a gradient gets one: the condition for DDP without find_unused_parameters."""
    model = _tiny_segmenter(decoder).train()
    frozen = model.frozen_parameter_names()
    assert frozen == ["encoder.head.weight", "encoder.head.bias"]
    assert "encoder.head.weight" in model.state_dict()  # still saved and loaded
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_ddp_without_find_unused_parameters_needs_the_frozen_head(tmp_path):
    """In-process DDP (gloo, one rank): the frozen model trains several steps without find_unused_parameters; the
    same model with its head trainable fails at the second step, which is why the release needed the flag."""
    import torch.distributed as dist
    from cbsa_core.engine import wrap_ddp
    from cbsa_core.engine.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = DistInfo(0, 1, 0, torch.device("cpu"), True)
        model = wrap_ddp(_tiny_segmenter(), info, sync_bn=False)
        assert not model.find_unused_parameters
        for _ in range(3):
            model(torch.randn(1, 3, 32, 32)).sum().backward()
        unfrozen = _tiny_segmenter()
        unfrozen.encoder.head.requires_grad_(True)
        unfrozen = wrap_ddp(unfrozen, info, sync_bn=False)
        unfrozen(torch.randn(1, 3, 32, 32)).sum().backward()
        with pytest.raises(RuntimeError, match="Expected to have finished reduction in the prior iteration"):
            unfrozen(torch.randn(1, 3, 32, 32)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_segmentation_trains_under_torchrun_without_find_unused_parameters(tmp_path):
    """torchrun, gloo, 2 processes, two steps each through the track's CLI: DDP without find_unused_parameters
    trains, the frozen head is saved unchanged and the optimizer holds only the trained parameters."""
    from test_segmentation_data import N_CLS, make_toy_ade20k

    from cbsa_core.engine import seed_everything
    from semantic_segmentation.model import create_segmenter

    data = make_toy_ade20k(tmp_path / "data", n_train=4, n_val=1)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "semantic_segmentation.main", "--dataset", "ade20k", "--data-root", str(data), "--log-dir", str(run),
           "--backbone", "test", "--d-model", "32", "--enc-heads", "2", "--enc-layers", "1", "--n-cls", str(N_CLS),
           "--crop-size", "64", "--im-size", "64", "--window-size", "64", "--window-stride", "64", "--batch-size", "2",
           "--num-workers", "0", "--from-scratch", "--device", "cpu", "--no-tensorboard", "--epochs", "1",
           "--max-steps-per-epoch", "2", "--learning-rate", "0.05", "--drop-path", "0.0", "--dec-layers", "1",
           "--dec-heads", "2", "--dec-dim-head", "16", "--rep-grid", "2", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["world_size"] == 2 and ckpt["config"]["tf32"] is True
    seed_everything(0, 0)  # rank 0's initialisation, which DDP broadcast to rank 1
    init = create_segmenter(ckpt["model_config"]).state_dict()
    trained = ckpt["state_dict"]
    assert torch.equal(trained["encoder.head.weight"], init["encoder.head.weight"])
    assert not torch.equal(trained["encoder.blocks.0.attn.qkv.weight"], init["encoder.blocks.0.attn.qkv.weight"])
    n_trained = sum(1 for k in init if not k.startswith("encoder.head.") and "running" not in k)
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_trained == len(ckpt["optimizer"]["state"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_optimizer_state_from_before_the_head_freeze_resumes(weight_decay):
    """A segmentation run saved when the encoder head was still in the optimizer (its groups hold it, with no
    state) resumes: the state is renumbered to the current groups, every momentum buffer by parameter name."""
    from semantic_segmentation import main as seg_main

    model = _tiny_segmenter()
    names = {id(p): n for n, p in model.named_parameters()}
    old_groups = seg_main._param_group_names(model, weight_decay, include_frozen=True)
    by_name = dict(model.named_parameters())
    decays = [0.0] if len(old_groups) == 1 else [0.0, weight_decay]
    old = torch.optim.SGD([dict(params=[by_name[n] for n in g], weight_decay=wd) for g, wd in zip(old_groups, decays)],
                          lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(1, 3, 32, 32)).sum().backward()  # the frozen head gets no gradient, hence no state
    old.step()
    saved = old.state_dict()
    assert sum(len(g["params"]) for g in saved["param_groups"]) == len(names)

    new = build_optimizer("sgd", seg_main.optimizer_param_groups(model, weight_decay), 0.1, 0.0)
    with pytest.raises(ValueError, match="doesn't match the size"):
        new.load_state_dict(saved)
    new.load_state_dict(seg_main.adapt_optimizer_state(model, weight_decay)(saved))
    old_buffers = {names[id(p)]: s["momentum_buffer"] for p, s in old.state.items()}
    new_buffers = {names[id(p)]: s["momentum_buffer"] for p, s in new.state.items()}
    assert new_buffers.keys() == old_buffers.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(new_buffers[n], old_buffers[n]) for n in new_buffers)
    current = new.state_dict()
    assert seg_main.adapt_optimizer_state(model, weight_decay)(current) is current  # the current layout: unchanged


# ---------------------------------------------------------------------------------------------- model benchmark
def test_benchmark_models_trains_with_each_models_recipe_optimizer(tmp_path):
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_models_gpu", REPO / "scripts" / "benchmark_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--threads", "1", "--optimizer", "recipe", "--out", str(tmp_path)])
    assert [(r["model"], r["optimizer"]) for r in rows] == [("cbt_tiny", "lion"), ("vit_tiny", "adamw")]
    with open(tmp_path / "model_benchmark.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["optimizer"] for r in written] == ["lion", "adamw"] and written[0]["train_peak_mem_mb"] == ""  # CPU
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtype", "fp16", "--out", str(tmp_path)])  # fp16 needs CUDA


# ------------------------------------------------------------------------------------------- scripts/gpu_check
def test_gpu_check_dry_run_on_cpu_passes_every_step_it_can_run(tmp_path):
    """`scripts/gpu_check.sh --device cpu --quick`: every step runs (tiny models and data), the CUDA-only checks are
    SKIP lines, the rest PASS, and the summary files agree, so the GPU check cannot rot before a GPU runs it."""
    out = tmp_path / "dry"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "summary.txt").read_text().splitlines()
    checks = [line.split(None, 2) for line in lines[1:-1]]
    assert {status for status, _, _ in checks} == {"PASS", "SKIP"}
    steps = {step for _, step, _ in checks}
    assert steps == {"env", "numerics", "syncs", "classification", "ddp", "seg_vit", "throughput", "compile"}
    skipped = sorted(rest.split("  ")[0].strip() for status, step, rest in checks if status == "SKIP")
    assert skipped == ["SyncBatchNorm host syncs", "fp16 1 epoch", "fp16 and tf32", "gpu",
                       "lion-pytorch Triton kernel"]
    assert lines[-1].startswith("overall: PASS:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == "PASS" and summary["counts"]["FAIL"] == 0
    assert len(summary["checks"]) == len(checks)
    numbers = {(c["step"], c["check"]): c["numbers"] for c in summary["checks"]}
    reads = numbers[("syncs", "bf16 CBT-S batch 4")]
    assert reads["syncs"] == reads["expected"] == 3  # 6 steps, a progress read every 3: steps 0, 3 and 5
    assert numbers[("ddp", "exact validation")]["one"]["num_images"] == 12
    assert numbers[("syncs", "Lion CBT-S step")]["unequal_fraction"] == 0.0  # bit-identical to lion-pytorch
    assert (out / "cls_eval_cpu" / "eval.json").is_file() and (out / "throughput" / "model_benchmark.csv").is_file()


def test_gpu_check_uses_the_project_venv_and_exits_3_without_cuda(tmp_path):
    """The shell script runs <repository>/.venv/bin/python by default (here a link to this interpreter in a copy
    of the scripts); without a CUDA device the check ends in one line with status 3 and writes nothing. Without
    an interpreter it says what to do."""
    (tmp_path / "scripts").mkdir()
    for name in ("gpu_check.sh", "gpu_check.py"):
        (tmp_path / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 127
    assert f"no Python interpreter at {tmp_path}/.venv/bin/python: run 'make venv'" in proc.stderr
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    wrapper = tmp_path / ".venv" / "bin" / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing was run; for a CPU dry run: "
        "scripts/gpu_check.sh --device cpu --quick"]
    assert not (tmp_path / "out").exists()


def test_precision_and_tf32_are_recorded_and_may_change_on_resume(tmp_path):
    """Classification: the CPU default (fp32, TF32 on) is recorded in config.yaml and the checkpoint; a resume with
    another precision and --no-tf32 is accepted and records what it uses."""
    import yaml
    from test_classification import make_imagefolder, run_main, write_config

    from image_classification import main as icm

    data, cfg, out = make_imagefolder(tmp_path / "data"), write_config(tmp_path / "tiny.yaml"), tmp_path / "run"
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        run_main(cfg, data, out, "--epochs", "2", "--stop-epoch", "1")
        recorded = yaml.safe_load((out / "config.yaml").read_text())
        assert (recorded["precision"], recorded["tf32"], recorded["sync_bn"]) == ("fp32", True, True)
        run_main(cfg, data, out, "--epochs", "2", "--resume", str(out / icm.LAST_CHECKPOINT), "--precision", "bf16",
                 "--no-tf32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        recorded = yaml.safe_load((out / "config.yaml").read_text())
        saved = torch.load(out / icm.LAST_CHECKPOINT, weights_only=True)["config"]
        assert (recorded["precision"], recorded["tf32"]) == (saved["precision"], saved["tf32"]) == ("bf16", False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_segmentation_precision_follows_amp_unless_precision_is_given():
    import argparse

    from cbsa_core.engine import ConfigError
    from semantic_segmentation import main as seg_main

    def resolve(**flags):
        return seg_main.resolve_training_precision(argparse.Namespace(**{"precision": None, "amp": False, **flags}),
                                                   torch.device("cpu"))

    assert resolve() == "fp32"  # the release's recipe
    assert resolve(amp=True) == resolve(precision="auto") == "bf16"  # the CPU's mixed precision
    assert resolve(amp=True, precision="fp32") == "fp32"  # --precision overrides --amp
    with pytest.raises(ConfigError, match="--precision fp16: fp16 autocast needs a CUDA device"):
        resolve(precision="fp16")
