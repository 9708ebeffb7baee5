"""Coding rates (paper Eq. 1) and the per-layer compression term R^c (paper Fig. 5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cbsa_core import CBSA, coding_rate, compression_term, create_model, layerwise_compression
from cbsa_core.coding_rate import split_heads

F64 = torch.float64


def rate_n_by_n(z: torch.Tensor, eps: float) -> float:
    """Eq. 1 as written: ½ logdet(I_N + d/(N ε²) ZᵀZ) with columns as tokens, i.e. the N×N Gram of rows."""
    n, d = z.shape
    gram = z @ z.T                                                      # (N, N)
    return 0.5 * torch.logdet(torch.eye(n, dtype=F64) + d / (n * eps ** 2) * gram).item()


@pytest.mark.parametrize("n,d", [(5, 12), (30, 4), (8, 8)])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_coding_rate_equals_the_n_by_n_form(n, d, eps):
    z = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(n * d))
    got = coding_rate(z, eps)
    assert got.dtype == F64 and got.shape == ()
    assert got.item() == pytest.approx(rate_n_by_n(z, eps), rel=1e-10)
    # and by singular values: ½ Σ log(1 + d/(Nε²) σ_i²)
    s = torch.linalg.svdvals(z)
    assert got.item() == pytest.approx(0.5 * torch.log1p(d / (n * eps ** 2) * s ** 2).sum().item(), rel=1e-10)


def test_coding_rate_defaults_and_batching():
    z = torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(1))
    got = coding_rate(z)                                                # eps defaults to 0.1 (ε² = 0.01)
    assert got.shape == (3, 2)
    for a in range(3):
        for b in range(2):
            assert got[a, b].item() == pytest.approx(rate_n_by_n(z[a, b].double(), 0.1), rel=1e-9)
    assert coding_rate(torch.zeros(4, 6)).item() == 0.0


def test_compression_term_is_the_sum_over_heads():
    heads = torch.randn(2, 3, 11, 4, dtype=F64, generator=torch.Generator().manual_seed(2))   # (B, H, N, p)
    got = compression_term(heads, eps=0.3)
    assert got.shape == (2,)
    for b in range(2):
        expected = sum(rate_n_by_n(heads[b, k], 0.3) for k in range(3))   # p in place of d inside each subspace
        assert got[b].item() == pytest.approx(expected, rel=1e-10)


def test_split_heads_takes_contiguous_channel_blocks():
    z = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    heads = split_heads(z, 3)
    assert heads.shape == (2, 3, 5, 4)
    for k in range(3):
        assert torch.equal(heads[:, k], z[..., 4 * k:4 * (k + 1)])


def _first_layer_projection(model, img):
    """Tokens entering layer 0's attention, projected by its bases (independent of the hooks)."""
    x, _ = model.embed(img)
    attn = model.transformer.layers[0][0]
    normed = attn.norm(x)
    weight = attn.fn.proj.weight if isinstance(attn.fn, CBSA) else attn.fn.qkv.weight
    return normed @ weight.T


@pytest.mark.parametrize("name", ["cbt_tiny", "mssa_tiny", "tssa_tiny"])
def test_layerwise_compression_one_finite_value_per_layer(name):
    torch.manual_seed(3)
    model = create_model(name, depth=3, image_size=64, patch_size=8, num_classes=5).eval()
    img = torch.randn(2, 3, 64, 64)
    rates = layerwise_compression(model, img)
    assert len(rates) == 3 and all(isinstance(r, float) and math.isfinite(r) for r in rates)
    normalized = layerwise_compression(model, img, normalize=True)
    assert len(normalized) == 3 and all(math.isfinite(r) for r in normalized)

    with torch.no_grad():
        proj = _first_layer_projection(model, img)                      # (B, T, H·p)
    heads = model.attention_layers[0].heads
    p = proj.shape[-1] // heads
    per_image, per_image_unit = [], []
    for b in range(2):
        blocks = [proj[b, :, k * p:(k + 1) * p].double() for k in range(heads)]
        per_image.append(sum(rate_n_by_n(blk, 0.1) for blk in blocks))
        per_image_unit.append(sum(rate_n_by_n(F.normalize(blk, dim=-1), 0.1) for blk in blocks))
    assert rates[0] == pytest.approx(sum(per_image) / 2, rel=1e-4)
    assert normalized[0] == pytest.approx(sum(per_image_unit) / 2, rel=1e-4)
    assert layerwise_compression(model, img, eps=0.5)[0] < rates[0]     # coarser precision, fewer bits
