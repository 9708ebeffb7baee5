"""Independent re-implementation of the authors' released classification code, used as a test oracle.

An independent re-statement of the authors' code as docs/authors-release.md describes it (§1.1.3 architectures,
§1.1.7 checkpoint layout, §2.1 CBSA, §2.4 MSSA, §2.5 TSSA, §2.6 ISTA, §2.7 ConvPatchEmbed, §2.8 composition; the
§ and item numbers below are that page's), NOT derived from cbsa_core: it deliberately keeps every quirk of the
release so that the authors' checkpoints can be mimicked:

* CBSA infers a square grid with ``int(sqrt(n))`` and pools ``w[:, :-1]`` (the [CLS] token lands in
  grid cell (0, 0), the last patch is never pooled), with a hard-coded 8×8 pool and ``reshape(b, 64, ...)``;
  the pooled reshape uses the input width ``c`` (so only ``heads * dim_head == dim`` works, as released).
* The training ``forward`` adds ``pos_embedding[:, :n + 1]`` without interpolation.
* ISTA has no outer residual; η = λ = 0.1 are constants.
* Module names follow the release (``to_patch_embedding.proj.{0,2,4,6}.{0,1}``,
  ``transformer.layers.{i}.{0,1}.{norm,fn}``, ``mlp_head.{0,1}``), so ``state_dict()`` keys are the keys
  of the released checkpoints once ``module.`` is stripped.

The original CRATE (Ma-Lab-Berkeley/CRATE ``model/crate.py``, which the release ships as ``crate.py`` and uses
as arch ``CRATE_small_Yu``) is re-stated at the end from CRATE's equations: einops patchify, LN -> Linear -> LN,
``to_out = Sequential(Linear, Dropout)`` (Identity when heads == 1 and dim_head == dim), CRATE's own size names.

Nothing here imports cbsa_core.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CBSA", "MSSA", "TSSA", "ISTA", "PreNorm", "ConvPatchEmbed", "Transformer", "VisionTransformer",
           "ARCHS", "build", "save_authors_checkpoint", "randomize_", "CrateAttention", "CRATE", "CRATE_ARCHS",
           "build_crate"]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, h*d) -> (b, h, n, d)."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(b, h, n, d) -> (b, n, h*d)."""
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


class CBSA(nn.Module):
    """§2.1. ``forward(x (b, n, D)) -> (b, n, D)``; ``return_attn`` gives Aᵀ·A (b, H, n, n)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.pool = nn.AdaptiveAvgPool2d((8, 8))
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))
        self.proj = nn.Linear(dim, inner_dim, bias=False)
        self.qkv = nn.Identity()
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        gh = gw = int(math.sqrt(n))                                     # step 1: square grid assumed
        w = self.proj(x)                                                # step 2
        self.qkv(w)                                                     # step 3: hook point, result discarded
        grid = w[:, :-1, :].reshape(b, gh, gw, c).permute(0, 3, 1, 2)   # step 4: drops the LAST token
        rep = self.pool(grid).reshape(b, c, 64).permute(0, 2, 1)        # (b, 64, c), pooled before head split
        w = _split_heads(w, self.heads)                                 # step 5
        rep = rep.reshape(b, 64, self.heads, -1).permute(0, 2, 1, 3)
        attn = self.attend(torch.matmul(rep, w.transpose(-1, -2)) * self.scale)   # step 6: (b, H, 64, n)
        if return_attn:                                                 # step 7
            return torch.matmul(attn.transpose(-1, -2), attn)
        delta = torch.matmul(attn, w)
        rep = rep + self.step_rep * delta                               # step 8
        contracted = torch.matmul(self.attend(torch.matmul(rep, rep.transpose(-1, -2)) * self.scale), rep)  # 9
        dx = torch.matmul(attn.transpose(-1, -2), contracted)           # step 10
        dx = self.step_x * dx                                           # step 11
        return self.to_out(_merge_heads(dx))                            # step 12


class MSSA(nn.Module):
    """§2.4 (CRATE attention): q = k = v = one bias-free projection; ``to_out`` always present."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.project_out = not (heads == 1 and dim_head == dim)  # computed but unused, as released
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> torch.Tensor:
        w = _split_heads(self.qkv(x), self.heads)
        attn = self.attend(torch.matmul(w, w.transpose(-1, -2)) * self.scale)
        if return_attn:
            return attn
        return self.to_out(_merge_heads(torch.matmul(attn, w)))


