"""The run lifecycle of issue 12, in one place in the engine and the same in all three tracks: output folder rule,
resume consistency, NaN/Inf policy, one atomic writer, exit codes, signals, parse-time validation.

The faults are produced the way a user meets them, through the command-line entry points (``cli``/``main`` return
the exit status) on tiny generated data; the engine pieces are also checked on their own.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

import image_classification.main as icm
from cbsa_core.atomic import atomic_write, atomic_write_json, atomic_write_text, remove_stale_temporaries
from cbsa_core.engine import (ConfigError, DistInfo, MustMatch, NonFiniteOutputError, NonFiniteParametersError,
                              OutputDirError, ResumeMismatchError, WarmupCosineLambda,
                              build_lambda_scheduler, build_optimizer, check_output_dir, check_resume_consistency,
                              evaluate_classifier, finite_float, fit, make_eval_loader, make_train_loader,
                              non_negative_float, parse_args_with_config, run_cli, save_training_checkpoint)
from finetune_vit import main as vit_main
from semantic_segmentation import eval as seg_eval
from semantic_segmentation import main as seg_main
from test_classification import make_imagefolder as make_shapes
from test_classification import write_config
from test_finetune_vit_main import argv as vit_argv
from test_finetune_vit_main import make_imagefolder as make_colours
from test_segmentation_data import TINY_ARGS as SEG_TINY
from test_segmentation_data import make_toy_ade20k

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.exists() else {}


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


# ======================================================================================= engine, piece by piece
def test_atomic_writer_keeps_the_old_file_on_failure_and_cleans_only_its_own_temporaries(tmp_path):
    target = tmp_path / "checkpoint.pth.tar"
    atomic_write_text(target, "old")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would give, not mkstemp's 0600

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    for error, write in ((OSError, half_then_fail), (KeyboardInterrupt, lambda f: (_ for _ in ()).throw(
            KeyboardInterrupt()))):
        with pytest.raises(error):
            atomic_write(target, write)
        assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        atomic_write_json(tmp_path / "eval.json", {"loss": float("nan")})
    assert not (tmp_path / "eval.json").exists()

    # kill -9 mid-save leaves '.<name>.<8 chars>.tmp'; only that pattern is cleaned.
    orphans = [tmp_path / ".checkpoint.pth.tar.a1b2_c3d.tmp", tmp_path / ".config.yaml.zzzzzzzz.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / "data.tmp", tmp_path / ".checkpoint.pth.tar.TOOLONG99.tmp"]
    for p in orphans + others:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(orphans)
    assert all(p.exists() for p in others) and target.read_text() == "old"


def test_output_folder_rule(tmp_path):
    markers = (icm.LAST_CHECKPOINT, icm.BEST_CHECKPOINT)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(OutputDirError, match=f"--output-dir {re.escape(str(a_file))} is a file, not a folder"):
        check_output_dir(a_file, flag="--output-dir", run_files=markers)
    with pytest.raises(OutputDirError, match="cannot be created: .*a_file is a file"):
        check_output_dir(a_file / "run", flag="--output-dir", run_files=markers)
    fresh = check_output_dir(tmp_path / "new" / "run", flag="--output-dir", run_files=markers)
    assert not (tmp_path / "new").exists()  # checking writes nothing
    fresh.claim()
    assert (tmp_path / "new" / "run").is_dir()

    run = tmp_path / "run"
    run.mkdir()
    for name in (*markers, "log.jsonl", "config.yaml", "notes.txt"):
        (run / name).write_text(name)
    (run / "tensorboard").mkdir()
    with pytest.raises(OutputDirError, match=r"already holds a run \(checkpoint.pth.tar, model_best.pth.tar\); "
                                             r"continue it with --resume .*, pick another --output-dir, or pass "
                                             r"--overwrite"):
        check_output_dir(run, flag="--output-dir", run_files=markers)
    other = tmp_path / "other" / icm.LAST_CHECKPOINT
    with pytest.raises(OutputDirError, match="holds another run .* but --resume .* comes from .*other"):
        check_output_dir(run, flag="--output-dir", run_files=markers, resume_from=other)
    # Continuing in its own folder, and evaluating into any folder, are allowed.
    check_output_dir(run, flag="--output-dir", run_files=markers, resume_from=run / icm.LAST_CHECKPOINT)
    check_output_dir(run, flag="--output-dir", run_files=markers, evaluate=True)
    assert (run / icm.BEST_CHECKPOINT).exists()
    # --overwrite replaces that run when the new one starts: its files go, the user's other files stay.
    replacing = check_output_dir(run, flag="--output-dir", run_files=markers, overwrite=True, resume_from=other,
                                 also_replaced=("log.jsonl", "config.yaml", "tensorboard", "eval.json"))
    assert (run / icm.BEST_CHECKPOINT).exists()  # nothing removed before the run starts
    replacing.claim()
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a mode-0500 folder, or for root (whom modes do not stop)
    Linux's /proc, where no file can be created."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").write_text("x")
    except OSError:
        return ro
    (ro / "probe").unlink()
    if not Path("/proc/self").is_dir():
        pytest.skip("no unwritable folder available to this user")
    return Path("/proc")


def test_an_unwritable_output_folder_is_refused_before_any_work(shapes, cfg, tmp_path, capsys):
    """Item 6: training, and --evaluate (which used to evaluate, then crash writing eval.json, losing the metric),
    are refused before the data is read: the data root given does not even exist."""
    ro = _unwritable_folder(tmp_path)
    for extra in ((), ("--evaluate",)):
        assert icm.cli(_cls(cfg, tmp_path / "no_data", ro / "cbsa_run", *extra)) == 1
        assert re.fullmatch(rf"error: --output-dir {re.escape(str(ro / 'cbsa_run'))} is not writable \(it would be "
                            rf"created in {re.escape(str(ro))}\): .*; pass another --output-dir",
                            _last_error_line(capsys))
    assert seg_eval.main([str(tmp_path / "m.pth"), "ade20k", "--data-root", str(tmp_path / "none"), "--output",
                          str(ro / "scores.yml")]) == 1
    assert f"--output {ro / 'scores.yml'} is not writable" in _last_error_line(capsys)
    if ro != Path("/proc"):
        ro.chmod(0o700)


def test_resume_consistency_names_the_flag_and_where_the_value_came_from(tmp_path):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lr", type=non_negative_float, default=0.1)
    parser.add_argument("--wd", dest="weight_decay", type=non_negative_float, default=0.05)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 3\n")
    args = parse_args_with_config(parser, ["--config", str(cfg), "--lr", "0.5"])
    assert "setting_sources" not in vars(args)  # never leaks into a recorded config

    def check(flag, dest, recorded):
        check_resume_consistency("ck.pth", [MustMatch(flag, getattr(args, dest), recorded, dest=dest)], args)

    # Issue 12 item 9: the seed came from --config, so the fix is there, and "drop --seed" is never suggested.
    with pytest.raises(ResumeMismatchError) as e:
        check("--seed", "seed", 7)
    assert str(e.value) == (f"--seed 3 (from --config {cfg}) differs from 7, which --resume ck.pth was trained with; a "
                            f"resumed run must continue that run exactly: set seed: 7 in {cfg} or pass --seed 7, or "
                            f"start a new run")
    with pytest.raises(ResumeMismatchError, match=r"--lr 0.5 \(from the command line\) differs from 0.01.*pass --lr "
                                                  r"0.01,"):
        check("--lr", "lr", 0.01)
    with pytest.raises(ResumeMismatchError, match=r"--wd 0.05 \(from the default\) differs from 0.9"):
        check("--wd", "weight_decay", 0.9)
    check("--lr", "lr", 0.5)  # equal: passes
    check("--lr", "lr", None)  # not recorded (an authors' file): not checked
    assert isinstance(ResumeMismatchError("x"), ConfigError)


def test_exit_codes_and_signals_are_one_function(capsys):
    def raising(error):
        def main(argv):
            raise error
        return main

    assert run_cli(lambda argv: None) == 0
    assert run_cli(raising(ConfigError("bad setting\n  detail line"))) == 1
    assert _last_error_line(capsys) == "error: bad setting; detail line"  # one line
    assert run_cli(raising(FileNotFoundError(2, "No such file", "x.pth"))) == 1
    assert run_cli(raising(SystemExit(2))) == 2
    assert run_cli(raising(KeyboardInterrupt())) == 130
    assert _last_error_line(capsys) == "interrupted by SIGINT: stopped"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(raising(ZeroDivisionError("bug")))
    with pytest.raises(ValueError):
        run_cli(raising(ValueError("not a refusal here")))
    assert run_cli(raising(ValueError("bad image name")), refusals=(ValueError,)) == 1

    def sigterm(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(sigterm) == 143
    assert _last_error_line(capsys) == "interrupted by SIGTERM: stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # restored


class _Spare(nn.Module):
    """A classifier with a parameter that no output depends on: only the parameter check can see it go NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 4)
        self.spare = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.net(x)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_a_model_with_non_finite_parameters_is_never_saved(tmp_path):
    torch.manual_seed(0)
    model = _Spare()
    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    epochs_done = []
    opt.register_step_post_hook(lambda o, a, k: model.spare.data.fill_(float("nan")) if len(epochs_done) else None)
    info = DistInfo()
    train = make_train_loader(_data(), info, batch_size=24, workers=0, seed=0)
    val = make_eval_loader(_data(8, 1), info, batch_size=8, workers=0)
    sched = build_lambda_scheduler(opt, WarmupCosineLambda(0, 3))
    with pytest.raises(NonFiniteParametersError, match=r"after epoch 1 the model holds NaN/inf values \(spare\).*"
                                                       r"the last good checkpoint is kept at .*checkpoint.pth.tar"):
        fit(model, train_loader=train, val_loader=val, criterion=nn.CrossEntropyLoss(), optimizer=opt,
            scheduler=sched, dist_info=info, output_dir=tmp_path, seed=0, epochs=3, arch="spare", model_config={},
            config={}, print_freq=100, tensorboard=False,
            record_extra=lambda epoch, train: epochs_done.append(epoch) or {})
    kept = torch.load(tmp_path / icm.LAST_CHECKPOINT, weights_only=True)
    assert kept["epoch"] == 1 and torch.isfinite(kept["state_dict"]["spare"]).all()
    assert _records(tmp_path / icm.LOG_JSONL)[-1]["event"] == "non_finite_parameters"
    # The writer refuses too, whoever calls it, and leaves the file as it was.
    before = (tmp_path / icm.LAST_CHECKPOINT).read_bytes()
    with pytest.raises(NonFiniteParametersError, match="was not written"):
        save_training_checkpoint(tmp_path / icm.LAST_CHECKPOINT, model=model, arch="spare", model_config={},
                                 optimizer=None, scheduler=None, scaler=None, epoch=5, best_metric=None, config={})
    assert (tmp_path / icm.LAST_CHECKPOINT).read_bytes() == before


