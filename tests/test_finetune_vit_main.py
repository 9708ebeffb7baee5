"""End-to-end fine-tuning with finetune_vit.main on a generated ImageFolder, and its refusals."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint
from cbsa_core.engine import ResumeMismatchError
from finetune_vit.main import main, parse_args

REPO = Path(__file__).resolve().parent.parent
ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_imagefolder(root: Path, per_class=(16, 6), size=40) -> Path:
    """Three classes of noisy solid colours, 40x40 PNGs, in root/{train,val}/<class>/."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("vit_data"))


@pytest.fixture(scope="module")
def init_file(tmp_path_factory) -> Path:
    """A randomly initialised tiny ViT saved as a timm state dict: the "pretrained" weights of the tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit_init") / "vit_tiny_random.pth"
    torch.save(timm.create_model(ARCH, num_classes=3, **TINY).state_dict(), path)
    return path


def argv(data, out, *extra):
    return ["--data", str(data), "--arch", ARCH, "--model-kwargs", json.dumps(TINY), "--rep-grid", "2", "2",
            "--batch-size", "16", "--workers", "0", "--lr", "1e-3", "--warmup-epochs", "1", "--print-freq", "100",
            "--output-dir", str(out), "--no-tensorboard", *extra]


def read_log(out: Path) -> list[dict]:
    """The per-epoch records of log.jsonl (the start/end events left out)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


@pytest.mark.parametrize("attention", ["cbsa_vee", "cbsa_star", "linear"])
def test_finetuning_runs_and_loss_falls(data, init_file, tmp_path, attention):
    out = tmp_path / "run"
    result = main(argv(data, out, "--attention", attention, "--pretrained-file", str(init_file), "--epochs", "4"))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    train_losses = [r["train_loss"] for r in log]
    val_losses = [r["val_loss"] for r in log]
    assert train_losses[-1] < 0.8 * train_losses[0], train_losses
    assert val_losses[-1] < val_losses[0], val_losses
    assert result["val"]["num_images"] == 18
    assert result["best_top1"] == max(r["val_top1"] for r in log)
    # Warm-up 1 epoch then cosine over 4: lr_e = 1e-3 * min(e + 1, (1 + cos(pi e / 4)) / 2).
    expected = [1e-3 * min(e + 1, 0.5 * (1 + np.cos(np.pi * e / 4))) for e in range(4)]
    np.testing.assert_allclose([r["lr"] for r in log], expected, rtol=1e-12)
    ckpt = read_checkpoint(out / "checkpoint.pth.tar")  # weights_only load
    assert ckpt["epoch"] == 4 and ckpt["arch"] == ARCH
    assert ckpt["model_config"]["attention"] == attention
    ref_keys = set(timm.create_model(ARCH, num_classes=3, **TINY).state_dict())
    assert set(ckpt["state_dict"]) == ref_keys  # a plain timm key set: no parameter was added
    assert (out / "model_best.pth.tar").is_file()


def test_interrupted_run_resumes_exactly_and_evaluate_reproduces(data, init_file, tmp_path, capsys, monkeypatch):
    """With loader workers: fresh (not persistent) workers take their seeds from the per-epoch reseeded RNG, so the
    resumed run draws the same crops as the uninterrupted one."""
    import cbsa_core.engine.runner as runner

    common = ["--pretrained-file", str(init_file), "--epochs", "3", "--attention", "cbsa_star", "--workers", "2"]
    full = tmp_path / "full"
    main(argv(data, full, *common))

    # Interrupt the same run during epoch 2 (after the epoch-1 checkpoint was written), then resume it.
    out = tmp_path / "run"
    real_eval, calls = runner.evaluate_classifier, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_classifier", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(argv(data, out, *common))
    monkeypatch.setattr(runner, "evaluate_classifier", real_eval)
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    result = main(argv(data, out, *common, "--resume", str(out / "checkpoint.pth.tar")))
    assert result["epochs_run"] == 1
    log, ref = read_log(out), read_log(full)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for mine, theirs in zip(log, ref):  # same data order, augmentation, LR and optimizer state
        assert mine["train_loss"] == theirs["train_loss"]
        assert mine["val_loss"] == theirs["val_loss"]
        assert mine["lr"] == theirs["lr"]
    final, ref_final = (read_checkpoint(d / "checkpoint.pth.tar")["state_dict"] for d in (out, full))
    for k in ref_final:
        assert torch.equal(final[k], ref_final[k]), k

    capsys.readouterr()
    ev = main(argv(data, tmp_path / "eval", "--attention", "cbsa_star", "--evaluate", "--resume",
                   str(out / "checkpoint.pth.tar")))
    assert ev["val"]["top1"] == pytest.approx(log[-1]["val_top1"])
    assert ev["val"]["loss"] == pytest.approx(log[-1]["val_loss"], rel=1e-6)
    assert " * Acc@1" in capsys.readouterr().out
    assert not (tmp_path / "eval").exists()  # evaluation writes nothing


