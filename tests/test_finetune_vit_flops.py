"""Analytic FLOPs of the ViT-adaptation variants (paper Fig. 9, and the per-layer FLOPs-versus-N plots) and
scripts/vit_flops.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from finetune_vit import convert_vit
from finetune_vit.flops import VIT_SHAPES, attention_macs, model_flops, vit_flops

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "vit_flops.py"


def test_totals_match_hand_computation():
    # ViT-S/16 at 224, MHSA: N = 197, d = 384 (d² = 147456), 12 layers.
    #   attention 4·197·147456 + 2·197²·384 = 116195328 + 29805312 = 146000640 MACs
    #   MLP       8·197·147456                                    = 232390656 MACs
    #   patch embed 196·(3·16²)·384 = 57802752; head 384·1000 = 384000
    #   total = 12·378391296 + 57802752 + 384000 = 4598882304 MACs = 9197764608 FLOPs
    small = vit_flops(VIT_SHAPES["small"], 224, "mhsa")
    assert small["total"] == 9197764608
    assert small["attention"] == 2 * 12 * 146000640
    # ViT-T/16 at 224, released CBSA^v (m = 64): attention 4·197·36864 + 4·197·64·192 = 38731776 MACs,
    # MLP 58097664, patch 28901376, head 192000 -> 12·96829440 + 29093376 = 1191046656 MACs.
    assert vit_flops(VIT_SHAPES["tiny"], 224, "cbsa_vee")["total"] == 2 * 1191046656
    # ViT-B at 384 (N = 577, d = 768, m = 64), CBSA* per layer: 4·577·768² + 3·577·64·768 + 2·64²·768.
    assert attention_macs("cbsa_star", 577, 768, 12, 64) == 1361313792 + 85082112 + 6291456
    # Linear attention per layer at N = 197, d = 192, p = 64: 4·197·36864 + 2·197·64·192.
    assert attention_macs("linear", 197, 192, 3, 64) == 29048832 + 4841472


@pytest.mark.parametrize("variant,n,paper", [
    # ViT-T (d = 192) per-layer GFLOPs read off the authors' README plot of FLOPs against N (digitised)
    ("mhsa", 196, 0.088), ("cbsa_star", 196, 0.075), ("linear", 196, 0.067),
    ("mhsa", 4096, 14.1), ("cbsa_star", 4096, 1.5), ("linear", 4096, 1.4),
])
def test_per_layer_flops_match_paper_plots(variant, n, paper):
    ours = 2 * attention_macs(variant, n, 192, 3, 64) / 1e9
    assert ours == pytest.approx(paper, rel=0.03)


def test_fig9_totals_within_digitisation_error():
    # MHSA and CBSA* at 224/384 for S and B: within 1.5 % of the digitised Fig. 9 points.
    for (res, size, variant, paper) in [(224, "small", "mhsa", 9.1), (224, "base", "cbsa_star", 34.2),
                                        (384, "small", "cbsa_star", 25.9), (384, "base", "mhsa", 110.6)]:
        ours = vit_flops(VIT_SHAPES[size], res, variant)["total"] / 1e9
        assert ours == pytest.approx(paper, rel=0.015), (res, size, variant)


@pytest.mark.parametrize("attention,kwargs", [("mhsa", {}), ("cbsa_vee", {}), ("cbsa_star", {}),
                                              ("cbsa_star", dict(broadcast="softmax")), ("linear", {})])
def test_model_flops_equal_counted_flops(attention, kwargs):
    model = timm.create_model("vit_tiny_patch16_224", img_size=(64, 96), patch_size=8, embed_dim=64, depth=2,
                              num_heads=2, num_classes=10).eval()
    convert_vit(model, attention, rep_grid=(4, 4), **kwargs)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 64, 96))
    analytic = model_flops(model, (64, 96))["total"]
    n, width = 1 + 8 * 12, 64
    # The paper's linear-attention count leaves out the normaliser φ(q)·mean φ(k): N·I MACs per layer.
    extra = 2 * 2 * n * width if attention == "linear" else 0
    assert counter.get_total_flops() == analytic + extra


def test_script_prints_ours_next_to_paper(capsys):
    spec = importlib.util.spec_from_file_location("vit_flops_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--sizes", "small", "--resolutions", "224"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("vit_small_patch16_224"))
    assert "9.20 /    9.1 ( +1.1%)" in row  # MHSA
    assert "8.91 /    8.9 ( +0.1%)" in row  # CBSA*
    assert "8.95 /    8.7 ( +2.8%)" in row  # CBSA^v as released
    script.main(["--sizes", "small", "--resolutions", "224", "--vee-paper-count"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vit_small_patch16_224"))
    assert row.rstrip().endswith("8.71 /    8.7 ( +0.2%)")
    with pytest.raises(SystemExit):
        script.main(["--sizes", "huge"])
