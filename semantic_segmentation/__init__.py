"""Semantic segmentation track: Segmenter ViT encoder + the CBT mask-transformer decoder (paper Fig. 8 left) and
the decoders it is compared with (Segmenter's mask transformer and linear decoder, DEPICT-SA/CA, ToST; Fig. 8).

    from semantic_segmentation import load_model, build_dataset, evaluate_miou, save_pretrained
    model = load_model("log/CBT-Small/checkpoint.pth")        # ours, CBSA's, Segmenter's or DEPICT's files
    logits = model(images)                                     # (B, 3, H, W) -> (B, n_cls, H, W)
    val = build_dataset("ade20k", "/data", "val", mode="eval", normalization=model.model_config["normalization"])
    scores = evaluate_miou(model, val, window_size=512, window_stride=480)   # mean_iou, per_class_iou, ...
    save_pretrained(model, "export/cbt_s")                     # config.json + model.safetensors; load_model(DIR)

Entry points: ``python main.py`` (training) and ``python eval.py CKPT ade20k --singlescale`` inside this folder,
or ``python -m semantic_segmentation.main`` / ``-m semantic_segmentation.eval``.
"""
from .data import ADE20K, DatasetError, SegmentationFolder, build_dataset
from .decoder import (DepictCAMaskTransformer, LinearDecoder, MaskDecoder, MaskTransformer,
                      SegmenterMaskTransformer)
from .decoders import DECODERS, build_decoder, resolve_decoder_config
from .depict_attention import DepictAttention
from .encoder import BACKBONES, SegmenterViT, create_encoder, load_pretrained_encoder
from .flops import decoder_flops
from .inference import MS_RATIOS, evaluate_miou, predict, predict_probabilities, sliding_window_logits
from .metrics import confusion_matrix, metrics_from_confusion
from .model import Segmenter, create_segmenter, default_model_config, load_model
from .pretrained import save_pretrained

__all__ = [
    "Segmenter", "SegmenterViT", "BACKBONES", "create_encoder", "load_pretrained_encoder",
    "MaskDecoder", "MaskTransformer", "SegmenterMaskTransformer", "DepictCAMaskTransformer", "LinearDecoder",
    "DepictAttention", "DECODERS", "build_decoder", "resolve_decoder_config", "decoder_flops",
    "create_segmenter", "default_model_config", "load_model", "save_pretrained",
    "ADE20K", "SegmentationFolder", "DatasetError", "build_dataset",
    "MS_RATIOS", "sliding_window_logits", "predict_probabilities", "predict", "evaluate_miou",
    "confusion_matrix", "metrics_from_confusion",
]
