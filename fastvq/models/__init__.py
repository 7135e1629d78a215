"""fastvq.models: the tokenizers and their building blocks (docs/models.md).

Not imported by ``import fastvq``. Plain PyTorch only at import time: the tokenizers (:mod:`fastvq.models.unitok`,
...) share the API of :mod:`fastvq.models.tokenizer` and are assembled from :mod:`fastvq.models.blocks` and
``fastvq.nn``'s quantizers. ``from_preset(name)`` builds a registered preset (``list_presets()``).
"""
from fastvq.models import blocks  # noqa: F401
from fastvq.models.blocks import (AdaptiveGroupNorm, Attention, AttnProjection, Downsample, GeGLU, LayerNorm2d,
                                  MBConv, ResBlock, RoPE2D, Upsample, ViTaminStem, ViTBlock)
from fastvq.models.tokenizer import (Tokenizer, TokenizerOutput, from_preset, from_pretrained, list_presets,
                                     register_preset)
from fastvq.models.mergevq import MergeVQ, MergeVQConfig
from fastvq.models.mergear import MergeAR, MergeARConfig
from fastvq.models.mllm import MLLM, MLLMConfig, VisualCodec, list_mllm_presets, register_mllm_preset
from fastvq.models.text import TextTokenizer
from fastvq.models.unitok import UniTok, UniTokConfig
from fastvq.models.uniwetok import UniWeTok, UniWeTokConfig
from fastvq.models.vqgan import VQGAN, VQGANConfig
from fastvq.models.vqrae import VQRAE, VQRAEConfig

__all__ = ["AdaptiveGroupNorm", "Attention", "AttnProjection", "Downsample", "GeGLU", "LayerNorm2d", "MBConv", "MLLM",
           "MLLMConfig", "MergeAR", "MergeARConfig", "MergeVQ", "MergeVQConfig", "ResBlock", "RoPE2D", "TextTokenizer",
           "Tokenizer", "TokenizerOutput", "UniTok", "UniTokConfig", "UniWeTok", "UniWeTokConfig", "Upsample", "VQGAN",
           "VQGANConfig", "VQRAE", "VQRAEConfig", "ViTBlock", "ViTaminStem", "VisualCodec", "blocks", "from_preset",
           "from_pretrained", "list_mllm_presets", "list_presets", "register_mllm_preset", "register_preset"]
