"""Model definitions: the CBT family (a timm model module, registered on import)."""
from .cbt import CBT, MODEL_CONFIGS, PreNorm, Transformer, checkpoint_filter_fn, recorded_model_config

__all__ = ["CBT", "MODEL_CONFIGS", "PreNorm", "Transformer", "checkpoint_filter_fn", "recorded_model_config"]
