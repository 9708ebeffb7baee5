"""scripts/export_pretrained.py: every checkpoint kind this project reads becomes a hub-format folder that reloads
with exactly the source's logits (timm's ``local-dir:`` and, with the hub download pointed at the folder,
``hf-hub:``; ``semantic_segmentation.load_model(DIR)`` for segmentation), with the config.json and model card
the issue asks for, and bad input is refused with one error naming the file or flag."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from lion_pytorch import Lion
from safetensors.torch import save_file

import official_reference as ref
from cbsa_core import create_model
from cbsa_core.checkpoint import save_model_checkpoint
from segmentation_reference import (RefDepictMaskTransformer, RefSegmenter, RefViT, perturb_norms_, segmenter_variant,
                                    write_release_checkpoint)
from semantic_segmentation import load_model
from test_segmentation_model import _ref_model as cbt_segmentation_reference
from test_segmentation_model import _write_authors_checkpoint as write_cbt_segmentation_release

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
export_pretrained = importlib.import_module("export_pretrained")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, dim=32, heads=2, dim_head=16, image_size=32, patch_size=4, rep_grid=(2, 2), num_classes=5)
TINY_FLAGS = ["--set", "depth=2", "--set", "dim=32", "--set", "heads=2", "--set", "dim_head=16", "--set",
              "image_size=32", "--set", "patch_size=4", "--set", "rep_grid=[2, 2]"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_cbt(seed: int = 5, **overrides):
    """A tiny CBT-T with arbitrary weights (BatchNorm statistics included)."""
    model = create_model("cbt_tiny", **dict(TINY, **overrides))
    return ref.randomize_(model, generator=torch.Generator().manual_seed(seed)).eval()


def _logits(model, shape, seed=21):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def _run(argv, capsys):
    """main() in-process, with the root logger as a fresh command-line process has it (no handler: main's own
    WARNING set-up applies): (exit status, stdout, stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        code = export_pretrained.cli([str(a) for a in argv])
    finally:
        root.handlers, root.level = handlers, level
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _card(folder: Path) -> str:
    return (folder / "README.md").read_text()


def _front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_exportable_archs_are_this_projects_timm_models():
    names = export_pretrained.exportable_archs()
    assert {"cbt_tiny", "cbt_large", "crate_cbt_small", "mssa_small"} <= set(names)
    assert "vit_small_patch16_224" not in names and "resnet50" not in names


# ------------------------------------------------------------------------------------------- classification
def test_own_checkpoint_exports_exactly_and_the_folder_re_exports(tmp_path, capsys):
    model = _tiny_cbt()
    path = save_model_checkpoint(model, tmp_path / "model_best.pth.tar", epoch=7, best_metric=87.5,
                                 config=dict(dataset="imagefolder", input_size=32, eval_resize=40,
                                             mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    out = tmp_path / "hub" / "cbt_tiny_own"
    code, stdout, stderr = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "verified: max |logit difference| = 0 (bit-identical)" in stdout

    config = _config(out)
    assert (config["architecture"], config["num_classes"], config["num_features"]) == ("cbt_tiny", 5, 32)
    # every setting that differs from cbt_tiny's registered default, nothing else but timm's own records
    assert config["model_args"] == dict(depth=2, dim=32, heads=2, dim_head=16, patch_size=4, rep_grid=[2, 2],
                                        img_size=[32, 32], num_classes=5, in_chans=3, global_pool="token")
    cfg = config["pretrained_cfg"]
    assert "tag" not in cfg                                   # not the authors' in1k weights
    assert cfg["input_size"] == [3, 32, 32] and cfg["min_input_size"] == [3, 8, 8]   # 2x2 reps x patch 4
    assert cfg["crop_pct"] == pytest.approx(32 / 40) and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3
    assert path.name in cfg["notes"][0] and _sha256(path) in cfg["notes"][0]

    for folder in (out,):
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert not any(a.legacy_token_layout for a in rebuilt.attention_layers)
        assert torch.equal(_logits(rebuilt, (3, 3, 32, 32)), _logits(model, (3, 3, 32, 32)))
        data = timm.data.resolve_data_config(model=rebuilt)
        assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == pytest.approx(0.8)

    card = _card(out)
    front = _front_matter(card)
    assert "library_name: timm" in front and "license: mit" in front and "- image-classification" in front
    assert "datasets" not in front
    assert f"`{path.name}`" in card and _sha256(path) in card
    assert "No reported number" in card and "87.50" in card and "recorded by the run" in card
    assert "**corrected**" in card and "resize the short side to 40" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card
    assert "timm.create_model('local-dir:" in card and "hf-hub:USER/REPO" in card and "max |Δlogit| = 0," in card

    # the folder is itself an input: re-exported, it gives the same config and the same logits
    again = tmp_path / "again"
    code, _, stderr = _run(["--checkpoint", out, "--out", again], capsys)
    assert code == 0, stderr
    assert _config(again)["model_args"] == config["model_args"]
    cfg_again = _config(again)["pretrained_cfg"]
    assert {k: cfg_again[k] for k in ("input_size", "crop_pct", "mean", "std", "min_input_size")} == \
        {k: cfg[k] for k in ("input_size", "crop_pct", "mean", "std", "min_input_size")}
    assert cfg_again["notes"][0] == cfg["notes"][0] and "model.safetensors" in cfg_again["notes"][1]
    rebuilt = timm.create_model(f"local-dir:{again}", pretrained=True)
    assert torch.equal(_logits(rebuilt, (3, 3, 32, 32)), _logits(model, (3, 3, 32, 32)))


def _write_release(path: Path, seed: int = 3) -> torch.nn.Module:
    """The authors' classification wrapper of a full-size Ours_tiny, as their main.py saves it (the release's model
    code, tests/official_reference.py): {'epoch', 'arch', 'state_dict' ('module.' keys), 'best_acc1', 'optimizer',
    'scheduler'}."""
    g = torch.Generator().manual_seed(seed)
    reference = ref.randomize_(ref.build("Ours_tiny"), generator=g).eval()
    opt = Lion(reference.parameters(), lr=2e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    ref.save_authors_checkpoint(reference, path, arch="Ours_tiny", epoch=149, best_acc1=torch.tensor(63.17),
                                optimizer=opt, scheduler=sched)
    return reference


def test_release_file_exports_in_the_legacy_layout_and_loads_from_the_hub(tmp_path, capsys, monkeypatch):
    path = tmp_path / "cbt_tiny_best.pth.tar"
    reference = _write_release(path)
    out = tmp_path / "cbt_tiny.authors_in1k"
    code, stdout, stderr = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 0, stderr

    config = _config(out)
    assert config["architecture"] == "cbt_tiny" and config["num_classes"] == 1000
    # the registered configuration: only the layout differs (plus what timm always records)
    assert config["model_args"] == dict(legacy_token_layout=True, num_classes=1000, in_chans=3, global_pool="token")
    cfg = config["pretrained_cfg"]
    assert cfg["tag"] == "authors_in1k" and cfg["license"] == "mit" and cfg["crop_pct"] == 0.875
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bilinear"
    assert len(config["label_names"]) == 1000 and config["label_names"][0] == "n01440764"   # sorted, as ImageFolder
    assert config["label_descriptions"]["n01440764"].startswith("tench")

    shape = (2, 3, 224, 224)
    loaded = create_model("Ours_tiny", pretrained=path)          # this project's loader
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert all(a.legacy_token_layout for a in rebuilt.attention_layers)
    expected = _logits(loaded, shape)
    assert torch.equal(_logits(rebuilt, shape), expected)
    # ... which are the release's own logits (its model code, other op order: close, not bit-equal)
    torch.testing.assert_close(expected, _logits(reference, shape), rtol=0, atol=1e-4)
    # the layout matters for these weights: the same folder read in the corrected layout is another function
    corrected = timm.create_model(f"local-dir:{out}", pretrained=True, legacy_token_layout=False)
    assert (_logits(corrected, shape) - expected).abs().max() > 1e-3

    # hf-hub: once the folder is pushed, timm's hub download returns its files; serve them from the folder
    from huggingface_hub.errors import EntryNotFoundError

    requested = []

    def hub_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        requested.append((repo_id, filename))
        if not (out / filename).is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(out / filename)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub_download)
    from_hub = timm.create_model("hf-hub:someone/cbt_tiny.authors_in1k", pretrained=True)
    assert ("someone/cbt_tiny.authors_in1k", "config.json") in requested
    assert ("someone/cbt_tiny.authors_in1k", "model.safetensors") in requested
    assert all(a.legacy_token_layout for a in from_hub.attention_layers)
    assert torch.equal(_logits(from_hub, shape), expected)

    card = _card(out)
    assert "datasets:\n- imagenet-1k" in _front_matter(card)
    assert "(the authors' `Ours_tiny`)" in card and f"`{path.name}`" in card and _sha256(path) in card
    assert "**63.2** ImageNet-1K val top-1" in card and "Table 3" in card and "github.com/QishuaiWen/CBSA" in card
    assert "Reported, not measured here" in card and "`best_acc1` = 63.17" in card
    assert "**legacy** (the file is in the authors' release format" in card and "docs/authors-release.md" in card
    assert "1,789,192" in card                                   # the README's CBT-T parameter count
    assert "resize the short side to 256 (bilinear), centre-crop 224×224" in card
    assert "The weights are the authors' release" in card


def test_bare_state_dicts_need_the_arch_and_its_settings(tmp_path, capsys):
    model = _tiny_cbt(seed=9)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    shape = (2, 3, 32, 32)

    code, _, err = _run(["--checkpoint", tmp_path / "weights.safetensors", "--out", tmp_path / "a"], capsys)
    # a usage error, as argparse reports one: the usage line, then one error line naming the file and the fix
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("export_pretrained.py: error:") and "weights.safetensors" in last \
        and "give --arch" in last
    # the registered configuration does not fit these weights: refused, naming the file and the way out
    code, _, err = _run(["--checkpoint", tmp_path / "weights.pth", "--arch", "cbt_tiny", "--out", tmp_path / "b"],
                        capsys)
    assert code == 1 and "weights.pth" in err and "--set" in err and not (tmp_path / "b").exists()

    for name in ("weights.safetensors", "weights.pth"):
        out = tmp_path / f"out_{name}"
        code, stdout, err = _run(["--checkpoint", tmp_path / name, "--arch", "Ours_tiny", *TINY_FLAGS, "--out", out],
                                 capsys)
        assert code == 0, err
        config = _config(out)
        assert config["num_classes"] == 5                       # read from the classifier's rows
        assert "legacy_token_layout" not in config["model_args"]  # bare weights record nothing: corrected
        rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True)
        assert torch.equal(_logits(rebuilt, shape), _logits(model, shape))
        card = _card(out)
        assert "records no provenance" in card and "No reported number for this configuration" in card

    # timm's train.py wrapper names the registered model in its args: no --arch needed
    timm_file = _write_timm_train_checkpoint(model, tmp_path / "timm_run")
    out = tmp_path / "from_timm_train"
    code, _, err = _run(["--checkpoint", timm_file, *TINY_FLAGS, "--out", out], capsys)
    assert code == 0, err
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_logits(rebuilt, shape), _logits(model, shape))

    # release weights saved bare: the explicit flag records the legacy layout
    legacy = _tiny_cbt(seed=9)
    legacy.set_legacy_token_layout(True)
    out = tmp_path / "forced"
    code, _, err = _run(["--checkpoint", tmp_path / "weights.pth", "--arch", "cbt_tiny", *TINY_FLAGS,
                         "--legacy-token-layout", "--out", out], capsys)
    assert code == 0, err
    assert _config(out)["model_args"]["legacy_token_layout"] is True
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_logits(rebuilt, shape), _logits(legacy, shape))
    assert (_logits(rebuilt, shape) - _logits(model, shape)).abs().max() > 1e-4
    assert "requested explicitly" in _card(out)


