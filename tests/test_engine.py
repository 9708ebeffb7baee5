"""Tests of the shared training machinery (cbsa_core.engine): schedules, checkpoint/resume, loops, samplers, misc."""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cbsa_core.checkpoint import CheckpointError, atomic_save, read_checkpoint
from cbsa_core.engine import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    LOG_JSONL,
    RUN_CONFIG,
    AverageMeter,
    ConfigError,
    DistInfo,
    JsonlLogger,
    MetricLogger,
    NonFiniteLossError,
    PolynomialLambda,
    ShardedEvalSampler,
    TensorBoardLogger,
    WarmupCosineLambda,
    accuracy,
    all_reduce_sum,
    autocast_context,
    broadcast_buffers,
    broadcast_object,
    build_lambda_scheduler,
    build_optimizer,
    capture_rng_state,
    epoch_seed,
    evaluate_classifier,
    fit,
    format_eta,
    init_distributed,
    load_config_file,
    load_training_checkpoint,
    make_eval_loader,
    make_grad_scaler,
    make_train_loader,
    make_train_sampler,
    parse_args_with_config,
    restore_rng_state,
    save_training_checkpoint,
    seed_everything,
    setup_logging,
    train_one_epoch,
    unwrap_model,
    wrap_ddp,
)


# --------------------------------------------------------------------------------------------------- helpers
class Tiny(nn.Module):
    """BatchNorm (buffers) and Dropout (RNG) make resume exactness depend on every restored piece."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def _loader(ds, epoch: int, seed: int = 7) -> DataLoader:
    # 40 samples / batch 12: three full batches and a partial one.
    return DataLoader(ds, batch_size=12, sampler=make_train_sampler(ds, None, seed=seed, epoch=epoch), shuffle=False)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- schedules
def _release_factor(e: int, warmup: int, epochs: int) -> float:
    # Written out independently of the implementation: linear ramp vs half-cosine, whichever is lower.
    ramp = (e + 1) / (warmup + 1e-8)
    cosine = (1 + math.cos(math.pi * e / epochs)) / 2
    return ramp if ramp < cosine else cosine


def test_warmup_cosine_values_and_peak():
    f = WarmupCosineLambda(20, 150)
    for e in (0, 19, 20, 149):
        assert f(e) == pytest.approx(_release_factor(e, 20, 150), rel=1e-12, abs=0)
    assert f(0) == pytest.approx(0.05, rel=1e-6)
    assert f(19) == pytest.approx(0.96093, abs=1e-5)  # 0.5 * (1 + cos(19 pi / 150))
    assert f(20) == pytest.approx(0.95677, abs=1e-5)
    assert f(149) == pytest.approx(1.0966e-4, rel=1e-3)
    values = [f(e) for e in range(150)]
    assert int(np.argmax(values)) == 19 and round(max(values), 3) == 0.961 and max(values) < 1.0
    # ViT fine-tuning: 10 warm-up epochs of 50, divided by exactly 10 -> peak 0.922 at e=9.
    g = WarmupCosineLambda(10, 50, eps=0.0)
    vit = [g(e) for e in range(50)]
    assert int(np.argmax(vit)) == 9 and round(max(vit), 3) == 0.922
    assert g(0) == 0.1
    assert WarmupCosineLambda(0, 10)(0) == 1.0  # no warm-up: pure cosine


def test_polynomial_lambda_values():
    base, max_iters, power, min_lr = 1e-3, 100, 0.9, 1e-5
    f = PolynomialLambda(base, max_iters, power=power, min_lr=min_lr)
    assert base * f(0) == pytest.approx(base, rel=1e-12)
    assert base * f(50) == pytest.approx((base - min_lr) * 0.5**0.9 + min_lr, rel=1e-12)
    assert base * f(100) == pytest.approx(min_lr, rel=1e-12)
    assert base * f(250) == pytest.approx(min_lr, rel=1e-12)
    # Through LambdaLR stepped per iteration: the lr after t steps is the formula at t.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_lambda_scheduler(opt, f)
    seen = []
    for _ in range(105):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t in (0, 1, 37, 99, 100, 104):
        expected = (base - min_lr) * (1 - min(t, max_iters) / max_iters) ** power + min_lr
        assert seen[t] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        PolynomialLambda(1e-3, 0)


def test_lambda_lr_resume_keeps_warmup(tmp_path):
    def run(stop_at: int | None, epochs: int = 30):
        p = nn.Parameter(torch.zeros(2))
        opt = build_optimizer("lion", [p], lr=1e-3, weight_decay=0.05)
        sched = build_lambda_scheduler(opt, WarmupCosineLambda(20, 150))
        lrs = []
        for e in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()  # (no gradients: a no-op, but the scheduler expects it first)
            sched.step()
            if stop_at is not None and e + 1 == stop_at:
                atomic_save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.pth")
                return lrs
        return lrs

    straight = run(None)
    first = run(stop_at=5)
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    p = nn.Parameter(torch.zeros(2))
    opt = build_optimizer("lion", [p], lr=1e-3, weight_decay=0.05)
    # Even a resuming script that builds the release's pure cosine (no warm-up) gets the saved schedule back.
    sched = build_lambda_scheduler(opt, WarmupCosineLambda(0, 150))
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rest = []
    for _ in range(5, 30):
        rest.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert first + rest == straight
    assert straight[5] == pytest.approx(1e-3 * 6 / (20 + 1e-8))


# ------------------------------------------------------------------------------------------------- RNG state
def test_rng_round_trip_weights_only(tmp_path):
    seed_everything(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's generator
    np.random.randn()  # and in numpy's (has_gauss = 1)
    state = capture_rng_state()
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"]

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.randn()),
                torch.rand(3).tolist(), torch.randn(2).tolist())

    a = draw()
    restore_rng_state(loaded)
    b = draw()
    assert a == b


# ----------------------------------------------------------------------------------- checkpoint save / load
def test_training_checkpoint_round_trip_lion(tmp_path):
    seed_everything(0)
    ds = _dataset()
    model = Tiny()
    opt = build_optimizer("lion", model, lr=1e-3, weight_decay=0.05)
    sched = build_lambda_scheduler(opt, WarmupCosineLambda(2, 10))
    scaler = make_grad_scaler("cpu", "fp32")
    train_one_epoch(model, _loader(ds, 0), nn.CrossEntropyLoss(), opt, epoch=0, device="cpu", print_freq=100)
    sched.step()

    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    config = {"data": Path("/data/imagenet"), "sizes": (224, 256), "obj": Opaque(), "nested": {"p": Path("x")}}
    path = save_training_checkpoint(tmp_path / "ck" / "last.pth", model=model, arch="tiny", model_config={"d": 8},
                                    optimizer=opt, scheduler=sched, scaler=scaler, epoch=0,
                                    best_metric=torch.tensor(12.5), config=config, note="hello")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cbsa" and raw["epoch"] == 1 and raw["best_metric"] == 12.5
    assert raw["config"] == {"data": "/data/imagenet", "sizes": [224, 256], "obj": "opaque", "nested": {"p": "x"}}
    assert raw["note"] == "hello" and "rng_state" in raw

    torch.manual_seed(99)
    model2 = Tiny()
    opt2 = build_optimizer("lion", model2, lr=1e-3, weight_decay=0.05)
    sched2 = build_lambda_scheduler(opt2, WarmupCosineLambda(2, 10))
    ck = load_training_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2,
                                  scaler=make_grad_scaler("cpu", "fp32"))
    assert ck["epoch"] == 1 and ck["best_metric"] == 12.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) == len(list(model.parameters()))
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["exp_avg"], s2["state"][i]["exp_avg"])
    assert sched.state_dict() == sched2.state_dict()

    with pytest.raises(TypeError, match="extra_obj"):
        save_training_checkpoint(tmp_path / "bad.pth", model=model, arch="tiny", model_config={}, optimizer=opt,
                                 scheduler=sched, scaler=None, epoch=0, best_metric=None, config={},
                                 extra_obj=Opaque())


def test_load_training_checkpoint_missing_and_authors_file(tmp_path):
    model = Tiny()
    missing = tmp_path / "nope" / "checkpoint.pth.tar"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        load_training_checkpoint(missing, model=model)

    # The release's layout with `module.` keys and a tensor best_acc1, but without optimizer/scheduler entries.
    src = Tiny()
    authors = {"epoch": 150, "arch": "tiny", "best_acc1": torch.tensor(71.25),
               "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}
    torch.save(authors, tmp_path / "authors.pth.tar")
    opt = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
    sched = build_lambda_scheduler(opt, WarmupCosineLambda(20, 150))
    ck = load_training_checkpoint(tmp_path / "authors.pth.tar", model=model, optimizer=opt, scheduler=sched)
    assert ck["epoch"] == 150 and ck["best_metric"] == pytest.approx(71.25)
    for k, v in src.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0


@pytest.mark.parametrize("opt_name", ["lion", "adamw", "sgd"])
def test_bit_exact_resume(tmp_path, opt_name):
    ds = _dataset()
    crit = nn.CrossEntropyLoss()

    def setup():
        model = Tiny()
        opt = build_optimizer(opt_name, model, lr=5e-3, weight_decay=0.05)
        return model, opt, build_lambda_scheduler(opt, WarmupCosineLambda(1, 4)), make_grad_scaler("cpu", "fp32")

    def epoch(model, opt, sched, e):
        train_one_epoch(model, _loader(ds, e), crit, opt, epoch=e, device="cpu", print_freq=100)
        sched.step()

    seed_everything(0)
    model_a, opt_a, sched_a, _ = setup()
    epoch(model_a, opt_a, sched_a, 0)
    epoch(model_a, opt_a, sched_a, 1)

    seed_everything(0)
    model_b, opt_b, sched_b, scaler_b = setup()
    epoch(model_b, opt_b, sched_b, 0)
    path = save_training_checkpoint(tmp_path / "last.pth", model=model_b, arch="tiny", model_config={},
                                    optimizer=opt_b, scheduler=sched_b, scaler=scaler_b, epoch=0, best_metric=None,
                                    config={"seed": 0})
    del model_b, opt_b, sched_b
    seed_everything(12345)  # a "fresh process": other RNG state, other initial weights
    model_c, opt_c, sched_c, scaler_c = setup()
    ck = load_training_checkpoint(path, model=model_c, optimizer=opt_c, scheduler=sched_c, scaler=scaler_c)
    assert ck["epoch"] == 1
    epoch(model_c, opt_c, sched_c, ck["epoch"])

    a, c = model_a.state_dict(), model_c.state_dict()
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def test_train_sampler_depends_only_on_seed_and_epoch():
    ds = _dataset(23)
    torch.manual_seed(1)
    a = list(make_train_sampler(ds, None, seed=5, epoch=3))
    torch.manual_seed(2)
    b = list(make_train_sampler(ds, None, seed=5, epoch=3))
    c = list(make_train_sampler(ds, None, seed=5, epoch=4))
    assert a == b and a != c and sorted(a) == list(range(23))
    # Distributed shards (built without a process group) cover the same permutation, padded to equal length.
    shards = [list(make_train_sampler(ds, DistInfo(r, 3, r, torch.device("cpu"), True), seed=5, epoch=3))
              for r in range(3)]
    assert {len(s) for s in shards} == {8} and set().union(*shards) == set(range(23))


# ------------------------------------------------------------------------------------------------------ loops
def test_nonfinite_loss_stops_before_step(tmp_path):
    seed_everything(0)
    ds = _dataset()
    model = Tiny()
    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    snapshots = []
    opt.register_step_post_hook(lambda o, args, kwargs: snapshots.append(
        {k: v.detach().clone() for k, v in model.named_parameters()}))
    ce = nn.CrossEntropyLoss()
    calls = {"n": 0}

    def nan_at_third(out, y):
        loss = ce(out, y)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss

    last = tmp_path / "last.pth"
    last.write_bytes(b"kept")
    # print_freq 1: the loss is read at every step, so the run stops before the bad update.
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 3, step 2: stopping; the last good "
                                                 r"checkpoint is kept at .*last\.pth") as info:
        train_one_epoch(model, _loader(ds, 0), nan_at_third, opt, epoch=3, device="cpu", checkpoint_path=last,
                        print_freq=1)
    assert (info.value.epoch, info.value.step, info.value.checked) == (3, 2, (2, 2))
    assert len(snapshots) == 2  # two good steps, no step on the nan loss
    for k, v in model.named_parameters():  # (BatchNorm buffers did see the failing forward)
        assert torch.equal(v, snapshots[-1][k]) and torch.isfinite(v).all()

    # The default print interval (50 > the 4 steps): the loss is read at step 0 and at the last step (3). The nan
    # of step 2 is found there, named with the steps that check covered, before step 3's update.
    seed_everything(0)
    model = Tiny()
    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    snapshots.clear()
    opt.register_step_post_hook(lambda o, args, kwargs: snapshots.append(1))
    calls["n"] = 0
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 3, step 2 \(found when steps 1-3 were "
                                                 r"checked\): stopping; the last good checkpoint is kept") as info:
        train_one_epoch(model, _loader(ds, 0), nan_at_third, opt, epoch=3, device="cpu", checkpoint_path=last)
    assert (info.value.step, info.value.checked) == (2, (1, 3))
    assert len(snapshots) == 3 and calls["n"] == 4  # steps 0-2 updated, step 3 stopped before its backward

    # nan on the very first step: the weights are untouched.
    model = Tiny()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    # The message checks the disk: no file at the path means none is claimed to be kept.
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 0, step 0: stopping; no checkpoint was "
                                                 r"written \(there is none at .*none\.pth\)"):
        train_one_epoch(model, _loader(ds, 0), lambda o, y: ce(o, y) + float("inf"), opt, epoch=0, device="cpu",
                        checkpoint_path=tmp_path / "none.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert opt.state_dict()["state"] == {}


def test_train_one_epoch_stats_clip_poly_bf16():
    seed_everything(0)
    ds = _dataset()
    model = Tiny()
    opt = build_optimizer("sgd", model, lr=1e-2, weight_decay=0.0)
    sched = build_lambda_scheduler(opt, PolynomialLambda(1e-2, 8, power=0.9, min_lr=1e-5))
    logged = []
    stats = train_one_epoch(model, _loader(ds, 0), nn.CrossEntropyLoss(), opt, epoch=0, device="cpu",
                            clip_grad=0.01, scheduler_per_iter=sched, print_freq=2,
                            log_fn=lambda m, step: logged.append((step, m)))
    assert stats["num_images"] == 40 and stats["steps"] == 4 and 0 <= stats["top1"] <= 100
    assert math.isfinite(stats["loss"]) and stats["images_per_sec"] > 0
    assert sched.last_epoch == 4
    assert stats["lr"] == pytest.approx((1e-2 - 1e-5) * (1 - 3 / 8) ** 0.9 + 1e-5)  # lr of the last (4th) step
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert total <= 0.01 + 1e-6  # the last step's gradients were clipped
    assert [s for s, _ in logged] == [0, 2, 3] and {"loss", "acc1", "lr"} <= logged[0][1].keys()

    # bf16 autocast on CPU, max_steps, and compute_accuracy=False.
    stats = train_one_epoch(model, _loader(ds, 1), nn.CrossEntropyLoss(), opt, epoch=1, device="cpu",
                            precision="bf16", max_steps=2, compute_accuracy=False, print_freq=100)
    assert stats["steps"] == 2 and stats["num_images"] == 24 and stats["top1"] is None


class _Lookup(nn.Module):
    """Returns a fixed row of logits per sample index."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx.long()]


