"""fastvq modules: thin nn.Modules over fastvq ops, with vector-quantize-pytorch's conventions
(``forward`` returns ``quantized, indices, loss``)."""
from fastvq.nn.decode import CompressedKVCache, first_occurrence, merge_causal_mask
from fastvq.nn.lfq import LFQ
from fastvq.nn.mcq import MultiCodebookQuantizer
from fastvq.nn.vq import VectorQuantize
from fastvq.nn.merge import MergingViTBlock, merge_schedule, proportional_attention_bias
from fastvq.nn.simvq import SimVQ

__all__ = ["VectorQuantize", "MultiCodebookQuantizer", "SimVQ", "LFQ", "MergingViTBlock", "merge_schedule",
           "proportional_attention_bias", "CompressedKVCache", "first_occurrence", "merge_causal_mask"]
