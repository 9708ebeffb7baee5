"""ViT adaptation track: timm ViTs converted to CBSA-style attention."""