class TSSA(nn.Module):
    """§2.5 (ToST attention): Linear D->D regardless of dim_head; Π is a softmax over heads."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.attend = nn.Softmax(dim=1)
        self.temp = nn.Parameter(torch.ones(heads, 1))
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> torch.Tensor:
        w = _split_heads(self.qkv(x), self.heads)                       # (b, H, n, d)
        if return_attn:
            return self.attend(torch.matmul(w, w.transpose(-1, -2)))
        w_normed = F.normalize(w, dim=-2)                               # each feature column over tokens
        pi = self.attend((w_normed ** 2).sum(dim=-1) * self.temp)       # (b, H, n), softmax over heads
        weights = (pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)).unsqueeze(-2)   # (b, H, 1, n)
        moments = torch.matmul(weights, w ** 2)                         # (b, H, 1, d)
        out = -(w * pi.unsqueeze(-1)) * (1.0 / (1 + moments))
        return self.to_out(_merge_heads(out))


class ISTA(nn.Module):
    """§2.6: ReLU(x + η (x W − x Wᵀ W) − η λ) with the release's three products."""

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, dropout: float = 0.0, step_size: float = 0.1,
                 lambd: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size = step_size
        self.lambd = lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.linear(x, self.weight)                 # x Wᵀ
        grad_1 = F.linear(x1, self.weight.t())        # x Wᵀ W
        grad_2 = F.linear(x, self.weight.t())         # x W
        update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
        return F.relu(x + update)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


def _conv3x3(in_ch: int, out_ch: int) -> nn.Sequential:
    # The release uses SyncBatchNorm; BatchNorm2d has identical keys and the same eval-mode maths.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch))


class ConvPatchEmbed(nn.Module):
    """§2.7. Only patch sizes 16 and 8; 3 input channels are hard-coded (``in_chans`` is ignored)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 padding_size: int = 0) -> None:
        super().__init__()
        d = embed_dim
        if patch_size == 16:
            self.proj = nn.Sequential(_conv3x3(3, d // 8), nn.GELU(), _conv3x3(d // 8, d // 4), nn.GELU(),
                                      _conv3x3(d // 4, d // 2), nn.GELU(), _conv3x3(d // 2, d))
        elif patch_size == 8:
            self.proj = nn.Sequential(_conv3x3(3, d // 4), nn.GELU(), _conv3x3(d // 4, d // 2), nn.GELU(),
                                      _conv3x3(d // 2, d))
        else:
            raise TypeError("For convolutional projection, patch size has to be in [8, 16]")  # release: raise("…")
        self.num_patches = (img_size // patch_size) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Transformer(nn.Module):
    """§2.8: z = x + Attn(LN x); x = ISTA(LN z), no residual around ISTA."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, attn: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, attn(dim, heads=heads, dim_head=dim_head)), PreNorm(dim, ISTA(dim))])
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = ff(attn(x) + x)
        return x


class VisionTransformer(nn.Module):
    """§2.8 composition with ``pool='cls'``: logits = Linear(LN(x[:, 0]))."""

    def __init__(self, *, attn: Callable[..., nn.Module], image_size: int = 224, patch_size: int = 16,
                 num_classes: int = 1000, dim: int = 384, depth: int = 12, heads: int = 6, pool: str = "cls",
                 channels: int = 3) -> None:
        super().__init__()
        dim_head = dim // heads
        self.to_patch_embedding = ConvPatchEmbed(image_size, patch_size, channels, dim)
        num_patches = self.to_patch_embedding.num_patches
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, attn)
        self.pool = pool
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embedding[:, :n + 1]       # no interpolation in the training forward
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(x)


