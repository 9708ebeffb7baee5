"""Independent re-statement of the released segmentation code, used as a test oracle.

Written from the releases' equations (rstrudel/segmenter ``segm/model/{vit,blocks,decoder,segmenter}.py``,
QishuaiWen/DEPICT ``model/{decoder,dec_blocks}.py``; docs/authors-release.md §1.3.5, §4.1, §4.6), NOT from the
semantic_segmentation package, which it never imports. Module names follow the releases so that ``state_dict()``
keys are the keys of their checkpoints. Like the releases, the decoders take ``(x, im_size=(H, W))`` and
rearrange the masks with ``h = H // patch_size``.

* Segmenter's ViT (optionally distilled: [CLS], [DIST]), its ``Block`` (pre-norm MHSA + GELU MLP), its
  ``DecoderLinear`` and ``MaskTransformer`` (proj_dec, blocks, decoder_norm, proj_patch/proj_classes,
  cosine masks, mask_norm) and ``Segmenter.forward`` (pad, encode, drop prefix tokens, decode, upsample, unpad);
* DEPICT's ``Attention`` (raw ``proj`` tied in and out, scalar ``step_size``; ``ortho(..., None)`` is the
  identity), its ``PreNorm``/``Transformer`` (with the ``query=`` branch that DEPICT-CA uses: only ``x`` is
  normalised), and its ``MaskTransformer`` in modes ``sa`` and ``ca``;
* the ToST decoder: the CBT decoder's skeleton around the released TSSA (``official_reference.TSSA``);
* :func:`write_release_checkpoint`: the ``checkpoint.pth`` + ``variant.yml`` pair their ``train.py`` writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import official_reference

# ------------------------------------------------------------------------------------------------ Segmenter


class RefBlockAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)), attn


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: Optional[int] = None) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RefBlockAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), RefMlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + y
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class RefViT(nn.Module):
    """Segmenter's vit.py: pos_embed for the crop grid, resized bilinearly (segm/model/utils.resize_pos_embed)."""

    def __init__(self, crop: int, patch: int, dim: int, depth: int, heads: int, distilled: bool = False) -> None:
        super().__init__()
        self.patch, self.grid, self.distilled = patch, crop // patch, int(distilled)
        self.patch_embed = RefPatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        if distilled:
            self.dist_token = nn.Parameter(torch.randn(1, 1, dim))
            self.head_dist = nn.Linear(dim, 1000)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2 + 1 + self.distilled, dim))
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        b, _, H, W = im.shape
        x = self.patch_embed.proj(im).flatten(2).transpose(1, 2)
        tokens = [self.cls_token.expand(b, -1, -1)] + ([self.dist_token.expand(b, -1, -1)] if self.distilled else [])
        x = torch.cat(tokens + [x], dim=1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            extra = 1 + self.distilled
            tok, grid = pos[:, :extra], pos[0, extra:]
            grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(H // self.patch, W // self.patch), mode="bilinear")
            pos = torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], dim=1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _masks_to_grid(masks: torch.Tensor, H: int, patch: int) -> torch.Tensor:
    """einops ``b (h w) n -> b n h w`` with h = H // patch."""
    b, n, k = masks.shape
    gh = H // patch
    return masks.reshape(b, gh, n // gh, k).permute(0, 3, 1, 2)


class RefDecoderLinear(nn.Module):
    def __init__(self, n_cls: int, patch: int, d_encoder: int) -> None:
        super().__init__()
        self.patch = patch
        self.head = nn.Linear(d_encoder, n_cls)

    def forward(self, x: torch.Tensor, im_size) -> torch.Tensor:
        return _masks_to_grid(self.head(x), im_size[0], self.patch)


class RefSegmenterMaskTransformer(nn.Module):
    """segm/model/decoder.py MaskTransformer (heads = d_model // 64 is the factory's choice, a parameter here)."""

    def __init__(self, n_cls: int, patch: int, d_encoder: int, n_layers: int, n_heads: int, d_model: int,
                 d_ff: int) -> None:
        super().__init__()
        self.n_cls, self.patch = n_cls, patch
        self.blocks = nn.ModuleList([RefBlock(d_model, n_heads, d_ff) for _ in range(n_layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.proj_dec(x), self.cls_emb.expand(x.size(0), -1, -1)), 1)

    def forward(self, x: torch.Tensor, im_size) -> torch.Tensor:
        x = self._tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, :-self.n_cls] @ self.proj_patch, x[:, -self.n_cls:] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        return _masks_to_grid(self.mask_norm(patches @ cls_seg_feat.transpose(1, 2)), im_size[0], self.patch)

    def get_attention_map(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        x = self._tokens(x)
        for i, blk in enumerate(self.blocks):
            if i < layer_id:
                x = blk(x)
            else:
                return blk(x, return_attention=True)


# --------------------------------------------------------------------------------------------------- DEPICT


class RefDepictAttention(nn.Module):
    """dec_blocks.Attention: ``proj`` (inner, dim) tied in and out, scalar ``step_size``, no ``to_out``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.proj = nn.Parameter((dim ** -0.5) * torch.randn(heads * dim_head, dim))
        self.step_size = nn.Parameter(torch.randn(1))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        proj = self.proj  # ortho(proj, heads, dim_head, operation=None) returns it unchanged
        w = self._split(x @ proj.t())
        if query is not None:
            dots = torch.matmul(self._split(query @ proj.t()), w.transpose(-1, -2)) * self.scale
        else:
            dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        out = torch.matmul(torch.softmax(dots, dim=-1), w)
        b, h, n, d = out.shape
        out = out.permute(0, 2, 1, 3).reshape(b, n, h * d) @ proj
        return self.step_size * out


class RefDepictTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([official_reference.PreNorm(dim, RefDepictAttention(dim, heads, dim_head))
                                     for _ in range(depth)])

    def forward(self, x: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        if query is not None:
            for attn in self.layers:
                query = attn(x, query=query) + query  # PreNorm normalises x only
            return query
        for attn in self.layers:
            x = attn(x) + x
        return x


class RefDepictMaskTransformer(nn.Module):
    """model/decoder.py MaskTransformer; ``dim_head`` (100) and the cnet's 3 layers × 50 are the release's."""

    def __init__(self, n_cls: int, patch: int, n_layers: int, n_heads: int, d_model: int, mode: str = "sa",
                 dim_head: int = 100, cross_layers: int = 3, cross_dim_head: int = 50) -> None:
        super().__init__()
        self.n_cls, self.patch, self.mode = n_cls, patch, mode
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        if mode == "sa":
            self.net = RefDepictTransformer(d_model, n_layers, n_heads, dim_head)
            self.decoder_norm = nn.LayerNorm(d_model)
        else:
            self.snet = RefDepictTransformer(d_model, n_layers, n_heads, dim_head)
            self.cnet = RefDepictTransformer(d_model, cross_layers, n_heads, cross_dim_head)
            self.snorm = nn.LayerNorm(d_model)
            self.cnorm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x: torch.Tensor, im_size) -> torch.Tensor:
        cls_emb = self.cls_emb.expand(x.size(0), -1, -1)
        if self.mode == "sa":
            x = self.decoder_norm(self.net(torch.cat((x, cls_emb), 1)))
            patches, cls_seg_feat = x[:, :-self.n_cls], x[:, -self.n_cls:]
        else:
            x = self.snorm(self.snet(x))
            patches, cls_seg_feat = x, self.cnorm(self.cnet(x, query=cls_emb))
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        return _masks_to_grid(self.mask_norm(patches @ cls_seg_feat.transpose(1, 2)), im_size[0], self.patch)


# ----------------------------------------------------------------------------------------------------- ToST


class _Layers(nn.Module):
    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RefTostMaskTransformer(nn.Module):
    """The CBT decoder's skeleton (classes appended, attention-only pre-norm layers, decoder_norm, cosine masks,
    mask_norm) around the released TSSA."""

    def __init__(self, n_cls: int, patch: int, n_layers: int, n_heads: int, d_model: int) -> None:
        super().__init__()
        self.n_cls, self.patch = n_cls, patch
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.net = _Layers([official_reference.PreNorm(d_model, official_reference.TSSA(d_model, n_heads))
                            for _ in range(n_layers)])
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x: torch.Tensor, im_size) -> torch.Tensor:
        x = torch.cat((x, self.cls_emb.expand(x.size(0), -1, -1)), 1)
        for layer in self.net.layers:
            x = layer(x) + x
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        return _masks_to_grid(self.mask_norm(patches @ cls_seg_feat.transpose(1, 2)), im_size[0], self.patch)


# ------------------------------------------------------------------------------------------------ the model


class RefSegmenter(nn.Module):
    """segm/model/segmenter.py: pad to the patch size, encode, drop [CLS] (and [DIST]), decode, upsample, unpad."""

    def __init__(self, encoder: RefViT, decoder: nn.Module) -> None:
        super().__init__()
        self.patch = encoder.patch
        self.encoder, self.decoder = encoder, decoder

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        H0, W0 = im.shape[2:]
        im = F.pad(im, (0, (-W0) % self.patch, 0, (-H0) % self.patch), value=0)
        H, W = im.shape[2:]
        x = self.encoder(im)[:, 1 + self.encoder.distilled:]
        masks = F.interpolate(self.decoder(x, (H, W)), size=(H, W), mode="bilinear")
        return masks[:, :, :H0, :W0]


def perturb_norms_(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Random LayerNorm affines (a swapped or skipped norm then shows up) and a small position embedding."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.mul_(scale)
    return model


def segmenter_variant(*, crop: int, patch: int, dim: int, depth: int, heads: int, n_cls: int,
                      decoder: Dict[str, Any], backbone: str = "vit_tiny_test", normalization: str = "vit",
                      distilled: bool = False) -> Dict[str, Any]:
    """The variant.yml dict of Segmenter's train.py (``image_size`` a tuple, as it stores it)."""
    return dict(
        world_batch_size=8, version="normal", resume=True,
        dataset_kwargs=dict(dataset="ade20k", image_size=crop, crop_size=crop, batch_size=8,
                            normalization=normalization, split="train", num_workers=10),
        algorithm_kwargs=dict(batch_size=8, start_epoch=0, num_epochs=64, eval_freq=2),
        optimizer_kwargs=dict(opt="sgd", lr=0.001, weight_decay=0.0, momentum=0.9, clip_grad=None,
                              sched="polynomial", epochs=64, min_lr=1e-5, poly_power=0.9, poly_step_size=1),
        net_kwargs=dict(image_size=(crop, crop), patch_size=patch, d_model=dim, n_heads=heads, n_layers=depth,
                        normalization=normalization, distilled=distilled, backbone=backbone, dropout=0.0,
                        drop_path_rate=0.1, decoder=decoder, n_cls=n_cls),
        amp=False, log_dir="log/run",
        inference_kwargs=dict(im_size=crop, window_size=crop, window_stride=crop),
    )


def write_release_checkpoint(folder: Path, model: nn.Module, n_cls: int, variant: Dict[str, Any],
                             state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """``checkpoint.pth`` as Segmenter's train.py saves it, and ``variant.yml`` (plain ``yaml.dump``, which writes
    ``!!python/tuple`` like the release)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pth"
    torch.save({"model": state_dict if state_dict is not None else model.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "momentum": 0.9, "params": []}]},
                "n_cls": n_cls, "lr_scheduler": {"last_epoch": 100, "base_lrs": [1e-3]}, "epoch": 4}, path)
    (folder / "variant.yml").write_text(yaml.dump(variant))
    return path

