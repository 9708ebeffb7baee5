"""Semantic segmentation track: Segmenter ViT encoder + CBT mask-transformer decoder."""
