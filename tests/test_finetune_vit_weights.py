"""Local pretrained weights for the ViT track: .pth, .safetensors and JAX .npz files, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError
from finetune_vit import create_vit, load_pretrained_file

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def source_vit(num_classes: int = 3, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **dict(TINY, **overrides))
    with torch.no_grad():  # make every tensor distinct from a fresh initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def to_jax_npz(model: torch.nn.Module, path) -> None:
    """Write ``model`` in the original JAX/Flax ViT layout read by timm's ``_load_weights`` (the inverse
    of its kernel transposes: conv (O,I,h,w) -> (h,w,I,O), dense (out,in) -> (in,out), heads split)."""
    d = model.embed_dim
    w = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
        "head/kernel": model.head.weight.t(),
        "head/bias": model.head.bias,
    }
    for i, blk in enumerate(model.blocks):
        pre = f"Transformer/encoderblock_{i}/"
        heads, hd = blk.attn.num_heads, blk.attn.head_dim
        qkv_w = blk.attn.qkv.weight.reshape(3, heads * hd, d)
        qkv_b = blk.attn.qkv.bias.reshape(3, heads, hd)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{pre}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].t().reshape(d, heads, hd)
            w[f"{pre}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j]
        out_kernel = blk.attn.proj.weight.reshape(d, heads, hd).permute(1, 2, 0)
        w[f"{pre}MultiHeadDotProductAttention_1/out/kernel"] = out_kernel
        w[f"{pre}MultiHeadDotProductAttention_1/out/bias"] = blk.attn.proj.bias
        w[f"{pre}LayerNorm_0/scale"], w[f"{pre}LayerNorm_0/bias"] = blk.norm1.weight, blk.norm1.bias
        w[f"{pre}LayerNorm_2/scale"], w[f"{pre}LayerNorm_2/bias"] = blk.norm2.weight, blk.norm2.bias
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[f"{pre}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.t()
            w[f"{pre}MlpBlock_3/Dense_{r}/bias"] = fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def assert_same_weights(model, src):
    sd, ref = model.state_dict(), src.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("fmt", ["pth", "wrapped_pth", "safetensors", "npz"])
def test_each_format_loads_exactly(tmp_path, fmt):
    src = source_vit()
    path = tmp_path / f"weights.{'pth' if 'pth' in fmt else fmt}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    elif fmt == "wrapped_pth":  # the release's layout: {'state_dict': {'module.' + key: ...}, ...}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    elif fmt == "safetensors":
        save_file(src.state_dict(), str(path))
    else:
        to_jax_npz(src, path)
    model = create_vit(ARCH, attention="cbsa_star", num_classes=3, pretrained_file=path, rep_grid=(2, 2),
                       model_kwargs=TINY)
    assert_same_weights(model, src)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(img)).all()


def test_other_class_count_keeps_fresh_head_and_other_resolution_resamples(tmp_path, caplog):
    src = source_vit(num_classes=1000)
    path = tmp_path / "in1k.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    model = create_vit(ARCH, num_classes=3, pretrained_file=path, rep_grid=(2, 2),
                       model_kwargs=dict(TINY, img_size=48))
    assert model.head.weight.shape == (3, 64)
    assert "1000-class classifier" in caplog.text and "resampled from a 4x4 to a 6x6 grid" in caplog.text
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], src.state_dict()["blocks.1.attn.qkv.weight"])
    assert sd["pos_embed"].shape == (1, 1 + 36, 64)
    # [CLS] position passes through the resampling untouched.
    assert torch.equal(sd["pos_embed"][:, 0], src.pos_embed[:, 0].detach())


def test_missing_file_names_the_expected_file(tmp_path):
    path = tmp_path / "vit_small_patch16_224.augreg_in21k_ft_in1k.npz"
    with pytest.raises(CheckpointError, match=f"pretrained weights file not found: {path}.*timm weights of {ARCH}"):
        create_vit(ARCH, pretrained_file=path, model_kwargs=TINY)


def test_unknown_suffix_and_corrupt_files_are_refused(tmp_path):
    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown kind '.ckpt'; expected one of .npz, .safetensors"):
        create_vit(ARCH, pretrained_file=bad, model_kwargs=TINY)
    for name in ("junk.pth", "junk.safetensors", "junk.npz"):
        path = tmp_path / name
        path.write_bytes(b"not a weights file")
        with pytest.raises(CheckpointError, match=str(path)):
            create_vit(ARCH, pretrained_file=path, model_kwargs=TINY)


def test_truncated_or_corrupt_npz_names_the_file(tmp_path):
    good = tmp_path / "good.npz"
    to_jax_npz(source_vit(), good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])  # an interrupted download: the zip directory at the end is gone
    with pytest.raises(CheckpointError, match=f"cannot read pretrained weights file {truncated}: not a readable "
                                              r"numpy .npz archive \(truncated or corrupt\?\): BadZipFile"):
        create_vit(ARCH, num_classes=3, pretrained_file=truncated, model_kwargs=TINY)


def test_npz_shapes_are_read_from_the_headers_only(tmp_path, monkeypatch):
    """The architecture check reads each member's .npy header; whole arrays are decompressed once, by timm."""
    from finetune_vit import models

    src = source_vit()
    path = tmp_path / "w.npz"
    to_jax_npz(src, path)
    with np.load(path) as w:
        expected = {k: w[k].shape for k in w.files}
    assert models._npz_shapes(path) == expected

    def no_full_read(*args, **kwargs):
        raise AssertionError("the shape check decompressed a whole array")

    monkeypatch.setattr(np.lib.format, "read_array", no_full_read)
    deep = source_vit(depth=3)
    to_jax_npz(deep, tmp_path / "deep.npz")
    with pytest.raises(CheckpointMismatchError, match="3 encoder blocks vs model depth 2"):
        create_vit(ARCH, num_classes=3, pretrained_file=tmp_path / "deep.npz", model_kwargs=TINY)


