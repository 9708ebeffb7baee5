"""Checkpoint I/O: the authors' release format (against tests/official_reference.py), this project's
format, atomic writes, corrupt/unsafe files, and mismatches that must be refused with the details."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from lion_pytorch import Lion

import official_reference as ref
from cbsa_core import CBSA, create_model
from cbsa_core.checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointMismatchError, atomic_save,
                                  checkpoint_kind, load_checkpoint, read_checkpoint, save_model_checkpoint)


def _release_lr_lambda(epoch: int, warmup: int = 20, epochs: int = 150) -> float:
    import math
    return min((epoch + 1) / (warmup + 1e-8), 0.5 * (1 + math.cos(math.pi * epoch / epochs)))


def write_authors_checkpoint(path, arch: str, seed: int, **overrides) -> nn.Module:
    """A release-style file: random weights (incl. BN stats, step sizes), a real Lion/LambdaLR state,
    ``module.``-prefixed keys, 0-d tensor best_acc1 (docs/authors-release.md §1.1.7)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ref.randomize_(ref.build(arch, **overrides), generator=g)
    opt = Lion(model.parameters(), lr=2e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _release_lr_lambda)
    model.train()
    size = overrides.get("image_size", 224)
    model(torch.randn(2, 3, size, size, generator=g)).logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    ref.randomize_(model, generator=g)         # training moved the BN stats; make them arbitrary again
    ref.save_authors_checkpoint(model, path, arch=arch, epoch=41, best_acc1=torch.tensor(63.2), optimizer=opt,
                                scheduler=sched)
    return model.eval()


AUTHORS_CASES = {
    "Ours_tiny": dict(depth=2),
    "Ours_small_patch8": dict(depth=1, image_size=112, patch_size=8),
    "CRATE_tiny": dict(depth=2),
    "ToST_tiny": dict(depth=2),
}


@pytest.mark.parametrize("case", sorted(AUTHORS_CASES))
def test_authors_checkpoint_reproduces_the_release_logits(case, tmp_path, caplog):
    arch = case.replace("_patch8", "")
    overrides = AUTHORS_CASES[case]
    path = tmp_path / "model_best.pth.tar"
    reference = write_authors_checkpoint(path, arch, seed=len(case), **overrides)

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "scheduler"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert checkpoint_kind(raw) == "authors_classification"

    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        model = create_model(arch, pretrained=path, **overrides).eval()
    cbsa_layers = [a for a in model.attention_layers if isinstance(a, CBSA)]
    # Only layers that pool representatives have a token layout; for MSSA/TSSA models none is set or recorded.
    assert str(path) in caplog.text
    assert ("legacy" if cbsa_layers else "no token layout applies") in caplog.text
    assert all(a.legacy_token_layout for a in cbsa_layers)
    assert model.model_config["legacy_token_layout"] is bool(cbsa_layers)

    size = overrides.get("image_size", 224)
    img = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        expected = reference(img)
        got = model(img)
        assert expected.abs().max() > 0.5                          # non-trivial logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        if cbsa_layers:   # the test is sensitive to the layout: the corrected pooling gives other logits
            model.set_legacy_token_layout(False)
            assert (model(img) - expected).abs().max() > 1e-3


