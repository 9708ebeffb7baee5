"""ViT adaptation track: pretrained timm ViTs converted to CBSA-style attention (the paper's Fig. 9).

    import timm
    from finetune_vit import convert_vit, create_vit

    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    vit = convert_vit(vit, "cbsa_vee")          # or "cbsa_star", "linear", "mhsa"; same parameters and keys
    vit = create_vit("vit_small_patch16_224", attention="cbsa_star", pretrained_file="vit_small.npz")

Fine-tuning: ``python -m finetune_vit.main --help`` (or ``python main.py`` inside this folder).
"""
from .attention import (ATTENTION_MODULES, CBSAStarAttention, CBSAVeeAttention, ConvertedAttention,
                        ReLULinearAttention, TokenGrid)
from .convert import ATTENTION_CHOICES, convert_vit, set_legacy_token_layout
from .flops import model_flops, vit_flops
from .models import VIT_ARCHS, create_vit, image_size_of, load_pretrained_file

__all__ = [
    "convert_vit", "set_legacy_token_layout", "create_vit", "load_pretrained_file", "image_size_of", "model_flops",
    "vit_flops", "ATTENTION_CHOICES", "VIT_ARCHS", "ATTENTION_MODULES", "ConvertedAttention", "CBSAVeeAttention",
    "CBSAStarAttention", "ReLULinearAttention", "TokenGrid",
]
