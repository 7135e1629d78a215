"""fastvq.models: the tokenizers' building blocks (:mod:`fastvq.models.blocks`; docs/models.md).

Not imported by ``import fastvq``. Plain PyTorch only: the model files of UniTok, MergeVQ, VQRAE and UniWeTok are
assembled from these blocks and ``fastvq.nn``'s quantizers.
"""
from fastvq.models import blocks  # noqa: F401
from fastvq.models.blocks import (AdaptiveGroupNorm, Attention, AttnProjection, Downsample, GeGLU, LayerNorm2d,
                                  MBConv, ResBlock, RoPE2D, Upsample, ViTaminStem, ViTBlock)

__all__ = ["AdaptiveGroupNorm", "Attention", "AttnProjection", "Downsample", "GeGLU", "LayerNorm2d", "MBConv",
           "ResBlock", "RoPE2D", "Upsample", "ViTBlock", "ViTaminStem", "blocks"]