def test_resume_with_other_variant_is_refused(data, init_file, tmp_path):
    out = tmp_path / "run"
    main(argv(data, out, "--pretrained-file", str(init_file), "--epochs", "1"))
    ckpt = str(out / "checkpoint.pth.tar")
    with pytest.raises(ResumeMismatchError, match="--attention linear \\(from the command line\\) differs from "
                                                  "cbsa_vee, which --resume .* was trained with; evaluating it"):
        main(argv(data, out, "--attention", "linear", "--evaluate", "--resume", ckpt))
    with pytest.raises(ResumeMismatchError, match="--norm inception .* differs from imagenet"):
        main(argv(data, out, "--norm", "inception", "--evaluate", "--resume", ckpt))
    with pytest.raises(ResumeMismatchError, match="--layers 1 .* differs from 0 1.*: pass --layers 0 1"):
        main(argv(data, out, "--layers", "1", "--evaluate", "--resume", ckpt))
    # The same blocks listed in another order are the same model.
    ev = main(argv(data, out, "--layers", "1", "0", "--evaluate", "--resume", ckpt))
    assert ev["val"]["num_images"] == 18
    # Training on from it needs the same schedule, seed, optimizer, lr and weight decay (the engine's one rule).
    for extra, match in ((("--epochs", "2"), "--epochs 2 (from the command line) differs from 1"),
                         (("--epochs", "1", "--seed", "5"), "--seed 5 (from the command line) differs from 0"),
                         (("--epochs", "1", "--lr", "0.5"), "--lr 0.5 (from the command line) differs from 0.001"),
                         (("--epochs", "1", "--wd", "0.9"), "--wd 0.9 (from the command line) differs from 0.01")):
        with pytest.raises(ResumeMismatchError, match=re.escape(match)):
            main(argv(data, out, *extra, "--resume", ckpt))


def _authors_file(src: Path, dst: Path) -> Path:
    """The release's fine-tuned ViT layout: DDP 'module.' keys, arch and best_acc1, no project format marker."""
    sd = read_checkpoint(src)["state_dict"]
    torch.save({"epoch": 1, "arch": ARCH, "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_acc1": 40.0}, dst)
    return dst