def _write_timm_train_checkpoint(model, folder: Path) -> Path:
    """timm's own train.py writer (CheckpointSaver): {'epoch', 'arch' (the class name), 'state_dict', 'optimizer',
    'version', 'args' (an argparse.Namespace whose .model is the registered name), 'metric', 'saver'}."""
    import argparse

    from timm.utils import CheckpointSaver

    folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            args=argparse.Namespace(model="cbt_tiny", lr=0.1), checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=3, metric=50.0)
    return folder / "last.pth.tar"


def test_a_model_arg_that_config_json_loses_is_caught_by_the_verification(tmp_path, capsys, monkeypatch):
    """Fault injection: an exporter that drops legacy_token_layout from model_args writes a folder that reloads in
    the corrected layout; the verification refuses it (exit 1, one line) and DIR is never created."""
    model = _tiny_cbt(seed=2)
    model.set_legacy_token_layout(True)
    path = save_model_checkpoint(model, tmp_path / "legacy.pth.tar")
    real = export_pretrained.export_model_args

    def lossy(*args, **kwargs):
        found = real(*args, **kwargs)
        found.pop("legacy_token_layout")
        return found

    monkeypatch.setattr(export_pretrained, "export_model_args", lossy)
    out = tmp_path / "out"
    code, stdout, err = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and stdout == ""
    assert "refused: the exported folder's logits differ" in err and "> 1e-05" in err and str(path) in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["legacy.pth.tar"]   # no staging left