def test_evaluation_of_non_finite_outputs_is_refused_not_scored():
    class NaNRows(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 4)
            out[x[:, 0] > 0] = float("nan")  # the argmax of these rows would be class 0
            return out

    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0], [-1.0]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(5, dtype=torch.long)),
                                         batch_size=2)
    with pytest.raises(NonFiniteOutputError, match="2 of 5 images got non-finite outputs"):
        evaluate_classifier(NaNRows(), loader, nn.CrossEntropyLoss(), device="cpu")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400"])
def test_value_types_refuse_non_finite_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        finite_float(text)
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        non_negative_float("-1e-3")


# ================================================================================ classification, through the CLI
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml")


def _cls(cfg: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg), "--data", str(data), "--output-dir", str(out), *extra]


def test_nan_divergence_with_one_step_per_epoch_is_never_saved_or_scored(shapes, cfg, tmp_path, capsys):
    """Item 1: one step per epoch (batch 32 > 24 images). lr 1e30: the first loss is finite, the update is not, so
    validation is NaN: the run stops before any checkpoint, and says that none exists."""
    out = tmp_path / "diverged"
    assert icm.cli(_cls(cfg, shapes, out, "--lr", "1e30", "--batch-size", "32")) == 1
    line = _last_error_line(capsys)
    assert line == (f"error: validation after epoch 0: 13 of 13 images got non-finite outputs, so its metrics would "
                    f"be meaningless; no checkpoint was written (there is none at {out / icm.LAST_CHECKPOINT})")
    assert not (out / icm.LAST_CHECKPOINT).exists() and not (out / icm.BEST_CHECKPOINT).exists()
    assert _records(out / icm.LOG_JSONL)[-1]["event"] == "non_finite_outputs"

    # lr 1e4: epoch 0 stays finite, epoch 1 diverges: epoch 0's files are kept and named, nothing NaN is "best".
    out = tmp_path / "late"
    assert icm.cli(_cls(cfg, shapes, out, "--lr", "1e4", "--batch-size", "32")) == 1
    assert _last_error_line(capsys).endswith(f"the last good checkpoint is kept at {out / icm.LAST_CHECKPOINT}")
    last, best = (torch.load(out / n, weights_only=True) for n in (icm.LAST_CHECKPOINT, icm.BEST_CHECKPOINT))
    assert last["epoch"] == best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())

    # --evaluate on a checkpoint whose outputs are NaN: exit 1, a clear line, no eval.json (never a bare NaN).
    bad = dict(last)
    bad["state_dict"] = {k: (v * float("nan") if k == "mlp_head.1.weight" else v)
                         for k, v in last["state_dict"].items()}
    torch.save(bad, tmp_path / "nan.pth.tar")
    ev = tmp_path / "eval"
    assert icm.cli(_cls(cfg, shapes, ev, "--evaluate", "--resume", str(tmp_path / "nan.pth.tar"))) == 1
    assert _last_error_line(capsys) == (f"error: evaluation of {tmp_path / 'nan.pth.tar'}: 13 of 13 images got "
                                        f"non-finite outputs, so its metrics would be meaningless; no eval.json was "
                                        f"written")
    assert not (ev / icm.EVAL_JSON).exists()
    # The finite one: results are printed first, then written as strict JSON.
    assert icm.cli(_cls(cfg, shapes, ev, "--evaluate", "--resume", str(out / icm.LAST_CHECKPOINT))) == 0
    result = _strict_json(ev / icm.EVAL_JSON)
    assert f"Acc@1 {result['top1']:.3f}" in capsys.readouterr().out