def test_evaluate_classifier_hand_computed():
    # Every row ranks class 0 first, then 1, 2, ... 5. Targets sit at ranks 1, 2, 5, 6, 1, 3:
    # top-1 hits = 2 (samples 0, 4), top-5 hits = 5 (all but sample 3, whose target 5 is ranked 6th).
    row = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    table = row.repeat(6, 1)
    targets = torch.tensor([0, 1, 4, 5, 0, 2])
    lse = math.log(sum(math.exp(v) for v in row.tolist()))
    expected_loss = sum(lse - row[t].item() for t in targets.tolist()) / 6

    ds = TensorDataset(torch.arange(6), targets)
    model = _Lookup(table)
    out = evaluate_classifier(model, DataLoader(ds, batch_size=4), nn.CrossEntropyLoss(), device="cpu")
    assert out["num_images"] == 6
    assert out["top1"] == pytest.approx(100 * 2 / 6)
    assert out["top5"] == pytest.approx(100 * 5 / 6)
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)  # mean over images, not over batches (4 + 2)

    # Shards of a 3-rank run add up to exactly the same totals.
    hits1 = hits5 = n = 0
    for r in range(3):
        loader = DataLoader(ds, batch_size=4, sampler=ShardedEvalSampler(len(ds), r, 3))
        o = evaluate_classifier(model, loader, nn.CrossEntropyLoss(), device="cpu")
        hits1 += round(o["top1"] * o["num_images"] / 100)
        hits5 += round(o["top5"] * o["num_images"] / 100)
        n += o["num_images"]
    assert (hits1, hits5, n) == (2, 5, 6)


