"""Pure-PyTorch references of every fastvq op: the oracles the tests compare kernels against."""
from fastvq.reference.mcq import mcq_gather_ref, mcq_search_ref, multi_codebook_quantize_ref

__all__ = ["mcq_search_ref", "mcq_gather_ref", "multi_codebook_quantize_ref"]