def test_resume_never_overwrites_another_run(shapes, cfg, tmp_path, capsys):
    """Item 2: --resume A/checkpoint --output-dir B, where B holds another run."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert icm.cli(_cls(cfg, shapes, a, "--epochs", "2", "--stop-epoch", "1")) == 0
    assert icm.cli(_cls(cfg, shapes, b, "--epochs", "2", "--stop-epoch", "1", "--seed", "5")) == 0
    before = _files(b)
    resume = _cls(cfg, shapes, b, "--epochs", "2", "--resume", str(a / icm.LAST_CHECKPOINT))
    assert icm.cli(resume) == 1
    assert f"--output-dir {b} holds another run" in _last_error_line(capsys)
    assert _files(b) == before
    # A fresh folder is a branch of run A; --overwrite replaces B entirely (no stale model_best of B left).
    assert icm.cli(_cls(cfg, shapes, tmp_path / "C", "--epochs", "2", "--resume", str(a / icm.LAST_CHECKPOINT))) == 0
    assert icm.cli(resume + ["--overwrite"]) == 0
    events = [r.get("event") for r in _records(b / icm.LOG_JSONL)]
    assert events == ["start", None, "end"]  # B's old log went with B's run
    new_b, c = (torch.load(d / icm.LAST_CHECKPOINT, weights_only=True) for d in (b, tmp_path / "C"))
    assert new_b["config"]["seed"] == c["config"]["seed"] == 0 and new_b["epoch"] == 2
    assert not (b / icm.BEST_CHECKPOINT).exists() or torch.load(
        b / icm.BEST_CHECKPOINT, weights_only=True)["config"]["seed"] == 0


def test_a_setting_from_the_config_file_is_named_there(shapes, cfg, tmp_path, capsys):
    """Items 3 and 9: lr/seed changes are refused, and a value from --config is to be fixed in that file."""
    run = tmp_path / "run"
    assert icm.cli(_cls(cfg, shapes, run, "--epochs", "2", "--stop-epoch", "1")) == 0
    other = write_config(tmp_path / "other.yaml", seed=3)
    argv = ["--config", str(other), "--data", str(shapes), "--output-dir", str(run), "--epochs", "2", "--resume",
            str(run / icm.LAST_CHECKPOINT)]
    assert icm.cli(argv) == 1
    line = _last_error_line(capsys)
    assert f"--seed 3 (from --config {other}) differs from 0" in line and f"set seed: 0 in {other}" in line
    assert "drop --seed" not in line


def test_output_location_is_checked_before_any_work(shapes, cfg, tmp_path, capsys):
    """Item 6: a file in place of --output-dir is refused before the data is read (here the data does not even
    exist, and that is not what is reported), for training and for --evaluate."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for extra in ((), ("--evaluate",)):
        assert icm.cli(_cls(cfg, tmp_path / "no_data", blocker, *extra)) == 1
        assert _last_error_line(capsys) == (f"error: --output-dir {blocker} is a file, not a folder; pass another "
                                            f"--output-dir")
        assert icm.cli(_cls(cfg, tmp_path / "no_data", blocker / "run", *extra)) == 1
        assert "cannot be created" in _last_error_line(capsys)
    assert blocker.read_text() == "a file"