# ----------------------------------------------------------------------------------------------- segmentation
def test_cbt_segmentation_release_file_exports_to_a_load_model_folder(tmp_path, capsys):
    reference = cbt_segmentation_reference(seed=4)
    path = write_cbt_segmentation_release(tmp_path / "log" / "cbt_tiny", reference)
    out = tmp_path / "seg_export"
    code, stdout, err = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 0, err
    assert "bit-identical" in stdout
    config = _config(out)
    assert config["arch"] == "segmenter" and config["decoder"]["name"] == "mask_transformer"
    assert config["inference"] == dict(im_size=112, window_size=112, window_stride=80)

    source, folder = load_model(path), load_model(out)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = folder(x)
        assert torch.equal(got, source(x))
        torch.testing.assert_close(got, reference(x), rtol=0, atol=1e-4)   # the release's equations

    card = _card(out)
    front = _front_matter(card)
    assert "pipeline_tag: image-segmentation" in front and "license: mit" in front and "library_name" not in front
    assert "with the CBT decoder" in card and f"`{path.name}`" in card and _sha256(path) in card
    assert "No reported number for this configuration" in card     # a test-sized encoder, not a released one
    assert "semantic_segmentation.flops.decoder_flops" in card and "load_model('/path/to/this/folder')" in card
    assert "The weights come from the CBSA authors" in card

    # this project's segmentation checkpoint, and the exported folder itself, export the same model
    own = save_model_checkpoint(source, tmp_path / "own_seg.pth.tar", epoch=3, best_metric=41.25)
    for given, name in ((own, "from_own"), (out, "from_folder")):
        code, _, err = _run(["--checkpoint", given, "--out", tmp_path / name], capsys)
        assert code == 0, err
        assert _config(tmp_path / name) == config
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / name)(x), got)
    card = _card(tmp_path / "from_own")
    assert "No reported number: these weights were trained with this project" in card
    assert "best validation mIoU of 41.25" in card and "recorded by the run" in card

    # segmentation files give their own model: --set / --arch / --legacy-token-layout are usage errors
    for flags in (["--set", "n_cls=3"], ["--arch", "cbt_tiny"], ["--legacy-token-layout"]):
        code, _, err = _run(["--checkpoint", path, "--out", tmp_path / "x", *flags], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("export_pretrained.py: error:") and flags[0] in last


def test_depict_release_file_exports_exactly(tmp_path, capsys):
    encoder = RefViT(64, 16, 48, depth=2, heads=2)
    decoder = RefDepictMaskTransformer(5, 16, 2, 3, 48, mode="sa")
    torch.manual_seed(6)
    reference = perturb_norms_(RefSegmenter(encoder, decoder)).eval()
    variant = segmenter_variant(crop=64, patch=16, dim=48, depth=2, heads=2, n_cls=5,
                                decoder=dict(dropout=0.0, n_layers=2, n_heads=3, name="mask_transformer"))
    path = write_release_checkpoint(tmp_path / "depict_run", reference, 5, variant)
    out = tmp_path / "depict"
    code, _, err = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 0, err
    assert _config(out)["decoder"]["name"] == "depict_sa"
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_model(out)(x), load_model(path)(x))
        torch.testing.assert_close(load_model(out)(x), reference(x), rtol=0, atol=1e-4)
    card = _card(out)
    assert "DEPICT-SA" in card and "The weights come from DEPICT's authors" in card
    assert "github.com/QishuaiWen/DEPICT" in card


