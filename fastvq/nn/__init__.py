"""fastvq modules: thin nn.Modules over fastvq ops, with vector-quantize-pytorch's conventions
(``forward`` returns ``quantized, indices, loss``)."""
from fastvq.nn.decode import CompressedKVCache, first_occurrence, merge_causal_mask
from fastvq.nn.lfq import LFQ
from fastvq.nn.mcq import MultiCodebookQuantizer

__all__ = ["MultiCodebookQuantizer", "LFQ", "CompressedKVCache", "first_occurrence", "merge_causal_mask"]
