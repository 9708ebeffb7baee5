"""Image classification track: CLI/config, training, evaluation, resume, DDP, transfer and bad input.

Everything runs on a tiny ImageFolder of coloured shapes generated here (6 classes, 16x16 crops) and a CBT with
one layer of width 32, so a full ``main()`` run takes about a second.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from torchvision import transforms as T

import cbsa_core
import image_classification.main as icm
from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError
from cbsa_core.engine import NonFiniteLossError, ResumeMismatchError
from image_classification.data import DatasetError, DigitsDataset, build_datasets, digits_arrays

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_MODEL = dict(image_size=16, patch_size=4, depth=1, dim=32, heads=2, dim_head=16, rep_grid=[2, 2])
TINY = dict(dataset="imagefolder", arch="cbt_tiny", model=TINY_MODEL, input_size=16, eval_resize=16,
            optimizer="AdamW", lr="1e-2", weight_decay=0.0, batch_size=8, epochs=5, warmup_epochs=1, workers=0,
            print_freq=100, seed=0, precision="fp32", tensorboard=False)
BASE_LR = 1e-2  # TINY["lr"] is the string "1e-2" on purpose: YAML 1.1 reads it as a string, the CLI converts it
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
CLASSES = [f"{c}_{s}" for c in COLOURS for s in SHAPES]  # 6 classes


# ------------------------------------------------------------------------------------------------ fixtures
def _draw(shape: str, colour, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (32, 32), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(7, 12))
    cx, cy = (int(v) for v in rng.integers(r + 1, 32 - r - 1, 2))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_imagefolder(root: Path, n_train: int = 4, n_val: int = 2, classes=CLASSES, seed: int = 0) -> Path:
    """<root>/{train,val}/<class>/*.png; the first class gets one extra val image (13 val images: odd, so the
    2-rank validation shards have unequal length)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, cls in enumerate(classes):
            colour, shape = cls.split("_")
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n + (1 if split == "val" and ci == 0 else 0)):
                _draw(shape, COLOURS[colour], rng).save(folder / f"{i}.png")
    return root


def write_config(path: Path, **overrides) -> Path:
    cfg = dict(TINY)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root, tiny_cfg):
    """One 5-epoch run shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("run")
    result = run_main(tiny_cfg, data_root, out)
    return out, result


def run_main(cfg: Path, data: Path, out: Path, *extra: str):
    return icm.main(["--config", str(cfg), "--data", str(data), "--output-dir", str(out), *extra])


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def epoch_records(out: Path):
    return [r for r in read_jsonl(out / icm.LOG_JSONL) if "epoch" in r and "event" not in r]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------- reference computations
def reference_eval(state_dict, data_root: Path, legacy: bool, smoothing: float = 0.1):
    """top-1/top-5 (percent), label-smoothed loss and count, computed without the track's code."""
    model = cbsa_core.create_model("cbt_tiny", num_classes=len(CLASSES), **TINY_MODEL)
    model.load_state_dict(state_dict)
    model.set_legacy_token_layout(legacy)
    model.eval()
    tf = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images, labels = [], []
    for ci, cls in enumerate(sorted(CLASSES)):
        for f in sorted((data_root / "val" / cls).iterdir()):
            images.append(tf(Image.open(f).convert("RGB")))
            labels.append(ci)
    x, y = torch.stack(images), torch.tensor(labels)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=1)
    n, c = logp.shape
    nll = -logp[torch.arange(n), y]
    uniform = -logp.sum(1) / c
    loss = ((1 - smoothing) * nll + smoothing * uniform).mean().item()
    rank = (logp > logp[torch.arange(n), y][:, None]).sum(1)  # classes strictly ahead of the true one
    return dict(top1=100.0 * (rank < 1).double().mean().item(), top5=100.0 * (rank < 5).double().mean().item(),
                loss=loss, num_images=n)


def lr_formula(base: float, e: int, warmup: int, epochs: int) -> float:
    return base * min((e + 1) / (warmup + 1e-8), 0.5 * (1 + math.cos(math.pi * e / epochs)))


# ================================================================================================ CLI
def test_release_defaults():
    a = icm.parse_args([])
    assert (a.data, a.arch, a.workers, a.epochs, a.start_epoch) == ("imagenet", "CRATE_tiny", 32, 150, 0)
    assert (a.label_smooth, a.batch_size, a.lr, a.weight_decay, a.print_freq) == (0.1, 256, 2e-4, 0.05, 50)
    assert (a.resume, a.evaluate, a.seed, a.optimizer) == ("", False, None, "Lion")
    assert (a.clip_grad, a.warmup_epochs, a.dataset, a.precision) == (None, 20, "imagefolder", None)
    # The README command line, short and long spellings.
    a = icm.parse_args("--arch Ours_small --batch-size 256 --epochs 150 --optimizer Lion --lr 2e-4 "
                       "--weight-decay 0.05 --print-freq 50".split())
    assert (a.arch, a.batch_size, a.optimizer, a.lr, a.weight_decay) == ("Ours_small", 256, "Lion", 2e-4, 0.05)
    a = icm.parse_args("-a Ours_small -e --resume x.pth -b 64 --wd 0.01 --learning-rate 5e-5 -j 4 -p 7 "
                       "--optimizer adamw".split())
    assert (a.evaluate, a.resume, a.batch_size, a.weight_decay, a.lr, a.workers, a.print_freq, a.optimizer) == (
        True, "x.pth", 64, 0.01, 5e-5, 4, 7, "AdamW")


def test_config_file_then_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    # --arch Ours_tiny: the release's default arch (CRATE_tiny, MSSA) has no representatives and refuses a rep_grid
    cfg.write_text("arch: Ours_tiny\nlr: 2e-3\nbatch-size: 12\noptimizer: adamw\nepochs: 7\nmodel:\n  depth: 2\n"
                   "  rep_grid: [2, 3]\n"
                   "mean: [0.1, 0.2, 0.3]\n")
    a = icm.parse_args(["--config", str(cfg)])
    assert (a.lr, a.batch_size, a.optimizer, a.epochs) == (2e-3, 12, "AdamW", 7)  # '2e-3' is a YAML string
    assert a.model == {"depth": 2, "rep_grid": (2, 3)} and a.mean == [0.1, 0.2, 0.3]
    assert a.weight_decay == 0.05  # untouched: the release default
    a = icm.parse_args(["--lr", "0.5", "--config", str(cfg), "--epochs", "9", "--model-override", "depth=4"])
    assert (a.lr, a.batch_size, a.epochs, a.model["depth"], a.model["rep_grid"]) == (0.5, 12, 9, 4, (2, 3))


@pytest.mark.parametrize("text, needle", [
    ("lr_typo: 1\n", "key 'lr_typo' is not a setting"),
    ("optimizer: sgd\n", "unknown optimizer"),
    ("dataset: mnist\n", "'mnist' is not one of"),
    ("epochs: many\n", "invalid value 'many'"),
    ("mean: [0.5, 0.5]\n", "expected 3 values"),
    ("model:\n  widht: 3\n", "unknown model override(s) widht"),
    ("no_tensorboard: true\n", "key 'no_tensorboard' is not a setting"),
    ("- 1\n", "must hold a mapping"),
])
def test_bad_config_file_names_file_and_key(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        icm.parse_args(["--config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and ("bad.yaml" in err or "--model-override" in err)


def test_unknown_arch_lists_valid_names(capsys):
    with pytest.raises(SystemExit) as e:
        icm.parse_args(["--arch", "Ours_huge"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --arch 'Ours_huge'" in err
    for name in cbsa_core.list_models():
        assert name in err


@pytest.mark.parametrize("name", ["cbt_t", "cbt_s", "cbt_b", "cbt_l", "mssa_t", "mssa_s", "tssa_t", "tssa_s",
                                  "agent_t", "agent_s"])
def test_table_configs_hold_the_paper_recipe(name):
    a = icm.parse_args(["--config", str(REPO / "configs" / "classification" / f"{name}.yaml")])
    family = {"cbt": "cbt", "mssa": "mssa", "tssa": "tssa", "agent": "agent"}[name.split("_")[0]]
    size = {"t": "tiny", "s": "small", "b": "base", "l": "large"}[name.split("_")[1]]
    assert a.arch == f"{family}_{size}"
    assert (a.optimizer, a.lr, a.weight_decay, a.batch_size, a.epochs, a.warmup_epochs) == (
        "Lion", 2e-4, 0.05, 256, 150, 20)
    assert (a.label_smooth, a.input_size, a.eval_resize, a.clip_grad, a.dataset) == (0.1, 224, 256, None,
                                                                                      "imagefolder")
    assert a.model == {}


def test_transfer_and_digits_configs():
    a = icm.parse_args(["--config", str(REPO / "configs/classification/transfer_finetune.yaml")])
    assert (a.optimizer, a.lr, a.weight_decay, a.batch_size) == ("AdamW", 5e-5, 0.01, 64)  # the paper's values
    a = icm.parse_args(["--config", str(REPO / "configs/classification/digits.yaml")])
    assert a.dataset == "digits" and a.model["image_size"] == a.input_size == 32 and a.model["patch_size"] == 4


def test_label_smoothing_matches_timm_and_the_formula():
    from timm.loss import LabelSmoothingCrossEntropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (7,), generator=g)
    ours = icm.build_criterion(0.1)(logits, target)
    timm_loss = LabelSmoothingCrossEntropy(smoothing=0.1)(logits, target)
    logp = torch.log_softmax(logits, 1)
    formula = (0.9 * -logp[torch.arange(7), target] + 0.1 * -logp.mean(1)).mean()
    torch.testing.assert_close(ours, timm_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, formula, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, F.cross_entropy(logits, target))  # smoothing does something


# ========================================================================================= train / eval
def test_training_loss_falls_and_writes_everything(trained):
    out, result = trained
    recs = epoch_records(out)
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.15, [r["train_loss"] for r in recs]
    assert all(r["train_num_images"] == 24 and r["val_num_images"] == 13 for r in recs)
    for e, r in enumerate(recs):  # per-epoch warm-up/cosine LambdaLR of the release
        assert r["lr"] == pytest.approx(lr_formula(BASE_LR, e, 1, 5), rel=1e-12)
    assert result["best_top1"] == max(r["val_top1"] for r in recs)

    ckpt = load_ckpt(out / icm.LAST_CHECKPOINT)  # loads with weights_only=True
    for key in ("state_dict", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "rng_state", "config",
                "arch", "model_config"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 5 and ckpt["arch"] == "cbt_tiny" and ckpt["config"]["seed"] == 0
    assert ckpt["scheduler"]["last_epoch"] == 5 and ckpt["best_metric"] == result["best_top1"]
    assert ckpt["model_config"]["depth"] == 1 and ckpt["model_config"]["num_classes"] == 6
    best = load_ckpt(out / icm.BEST_CHECKPOINT)
    best_epoch = max(range(5), key=lambda e: (recs[e]["val_top1"], -e))
    assert best["epoch"] == best_epoch + 1
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert (out / "config.yaml").is_file()


def test_tensorboard_scalars(tmp_path, data_root, tiny_cfg):
    run_main(tiny_cfg, data_root, tmp_path, "--epochs", "1", "--tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_dir,) = {p.parent for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_sec", "val/top1", "val/top5",
            "val/loss", "train_step/loss", "train_step/lr"} <= tags
    assert acc.Scalars("train/lr")[0].value == pytest.approx(BASE_LR, rel=1e-6)


@pytest.mark.parametrize("which", [icm.LAST_CHECKPOINT, icm.BEST_CHECKPOINT])
def test_evaluate_writes_eval_json_matching_reference(trained, data_root, tiny_cfg, tmp_path, capsys, which):
    out, _ = trained
    res = run_main(tiny_cfg, data_root, tmp_path, "--evaluate", "--resume", str(out / which))
    saved = json.loads((tmp_path / icm.EVAL_JSON).read_text())
    assert {"top1", "top5", "loss", "num_images"} <= set(saved)
    ref = reference_eval(load_ckpt(out / which)["state_dict"], data_root, legacy=False)
    assert saved["num_images"] == ref["num_images"] == 13
    assert saved["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert saved["top5"] == pytest.approx(ref["top5"], abs=1e-9)
    assert saved["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert res["top1"] == saved["top1"] and saved["legacy_token_layout"] is False
    printed = capsys.readouterr().out
    assert f"Acc@1 {ref['top1']:.3f}" in printed and f"Acc@5 {ref['top5']:.3f}" in printed
    if which == icm.BEST_CHECKPOINT:  # the value recorded during training is the same evaluation
        recs = epoch_records(out)
        assert saved["top1"] == pytest.approx(max(r["val_top1"] for r in recs), abs=1e-9)


def test_evaluate_authors_checkpoint_uses_legacy_layout(trained, data_root, tiny_cfg, tmp_path):
    """The release's file: 'module.' keys, best_acc1, no optimizer/scheduler, the authors' arch name."""
    out, _ = trained
    sd = load_ckpt(out / icm.LAST_CHECKPOINT)["state_dict"]
    authors = tmp_path / "cbt_tiny_best.pth.tar"
    torch.save({"epoch": 150, "arch": "Ours_tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_acc1": 63.2}, authors)
    run_main(tiny_cfg, data_root, tmp_path / "eval", "--arch", "Ours_tiny", "--evaluate", "--resume", str(authors))
    saved = json.loads((tmp_path / "eval" / icm.EVAL_JSON).read_text())
    ref = reference_eval(sd, data_root, legacy=True)
    corrected = reference_eval(sd, data_root, legacy=False)
    assert ref["loss"] != pytest.approx(corrected["loss"], rel=1e-6)  # the layout matters for this model
    assert saved["legacy_token_layout"] is True and saved["num_images"] == 13
    assert (saved["top1"], saved["top5"]) == pytest.approx((ref["top1"], ref["top5"]), abs=1e-9)
    assert saved["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_resume_is_bit_exact(tmp_path, data_root, tiny_cfg, monkeypatch):
    """3 epochs straight == 1 epoch + resume + 2 epochs, with the resume inside the warm-up (docs/authors-release.md
    item 13): at epoch 1 the warm-up factor 2/3 is below the cosine's 0.75, so a resume that dropped the warm-up
    would differ."""
    common = ("--epochs", "3", "--warmup-epochs", "3")
    run_main(tiny_cfg, data_root, tmp_path / "a", *common)
    run_main(tiny_cfg, data_root, tmp_path / "b", *common, "--stop-epoch", "1")
    assert load_ckpt(tmp_path / "b" / icm.LAST_CHECKPOINT)["epoch"] == 1
    resumed = tmp_path / "b" / icm.LAST_CHECKPOINT
    reads, real_load = [], torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else None)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    run_main(tiny_cfg, data_root, tmp_path / "b", *common, "--resume", str(resumed))
    monkeypatch.setattr(torch, "load", real_load)
    assert reads.count(str(resumed)) == 1   # checked for consistency, then loaded: one read of the run state
    a, b = (load_ckpt(tmp_path / d / icm.LAST_CHECKPOINT) for d in ("a", "b"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][name])), (pid, name)
    assert a["scheduler"] == b["scheduler"] and a["epoch"] == b["epoch"] == 3
    ra, rb = epoch_records(tmp_path / "a"), epoch_records(tmp_path / "b")
    expected = [lr_formula(BASE_LR, e, 3, 3) for e in range(3)]
    assert expected[1] == pytest.approx(BASE_LR * 2 / 3) and expected[1] < BASE_LR * 0.5 * (1 + math.cos(math.pi / 3))
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb] == expected
    assert ra[1]["val_loss"] == rb[1]["val_loss"] and ra[1]["train_loss"] == rb[1]["train_loss"]


def test_ddp_two_processes_match_one(tmp_path, data_root, tiny_cfg):
    """torchrun, gloo, 2 processes: exact validation (13 images, unequal shards) equal to a 1-process run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "image_classification.main", "--config", str(tiny_cfg), "--data", str(data_root)]
    ddp = tmp_path / "ddp"
    r = subprocess.run(torchrun + ["--output-dir", str(ddp), "--epochs", "1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = epoch_records(ddp)  # one log, written by rank 0 only
    assert rec["train_num_images"] == 24 and rec["val_num_images"] == 13
    assert load_ckpt(ddp / icm.LAST_CHECKPOINT)["world_size"] == 2
    r = subprocess.run(torchrun + ["--output-dir", str(tmp_path / "ddp_eval"), "--evaluate", "--resume",
                                   str(ddp / icm.LAST_CHECKPOINT)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "ddp_eval" / icm.EVAL_JSON).read_text())
    one = run_main(tiny_cfg, data_root, tmp_path / "one", "--evaluate", "--resume", str(ddp / icm.LAST_CHECKPOINT))
    for res in (two, rec_as_eval(rec)):
        assert res["num_images"] == one["num_images"] == 13
        assert (res["top1"], res["top5"]) == (one["top1"], one["top5"])
        assert res["loss"] == pytest.approx(one["loss"], rel=1e-6)


def rec_as_eval(rec: dict) -> dict:
    return {k: rec[f"val_{k}"] for k in ("top1", "top5", "loss", "num_images")}


_HIDE_INSTALLED_PACKAGES = """
# Test isolation: make this repository's packages unimportable except through a script's own sys.path bootstrap,
# whatever an editable install (a meta-path finder or a .pth path entry) would resolve them to.
import importlib.machinery
import sys
_NAMES = ("cbsa_core", "image_classification", "finetune_vit", "semantic_segmentation")
_STANDARD = {"BuiltinImporter", "FrozenImporter", "PathFinder"}
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", type(f).__name__) in _STANDARD
                    or not any(f.find_spec(n, None) for n in _NAMES)]
sys.path[:] = [p for p in sys.path if not any(
    importlib.machinery.PathFinder.find_spec(n, [p]) for n in _NAMES)]
sys.path_importer_cache.clear()
"""


def test_script_runs_from_inside_the_folder(tmp_path, data_root, tiny_cfg):
    """``python main.py`` inside the folder, where only the script's sys.path bootstrap can make the packages
    importable: the editable install is hidden, and a control run shows that nothing else finds them."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE_INSTALLED_PACKAGES)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(hide))
    folder = REPO / "image_classification"
    control = subprocess.run([sys.executable, "-c", "import cbsa_core"], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=120)
    assert control.returncode == 1 and "No module named 'cbsa_core'" in control.stderr, control.stderr
    r = subprocess.run([sys.executable, "main.py", "--config", str(tiny_cfg), "--data", str(data_root),
                        "--epochs", "1", "--output-dir", str(tmp_path / "run")], cwd=folder,
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / icm.LAST_CHECKPOINT).is_file()
    # The README's evaluation command, verbatim: parses, then fails cleanly on the missing checkpoint.
    r = subprocess.run([sys.executable, "main.py", "--arch", "Ours_small", "--evaluate", "--resume",
                        "CKPT/CBT/cbt_small_best.pth.tar"], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "CKPT/CBT/cbt_small_best.pth.tar" in r.stderr and "Traceback" not in r.stderr


# ============================================================================================= datasets
def test_digits_dataset_split_and_pixels():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1438, 359)
    images, labels = digits_arrays(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    # Disjoint and complete: every digit image lands in exactly one split.
    seen = {a.tobytes() for a in train.images} | {a.tobytes() for a in val.images}
    assert len(train.images) + len(val.images) == 1797 and len(seen) == len({a.tobytes() for a in images})
    assert np.array_equal(DigitsDataset("val").targets, val.targets)  # fixed split
    # Upsampling keeps the digit: 2x2 block means of a 32x32 image ~ the 8x8 original (scaled to 0..255).
    from sklearn.datasets import load_digits

    orig = load_digits().images[5] / 16.0 * 255.0
    block = images[5, :, :, 0].astype(np.float64).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.abs(block - orig).mean() < 20 and np.array_equal(images[5, ..., 0], images[5, ..., 2])
    x, y = DigitsDataset("val", transform=T.ToTensor())[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)


def _fake_pets(root: Path, n_per_class: int = 3) -> Path:
    """Oxford-IIIT Pets in torchvision's layout (no integrity hashes are checked for it)."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rng = np.random.default_rng(1)
    lines = {"trainval": [], "test": []}
    for label, (breed, species) in enumerate([("Abyssinian", 1), ("beagle", 2)], start=1):
        for i in range(2 * n_per_class):
            name = f"{breed}_{i}"
            _draw("circle" if label == 1 else "square", (200, 40, 40), rng).save(base / "images" / f"{name}.jpg")
            lines["trainval" if i < n_per_class else "test"].append(f"{name} {label} {species} 1")
    for split, ls in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def test_finetune_reinitialises_head_and_keeps_the_rest(trained, tmp_path, tiny_cfg):
    out, _ = trained
    ckpt = out / icm.LAST_CHECKPOINT
    model = cbsa_core.create_model("cbt_tiny", num_classes=37, **TINY_MODEL)
    icm.load_finetune_weights(model, str(ckpt), 37)
    sd = load_ckpt(ckpt)["state_dict"]
    for k, v in model.state_dict().items():
        if k.startswith("mlp_head.1."):
            assert v.shape[0] == 37
        else:
            assert torch.equal(v, sd[k]), k
    # End to end on a local (fake) Pets: --finetune --dataset pets, nothing downloads.
    root = _fake_pets(tmp_path / "pets")
    res = icm.main(["--config", str(tiny_cfg), "--dataset", "pets", "--data", str(root), "--finetune", str(ckpt),
                    "--epochs", "1", "--eval-resize", "16", "--output-dir", str(tmp_path / "ft")])
    assert res["val"]["num_images"] == 6
    assert load_ckpt(tmp_path / "ft" / icm.LAST_CHECKPOINT)["state_dict"]["mlp_head.1.weight"].shape == (37, 32)


def test_transfer_dataset_missing_names_expected_path(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                         ("flowers102", "flowers-102"), ("pets", "oxford-iiit-pet")):
        with pytest.raises(DatasetError, match=folder):
            build_datasets(name, tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        build_datasets("cifar10", tmp_path / "nowhere")


# ============================================================================================ bad input
def _assert_untouched(folder: Path, before: dict):
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.exists() else {}


@pytest.mark.parametrize("case", ["missing", "empty", "mismatch", "no_val"])
def test_bad_dataset_folders(tmp_path, tiny_cfg, capsys, case):
    root = tmp_path / "data"
    if case == "empty":
        for split in ("train", "val"):
            (root / split / "a").mkdir(parents=True)
    elif case == "mismatch":
        make_imagefolder(root, 1, 1, classes=["red_circle", "blue_square"])
        (root / "val" / "blue_square").rename(root / "val" / "blue_triangle")
    elif case == "no_val":
        make_imagefolder(root, 1, 1, classes=["red_circle"])
        import shutil

        shutil.rmtree(root / "val")
    expected = {"missing": "dataset root not found", "empty": "no image files", "mismatch": "blue_triangle",
                "no_val": "missing split folder"}[case]
    with pytest.raises(DatasetError, match=expected):
        run_main(tiny_cfg, root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the data is validated
    rc = icm.cli(["--config", str(tiny_cfg), "--data", str(root), "--output-dir", str(tmp_path / "out")])
    assert rc == 1 and expected in capsys.readouterr().err


def test_unreadable_image_fail_or_skip_and_nothing_lost(tmp_path, tiny_cfg):
    root = make_imagefolder(tmp_path / "data", 2, 1)
    out = tmp_path / "out"
    run_main(tiny_cfg, root, out, "--epochs", "2", "--stop-epoch", "1")
    before = _snapshot(out)
    bad = root / "train" / "red_square" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DatasetError, match="red_square/1.png"):
        run_main(tiny_cfg, root, out, "--epochs", "2", "--resume", str(out / icm.LAST_CHECKPOINT))
    _assert_untouched(out, {k: v for k, v in before.items()} | {icm.LOG_JSONL: (out / icm.LOG_JSONL).read_bytes(),
                                                                "config.yaml": (out / "config.yaml").read_bytes()})
    assert load_ckpt(out / icm.LAST_CHECKPOINT)["epoch"] == 1
    assert (out / icm.LAST_CHECKPOINT).read_bytes() == before[icm.LAST_CHECKPOINT]
    # The documented alternative: skip (substitute) and count.
    run_main(tiny_cfg, root, out, "--epochs", "2", "--resume", str(out / icm.LAST_CHECKPOINT), "--bad-images", "skip")
    assert epoch_records(out)[-1]["skipped_images"] == 1


def test_checkpoint_of_another_arch(trained, tmp_path, data_root, tiny_cfg):
    out, _ = trained
    ckpt = out / icm.LAST_CHECKPOINT
    # MSSA models have no representatives, so their config has no rep_grid (one would be refused).
    mssa_cfg = write_config(tmp_path / "mssa.yaml", model={k: v for k, v in TINY_MODEL.items() if k != "rep_grid"})
    with pytest.raises(CheckpointMismatchError, match="'cbt_tiny'.*'mssa_tiny'|'mssa_tiny'.*'cbt_tiny'"):
        run_main(mssa_cfg, data_root, tmp_path, "--arch", "CRATE_tiny", "--evaluate", "--resume", str(ckpt))
    # An authors'-style file has no arch record: the key/shape check names what differs.
    sd = load_ckpt(ckpt)["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc1": 1.0}, tmp_path / "a.pth")
    with pytest.raises(CheckpointMismatchError, match="fn.qkv.weight"):
        run_main(mssa_cfg, data_root, tmp_path, "--arch", "mssa_tiny", "--evaluate", "--resume",
                 str(tmp_path / "a.pth"))
    with pytest.raises(CheckpointMismatchError, match="shape"):  # same arch, other width
        run_main(tiny_cfg, data_root, tmp_path, "--model-override", "dim=64", "--evaluate", "--resume", str(ckpt))
    assert not (tmp_path / icm.EVAL_JSON).exists()


def test_missing_resume_and_finetune_paths(tmp_path, data_root, tiny_cfg, capsys):
    for flag in ("--resume", "--finetune"):
        with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
            run_main(tiny_cfg, data_root, tmp_path / "out", flag, str(tmp_path / "nope.pth"))
    assert icm.cli(["--config", str(tiny_cfg), "--data", str(data_root), "--output-dir", str(tmp_path / "out"),
                    "--evaluate", "--resume", str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fresh_run_refuses_to_overwrite_checkpoints(trained, data_root, tiny_cfg):
    out, _ = trained
    before = (out / icm.LAST_CHECKPOINT).read_bytes()
    with pytest.raises(icm.ConfigError, match="--resume"):
        run_main(tiny_cfg, data_root, out)
    assert (out / icm.LAST_CHECKPOINT).read_bytes() == before


def test_fp16_on_cpu_and_impossible_model_are_refused(tmp_path, data_root, tiny_cfg, capsys):
    with pytest.raises(icm.ConfigError, match="fp16"):
        run_main(tiny_cfg, data_root, tmp_path, "--precision", "fp16", "--device", "cpu")
    # An impossible model is a usage error at parse time (the model refuses it on the meta device): nothing written.
    with pytest.raises(SystemExit) as e:  # 16 does not divide by 5
        run_main(tiny_cfg, data_root, tmp_path / "out", "--model-override", "patch_size=5")
    assert e.value.code == 2
    assert "model overrides" in capsys.readouterr().err and not (tmp_path / "out").exists()


class _NaNAfter(torch.nn.Module):
    """The track's criterion, returning NaN from the ``n``-th call on."""

    def __init__(self, n: int, smoothing: float) -> None:
        super().__init__()
        self.inner, self.n, self.calls = icm.nn.CrossEntropyLoss(label_smoothing=smoothing), n, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = self.inner(logits, target)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path, data_root, tiny_cfg, monkeypatch):
    # Per epoch: 3 train steps (24 images / 8) then 2 val batches (13 / 8) -> call 7 is epoch 1, step 1.
    monkeypatch.setattr(icm, "build_criterion", lambda s: _NaNAfter(7, s))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1") as e:
        run_main(tiny_cfg, data_root, tmp_path)
    assert str(tmp_path / icm.LAST_CHECKPOINT) in str(e.value)
    assert load_ckpt(tmp_path / icm.LAST_CHECKPOINT)["epoch"] == 1  # epoch 0's checkpoint, intact
    last = read_jsonl(tmp_path / icm.LOG_JSONL)[-1]
    assert last["event"] == "non_finite_loss" and (last["epoch"], last["step"]) == (1, 1)


@pytest.mark.parametrize("extra, match", [
    (("--seed", "123"), "--seed 123 (from the command line) differs from 7"),
    (("--epochs", "4"), "--epochs 4 (from the command line) differs from 3"),
    (("--warmup-epochs", "1"), "--warmup-epochs 1 (from the command line) differs from 3"),
    (("--optimizer", "AdamW"), "--optimizer AdamW (from the command line) differs from Lion"),
    (("--lr", "0.5"), "--lr 0.5 (from the command line) differs from 0.01"),
    (("--wd", "0.9"), "--wd 0.9 (from the command line) differs from 0.0"),
    (("--model-override", "rep_grid=[1,1]"), "model setting rep_grid 1 1 (from the command line) differs from 2 2"),
    (("--legacy-token-layout",), "legacy_token_layout True (from the command line) differs from False"),
])
def test_resume_refuses_settings_that_break_exact_continuation(tmp_path, data_root, tiny_cfg, capsys, extra, match):
    """Issue 12 item 3: a changed setting is refused naming the flag, instead of being overruled by the restored
    optimizer state while config.yaml records it."""
    common = ["--epochs", "3", "--warmup-epochs", "3", "--optimizer", "Lion", "--seed", "7"]
    run_main(tiny_cfg, data_root, tmp_path / "run", *common, "--stop-epoch", "1")
    ckpt = tmp_path / "run" / icm.LAST_CHECKPOINT
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    argv = ["--config", str(tiny_cfg), "--data", str(data_root), "--output-dir", str(tmp_path / "run"), *common,
            *extra, "--resume", str(ckpt)]
    with pytest.raises(ResumeMismatchError, match=re.escape(match)):
        icm.main(argv)
    assert icm.cli(argv) == 1  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1] and "Traceback" not in "".join(err)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before  # nothing saved is lost, nothing written
