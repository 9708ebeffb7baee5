"""Segmentation model: Segmenter ViT + CBT decoder against an independent re-statement of the authors' code,
the authors' checkpoint format (variant.yml beside it), this project's checkpoints and pretrained-encoder files.

The reference below restates docs/authors-release.md §2.2 (decoder attention, with the release's hard-coded
slicing style but parametrised constants) and §4.1 (MaskTransformer, Segmenter.forward); Segmenter's ViT comes from
``segmentation_reference``. Neither shares code with the package.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from cbsa_core.checkpoint import CheckpointError, CheckpointMismatchError, atomic_save, save_model_checkpoint
from segmentation_reference import RefViT
from semantic_segmentation import (MaskTransformer, create_segmenter, default_model_config, load_model,
                                   load_pretrained_encoder)

# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the authors' Segmenter + CBT decoder.
# ---------------------------------------------------------------------------------------------------------------


class RefAttention(nn.Module):
    """dec_blocks.Attention: constants 150 / 300 / 10x10 become n_cls / inner / rep."""

    def __init__(self, dim, heads, dim_head, n_cls, rep, tied=False):
        super().__init__()
        self.heads, self.dim_head, self.n_cls, self.rep = heads, dim_head, n_cls, rep
        self.inner = heads * dim_head
        self.scale = dim_head ** -0.5
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))
        self.proj = nn.Linear(dim, self.inner, bias=False)
        self.pool = nn.AdaptiveAvgPool2d((rep, rep))
        self.tied = tied
        if not tied:
            self.to_out = nn.Linear(self.inner, dim)

    def forward(self, x, grid=None):
        b, n, _ = x.shape
        if grid is None:  # the release: a square grid of n - n_cls patches
            gh = gw = int(math.sqrt(n - self.n_cls))
        else:
            gh, gw = grid
        w = self.proj(x)
        rep = self.pool(w[:, :-self.n_cls].reshape(b, gh, gw, self.inner).permute(0, 3, 1, 2))
        rep = rep.reshape(b, self.inner, self.rep * self.rep).permute(0, 2, 1)
        w = w.reshape(b, n, self.heads, self.dim_head).permute(0, 2, 1, 3)
        rep = rep.reshape(b, self.rep * self.rep, self.heads, self.dim_head).permute(0, 2, 1, 3)
        attn = torch.softmax(rep @ w.transpose(-1, -2) * self.scale, dim=-1)
        rep = rep + self.step_rep * (attn @ w)
        rep = torch.softmax(rep @ rep.transpose(-1, -2) * self.scale, dim=-1) @ rep
        dx = self.step_x * (attn.transpose(-1, -2) @ rep)
        dx = dx.permute(0, 2, 1, 3).reshape(b, n, self.inner)
        return dx @ self.proj.weight if self.tied else self.to_out(dx)


class RefPreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn


class RefNet(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RefMaskTransformer(nn.Module):
    def __init__(self, n_cls, d_model, n_layers, heads, dim_head, rep, patch_size, tied=False):
        super().__init__()
        self.n_cls, self.patch_size = n_cls, patch_size
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.net = RefNet([RefPreNorm(d_model, RefAttention(d_model, heads, dim_head, n_cls, rep, tied))
                           for _ in range(n_layers)])
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x, im_size, grid=None):
        H, W = im_size
        x = torch.cat((x, self.cls_emb.expand(x.size(0), -1, -1)), 1)
        for layer in self.net.layers:
            x = layer.fn(layer.norm(x), grid) + x
        x = self.decoder_norm(x)
        patches, cls_feat = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_feat = cls_feat / cls_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ cls_feat.transpose(1, 2))
        gh = H // self.patch_size
        return masks.reshape(x.size(0), gh, masks.shape[1] // gh, self.n_cls).permute(0, 3, 1, 2)


class RefSegmenter(nn.Module):
    def __init__(self, crop, patch, dim, depth, heads, n_cls, dec_layers, dec_heads, dim_head, rep, tied=False):
        super().__init__()
        self.patch = patch
        self.encoder = RefViT(crop, patch, dim, depth, heads)
        self.decoder = RefMaskTransformer(n_cls, dim, dec_layers, dec_heads, dim_head, rep, patch, tied)

    def forward(self, im, explicit_grid=False):
        H0, W0 = im.shape[2:]
        pad_h, pad_w = (-H0) % self.patch, (-W0) % self.patch
        im = F.pad(im, (0, pad_w, 0, pad_h), value=0)
        H, W = im.shape[2:]
        x = self.encoder(im)[:, 1:]
        grid = (H // self.patch, W // self.patch) if explicit_grid else None
        masks = self.decoder(x, (H, W), grid)
        masks = F.interpolate(masks, size=(H, W), mode="bilinear")
        return masks[:, :, :H0, :W0]


# Small but complete: inner width (3 x 8 = 24) != d_model (48); a 7x7 grid pooled to 3x3 has overlapping bins.
CROP, PATCH, DIM, DEPTH, HEADS, N_CLS, DEC_LAYERS, DEC_HEADS, DIM_HEAD, REP = 112, 16, 48, 2, 4, 7, 2, 3, 8, 3


def _ref_model(tied=False, seed=0):
    torch.manual_seed(seed)
    ref = RefSegmenter(CROP, PATCH, DIM, DEPTH, HEADS, N_CLS, DEC_LAYERS, DEC_HEADS, DIM_HEAD, REP, tied).eval()
    with torch.no_grad():  # perturb every norm so that a swapped or skipped LayerNorm shows up
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        ref.encoder.pos_embed.mul_(0.1)
    return ref


def _variant(dec_layers=DEC_LAYERS, enc_layers=DEPTH, dec_heads=DEC_HEADS):
    """A Segmenter-style variant.yml (image_size is a tuple, as train.py stores it)."""
    return dict(
        world_batch_size=8, version="normal", resume=True,
        dataset_kwargs=dict(dataset="ade20k", image_size=CROP, crop_size=CROP, batch_size=8, normalization="vit",
                            split="train", num_workers=10),
        net_kwargs=dict(image_size=(CROP, CROP), patch_size=PATCH, d_model=DIM, n_heads=HEADS, n_layers=enc_layers,
                        normalization="vit", distilled=False, backbone="vit_tiny_test", dropout=0.0,
                        drop_path_rate=0.1,
                        decoder=dict(drop_path_rate=0.0, dropout=0.0, n_layers=dec_layers, n_heads=dec_heads,
                                     name="mask_transformer", rep_grid=[REP, REP]),
                        n_cls=N_CLS),
        inference_kwargs=dict(im_size=CROP, window_size=CROP, window_stride=CROP - 32),
    )


def _write_authors_checkpoint(folder, ref, variant=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pth"
    atomic_save({"model": ref.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "n_cls": N_CLS,
                 "lr_scheduler": {"last_epoch": 100, "base_lrs": [1e-3]}, "epoch": 4}, path)
    with open(folder / "variant.yml", "w") as f:
        f.write(yaml.dump(variant or _variant()))  # plain yaml.dump: writes !!python/tuple like the release
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_authors_checkpoint_logits_match_reference(tmp_path, tied):
    ref = _ref_model(tied=tied)
    path = _write_authors_checkpoint(tmp_path / "run", ref)
    model = load_model(path)
    assert not model.training
    assert model.decoder.tied_output is tied
    assert (model.decoder.n_layers, model.decoder.n_heads, model.decoder.dim_head) == (DEC_LAYERS, DEC_HEADS, DIM_HEAD)
    torch.manual_seed(1)
    # crop size; smaller and larger square grids (pos_embed resized bilinearly); a non-multiple of the patch (padding)
    for h, w in [(CROP, CROP), (96, 96), (128, 128), (100, 100)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ours, theirs = model(x), ref(x)
        assert ours.shape == (2, N_CLS, h, w)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_non_square_grid_matches_reference_with_explicit_grid(tmp_path):
    ref = _ref_model()
    model = load_model(_write_authors_checkpoint(tmp_path / "run", ref))
    x = torch.randn(1, 3, 112, 176)  # 7 x 11 grid: the release's sqrt(n - 150) would crash here (item 34)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x, explicit_grid=True), atol=1e-4, rtol=0)


def test_encoder_dropout_reaches_every_segmenter_dropout_site():
    """Segmenter's --dropout acts after pos_embed, on the attention weights, after the attention projection and
    after both MLP layers; drop-path is separate."""
    cfg = default_model_config("test", n_cls=3, crop_size=64, d_model=32, n_heads=2, n_layers=2, dropout=0.3,
                               drop_path_rate=0.2, decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2]))
    enc = create_segmenter(cfg).encoder
    assert enc.pos_drop.p == 0.3
    for blk in enc.blocks:
        assert (blk.attn.attn_drop.p, blk.attn.proj_drop.p, blk.mlp.drop1.p, blk.mlp.drop2.p) == (0.3,) * 4
    # drop-path rises linearly from 0 to --drop-path over the blocks
    assert isinstance(enc.blocks[0].drop_path1, nn.Identity)
    assert enc.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    # the dropout is live in training mode and off in eval mode
    x = torch.randn(1, 3, 64, 64)
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, enc(x))
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x), atol=0, rtol=0)
    plain = create_segmenter(_small_encoder_cfg(64)).encoder
    assert (plain.pos_drop.p, plain.blocks[0].attn.attn_drop.p, plain.blocks[0].mlp.drop2.p) == (0.0, 0.0, 0.0)


def test_release_decoder_parameter_counts():
    # docs/authors-release.md §4.1, by arithmetic: T 376,830; S 753,342; B 1,506,366; L 2,008,382.
    for d, expected in [(192, 376_830), (384, 753_342), (768, 1_506_366), (1024, 2_008_382)]:
        assert sum(p.numel() for p in MaskTransformer(150, d).parameters()) == expected


def test_decoder_key_names_and_init():
    dec = MaskTransformer(150, 384)
    sd = dec.state_dict()
    assert tuple(sd["cls_emb"].shape) == (1, 150, 384)
    for j in range(3):
        p = f"net.layers.{j}."
        assert tuple(sd[p + "fn.proj.weight"].shape) == (300, 384)
        assert tuple(sd[p + "fn.to_out.weight"].shape) == (384, 300)
        assert tuple(sd[p + "fn.step_x"].shape) == (3, 1, 1)
        assert tuple(sd[p + "norm.weight"].shape) == (384,)
    assert tuple(sd["mask_norm.weight"].shape) == (150,)
    # item 42: trunc_normal(0.02) Linears, zero biases, randn steps
    w = sd["net.layers.0.fn.proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002  # timm bounds: [-2, 2], absolute
    assert torch.count_nonzero(sd["net.layers.0.fn.to_out.bias"]) == 0
    assert sd["net.layers.0.fn.step_x"].abs().max() > 0.04  # randn, not trunc_normal(0.02)
    assert "net.layers.0.fn.to_out.weight" not in MaskTransformer(5, 32, tied_output=True).state_dict()


def test_decoder_shapes_configurable_and_rejects_bad_tokens():
    dec = MaskTransformer(11, 32, n_layers=1, n_heads=2, dim_head=5, rep_grid=(2, 3))
    out = dec(torch.randn(2, 4 * 6, 32), (4, 6))
    assert out.shape == (2, 11, 4, 6)
    with pytest.raises(ValueError, match="grid_size"):
        dec(torch.randn(2, 25, 32), (4, 6))
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        dec(torch.randn(2, 24, 16), (4, 6))
    maps = dec.attention_maps(torch.randn(1, 24, 32), (4, 6))
    assert len(maps) == 1 and maps[0].shape == (1, 2, 24 + 11, 24 + 11)


def test_own_checkpoint_round_trip(tmp_path):
    cfg = default_model_config("test", n_cls=5, crop_size=64, d_model=32, n_heads=2, n_layers=1,
                               decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2], tied_output=True))
    torch.manual_seed(0)
    model = create_segmenter(cfg).eval()
    path = save_model_checkpoint(model, tmp_path / "seg.pth")
    loaded = load_model(path)
    assert loaded.model_config == model.model_config
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_mismatching_variant_is_refused_naming_the_file(tmp_path):
    ref = _ref_model()
    path = _write_authors_checkpoint(tmp_path / "a", ref, _variant(dec_layers=3))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)checkpoint\.pth.*decoder depth.*n_layers=3.*2 layers"):
        load_model(path)
    path = _write_authors_checkpoint(tmp_path / "b", ref, _variant(enc_layers=4))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)checkpoint\.pth.*encoder depth"):
        load_model(path)
    path = _write_authors_checkpoint(tmp_path / "c", ref, _variant(dec_heads=4))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)decoder heads.*n_heads=4.*has 3"):
        load_model(path)
    path = _write_authors_checkpoint(tmp_path / "d", ref)
    (tmp_path / "d" / "variant.yml").unlink()
    with pytest.raises(CheckpointError, match=r"variant file not found: .*d/variant\.yml"):
        load_model(path)
    # a variant without the encoder's head count (or depth): refused, naming the variant file and the checkpoint
    for key in ("n_heads", "n_layers"):
        variant = _variant()
        del variant["net_kwargs"][key]
        path = _write_authors_checkpoint(tmp_path / f"no_{key}", ref, variant)
        with pytest.raises(CheckpointMismatchError,
                           match=rf"no_{key}/variant\.yml \(beside checkpoint .*no_{key}/checkpoint\.pth\) has no "
                                 rf"net_kwargs\.{key}"):
            load_model(path)


def test_own_checkpoint_with_wrong_weights_is_refused(tmp_path):
    cfg = default_model_config("test", n_cls=5, crop_size=64, d_model=32, n_heads=2, n_layers=1,
                               decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2]))
    model = create_segmenter(cfg)
    save_model_checkpoint(model, tmp_path / "seg.pth")
    ckpt = torch.load(tmp_path / "seg.pth", weights_only=True)
    ckpt["model_config"]["decoder"]["dim_head"] = 16  # config no longer fits the weights
    atomic_save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)bad\.pth.*decoder\.net\.layers\.0\.fn\.proj\.weight"):
        load_model(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pth")


def _small_encoder_cfg(crop):
    return default_model_config("test", n_cls=3, crop_size=crop, d_model=32, n_heads=2, n_layers=1,
                                decoder=dict(n_layers=1, n_heads=2, dim_head=8, rep_grid=[2, 2]))


def test_pretrained_pth_loads_and_resizes_pos_embed(tmp_path):
    torch.manual_seed(0)
    src = create_segmenter(_small_encoder_cfg(64)).encoder  # 4x4 grid
    torch.save({"model": src.state_dict()}, tmp_path / "enc.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    dst = create_segmenter(_small_encoder_cfg(96)).encoder  # 6x6 grid
    load_pretrained_encoder(dst, tmp_path / "enc.pth")
    dst2 = create_segmenter(_small_encoder_cfg(96)).encoder
    load_pretrained_encoder(dst2, tmp_path / "enc.safetensors")
    for k, v in dst.state_dict().items():
        assert torch.equal(dst2.state_dict()[k], v), k
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight, atol=0, rtol=0)
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dst.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 32))
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])


def test_pretrained_npz_loads_through_timm(tmp_path):
    """A Google-layout .npz (as timm's augreg files) written from a known encoder loads back exactly."""
    torch.manual_seed(0)
    src = create_segmenter(_small_encoder_cfg(64)).encoder
    d, heads = 32, 2
    t = lambda x: x.detach().numpy()
    w = {"embedding/kernel": t(src.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": t(src.patch_embed.proj.bias), "cls": t(src.cls_token),
         "Transformer/posembed_input/pos_embedding": t(src.pos_embed),
         "Transformer/encoder_norm/scale": t(src.norm.weight), "Transformer/encoder_norm/bias": t(src.norm.bias),
         "head/kernel": t(src.head.weight.T), "head/bias": t(src.head.bias)}
    blk, p = src.blocks[0], "Transformer/encoderblock_0/"
    for i, n in enumerate(("query", "key", "value")):
        rows = slice(i * d, (i + 1) * d)
        w[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = t(
            blk.attn.qkv.weight[rows].T.reshape(d, heads, d // heads))
        w[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = t(blk.attn.qkv.bias[rows].reshape(heads, d // heads))
    w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = t(blk.attn.proj.weight.T.reshape(heads, d // heads, d))
    w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
    for ln, mod in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
        w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = t(mod.weight), t(mod.bias)
    for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
        w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(tmp_path / "enc.npz", **w)
    dst = create_segmenter(_small_encoder_cfg(64)).encoder
    load_pretrained_encoder(dst, tmp_path / "enc.npz")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_missing_or_unfit_pretrained_file_is_named(tmp_path):
    enc = create_segmenter(_small_encoder_cfg(64)).encoder
    with pytest.raises(FileNotFoundError, match=r"pretrained encoder file not found: .*nope\.npz"):
        load_pretrained_encoder(enc, tmp_path / "nope.npz")
    wide = default_model_config("test", n_cls=3, crop_size=64, d_model=48, n_heads=2, n_layers=1,
                                decoder=dict(rep_grid=[2, 2]))
    torch.save(create_segmenter(wide).encoder.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)wide\.pth does not fit the encoder.*cls_token"):
        load_pretrained_encoder(enc, tmp_path / "wide.pth")
