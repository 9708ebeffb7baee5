"""ONNX export (scripts/export_onnx.py): tiny CBT classifiers (both token layouts, MSSA/TSSA/agent/CBSA† layers)
and tiny segmentation models are exported, run in onnxruntime on a batch size other than the export's, and
compared with eager; the file's metadata and the refusals of bad input are checked."""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

import cbsa_core
from cbsa_core.checkpoint import atomic_save, save_model_checkpoint
from semantic_segmentation import create_segmenter, default_model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
export_onnx = importlib.import_module("export_onnx")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
# 64-px images, patch 16: a 4x4 token grid pooled to 2x2 representatives (bins of 2x2 tokens).
TINY = dict(num_classes=10, dim=64, heads=2, dim_head=32, depth=2, image_size=64, patch_size=16, rep_grid=(2, 2))
SEG = dict(n_cls=5, crop_size=64, d_model=32, n_heads=2, n_layers=1)
SEG_DECODER = dict(n_layers=1, n_heads=2, dim_head=16, rep_grid=[2, 2])


def run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "logits")
    return session.run(None, {inp.name: images.numpy()})[0]


def eager(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(images).numpy()


def io_shapes(path):
    graph = onnx.load(str(path)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return dims(graph.input[0]), dims(graph.output[0])


def metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_cbt(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cbsa_core.create_model("cbt_tiny", **{**TINY, **overrides}).eval()


def authors_classification_file(path: Path, model) -> Path:
    """The release's wrapper: DataParallel keys, its --arch name, best_acc1 (which marks the release's files)."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    atomic_save({"epoch": 7, "arch": "Ours_tiny", "state_dict": state, "best_acc1": 12.5, "optimizer": {},
                 "scheduler": {}}, path)
    return path


def tiny_segmenter(seed: int = 0):
    torch.manual_seed(seed)
    model = create_segmenter(default_model_config("test", **SEG, decoder=SEG_DECODER)).eval()
    with torch.no_grad():  # the decoder's zero-initialised parts would hide a wrong mask product
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory, one_thread):
    """A random-weight classifier with one layer of each other attention (MSSA, TSSA, agent, CBSA†)."""
    model = tiny_cbt(seed=3, depth=4, attn=["mssa", "tssa", "agent", "cbsa_dagger"])
    out = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    result = export_onnx.export_model(model, out)
    return model, out, result


def test_classifier_checkpoint_exports_with_dynamic_batch(tmp_path):
    model = tiny_cbt()
    ckpt = save_model_checkpoint(model, tmp_path / "cbt.pth", config=dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4]))
    result = export_onnx.export_checkpoint(ckpt, tmp_path / "cbt.onnx")
    assert result.path == tmp_path / "cbt.onnx" and result.image_size == (64, 64)
    assert 0 <= result.max_abs_diff <= TOL
    assert io_shapes(result.path) == (["batch", 3, 64, 64], ["batch", 10])
    for batch in (3, 1):  # the export ran on a batch of 2
        images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        np.testing.assert_allclose(run_onnx(result.path, images), eager(model, images), rtol=0, atol=TOL)
    meta = metadata(result.path)
    assert meta["task"] == "classification" and meta["arch"] == "cbt_tiny"
    assert json.loads(meta["image_size"]) == [64, 64]
    assert meta["token_layout"] == "corrected"
    assert json.loads(meta["normalization_mean"]) == [0.5, 0.4, 0.3]  # the training run's, recorded in the file
    assert json.loads(meta["normalization_std"]) == [0.2, 0.3, 0.4]
    assert meta["input_range"] == "[0, 1]"
    assert json.loads(meta["model_config"]) == json.loads(json.dumps(model.model_config))
    assert meta["source_checkpoint"] == str(ckpt) and meta["source_checkpoint_format"] == "cbsa"
    assert meta["source_checkpoint_sha256"] == sha256(ckpt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_authors_checkpoint_exports_legacy_layout_through_cli(tmp_path, capsys):
    corrected = tiny_cbt(seed=1)
    legacy = copy.deepcopy(corrected)
    legacy.set_legacy_token_layout(True)
    ckpt = authors_classification_file(tmp_path / "cbt_tiny_best.pth.tar", corrected)
    out = tmp_path / "sub" / "authors.onnx"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={list(v) if isinstance(v, tuple) else v}")]
    assert export_onnx.main(["--checkpoint", str(ckpt), "--out", str(out), *sets]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "token layout legacy" in printed and "max |onnxruntime - eager|" in printed
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = run_onnx(out, images)
    np.testing.assert_allclose(got, eager(legacy, images), rtol=0, atol=TOL)
    # The layout is part of the graph: the corrected model computes something else on the same weights.
    assert np.abs(got - eager(corrected, images)).max() > 20 * TOL
    meta = metadata(out)
    assert meta["arch"] == "Ours_tiny" and meta["token_layout"] == "legacy"
    assert meta["source_checkpoint_format"] == "authors_classification"
    assert json.loads(meta["normalization_mean"]) == [0.485, 0.456, 0.406]  # ImageNet: the release's training data


def test_token_layout_override(tmp_path):
    model = tiny_cbt(seed=2)
    authors = authors_classification_file(tmp_path / "authors.pth", model)
    ours = save_model_checkpoint(model, tmp_path / "ours.pth")
    cases = [(authors, None, True), (authors, False, False), (ours, None, False), (ours, True, True)]
    for path, requested, legacy in cases:
        source = export_onnx.load_for_export(path, legacy_token_layout=requested,
                                             overrides=TINY if path == authors else None)
        layers = [m.legacy_token_layout for m in source.model.modules() if isinstance(m, cbsa_core.CBSA)]
        assert layers == [legacy] * TINY["depth"], (path.name, requested)
        assert source.token_layout == ("legacy" if legacy else "corrected")


def test_mssa_tssa_agent_dagger_layers_export(mixed_export):
    model, out, result = mixed_export
    assert result.max_abs_diff <= TOL
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(run_onnx(out, images), eager(model, images), rtol=0, atol=TOL)
    meta = metadata(out)
    assert json.loads(meta["model_config"])["attn"] == ["mssa", "tssa", "agent", "cbsa_dagger"]
    assert "source_checkpoint" not in meta  # built in memory, not from a file


def test_segmentation_checkpoint_exports_at_its_crop(tmp_path):
    model = tiny_segmenter()
    ckpt = save_model_checkpoint(model, tmp_path / "seg.pth")
    result = export_onnx.export_checkpoint(ckpt, tmp_path / "seg.onnx")
    assert result.image_size == (64, 64) and result.max_abs_diff <= TOL
    assert io_shapes(result.path) == (["batch", 3, 64, 64], ["batch", 5, 64, 64])
    images = 2 * torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) - 1
    np.testing.assert_allclose(run_onnx(result.path, images), eager(model, images), rtol=0, atol=TOL)
    meta = metadata(result.path)
    assert meta["task"] == "segmentation" and meta["input_range"] == "[0, 255]"
    assert json.loads(meta["normalization_mean"]) == [127.5] * 3  # Segmenter's "vit" statistics
    assert json.loads(meta["normalization_std"]) == [127.5] * 3


def test_authors_segmentation_checkpoint_exports_padded_size(tmp_path):
    """The authors' file with its variant.yml, exported at a size the patch does not divide (padded as in eager)."""
    model = tiny_segmenter(seed=1)
    folder = tmp_path / "run"
    folder.mkdir()
    atomic_save({"model": model.state_dict(), "optimizer": {}, "n_cls": SEG["n_cls"], "lr_scheduler": {},
                 "epoch": 3}, folder / "checkpoint.pth")
    net = dict(image_size=[64, 64], patch_size=16, d_model=SEG["d_model"], n_heads=SEG["n_heads"],
               n_layers=SEG["n_layers"], normalization="deit", backbone="test", n_cls=SEG["n_cls"],
               decoder=dict(name="mask_transformer", n_layers=1, n_heads=2, rep_grid=[2, 2]))
    (folder / "variant.yml").write_text(yaml.safe_dump(dict(net_kwargs=net)))
    result = export_onnx.export_checkpoint(folder / "checkpoint.pth", tmp_path / "seg.onnx", image_size=(72, 64))
    assert io_shapes(result.path) == (["batch", 3, 72, 64], ["batch", 5, 72, 64])
    images = torch.randn(1, 3, 72, 64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(run_onnx(result.path, images), eager(model, images), rtol=0, atol=TOL)
    meta = metadata(result.path)
    assert meta["source_checkpoint_format"] == "authors_segmentation"
    assert json.loads(meta["normalization_mean"]) == [123.675, 116.28, 103.53]


# ------------------------------------------------------------------------------------------------
# refusals
@pytest.fixture
def tiny_files(tmp_path):
    model = tiny_cbt()
    return dict(ours=save_model_checkpoint(model, tmp_path / "ours.pth"),
                authors=authors_classification_file(tmp_path / "authors.pth", model),
                seg=save_model_checkpoint(tiny_segmenter(), tmp_path / "seg.pth"),
                missing=tmp_path / "missing.pth", out=tmp_path / "out.onnx")


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "{missing}"], "checkpoint file not found: {missing}"),
    (["--checkpoint", "{authors}", "--arch", "cbt_huge"], "unknown model 'cbt_huge'"),
    (["--checkpoint", "{ours}", "--image-size", "72", "64"],
     "--image-size 72 64 does not divide by the classifier's patch size 16"),
    (["--checkpoint", "{ours}", "--image-size", "16"],
     "gives a 1x1 token grid (patch 16), smaller than the 2x2 representative grid"),
    (["--checkpoint", "{seg}", "--image-size", "64", "16"], "gives a 4x1 token grid (patch 16), smaller than the 2x2"),
    (["--checkpoint", "{ours}", "--set", "depth=3"], "--set only applies to files without one"),
    (["--checkpoint", "{seg}", "--legacy-token-layout"], "--legacy-token-layout do(es) not apply"),
    (["--checkpoint", "{ours}", "--tolerance", "-1"], "--tolerance must be >= 0"),
])
def test_bad_input_is_refused_with_one_error(tiny_files, capsys, args, expected):
    argv = [a.format(**tiny_files) for a in args] + ["--out", str(tiny_files["out"])]
    assert export_onnx.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected.format(**tiny_files) in err[0], err
    assert not tiny_files["out"].exists()