def _legacy_flags(model) -> list:
    return [b.attn.legacy_token_layout for b in model.blocks]


def test_authors_finetuned_file_switches_on_the_legacy_layout(tmp_path, caplog):
    """The release's fine-tuned ViTs pooled X_q[:, :-1] (docs/authors-release.md item 28)."""
    src = source_vit()
    authors = tmp_path / "vit_small_cbsa.pth.tar"
    torch.save({"epoch": 50, "arch": ARCH, "best_acc1": 70.1, "optimizer": {}, "scheduler": {},
                "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, authors)
    plain = tmp_path / "timm.pth"
    torch.save(src.state_dict(), plain)
    caplog.set_level("INFO")
    model = create_vit(ARCH, attention="cbsa_vee", num_classes=3, pretrained_file=authors, rep_grid=(2, 2),
                       model_kwargs=TINY)
    assert _legacy_flags(model) == [True, True] and model.vit_adaptation["legacy_token_layout"] is True
    assert f"{authors} holds the authors' fine-tuned weights" in caplog.text
    assert_same_weights(model, src)
    # Plain timm weights keep the corrected layout; an explicit choice wins (with a warning when it disagrees).
    assert _legacy_flags(create_vit(ARCH, num_classes=3, pretrained_file=plain, rep_grid=(2, 2),
                                    model_kwargs=TINY)) == [False, False]
    caplog.clear()
    forced = create_vit(ARCH, num_classes=3, pretrained_file=authors, rep_grid=(2, 2), model_kwargs=TINY,
                        legacy_token_layout=False)
    assert _legacy_flags(forced) == [False, False]
    assert "was trained with legacy_token_layout=True, but legacy_token_layout=False was asked for" in caplog.text


def test_weights_of_another_architecture_are_refused(tmp_path):
    wide = source_vit(embed_dim=96, num_heads=3)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)does not match model 'vit_tiny_patch16_224'.*blocks.0.attn.qkv.weight: "
                             r"checkpoint \(288, 96\) vs model \(192, 64\)"):
        create_vit(ARCH, num_classes=3, pretrained_file=tmp_path / "wide.pth", model_kwargs=TINY)
    deep = source_vit(depth=3)
    save_file(deep.state_dict(), str(tmp_path / "deep.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\).*\n.*blocks.2"):
        create_vit(ARCH, num_classes=3, pretrained_file=tmp_path / "deep.safetensors", model_kwargs=TINY)
    to_jax_npz(deep, tmp_path / "deep.npz")
    with pytest.raises(CheckpointMismatchError, match="3 encoder blocks vs model depth 2"):
        create_vit(ARCH, num_classes=3, pretrained_file=tmp_path / "deep.npz", model_kwargs=TINY)
    patch4 = source_vit(patch_size=4)
    to_jax_npz(patch4, tmp_path / "patch4.npz")
    with pytest.raises(CheckpointMismatchError, match=r"patch embedding \(4, 4, 3, 64\) vs model patch \(8, 8\)"):
        create_vit(ARCH, num_classes=3, pretrained_file=tmp_path / "patch4.npz", model_kwargs=TINY)
    torch.save(patch4.state_dict(), tmp_path / "patch4.pth")
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed.proj.weight: checkpoint \(64, 3, 4, 4\)"):
        load_pretrained_file(timm.create_model(ARCH, num_classes=3, **TINY), tmp_path / "patch4.pth")


def test_unknown_arch_and_bad_model_kwargs_are_refused():
    with pytest.raises(ValueError, match=r"unknown arch 'vit_huge_patch14_224'; valid: vit_tiny_patch16_224, "
                                         r"vit_tiny_patch16_384, .*vit_large_patch16_384"):
        create_vit("vit_huge_patch14_224")
    with pytest.raises(ValueError, match="model_kwargs may not set 'pretrained'"):
        create_vit(ARCH, model_kwargs=dict(TINY, pretrained=True))
    with pytest.raises(ValueError, match="cannot build vit_tiny_patch16_224 with model_kwargs"):
        create_vit(ARCH, model_kwargs=dict(TINY, no_such_option=1))
    with pytest.raises(ValueError, match="image size 36x36 is not divisible by the patch size 8x8"):
        create_vit(ARCH, model_kwargs=dict(TINY, img_size=36))


def test_no_file_means_random_weights_and_no_download(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("timm.models._builder.load_pretrained", refuse)
    monkeypatch.setattr("timm.models._hub.download_cached_file", refuse, raising=False)
    caplog.set_level("INFO")
    model = create_vit(ARCH, num_classes=3, rep_grid=(2, 2), model_kwargs=TINY)
    assert "the weights are random" in caplog.text
    assert model.arch == ARCH