def test_stale_temporaries_are_removed_when_a_run_starts(shapes, cfg, tmp_path):
    """Item 9: kill -9 during a save leaves '.checkpoint.pth.tar.<8>.tmp'; the next run in the folder removes it."""
    run = tmp_path / "run"
    assert icm.cli(_cls(cfg, shapes, run, "--epochs", "2", "--stop-epoch", "1")) == 0
    orphan = run / ".checkpoint.pth.tar.k9x2m4q7.tmp"
    orphan.write_bytes(b"half a checkpoint")
    (run / "keep.tmp").write_text("not ours")
    assert icm.cli(_cls(cfg, shapes, run, "--epochs", "2", "--resume", str(run / icm.LAST_CHECKPOINT))) == 0
    assert not orphan.exists() and (run / "keep.tmp").exists()


def test_one_class_dataset_warns(tmp_path, cfg, caplog):
    root = make_shapes(tmp_path / "one", 2, 1, classes=["red_circle"])
    caplog.set_level("WARNING")
    assert icm.cli(_cls(cfg, root, tmp_path / "run", "--epochs", "1", "--model-override", "depth=1")) == 0
    assert "has 1 class: every prediction is that class, so its top-1 of 100 % is trivial" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (("--lr", "nan"), "argument --lr/--learning-rate: must be a finite number, got 'nan'"),
    (("--wd", "nan"), "argument --wd/--weight-decay: must be a finite number, got 'nan'"),
    (("--wd", "-1"), "argument --wd/--weight-decay: must be a finite number >= 0, got '-1'"),
    (("--epoch", "3"), "unrecognized arguments: --epoch 3"),
    (("--warm", "1"), "unrecognized arguments: --warm 1"),
    (("--input-size", "18"), "--input-size 18 does not fit --arch cbt_tiny: image_size 18 does not divide by "
                             "patch_size 4"),
])
def test_bad_settings_are_usage_errors_before_anything_is_written(shapes, cfg, tmp_path, capsys, extra, message):
    """Items 7 and 9: parse time, exit 2, nothing written (not even config.yaml or log.jsonl)."""
    assert icm.cli(_cls(cfg, shapes, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_input_size_below_the_representative_grid_is_a_usage_error(shapes, cfg, tmp_path, capsys):
    """Item 7: 8 / patch 4 = a 2x2 token grid, smaller than the 4x4 representative grid. The model refuses it (one
    forward on the meta device at parse time), before config.yaml or log.jsonl exist."""
    assert icm.cli(_cls(cfg, shapes, tmp_path / "run", "--input-size", "8", "--model-override", "rep_grid=[4,4]")) == 2
    err = capsys.readouterr().err  # the model's own words, whichever layer says them
    assert "--input-size 8 does not fit --arch cbt_tiny: " in err and "4x4" in err and "2x2" in err
    assert not (tmp_path / "run").exists()


def test_legacy_token_layout_flag_overrides_the_file_for_evaluate_and_finetune(shapes, cfg, tmp_path, caplog):
    caplog.set_level("INFO")
    run = tmp_path / "run"
    assert icm.cli(_cls(cfg, shapes, run, "--epochs", "1")) == 0
    sd = torch.load(run / icm.LAST_CHECKPOINT, weights_only=True)["state_dict"]
    authors = tmp_path / "cbt_tiny_best.pth.tar"
    torch.save({"epoch": 1, "arch": "Ours_tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_acc1": 1.0}, authors)
    results = {}
    for flag in ((), ("--no-legacy-token-layout",), ("--legacy-token-layout",)):
        out = tmp_path / f"eval{len(results)}"
        assert icm.cli(_cls(cfg, shapes, out, "--evaluate", "--resume", str(authors), *flag)) == 0
        results[flag] = _strict_json(out / icm.EVAL_JSON)
    assert results[()]["legacy_token_layout"] is True  # the release's wrapper implies it
    assert results[("--no-legacy-token-layout",)]["legacy_token_layout"] is False
    assert "corrected token layout (requested explicitly)" in caplog.text
    assert results[("--legacy-token-layout",)]["loss"] == results[()]["loss"]
    assert results[("--no-legacy-token-layout",)]["loss"] != results[()]["loss"]
    # The same flag reaches --finetune's load.
    caplog.clear()
    assert icm.cli(_cls(cfg, shapes, tmp_path / "ft", "--finetune", str(authors), "--no-legacy-token-layout",
                        "--epochs", "1")) == 0
    assert f"{authors}: corrected token layout (requested explicitly)" in caplog.text


def test_sigterm_stops_a_training_process_cleanly(shapes, cfg, tmp_path):
    """Item 9: SIGTERM (a scheduler's kill) in a real process: exit 143, one line, no traceback, an 'interrupted'
    record, the last checkpoint kept and resumable."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "image_classification.main", *_cls(cfg, shapes, out, "--epochs",
                                                                                      "100000")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / icm.LAST_CHECKPOINT).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert re.search(r"interrupted by SIGTERM: stopped during epoch \d+; the last good checkpoint is kept at .*; "
                     r"continue with --resume", err.strip().splitlines()[-1])
    last = _records(out / icm.LOG_JSONL)[-1]
    assert last["event"] == "interrupted" and last["signal"] == "SIGTERM"
    assert torch.load(out / icm.LAST_CHECKPOINT, weights_only=True)["epoch"] >= 1
    assert not list(out.glob(".*.tmp"))


# ================================================================================ segmentation, through the CLI
@pytest.fixture(scope="module")
def toy_ade(tmp_path_factory) -> Path:
    return make_toy_ade20k(tmp_path_factory.mktemp("toy_ade"), n_train=4, n_val=2)


def _seg(root: Path, log_dir: Path, *extra: str) -> list[str]:
    return SEG_TINY + ["--data-root", str(root), "--log-dir", str(log_dir), "--eval-freq", "100", *extra]


def test_segmentation_refuses_another_schedule_length_on_resume(toy_ade, tmp_path, capsys):
    """Item 4: resuming a 2-epoch run with --epochs 4 kept the old polynomial decay (both extra epochs at the
    minimum lr); it is now refused like in the other tracks."""
    run = tmp_path / "run"
    assert seg_main.main(_seg(toy_ade, run, "--epochs", "2")) == 0
    before = _files(run)
    assert seg_main.main(_seg(toy_ade, run, "--epochs", "4")) == 1
    line = _last_error_line(capsys)
    assert line.startswith("error: --epochs 4 (from the command line) differs from 2, which --resume ") and \
        "pass --epochs 2" in line
    assert _files(run) == before


def test_segmentation_nan_message_names_only_what_exists(toy_ade, tmp_path, capsys):
    """Item 5: the message said the last good checkpoint 'is kept at .../checkpoint.pth' when none existed."""
    run = tmp_path / "run"
    assert seg_main.main(_seg(toy_ade, run, "--epochs", "2", "--learning-rate", "1e30")) == 1
    line = _last_error_line(capsys)
    assert f"no checkpoint was written (there is none at {run / 'checkpoint.pth'})" in line
    assert "kept at" not in line and not (run / "checkpoint.pth").exists()


def test_segmentation_non_finite_logits_fail_the_miou_evaluation(toy_ade, tmp_path, capsys):
    run = tmp_path / "run"
    assert seg_main.main(_seg(toy_ade, run, "--epochs", "1")) == 0
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("decoder.") and k.endswith("weight"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] * float("nan")
    bad = tmp_path / "bad" / "checkpoint.pth"
    bad.parent.mkdir()
    torch.save(ckpt, bad)
    assert seg_eval.main([str(bad), "ade20k", "--data-root", str(toy_ade), "--num-workers", "0", "--device",
                          "cpu"]) == 1
    assert _last_error_line(capsys) == (f"error: evaluation of {bad}: 2 of 2 images got non-finite outputs, so its "
                                        f"metrics would be meaningless; no scores file was written")
    assert not (bad.parent / "scores_ss.yml").exists()
    # Item 6 for eval.py: an unwritable scores file is refused before the evaluation (the data root is not even
    # looked at), and the result of a good run is printed before the file is written.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert seg_eval.main([str(run / "checkpoint.pth"), "ade20k", "--data-root", str(tmp_path / "none"),
                          "--output", str(blocker / "scores.yml")]) == 1
    assert "cannot be created" in _last_error_line(capsys)
    assert seg_eval.main([str(run / "checkpoint.pth"), "ade20k", "--data-root", str(toy_ade), "--num-workers", "0",
                          "--device", "cpu"]) == 0
    report = yaml.safe_load((run / "scores_ss.yml").read_text())
    assert f"mIoU {report['mean_iou']:.2f}" in capsys.readouterr().out


def test_segmentation_finds_a_bad_validation_label_before_training(tmp_path, capsys):
    root = make_toy_ade20k(tmp_path / "d", n_train=2, n_val=2)
    label = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_validation_00000001.png"
    values = np.array(Image.open(label))
    values[0, 0] = 200  # 199 after reduce_zero_label: not a class of 4, not the ignore index
    Image.fromarray(values).save(label)
    run = tmp_path / "run"
    start = time.perf_counter()
    assert seg_main.main(_seg(root, run, "--epochs", "1")) == 1
    assert "ADE_validation_00000001.png has values [199] >= n_cls=4" in _last_error_line(capsys)
    assert not run.exists()  # found before training: nothing written
    assert time.perf_counter() - start < 30


# ====================================================================================== the same rules, per track
class _Track:
    """How to drive one track's CLI for the shared lifecycle test."""

    def __init__(self, cli, train, resume, lr_flag, abbreviated, out_flag, log, checkpoint, fresh):
        self.cli, self.train, self.resume, self.lr_flag = cli, train, resume, lr_flag
        self.abbreviated, self.out_flag, self.log, self.checkpoint, self.fresh = (abbreviated, out_flag, log,
                                                                                  checkpoint, fresh)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colours(tmp_path_factory.mktemp("colours"), per_class=(4, 2), size=32)


def _track(name: str, shapes: Path, cfg: Path, toy_ade: Path, colours: Path) -> _Track:
    if name == "classification":
        def train(out, *extra):
            return _cls(cfg, shapes, out, "--epochs", "2", *extra)
        return _Track(icm.cli, train, lambda out: ["--resume", str(out / icm.LAST_CHECKPOINT)], "--lr", "--epoch",
                      "--output-dir", icm.LOG_JSONL, icm.LAST_CHECKPOINT, [])
    if name == "vit":
        def train(out, *extra):
            return vit_argv(colours, out, "--epochs", "2", *extra)
        return _Track(vit_main.cli, train, lambda out: ["--resume", str(out / "checkpoint.pth.tar")], "--lr",
                      "--epoch", "--output-dir", "log.jsonl", "checkpoint.pth.tar", [])
    def train(out, *extra):
        return _seg(toy_ade, out, "--epochs", "2", *extra)
    return _Track(seg_main.main, train, lambda out: [], "--learning-rate", "--epoch", "--log-dir", "log.txt",
                  "checkpoint.pth", ["--no-resume"])


def _stop_with(sig):
    """A train_one_epoch that receives ``sig`` (as from the terminal or a job scheduler) as it starts."""
    def train_one_epoch(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # interrupted by the signal
        raise AssertionError("the signal did not interrupt the run")
    return train_one_epoch


@pytest.mark.parametrize("name", ["classification", "segmentation", "vit"])
def test_the_same_lifecycle_rules_hold_in_every_track(name, shapes, cfg, toy_ade, colours, tmp_path, capsys,
                                                      monkeypatch):
    import cbsa_core.engine.runner as runner

    t = _track(name, shapes, cfg, toy_ade, colours)
    run = tmp_path / "run"
    assert t.cli(t.train(run, *("--stop-after" if name == "segmentation" else "--stop-epoch", "1"))) == 0
    snapshot = _files(run)
    # Usage errors: exit 2 at parse time.
    assert t.cli(t.train(tmp_path / "x", t.lr_flag, "nan")) == 2
    assert "must be a finite number, got 'nan'" in capsys.readouterr().err
    assert t.cli(t.train(tmp_path / "x", t.abbreviated, "3")) == 2
    assert f"unrecognized arguments: {t.abbreviated} 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # Runtime refusals: exit 1, one line, nothing touched.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert t.cli(t.train(blocker)) == 1
    assert _last_error_line(capsys) == (f"error: {t.out_flag} {blocker} is a file, not a folder; pass another "
                                        f"{t.out_flag}")
    assert t.cli(t.train(run, *t.resume(run), t.lr_flag, "0.5")) == 1
    assert f"{t.lr_flag} 0.5 (from the command line) differs from" in _last_error_line(capsys)
    assert t.cli(t.train(run, *t.fresh)) == 1
    assert f"{t.out_flag} {run} already holds a run" in _last_error_line(capsys)
    assert _files(run) == snapshot
    # Signals: SIGINT 130, SIGTERM 143, each with an 'interrupted' record and the checkpoint kept.
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        monkeypatch.setattr(runner, "train_one_epoch", _stop_with(sig))
        assert t.cli(t.train(run, *t.resume(run))) == code
        assert _last_error_line(capsys) == (f"interrupted by {sig.name}: stopped during epoch 1; the last good "
                                            f"checkpoint is kept at {run / t.checkpoint}; continue with --resume "
                                            f"{run / t.checkpoint}")
        record = _records(run / t.log)[-1]
        assert (record["event"], record["signal"], record["epoch"]) == ("interrupted", sig.name, 1)
        assert (run / t.checkpoint).read_bytes() == snapshot[t.checkpoint]
    monkeypatch.undo()
    # An orphan of a killed save is removed when the run continues; the resumed run finishes.
    orphan = run / f".{t.checkpoint}.abcd1234.tmp"
    orphan.write_bytes(b"partial")
    assert t.cli(t.train(run, *t.resume(run))) == 0
    assert not orphan.exists()
    assert torch.load(run / t.checkpoint, weights_only=True)["epoch"] == 2


def test_vit_input_size_below_the_representative_grid_is_a_usage_error(colours, tmp_path, capsys):
    """Item 7 for the ViT track: 32 / patch 8 = 4x4 tokens cannot be pooled to 8x8 representatives (the converted
    model refuses it, asked on the meta device at parse time)."""
    args = vit_argv(colours, tmp_path / "run")
    args[args.index("--rep-grid") + 1: args.index("--rep-grid") + 3] = ["8", "8"]
    assert vit_main.cli(args) == 2
    assert "representative grid (8, 8) is larger than the token grid (4, 4)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_scripts_report_bad_input_in_one_line(tmp_path, capsys):
    """Item 9: the figure scripts use the same exit codes (1: one line, no traceback; 2: bad or abbreviated flags)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    cmd = [sys.executable, str(REPO / "scripts" / "attention_maps.py"), "--images", str(tmp_path / "cat.png"),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: image file not found: {tmp_path / 'cat.png'}"
    # In-process, the same function: an unknown model name, and an abbreviated flag.
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import zero_shot_segmentation as zss
        from _common import run_script
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert run_script(lambda argv: zss.main(["--arch", "no_such_model", "--out", str(tmp_path / "z")])) == 1
    assert _last_error_line(capsys).startswith("error: unknown model 'no_such_model'; valid names: ")
    assert run_script(lambda argv: zss.main(["--imag", "chelsea"])) == 2
    assert "unrecognized arguments: --imag chelsea" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    import importlib

    parsers = [icm.build_parser(), vit_main.build_parser(), seg_main.build_parser(), seg_eval.build_parser()]
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        common = importlib.import_module("_common")
        parsers.append(common.script_parser("doc"))
        for name in ("benchmark_attention", "benchmark_models", "model_table", "vit_flops"):
            module = importlib.import_module(name)
            with pytest.raises(SystemExit) as e:
                module.parse_args(["--hel"])  # an abbreviation of --help
            assert e.value.code == 2
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert all(p.allow_abbrev is False for p in parsers)