def test_reported_numbers_apply_only_to_the_released_configurations():
    from semantic_segmentation import default_model_config

    reported = export_pretrained.classification_reported
    assert reported("cbt_small", {"num_classes": 1000, "legacy_token_layout": True})[0] == "71.4"
    assert reported("cbt_large", {"num_classes": 1000})[0] == "74.4"
    assert "Table 4" in reported("mssa_tiny", {"num_classes": 1000})[2]
    assert reported("cbt_small", {"num_classes": 10}) is None
    assert reported("cbt_small", {"num_classes": 1000, "depth": 6}) is None
    assert reported("cbt_dagger_tiny", {"num_classes": 1000}) is None

    seg = export_pretrained.segmentation_reported
    small = default_model_config("vit_small_patch16_384")                         # the CBT decoder, 150 classes
    value, source = seg(small)
    assert value == "45.8" and "single-scale" in source and "QishuaiWen/CBSA" in source
    assert seg(default_model_config("vit_large_patch16_384"))[0] == "53.3"
    assert seg(default_model_config("vit_tiny_patch16_384", decoder=dict(tied_output=True)))[0] == "≈39.0"
    assert seg(default_model_config("vit_base_patch16_384", decoder=dict(name="depict_ca")))[0] == "≈49.4"
    segmenter = seg(default_model_config("vit_large_patch16_384", decoder=dict(name="segmenter_mask_transformer")))
    assert segmenter[0].startswith("51.8 / 53.6") and "rstrudel/segmenter" in segmenter[1]
    assert seg(default_model_config("vit_base_patch8_384", decoder=dict(name="linear")))[0] == "49.5 / 50.5"
    assert seg(default_model_config("vit_small_patch16_384", decoder=dict(name="tssa"))) is None
    assert seg(default_model_config("vit_small_patch16_384", n_cls=21)) is None
    assert seg(default_model_config("vit_small_patch16_384", n_layers=6)) is None    # not the released encoder


