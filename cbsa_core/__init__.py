"""cbsa_core: Contract-and-Broadcast Self-Attention, its family, CBT models and shared tooling.

Public API::

    from cbsa_core import CBSA, create_model, load_checkpoint, list_models
    layer = CBSA(dim=384, heads=6, dim_head=64)              # rep_grid=(8, 8), one [CLS] prefix token
    y = layer(x, grid_size=(14, 14))                         # (B, 1 + 14*14, 384) -> same shape
    model = create_model("cbt_small", pretrained="cbt_small_best.pth.tar")
    model = timm.create_model("cbt_small", pretrained=True, pretrained_cfg_overlay=dict(file="cbt_small_best.pth.tar"))

Importing the package registers the CBT family with timm (module ``cbt``: ``timm.list_models(module="cbt")``).
"""
from .checkpoint import (CheckpointError, CheckpointMismatchError, atomic_save, load_checkpoint, read_checkpoint,
                         save_model_checkpoint)
from .coding_rate import coding_rate, compression_term, layerwise_compression
from .layers import CBSA, ISTA, MSSA, TSSA, ConvPatchEmbed, build_attention, resample_pos_embed
from .models import CBT
from .registry import create_model, list_models, model_config

__version__ = "0.1.0"

__all__ = [
    "CBSA", "MSSA", "TSSA", "ISTA", "ConvPatchEmbed", "CBT", "build_attention", "resample_pos_embed",
    "create_model", "list_models", "model_config", "load_checkpoint", "save_model_checkpoint", "read_checkpoint",
    "atomic_save", "CheckpointError", "CheckpointMismatchError", "coding_rate", "compression_term",
    "layerwise_compression",
]