def test_authors_file_switches_on_legacy_layout_and_the_saved_config_says_so(data, init_file, tmp_path, caplog):
    caplog.set_level("INFO")
    first = tmp_path / "first"
    main(argv(data, first, "--pretrained-file", str(init_file), "--epochs", "1"))
    assert read_checkpoint(first / "checkpoint.pth.tar")["model_config"]["legacy_token_layout"] is False
    authors = _authors_file(first / "checkpoint.pth.tar", tmp_path / "vit_tiny_cbsa_best.pth.tar")

    # As --pretrained-file: the layout it was trained with is switched on, with a log line.
    out = tmp_path / "ft"
    main(argv(data, out, "--pretrained-file", str(authors), "--epochs", "1"))
    assert f"{authors} holds the authors' fine-tuned weights" in caplog.text
    assert "switching on the legacy token layout" in caplog.text
    ckpt = read_checkpoint(out / "checkpoint.pth.tar")
    assert ckpt["model_config"]["legacy_token_layout"] is True and ckpt["config"]["legacy_token_layout"] is True
    assert yaml.safe_load((out / "config.yaml").read_text())["legacy_token_layout"] is True

    # As --resume: an authors' file records no layout, so it follows the file (legacy), and an explicit flag is
    # the override the core's rule allows for such files; the files written record the layout really trained.
    caplog.clear()
    out = tmp_path / "resumed"
    main(argv(data, out, "--resume", str(authors), "--epochs", "2"))
    assert "legacy token layout (the file is in the authors' release format" in caplog.text
    ckpt = read_checkpoint(out / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 2
    assert ckpt["model_config"]["legacy_token_layout"] is True and ckpt["config"]["legacy_token_layout"] is True
    assert yaml.safe_load((out / "config.yaml").read_text())["legacy_token_layout"] is True
    caplog.clear()
    out2 = tmp_path / "resumed_corrected"
    main(argv(data, out2, "--resume", str(authors), "--epochs", "2", "--no-legacy-token-layout"))
    assert "corrected token layout (requested explicitly)" in caplog.text
    assert read_checkpoint(out2 / "checkpoint.pth.tar")["model_config"]["legacy_token_layout"] is False
    # This project's checkpoint records its layout: resuming it with the other one is a mismatch, refused.
    with pytest.raises(ResumeMismatchError, match="legacy_token_layout False .* differs from True.*drop "
                                                  "--no-legacy-token-layout"):
        main(argv(data, out, "--resume", str(out / "checkpoint.pth.tar"), "--epochs", "2",
                  "--no-legacy-token-layout"))


def test_config_file_sets_defaults_and_flags_override(data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("arch: vit_base_patch16_384\nattention: linear\nbatch-size: 64\nweight_decay: 0.05\n"
                   "model_kwargs: {depth: 4}\nlearning_rate: 1e-4\nrep_grid: [4, 2]\nlayers: [3, 1]\n")
    args = parse_args(["--config", str(cfg), "--data", str(data), "--batch-size", "8"])
    assert (args.arch, args.attention, args.batch_size, args.weight_decay) == ("vit_base_patch16_384", "linear", 8,
                                                                               0.05)
    assert args.model_kwargs == {"depth": 4} and args.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert args.rep_grid == [4, 2] and args.layers == [3, 1]
    args = parse_args(["--config", str(cfg), "--data", str(data), "--model-kwargs", '{"depth": 5}'])
    assert args.model_kwargs == {"depth": 5}
    bad = tmp_path / "bad.yaml"
    for text, needle in [("attention: softmax\n", "'softmax' is not one of cbsa_vee, cbsa_star, linear, mhsa"),
                         ("learning_rat: 0.1\n", "key 'learning_rat' is not a setting"),
                         ("epochs: 2.5\n", "key 'epochs': invalid value 2.5"),
                         ("rep-grid: 8\n", "key 'rep-grid': expected a list"),
                         ("model_kwargs: [1]\n", "key 'model_kwargs': invalid value [1]"),
                         ("no_tensorboard: 1\n", "key 'no_tensorboard': expected true or false")]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:
            parse_args(["--config", str(bad), "--data", str(data)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert str(bad) in err and needle in err, err


def test_shipped_configs_parse(data):
    configs = sorted((REPO / "configs" / "finetune_vit").glob("*.yaml"))
    assert len(configs) >= 8
    for cfg in configs:
        args = parse_args(["--config", str(cfg), "--data", str(data)])
        assert args.arch in cfg.stem or args.arch.replace("_patch16", "") in cfg.stem


@pytest.mark.parametrize("flag,value,valid", [
    ("--arch", "vit_huge_patch14_224", ("vit_tiny_patch16_224", "vit_small_patch16_384", "vit_large_patch16_384")),
    ("--attention", "softmax", ("cbsa_vee", "cbsa_star", "linear", "mhsa")),
    ("--norm", "zscore", ("imagenet", "inception")),
])
def test_unknown_choices_are_refused_listing_valid_ones(data, tmp_path, capsys, flag, value, valid):
    with pytest.raises(SystemExit) as exc:
        main(argv(data, tmp_path, flag, value))
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag}: invalid choice: '{value}'" in line
    assert all(name in line for name in valid)


def test_image_size_not_divisible_by_patch_is_refused(data, tmp_path, capsys):
    """A size the model refuses is a usage error at parse time (built on the meta device), before any work."""
    args = argv(data, tmp_path / "run")
    args[args.index("--model-kwargs") + 1] = json.dumps(dict(TINY, img_size=36))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "image size 36x36 is not divisible by the patch size 8x8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_weights_of_another_architecture_are_refused(data, tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save(timm.create_model(ARCH, num_classes=3, **dict(TINY, embed_dim=96, num_heads=3)).state_dict(), wide)
    with pytest.raises(CheckpointMismatchError, match=f"pretrained weights file {wide} does not match model "
                                                      f"'{ARCH}'"):
        main(argv(data, tmp_path / "run", "--pretrained-file", str(wide)))
    with pytest.raises(CheckpointError, match="pretrained weights file not found: .*missing.npz"):
        main(argv(data, tmp_path / "run", "--pretrained-file", str(tmp_path / "missing.npz")))


@pytest.mark.parametrize("where", ["inside_folder", "module"])
def test_command_line_entry_points(data, tmp_path, where):
    """Both launches work, and a runtime refusal exits with status 1 and one line naming the problem."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if where == "inside_folder":  # the script's own bootstrap finds the repository
        cmd, cwd = [sys.executable, "main.py"], REPO / "finetune_vit"
    else:  # this checkout's package, whatever an installed copy points at
        cmd, cwd, env["PYTHONPATH"] = [sys.executable, "-m", "finetune_vit.main"], tmp_path, str(REPO)
    missing = tmp_path / "nowhere"
    proc = subprocess.run(cmd + ["--data", str(missing), "--arch", ARCH], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"error: dataset root not found (or not a directory): {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("size,resize", [(224, 256), (384, 438)])
def test_transforms_follow_the_arch_size(size, resize):
    from torchvision import transforms as T

    from finetune_vit.main import _transforms

    train_tf, eval_tf = _transforms((size, size), "imagenet")
    crop = next(t for t in train_tf.transforms if isinstance(t, T.RandomResizedCrop))
    assert tuple(crop.size) == (size, size)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train_tf.transforms)
    resize_t = next(t for t in eval_tf.transforms if isinstance(t, T.Resize))
    center = next(t for t in eval_tf.transforms if isinstance(t, T.CenterCrop))
    assert resize_t.size == resize and tuple(center.size) == (size, size)
    norm = next(t for t in eval_tf.transforms if isinstance(t, T.Normalize))
    assert list(norm.mean) == [0.485, 0.456, 0.406] and list(norm.std) == [0.229, 0.224, 0.225]
    _, inception = _transforms((size, size), "inception")
    norm = next(t for t in inception.transforms if isinstance(t, T.Normalize))
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.5] * 3
    img = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    assert train_tf(img).shape == eval_tf(img).shape == (3, size, size)


def test_seed_command_parses_to_the_release_recipe(data):
    args = parse_args(["--data", str(data), "--arch", "vit_small_patch16_224", "--batch-size", "512", "--epochs", "50",
                       "--optimizer", "AdamW", "--lr", "5e-5", "--weight-decay", "0.01", "--print-freq", "50"])
    assert (args.arch, args.batch_size, args.epochs, args.optimizer, args.lr, args.weight_decay, args.print_freq) == (
        "vit_small_patch16_224", 512, 50, "adamw", 5e-5, 0.01, 50)
    assert (args.attention, args.warmup_epochs, args.label_smooth, args.norm) == ("cbsa_vee", 10, 0.1, "imagenet")
    assert args.pretrained_file is None and args.rep_grid == [8, 8] and not args.legacy_token_layout