def test_only_cbt_and_segmenter_models_are_exported(tmp_path):
    with pytest.raises(export_onnx.ExportError, match="only CBT classifiers"):
        export_onnx.export_model(torch.nn.Linear(3, 3), tmp_path / "x.onnx", image_size=(8, 8))


def test_verification_refuses_a_difference_over_tolerance(mixed_export):
    model, out, _ = mixed_export
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.mlp_head[1].bias.add_(1e-3)  # every logit moves by exactly 1e-3
    assert export_onnx.verify_onnx(out, model, (64, 64)) <= TOL
    with pytest.raises(export_onnx.ExportError, match=r"differs from eager by 0\.001 .* over --tolerance 0\.0001"):
        export_onnx.verify_onnx(out, other, (64, 64))


def test_failed_verification_keeps_the_previous_file(tiny_files, capsys, monkeypatch):
    out = tiny_files["out"]
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export_onnx, "onnx_vs_eager", lambda *args, **kwargs: 0.5)
    assert export_onnx.main(["--checkpoint", str(tiny_files["ours"]), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "differs from eager by 0.5" in err[0] and f"nothing was written to {out}" in err[0]
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["authors.pth", "ours.pth", "seg.pth", "out.onnx"])


# ------------------------------------------------------------------------------------------------
# scripts/benchmark_onnx.py (timings are printed by the script, never asserted here)
def test_benchmark_quick_writes_consistent_rows(tmp_path, capsys):
    bench = importlib.import_module("benchmark_onnx")
    csv_path = tmp_path / "bench" / "onnx.csv"
    rows = bench.main(["--quick", "--batches", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                       "--csv", str(csv_path)])
    assert [(r["model"], r["image_size"], r["batch"], r["threads"]) for r in rows] == [("cbt_tiny", 128, 2, 1)]
    row = rows[0]
    assert row["eager_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["max_abs_diff"] <= TOL
    assert row["speedup"] == pytest.approx(row["eager_ms"] / row["onnxruntime_ms"])
    with open(csv_path) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",") == list(bench.CSV_COLUMNS) and lines[1].startswith("cbt_tiny,classification,128,2,1,")
    assert "eager/ORT" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "120"])
