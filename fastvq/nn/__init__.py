"""fastvq modules: thin nn.Modules over fastvq ops, with vector-quantize-pytorch's conventions
(``forward`` returns ``quantized, indices, loss``)."""
from fastvq.nn.lfq import LFQ
from fastvq.nn.mcq import MultiCodebookQuantizer

__all__ = ["MultiCodebookQuantizer", "LFQ"]