def test_bare_state_dict_loads_in_the_corrected_layout_unless_overridden(tmp_path):
    """A bare state dict records no layout: it is read in the corrected layout (the layout of the model that
    saved it), and legacy_token_layout=True reads release-trained weights extracted by hand."""
    torch.manual_seed(3)
    saver = create_model("cbt_tiny", depth=1, image_size=112, patch_size=8).eval()
    torch.save(saver.state_dict(), tmp_path / "sd.pth")
    model = create_model("cbt_tiny", depth=1, image_size=112, patch_size=8, pretrained=tmp_path / "sd.pth").eval()
    assert not any(a.legacy_token_layout for a in model.attention_layers)
    img = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(img), saver(img))

    reference = ref.randomize_(ref.build("Ours_tiny", depth=1, image_size=112, patch_size=8),
                               generator=torch.Generator().manual_seed(5)).eval()
    torch.save(reference.state_dict(), tmp_path / "release_sd.pth")
    forced = create_model("cbt_tiny", depth=1, image_size=112, patch_size=8, pretrained=tmp_path / "release_sd.pth",
                          legacy_token_layout=True).eval()
    assert all(a.legacy_token_layout for a in forced.attention_layers)
    with torch.no_grad():
        torch.testing.assert_close(forced(img), reference(img), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# This project's format
# ------------------------------------------------------------------------------------------------
def small(name="cbt_tiny", seed=0, **kw):
    cfg = dict(depth=1, image_size=64, patch_size=8, num_classes=6)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = create_model(name, **cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), cfg


@pytest.mark.parametrize("name,legacy", [("cbt_tiny", False), ("cbt_tiny", True), ("tssa_tiny", False)])
def test_own_format_round_trip(name, legacy, tmp_path):
    model, cfg = small(name)
    model.set_legacy_token_layout(legacy)
    path = save_model_checkpoint(model, tmp_path / "sub" / "ckpt.pth", epoch=7)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cbsa" and raw["format_version"] == FORMAT_VERSION
    assert raw["arch"] == name and raw["epoch"] == 7
    assert raw["model_config"] == model.model_config
    assert raw["model_config"]["legacy_token_layout"] is legacy
    assert list(raw["state_dict"]) == list(model.state_dict())

    loaded = create_model(name, pretrained=path, **cfg).eval()
    assert all(a.legacy_token_layout is legacy for a in loaded.attention_layers if isinstance(a, CBSA))
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(img), model(img), rtol=0, atol=0)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_saving_a_wrapped_model_strips_the_wrapper(tmp_path):
    model, cfg = small()
    path = save_model_checkpoint(nn.DataParallel(model), tmp_path / "dp.pth")
    assert not any(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])
    assert torch.equal(create_model("cbt_tiny", pretrained=path, **cfg).pos_embedding, model.pos_embedding)


def test_alias_and_canonical_name_are_the_same_arch(tmp_path):
    model, cfg = small("Ours_tiny")
    path = save_model_checkpoint(model, tmp_path / "alias.pth")
    loaded = create_model("cbt_tiny", pretrained=path, **cfg)
    assert torch.equal(loaded.pos_embedding, model.pos_embedding)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
def test_atomic_save_leaves_only_the_target_and_survives_a_failed_save(tmp_path):
    path = tmp_path / "deep" / "ckpt.pth"
    atomic_save({"w": torch.arange(5)}, path)
    assert os.listdir(path.parent) == ["ckpt.pth"]
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"w": torch.zeros(3), "bad": lambda: 0}, path)       # a lambda cannot be pickled
    assert os.listdir(path.parent) == ["ckpt.pth"]                         # no temp file left behind
    assert path.read_bytes() == before
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(5))
    atomic_save({"w": torch.ones(2)}, path)                                # overwrite
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))
    assert os.listdir(path.parent) == ["ckpt.pth"]