# --------------------------------------------------------------------------------------------------- refusals
def test_output_folder_and_input_refusals(tmp_path, capsys):
    model = _tiny_cbt(seed=1)
    path = save_model_checkpoint(model, tmp_path / "own.pth.tar")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    code, _, err = _run(["--checkpoint", path, "--out", out], capsys)
    assert code == 1 and "not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = _run(["--checkpoint", path, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep me"                      # no data lost
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~_umask()}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []

    (tmp_path / "a_file").write_text("x")
    code, _, err = _run(["--checkpoint", path, "--out", tmp_path / "a_file"], capsys)
    assert code == 1 and "a_file" in err and "not a folder" in err

    # bad input (status 1) and bad flags (status 2), as every script of the project
    code, _, err = _run(["--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "m"], capsys)
    assert code == 1 and "--checkpoint" in err and "missing.pth" in err and len(err.splitlines()) == 1
    code, _, err = _run(["--checkpoint", path, "--arch", "vit_small_patch16_224", "--out", tmp_path / "u"], capsys)
    assert code == 1 and "unknown arch 'vit_small_patch16_224'" in err and "cbt_tiny" in err
    assert len(err.splitlines()) == 1
    code, _, err = _run(["--checkpoint", path, "--arch", "cbt_small", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "disagrees" in err and "own.pth.tar" in err
    code, _, err = _run(["--checkpoint", path, "--set", "depth=3", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "--set" in err and "records its model config" in err
    code, _, err = _run(["--checkpoint", path, "--set", "depth", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "KEY=VALUE" in err

    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 8)
    code, _, err = _run(["--checkpoint", tmp_path / "garbage.pth", "--arch", "cbt_tiny", "--out", tmp_path / "g"],
                        capsys)
    assert code == 1 and "garbage.pth" in err
    # a state dict of another model entirely (a segmentation encoder) fits no registered arch
    torch.save(RefViT(32, 16, 48, depth=1, heads=2).state_dict(), tmp_path / "encoder.pth")
    code, _, err = _run(["--checkpoint", tmp_path / "encoder.pth", "--arch", "cbt_tiny", "--out", tmp_path / "e"],
                        capsys)
    assert code == 1 and "encoder.pth" in err and "does not fit --arch cbt_tiny" in err
    assert not any((tmp_path / n).exists() for n in ("m", "u", "d", "s", "g", "e"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_command_line_exit_status_and_one_line_error(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_pretrained.py"), "--checkpoint",
                           str(tmp_path / "nowhere.pth.tar"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    missing = tmp_path / "nowhere.pth.tar"
    assert proc.stderr.strip().splitlines() == [f"error: --checkpoint {missing}: no such file or folder"]
    for argv in (["--out", str(tmp_path / "x")], ["--checkpoint", "f", "--ou", "x"]):   # no abbreviations either
        with pytest.raises(SystemExit) as exit_info:      # argparse's own usage errors: status 2
            export_pretrained.main(argv)
        assert exit_info.value.code == 2