def test_accuracy_counts():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])  # target ranks 1, 2, 3
    tgt = torch.tensor([1, 2, 0])
    c1, c2, c5 = accuracy(out, tgt, topk=(1, 2, 5))
    assert (c1.item(), c2.item(), c5.item()) == (1, 2, 3)  # k > classes counts every sample
    assert c1.dtype == torch.int64


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 13, 16])
def test_sharded_eval_sampler_exact_cover(world_size, n):
    shards = [list(ShardedEvalSampler(n, r, world_size)) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardedEvalSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        ShardedEvalSampler(n, world_size, world_size)


# ------------------------------------------------------------------------------------------- optim / amp
def test_build_optimizer():
    from cbsa_core.engine import Lion

    model = Tiny()
    n_params = len(list(model.parameters()))
    lion = build_optimizer("LION", model, lr=1e-4, weight_decay=0.05)
    assert isinstance(lion, Lion) and lion.param_groups[0]["betas"] == (0.9, 0.99)
    adamw = build_optimizer("AdamW", model.parameters(), lr=1e-3, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.999)
    sgd = build_optimizer("sgd", model, lr=1e-3, weight_decay=0.0)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is True
    for opt, wd in ((lion, 0.05), (adamw, 0.1), (sgd, 0.0)):
        assert len(opt.param_groups) == 1  # decay on every parameter, norms and biases included
        assert len(opt.param_groups[0]["params"]) == n_params and opt.param_groups[0]["weight_decay"] == wd
    with pytest.raises(ValueError, match="lion, adamw, sgd"):
        build_optimizer("adam", model, lr=1e-3, weight_decay=0.0)


def test_amp_helpers(tmp_path):
    with autocast_context("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast_context("cpu", "BF16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        autocast_context("cpu", "fp8")
    for precision in ("fp32", "fp16", "bf16"):
        scaler = make_grad_scaler("cpu", precision)
        assert not scaler.is_enabled()
    atomic_save({"scaler": make_grad_scaler("cpu", "fp16").state_dict()}, tmp_path / "s.pth")
    state = torch.load(tmp_path / "s.pth", weights_only=True)["scaler"]
    fresh = make_grad_scaler("cpu", "fp16")
    fresh.load_state_dict(state)  # a disabled scaler's {} round-trips
    assert state == {} and not fresh.is_enabled()


# ----------------------------------------------------------------------------------------- meters / logging
def test_meters_and_progress_line():
    m = AverageMeter("loss")
    m.update(2.0, 3)
    m.update(torch.tensor(4.0), 1)
    assert (m.val, m.avg, m.count) == (4.0, 2.5, 4)
    assert format_eta(3723) == "1:02:03" and format_eta(100000) == "27:46:40"

    lines = []
    ml = MetricLogger(5005, header="Epoch [3/150]", print_freq=50, enabled=True, printer=lines.append)
    for step in range(51):
        ml.update(step, 256, loss=6.4 if step < 50 else 6.123, lr=2e-4)
    assert len(lines) == 2
    assert re.fullmatch(r"Epoch \[3/150\] \[  50/5005\] eta \d+:\d\d:\d\d loss 6\.123 \(6\.39\d\) "
                        r"lr 2\.0e-04 img/s \d+\.\d", lines[1]), lines[1]
    buf = io.StringIO()
    with redirect_stdout(buf):
        quiet = MetricLogger(10, print_freq=1, enabled=False)
        quiet.update(0, 1, loss=1.0)
    assert buf.getvalue() == ""


def test_jsonl_tensorboard_and_logging(tmp_path):
    log = JsonlLogger(tmp_path / "logs" / "log.txt", enabled=True)
    log.log({"epoch": 0, "loss": torch.tensor(1.5), "path": Path("a/b")})
    log({"epoch": 1, "top1": float("nan")})
    lines = (tmp_path / "logs" / "log.txt").read_text().splitlines()
    assert json.loads(lines[0]) == {"epoch": 0, "loss": 1.5, "path": "a/b"}
    assert math.isnan(json.loads(lines[1])["top1"])
    JsonlLogger(tmp_path / "off.txt", enabled=False).log({"epoch": 0})
    assert not (tmp_path / "off.txt").exists()

    with TensorBoardLogger(tmp_path / "tb", enabled=True) as tb:
        tb.scalar("train/loss", 1.0, 0)
        tb.scalars({"loss": 0.5, "name": "x"}, 1, prefix="val/")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    TensorBoardLogger(tmp_path / "tb_off", enabled=False).scalar("x", 1.0, 0)
    assert not (tmp_path / "tb_off").exists()



def test_setup_logging_is_idempotent_and_keeps_foreign_handlers(caplog, capsys):
    """Entry points call setup_logging on every main(): pytest's capture (and an application's handlers) must
    survive, and each line must be printed once."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    try:
        with caplog.at_level(logging.INFO):
            setup_logging(1)
            assert root.level == logging.WARNING
            first = setup_logging(0)
            assert setup_logging(0) is first and root.level == logging.INFO
            assert foreign in root.handlers and caplog.handler in root.handlers
            assert [h for h in root.handlers if h is first] == [first]
            logging.getLogger("cbsa.test").info("hello once")
        assert "hello once" in caplog.text  # pytest's capture handler still receives records
        assert foreign.stream.getvalue() == "hello once\n"
        assert capsys.readouterr().err.count("[rank 0] INFO cbsa.test: hello once") == 1
    finally:
        for h in list(root.handlers):
            if h not in saved_handlers:
                root.removeHandler(h)
        root.setLevel(saved_level)


# ------------------------------------------------------------------------------------------------ distributed
def test_init_distributed_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), False) and info.is_main
    t = torch.ones(3)
    assert all_reduce_sum(t) is t and broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed(device="cpu")
    assert not DistInfo(rank=1, world_size=2).is_main


def test_seeding_and_unwrap():
    seed_everything(5, rank=1)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(6)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b  # seed + rank
    assert epoch_seed(0, 1, 0) != epoch_seed(0, 0, 1) and epoch_seed(3, 4, 5) == epoch_seed(3, 4, 5)
    model = Tiny()
    assert unwrap_model(nn.DataParallel(model)) is model and unwrap_model(model) is model


def test_wrap_ddp_cpu_reverts_syncbn(tmp_path):
    """Single-process gloo group: torch's SyncBatchNorm refuses CPU input in training; wrap_ddp falls back."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        def net():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())

        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            net().train()(torch.randn(2, 3, 8, 8))
        model = net()
        keys = list(model.state_dict())
        info = DistInfo(0, 1, 0, torch.device("cpu"), True)
        ddp = wrap_ddp(model, info)
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in ddp.modules())
        assert list(unwrap_model(ddp).state_dict()) == keys
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
        assert all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ config files
def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--config", default=None)
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--optimizer", type=str.lower, choices=("adamw", "lion"), default="adamw")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--grid", type=int, nargs=2, default=[8, 8])
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--data", default="x")
    p.set_defaults(model={})
    return p


