"""fastvq ops: every function calls a ``torch.ops.fastvq.*`` op (CPU and CUDA kernels, fake kernels for
torch.compile, autograd where differentiable)."""
from fastvq.ops.decode import decode_attention, decode_step, kv_append
from fastvq.ops.lfq import lfq_codes_from_indices, lfq_entropy, lfq_quantize
from fastvq.ops.mcq import mcq_gather, mcq_search
from fastvq.ops.segment import segment_sum
from fastvq.ops.kmeans import KMeansResult, kmeans
from fastvq.ops.merge import bipartite_merge, bipartite_merge_backward, compose_source, unmerge, unmerge_backward

__all__ = ["mcq_search", "mcq_gather", "lfq_quantize", "lfq_codes_from_indices", "lfq_entropy",
           "bipartite_merge", "bipartite_merge_backward", "compose_source", "unmerge", "unmerge_backward",
           "decode_attention", "kv_append", "decode_step", "segment_sum", "kmeans", "KMeansResult"]
