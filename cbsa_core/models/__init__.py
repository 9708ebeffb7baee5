"""Model definitions."""
from .cbt import CBT, PreNorm, Transformer

__all__ = ["CBT", "PreNorm", "Transformer"]