def _model_section(value, where):
    if not isinstance(value, dict) or set(value) - {"depth"}:
        raise ConfigError(f"{where}: only 'depth' may be set")
    return dict(value)


def test_config_values_go_through_their_flags_and_the_cli_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    # 2e-3 is a string to YAML 1.1; `data: 5` an int; `LION` upper case: each goes through the flag's own type.
    cfg.write_text("learning-rate: 2e-3\nepochs: 7\noptimizer: LION\namp: true\ntensorboard: false\n"
                   "grid: [4, 2]\nlayers: [3]\ntag: [a, b]\ndata: 5\nmodel: {depth: 2}\n")
    sections = {"model": _model_section}
    a = parse_args_with_config(_config_parser(), ["--config", str(cfg)], sections=sections)
    assert (a.lr, a.epochs, a.optimizer, a.amp, a.tensorboard) == (2e-3, 7, "lion", True, False)
    assert (a.grid, a.layers, a.tag, a.data, a.model) == ([4, 2], [3], ["a", "b"], "5", {"depth": 2})
    assert isinstance(a.epochs, int) and isinstance(a.lr, float)
    a = parse_args_with_config(_config_parser(), ["--epochs", "9", "--config", str(cfg), "--tensorboard",
                                                  "--tag", "c", "--grid", "1", "1", "--learning-rate", "1"],
                               sections=sections)
    assert (a.lr, a.epochs, a.tensorboard, a.grid, a.tag) == (1.0, 9, True, [1, 1], ["a", "b", "c"])
    assert (a.optimizer, a.amp, a.layers) == ("lion", True, [3])  # still from the file
    a = parse_args_with_config(_config_parser(), [])
    assert (a.lr, a.epochs, a.optimizer, a.grid, a.tag, a.model) == (0.1, 3, "adamw", [8, 8], [], {})
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config_file(_config_parser(), empty) == {}