# §1.1.3: arch -> (attention, dim, depth, heads); dim_head = dim // heads = 64 everywhere.
ARCHS: Dict[str, tuple] = {
    "Ours_tiny": (CBSA, 192, 12, 3), "Ours_small": (CBSA, 384, 12, 6),
    "Ours_base": (CBSA, 768, 12, 12), "Ours_large": (CBSA, 1024, 24, 16),  # release: undefined `Ours` (item 1)
    "CRATE_tiny": (MSSA, 192, 12, 3), "CRATE_small": (MSSA, 384, 12, 6),
    "ToST_tiny": (TSSA, 192, 12, 3), "ToST_small": (TSSA, 384, 12, 6),
}


def build(arch: str, **overrides: Any) -> VisionTransformer:
    """The release's model factory, with optional overrides (e.g. ``depth=2``) to keep tests small."""
    attn, dim, depth, heads = ARCHS[arch]
    cfg = dict(attn=attn, dim=dim, depth=depth, heads=heads, image_size=224, patch_size=16, num_classes=1000)
    cfg.update(overrides)
    return VisionTransformer(**cfg)


@torch.no_grad()
def randomize_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give every parameter and BatchNorm buffer a non-default random value (so no key can load by luck)."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith("weight"):                      # LayerNorm / BatchNorm scales
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
        elif p.dim() >= 2 and not name.startswith(("pos_embedding", "cls_token")):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=generator))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=generator))
            mod.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=generator)))
    return model


def save_authors_checkpoint(model: nn.Module, path, *, arch: str, epoch: int, best_acc1: Any,
                            optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """The release's ``save_checkpoint``: a plain ``torch.save`` of §1.1.7's dict, with the
    DataParallel/DDP ``module.`` prefix on every state_dict key."""
    state_dict = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save({"epoch": epoch + 1, "arch": arch, "state_dict": state_dict, "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


# ------------------------------------------------------------------------------------------------
# The original CRATE (Ma-Lab-Berkeley/CRATE model/crate.py; the release's crate.py)
# ------------------------------------------------------------------------------------------------
class CrateAttention(nn.Module):
    """CRATE's MSSA: w = x U (no bias), softmax(w wᵀ/√p) w per head, then ``to_out = Sequential(Linear,
    Dropout)``, or Identity when heads == 1 and dim_head == dim (no output projection at all)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from einops import rearrange

        w = rearrange(self.qkv(x), "b n (h d) -> b h n d", h=self.heads)
        attn = self.attend(torch.matmul(w, w.transpose(-1, -2)) * self.scale)
        return self.to_out(rearrange(torch.matmul(attn, w), "b h n d -> b n (h d)"))


class CRATE(nn.Module):
    """CRATE's classifier: einops patchify '(h p1) (w p2) -> (h w) (p1 p2 c)', LN -> Linear -> LN, [CLS] and
    ``pos_embedding[:, :n + 1]``, the layers, then LN + Linear on [CLS] (``pool='cls'``) or on the mean of ALL
    tokens, [CLS] included (``pool='mean'``)."""

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 pool: str = "cls", channels: int = 3, dim_head: int = 64) -> None:
        super().__init__()
        from einops.layers.torch import Rearrange

        assert image_size % patch_size == 0 and pool in {"cls", "mean"}
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size * patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, CrateAttention)
        self.pool = pool
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embedding[:, :n + 1]
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(x)


# CRATE's own sizes (its main.py --arch names): name -> (dim, depth, heads), dim_head = dim // heads.
CRATE_ARCHS: Dict[str, tuple] = {
    "CRATE_tiny": (384, 12, 6), "CRATE_small": (576, 12, 12), "CRATE_base": (768, 12, 12),
    "CRATE_large": (1024, 24, 16),
}


def build_crate(arch: str, **overrides: Any) -> CRATE:
    """CRATE's factory (``CRATE_base()`` etc.: 224², patch 16, 1000 classes), with overrides such as depth=1."""
    dim, depth, heads = CRATE_ARCHS[arch]
    cfg = dict(image_size=224, patch_size=16, num_classes=1000, dim=dim, depth=depth, heads=heads,
               dim_head=dim // heads)
    cfg.update(overrides)
    return CRATE(**cfg)