# ------------------------------------------------------------------------------------------------
# Broken and unsafe files
# ------------------------------------------------------------------------------------------------
class NotAWeight:
    """An arbitrary Python object: a weights_only load must refuse to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_missing_truncated_garbage_and_unsafe_files_raise_naming_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        read_checkpoint(missing)
    with pytest.raises(CheckpointError, match="nope.pth"):
        create_model("cbt_tiny", depth=1, pretrained=missing)

    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.randn(100, 100)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": NotAWeight()}, unsafe)
    for bad in (truncated, garbage, unsafe):
        with pytest.raises(CheckpointError, match=bad.name) as info:
            read_checkpoint(bad)
        assert str(bad) in str(info.value)
        assert not isinstance(info.value, CheckpointMismatchError)

    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint(tmp_path)
    a_tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), a_tensor)
    with pytest.raises(CheckpointError, match="tensor.pth.*expected a dict"):
        read_checkpoint(a_tensor)
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "notes": "hello"}, odd)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*epoch"):
        load_checkpoint(create_model("cbt_tiny", depth=1), odd)


# ------------------------------------------------------------------------------------------------
# Mismatches
# ------------------------------------------------------------------------------------------------
def _snapshot(model):
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items())


def test_weights_of_another_arch_are_refused_with_the_mismatched_shapes(tmp_path):
    other = ref.build("Ours_small", depth=1, image_size=64, patch_size=8)
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in other.state_dict().items())},
               tmp_path / "small.pth")
    model, _ = small()
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, tmp_path / "small.pth")
    msg = str(info.value)
    assert "small.pth" in msg
    assert "pos_embedding: checkpoint (1, 65, 384) vs model (1, 65, 192)" in msg
    assert "transformer.layers.0.0.fn.proj.weight: checkpoint (384, 384) vs model (192, 192)" in msg
    assert "transformer.layers.0.0.fn.step_x: checkpoint (6, 1, 1) vs model (3, 1, 1)" in msg
    # nothing was changed by the refused load, not even the token layout
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    assert not model.attention_layers[0].legacy_token_layout
    # shape mismatches stay fatal with strict=False
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_checkpoint(model, tmp_path / "small.pth", strict=False)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    deeper = ref.build("Ours_tiny", depth=2, image_size=64, patch_size=8)
    torch.save(deeper.state_dict(), tmp_path / "deep.pth")
    model, _ = small()                                                     # depth 1
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, tmp_path / "deep.pth")
    msg = str(info.value)
    assert "unexpected key(s)" in msg and "transformer.layers.1.0.fn.step_rep" in msg
    assert "transformer.layers.1.1.fn.weight" in msg

    mssa_sd = ref.build("CRATE_tiny", depth=1, image_size=64, patch_size=8).state_dict()
    torch.save(mssa_sd, tmp_path / "mssa.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, tmp_path / "mssa.pth")
    msg = str(info.value)
    assert "missing" in msg and "transformer.layers.0.0.fn.proj.weight" in msg
    assert "unexpected" in msg and "transformer.layers.0.0.fn.qkv.weight" in msg


def test_own_format_of_another_arch_is_refused_naming_both(tmp_path):
    other, cfg = small("cbt_small")
    path = save_model_checkpoint(other, tmp_path / "cbt_small.pth")
    with pytest.raises(CheckpointMismatchError, match=r"cbt_small.pth.*'cbt_small'.*'cbt_tiny'"):
        create_model("cbt_tiny", pretrained=path, **cfg)
    same_arch_other_shape, _ = small("cbt_tiny", depth=2)
    path = save_model_checkpoint(same_arch_other_shape, tmp_path / "deep.pth")
    with pytest.raises(CheckpointMismatchError, match="transformer.layers.1"):
        create_model("cbt_tiny", pretrained=path, **cfg)


def test_authors_file_of_another_registered_arch_is_refused(tmp_path):
    # Ours_tiny and Agent_tiny have identical keys and shapes; only the recorded arch tells them apart.
    path = tmp_path / "ours.pth.tar"
    write_authors_checkpoint(path, "Ours_tiny", seed=3, depth=2)
    with pytest.raises(CheckpointMismatchError, match="'Ours_tiny'.*'agent_tiny'"):
        create_model("agent_tiny", depth=2, pretrained=path)
    create_model("cbt_tiny", depth=2, pretrained=path)  # the same arch under its canonical name loads


@pytest.mark.parametrize("saved, loaded, field", [
    (dict(rep_grid=(4, 4)), dict(), "rep_grid"),
    (dict(attn="agent"), dict(), "attn"),
    (dict(global_pool="avg"), dict(), "global_pool"),
])
def test_own_file_with_another_behaviour_config_is_refused(saved, loaded, field, tmp_path):
    model, cfg = small("cbt_tiny", **saved)
    path = save_model_checkpoint(model, tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match=field):
        create_model("cbt_tiny", pretrained=path, **{k: v for k, v in cfg.items() if k not in saved}, **loaded)


def test_newer_format_version_and_text_files_are_refused(tmp_path):
    model, cfg = small("cbt_tiny")
    ckpt = torch.load(save_model_checkpoint(model, tmp_path / "m.pth"), weights_only=True)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match="format_version"):
        create_model("cbt_tiny", pretrained=tmp_path / "future.pth", **cfg)
    text = tmp_path / "notes.pth"
    text.write_bytes(b"hello world\n" * 10)
    with pytest.raises(CheckpointError, match="notes.pth"):
        read_checkpoint(text)


# ------------------------------------------------------------------------------------------------
# Exact loading everywhere: every writer x every reader gives the writer's logits
# ------------------------------------------------------------------------------------------------
TINY_CBT = dict(depth=2, dim=32, heads=2, dim_head=16, image_size=32, patch_size=4, rep_grid=(2, 2), num_classes=5)


def _trained_cbt(legacy: bool):
    """A tiny CBT with arbitrary weights (BatchNorm statistics included) in the given token layout."""
    model, _ = small("cbt_tiny", seed=11, **TINY_CBT)
    model.set_legacy_token_layout(legacy)
    return model


def _write_timm_train_checkpoint(model, folder):
    """timm's own train.py writer (CheckpointSaver): {'epoch', 'arch', 'state_dict', 'optimizer', 'version',
    'args' (an argparse.Namespace), 'metric', 'saver'}."""
    import argparse

    from timm.utils import CheckpointSaver

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, opt, args=argparse.Namespace(model="cbt_tiny", lr=0.1), checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=3, metric=50.0)
    return folder / "last.pth.tar"


def _write(writer, model, tmp_path):
    from safetensors.torch import save_file

    if writer == "cbsa":
        return save_model_checkpoint(model, tmp_path / "own.pth.tar")
    if writer == "bare":
        torch.save(model.state_dict(), tmp_path / "bare.pth")
        return tmp_path / "bare.pth"
    if writer == "safetensors":
        save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
        return tmp_path / "w.safetensors"
    if writer == "timm_train":
        return _write_timm_train_checkpoint(model, tmp_path)
    raise AssertionError(writer)


def _read(reader, path, **kwargs):
    import timm

    cfg = {k: v for k, v in TINY_CBT.items()}
    if reader == "create_model":
        return create_model("cbt_tiny", pretrained=path, **cfg, **kwargs)
    if reader == "load_checkpoint":
        legacy = kwargs.pop("legacy_token_layout", None)
        model = create_model("cbt_tiny", **cfg, **kwargs)
        load_checkpoint(model, path, legacy_token_layout=legacy)
        return model
    if reader == "timm_pretrained":
        return timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **cfg,
                                 **kwargs)
    if reader == "timm_checkpoint_path":
        return timm.create_model("cbt_tiny", checkpoint_path=str(path), **cfg, **kwargs)
    raise AssertionError(reader)


WRITERS = ["cbsa", "bare", "safetensors", "timm_train"]
READERS = ["create_model", "load_checkpoint", "timm_pretrained", "timm_checkpoint_path"]


def _logits(model, seed=21):
    img = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(img)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_and_reader_give_identical_logits_in_the_corrected_layout(writer, reader, tmp_path, caplog):
    model = _trained_cbt(legacy=False)
    path = _write(writer, model, tmp_path)
    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        loaded = _read(reader, path)
    assert not any(a.legacy_token_layout for a in loaded.attention_layers)
    assert torch.equal(_logits(loaded), _logits(model))
    if reader != "timm_checkpoint_path":       # timm's own reader: the model's constructor layout, no log line
        assert "corrected token layout" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", WRITERS)
def test_legacy_weights_load_exactly_where_recorded_or_requested(writer, reader, tmp_path, caplog):
    """Weights trained in the legacy layout: this project's files record it; a file without a record needs the
    explicit override (it is taken as corrected otherwise, which gives other logits)."""
    model = _trained_cbt(legacy=True)
    path = _write(writer, model, tmp_path)
    recorded = writer == "cbsa" and reader != "timm_checkpoint_path"
    if not recorded:
        plain = _read(reader, path)
        assert not any(a.legacy_token_layout for a in plain.attention_layers)
        assert (_logits(plain) - _logits(model)).abs().max() > 1e-4
    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        loaded = _read(reader, path) if recorded else _read(reader, path, legacy_token_layout=True)
    assert all(a.legacy_token_layout for a in loaded.attention_layers)
    assert torch.equal(_logits(loaded), _logits(model))
    if reader != "timm_checkpoint_path":
        reason = "recorded in this project's checkpoint" if recorded else "requested explicitly"
        assert f"legacy token layout ({reason})" in caplog.text


@pytest.mark.parametrize("reader", ["create_model", "load_checkpoint", "timm_pretrained"])
def test_the_authors_release_file_loads_legacy_through_every_reader(reader, tmp_path, caplog):
    path = tmp_path / "cbt_tiny_best.pth.tar"
    overrides = dict(depth=2, image_size=64, patch_size=8)
    reference = write_authors_checkpoint(path, "Ours_tiny", seed=12, **overrides)
    import timm

    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        if reader == "create_model":
            model = create_model("Ours_tiny", pretrained=path, **overrides)
        elif reader == "load_checkpoint":
            model = create_model("Ours_tiny", **overrides)
            load_checkpoint(model, path)
        else:
            model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                      **overrides)
    assert "legacy token layout (the file is in the authors' release format" in caplog.text
    img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(img), reference(img), rtol=0, atol=1e-4)
    # ... and the explicit override wins over the wrapper's record
    forced = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               legacy_token_layout=False, **overrides)
    assert not any(a.legacy_token_layout for a in forced.attention_layers)


@pytest.mark.parametrize("legacy", [False, True])
def test_timm_hub_export_round_trips_through_local_dir(legacy, tmp_path, caplog):
    """timm's save_for_hf (model.safetensors + config.json) of a model built by the entrypoint, rebuilt with
    timm.create_model('local-dir:...'): the layout travels in config.json's model_args."""
    import json

    import timm
    from timm.models import save_for_hf

    model = _trained_cbt(legacy=legacy)
    if legacy:      # as a model loaded from the release would be: the layout was set by the loader
        path = tmp_path / "release.pth.tar"
        torch.save({"epoch": 1, "arch": "Ours_tiny", "best_acc1": 1.0,
                    "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
        model = create_model("cbt_tiny", pretrained=path, **TINY_CBT)
        assert all(a.legacy_token_layout for a in model.attention_layers)
    save_for_hf(model, tmp_path / "export", safe_serialization=True)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "cbt_tiny" and config["num_classes"] == 5
    assert config["model_args"]["legacy_token_layout"] is legacy       # recorded whenever a layout was set
    with caplog.at_level(logging.INFO, logger="cbsa_core"):
        rebuilt = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert all(a.legacy_token_layout is legacy for a in rebuilt.attention_layers)
    assert torch.equal(_logits(rebuilt), _logits(model))
    assert f"{'legacy' if legacy else 'corrected'} token layout (requested explicitly)" in caplog.text


def test_safetensors_and_timm_train_files_are_read_safely(tmp_path):
    model = _trained_cbt(legacy=False)
    timm_file = _write("timm_train", model, tmp_path)
    raw = read_checkpoint(timm_file)
    assert checkpoint_kind(raw) == "wrapped_state_dict" and type(raw["args"]).__name__ == "Namespace"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_checkpoint(broken)
    sd = read_checkpoint(_write("safetensors", model, tmp_path))
    assert checkpoint_kind(sd) == "state_dict" and sd.keys() == model.state_dict().keys()


def test_token_layout_rule_and_records():
    from cbsa_core.checkpoint import decide_token_layout, recorded_token_layout, resolve_token_layout

    sd = {"w": torch.zeros(1)}
    release = {"epoch": 1, "arch": "Ours_tiny", "state_dict": sd, "best_acc1": 1.0}
    timm_wrapper = {"epoch": 1, "arch": "cbt_tiny", "state_dict": sd}
    own = {"format": "cbsa", "model_config": {"legacy_token_layout": True}, "state_dict": sd}
    segmenter = {"model": {"decoder.net.layers.0.fn.step_x": torch.zeros(1)}, "n_cls": 150}
    other_segmenter = {"model": {"decoder.head.weight": torch.zeros(1)}, "n_cls": 150}
    assert recorded_token_layout(release)[0] is True
    assert recorded_token_layout(own)[0] is True
    assert recorded_token_layout(segmenter)[0] is True
    for plain in (sd, timm_wrapper, other_segmenter, {"format": "cbsa", "model_config": {}, "state_dict": sd}):
        assert recorded_token_layout(plain)[0] is None
        assert resolve_token_layout(plain) == (False, resolve_token_layout(plain)[1])
        assert "pass legacy_token_layout=True" in resolve_token_layout(plain)[1]
    assert resolve_token_layout(release, requested=False) == (False, "requested explicitly")
    assert decide_token_layout(None, True) == (True, "requested explicitly")
    assert decide_token_layout(True, None, "why")[0] is True


def test_older_mssa_files_recording_the_unused_rep_grid_still_load(tmp_path):
    """Files written before models without representatives recorded ``rep_grid: None`` carry (8, 8) for MSSA/TSSA
    models. They load, and rebuilding from the record (recorded_model_config) gives the same logits."""
    from cbsa_core.models import recorded_model_config

    for name in ("mssa_tiny", "tssa_tiny"):
        model, _ = small(name, seed=4)
        path = save_model_checkpoint(model, tmp_path / f"{name}.pth")
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["model_config"]["rep_grid"] is None
        ckpt["model_config"]["rep_grid"] = [8, 8]          # what the older files recorded
        torch.save(ckpt, path)
        with pytest.raises(ValueError, match="rep_grid"):  # the record as it stands is refused by the constructor
            create_model(name, **ckpt["model_config"])
        rebuilt = create_model(name, pretrained=path, **recorded_model_config(ckpt["model_config"])).eval()
        img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(rebuilt(img), model(img))


def test_a_release_file_given_through_pretrained_cfg_is_read_whole(tmp_path):
    """timm's other way to name a file, a whole pretrained_cfg with ``file``, takes the same whole-file reader as
    ``pretrained_cfg_overlay``: the release wrapper is recognised and its legacy layout switched on."""
    import timm
    from timm.models import resolve_pretrained_cfg

    reference = ref.randomize_(ref.build("Ours_tiny", depth=1, image_size=112, patch_size=8),
                               generator=torch.Generator().manual_seed(5)).eval()
    path = tmp_path / "release.pth.tar"
    torch.save({"epoch": 1, "arch": "Ours_tiny", "best_acc1": 1.0, "optimizer": {}, "scheduler": {},
                "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    cfg = dict(resolve_pretrained_cfg("cbt_tiny").to_dict(), file=str(path))
    model = timm.create_model("cbt_tiny", pretrained=True, pretrained_cfg=cfg, depth=1, img_size=112,
                              patch_size=8).eval()
    assert model.model_config["legacy_token_layout"] is True
    img = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(img), reference(img), rtol=0, atol=1e-4)