@pytest.mark.parametrize("text, needle", [
    ("lr_typo: 1\n", "key 'lr_typo' is not a setting; valid keys: amp, data, epochs, grid, layers, lr, model, "
                     "optimizer, tag, tensorboard"),
    ("epochs: 2.5\n", "key 'epochs': invalid value 2.5"),  # not truncated to 2
    ("epochs: true\n", "key 'epochs': invalid value True"),
    ("lr: fast\n", "key 'lr': invalid value 'fast'"),
    ("optimizer: sgd\n", "key 'optimizer': 'sgd' is not one of adamw, lion"),
    ("amp: 1\n", "key 'amp': expected true or false, got 1"),
    ("tensorboard: 'no'\n", "key 'tensorboard': expected true or false, got 'no'"),
    ("no_tensorboard: true\n", "key 'no_tensorboard' is not a setting"),  # would read as its opposite
    ("grid: [1, 2, 3]\n", "key 'grid': expected 2 values, got 3"),
    ("grid: 4\n", "key 'grid': expected a list, got 4"),
    ("layers: []\n", "key 'layers': expected at least one value"),
    ("layers: [1, x]\n", "key 'layers': invalid value [1, 'x']"),
    ("tag: a\n", "key 'tag': expected a list"),
    ("data: [1]\n", "key 'data': invalid value [1]"),
    ("config: other.yaml\n", "key 'config' is not a setting"),
    ("lr: 1\nlearning_rate: 2\n", "key 'learning_rate' sets 'lr', which another key of the file already set"),
    ("model: {width: 3}\n", "key 'model': only 'depth' may be set"),
    ("- 1\n", "must hold a mapping of settings, got list"),
    ("epochs: [1, 2\n", "(YAML syntax error)"),
])
def test_bad_config_file_is_refused_naming_file_and_key(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config_file(_config_parser(), cfg, sections={"model": _model_section})
    assert str(cfg) in str(e.value) and needle in str(e.value), str(e.value)
    # Through the parser: the usual usage line + message, exit status 2, no traceback.
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(_config_parser(), ["--config", str(cfg)], sections={"model": _model_section})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prog") and str(cfg) in err and needle in err


def test_config_file_missing_or_parser_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(_config_parser(), ["--config", str(tmp_path / "nope.yaml")])
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
    # A section the caller did not name is an unknown key; an excluded flag cannot be set from a file.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {depth: 1}\n")
    with pytest.raises(ConfigError, match="key 'model' is not a setting"):
        load_config_file(_config_parser(), cfg)
    cfg.write_text("tag: [a]\n")
    with pytest.raises(ConfigError, match="key 'tag' is not a setting"):
        load_config_file(_config_parser(), cfg, exclude=("tag",))
    with pytest.raises(ValueError, match="no --config option"):
        parse_args_with_config(argparse.ArgumentParser(), [])


# ------------------------------------------------------------------------------------------------------ runner
class _NoisyDataset(Dataset):
    """``_dataset`` plus per-item Gaussian noise: an augmentation drawn inside the loader workers."""

    def __init__(self, n: int) -> None:
        self.base = _dataset(n)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x + 0.5 * torch.randn(8), y


def _fit_tiny(out: Path, *, workers: int, stop_epoch=None, resume: bool = False) -> dict:
    seed_everything(0)
    model = Tiny()
    opt = build_optimizer("adamw", model, lr=5e-3, weight_decay=0.05)
    sched = build_lambda_scheduler(opt, WarmupCosineLambda(1, 3))
    start, best = 0, None
    if resume:
        seed_everything(999)  # a fresh process: other RNG state before the checkpoint's is restored
        ck = load_training_checkpoint(out / LAST_CHECKPOINT, model=model, optimizer=opt, scheduler=sched)
        start, best = ck["epoch"], ck["best_metric"]
    info = DistInfo()
    train = make_train_loader(_NoisyDataset(40), info, batch_size=12, workers=workers, seed=7, epoch=start)
    val = make_eval_loader(_dataset(15), info, batch_size=8, workers=0)
    return fit(model, train_loader=train, val_loader=val, criterion=nn.CrossEntropyLoss(), optimizer=opt,
               scheduler=sched, dist_info=info, output_dir=out, seed=7, epochs=3, start_epoch=start,
               stop_epoch=stop_epoch, best_metric=best, print_freq=100, tensorboard=False, arch="tiny",
               model_config={"width": 16}, config={"seed": 7, "path": out},
               record_extra=lambda epoch, train: {"extra": 1})


def test_fit_resume_is_bit_exact_with_loader_workers(tmp_path, capsys):
    """3 epochs straight == 2 epochs (stop_epoch) + resume + 1, with the augmentation drawn in a worker process:
    only fresh per-epoch workers (seeded from the reseeded RNG) make that hold; persistent ones keep the seed of
    the epoch they started in."""
    full = _fit_tiny(tmp_path / "full", workers=1)
    part = _fit_tiny(tmp_path / "part", workers=1, stop_epoch=2)
    assert part["epochs_run"] == 2 and part["last_epoch"] == 1
    assert read_checkpoint(tmp_path / "part" / LAST_CHECKPOINT)["epoch"] == 2
    resumed = _fit_tiny(tmp_path / "part", workers=1, resume=True)
    assert resumed["epochs_run"] == 1 and resumed["last_epoch"] == 2
    a, b = (read_checkpoint(tmp_path / d / LAST_CHECKPOINT) for d in ("full", "part"))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["scheduler"] == b["scheduler"] and a["epoch"] == b["epoch"] == 3

    def records(d):
        lines = [json.loads(x) for x in (tmp_path / d / LOG_JSONL).read_text().splitlines()]
        return [r for r in lines if "event" not in r], [r["event"] for r in lines if "event" in r]

    (ra, ea), (rb, eb) = records("full"), records("part")
    assert ea == ["start", "end"] and eb == ["start", "end", "start", "end"]
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == [0, 1, 2]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["lr"] for r in ra] == [5e-3 * _release_factor(e, 1, 3) for e in range(3)]
    assert all(r["extra"] == 1 and r["train_num_images"] == 40 and r["val_num_images"] == 15 for r in ra)
    assert full["best_top1"] == max(r["val_top1"] for r in ra) == a["best_metric"] == a["best_acc1"]
    best_epoch = next(r["epoch"] for r in ra if r["val_top1"] == full["best_top1"])
    assert read_checkpoint(tmp_path / "full" / BEST_CHECKPOINT)["epoch"] == best_epoch + 1
    assert a["model_config"] == {"width": 16} and a["config"]["path"] == str(tmp_path / "full")
    assert yaml.safe_load((tmp_path / "full" / RUN_CONFIG).read_text()) == {"seed": 7,
                                                                           "path": str(tmp_path / "full")}
    assert "Epoch 2/3: train loss" in capsys.readouterr().out


