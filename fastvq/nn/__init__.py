"""fastvq modules: thin nn.Modules over fastvq ops, with vector-quantize-pytorch's conventions
(``forward`` returns ``quantized, indices, loss``)."""
from fastvq.nn.lfq import LFQ
from fastvq.nn.mcq import MultiCodebookQuantizer
from fastvq.nn.merge import MergingViTBlock, merge_schedule, proportional_attention_bias

__all__ = ["MultiCodebookQuantizer", "LFQ", "MergingViTBlock", "merge_schedule", "proportional_attention_bias"]