def test_loaders_are_sharded_and_not_persistent():
    info = DistInfo(1, 3, 1, torch.device("cpu"), True)
    train = make_train_loader(_dataset(10), info, batch_size=2, workers=1, seed=0)
    val = make_eval_loader(_dataset(10), info, batch_size=2, workers=1)
    assert not train.persistent_workers and not val.persistent_workers and not train.drop_last
    assert list(val.sampler) == [1, 4, 7] and len(list(train.sampler)) == 4  # 10 padded to 12 over 3 ranks


def _broadcast_eval_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _bn_model(running_mean=float(rank), running_var=1.0 + rank)  # BN statistics drifted apart
        x, y = _eval_data()
        loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=ShardedEvalSampler(len(x), rank, world))
        res = evaluate_classifier(model, loader, nn.CrossEntropyLoss(), device="cpu",
                                  dist_info=DistInfo(rank, world, rank, torch.device("cpu"), True))
        torch.save({"result": res, "bn": {k: v for k, v in model[1].state_dict().items()}},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bn_model(running_mean: float, running_var: float) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank; only the buffers differ
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model[1].running_mean.fill_(running_mean)
    model[1].running_var.fill_(running_var)
    return model


def _eval_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(11, 3, generator=g), torch.randint(0, 4, (11,), generator=g)


def test_distributed_evaluation_uses_rank0_buffers(tmp_path):
    """2 gloo processes whose BatchNorm statistics differ (no SyncBatchNorm on the CPU): the validation metric is
    that of rank 0's weights, the ones saved, and rank 1 ends up holding them too."""
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_eval_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    x, y = _eval_data()

    def single(model):
        return evaluate_classifier(model, DataLoader(TensorDataset(x, y), batch_size=4), nn.CrossEntropyLoss(),
                                   device="cpu")

    ref0, ref1 = single(_bn_model(0.0, 1.0)), single(_bn_model(1.0, 2.0))
    assert ref0["loss"] != pytest.approx(ref1["loss"], rel=1e-6)  # the drift matters to the metric
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["result"]["num_images"] == 11
        assert saved["result"]["loss"] == pytest.approx(ref0["loss"], rel=1e-6)
        assert (saved["result"]["top1"], saved["result"]["top5"]) == (ref0["top1"], ref0["top5"])
        assert torch.equal(saved["bn"]["running_mean"], torch.zeros(8))
        assert torch.equal(saved["bn"]["running_var"], torch.ones(8))
    broadcast_buffers(_bn_model(1.0, 2.0), DistInfo())  # no process group: a no-op, no error
