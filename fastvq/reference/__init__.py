"""Pure-PyTorch references of every fastvq op: the oracles the tests compare kernels against."""
from fastvq.reference.decode import (decode_attention_full_mask_ref, decode_attention_ref, decode_step_ref,
                                     kv_append_ref)
from fastvq.reference.lfq import (
    lfq_codes_from_indices_ref,
    lfq_entropy_factorized_ref,
    lfq_entropy_ref,
    lfq_loss_ref,
    lfq_quantize_ref,
)
from fastvq.reference.mcq import mcq_gather_ref, mcq_search_ref, multi_codebook_quantize_ref
from fastvq.reference.segment import segment_sum_ref
from fastvq.reference.merge import (
    bipartite_merge_ref,
    compose_source_ref,
    tome_merge_dense_ref,
    unmerge_dense_ref,
    unmerge_ref,
)

__all__ = [
    "mcq_search_ref", "mcq_gather_ref", "multi_codebook_quantize_ref",
    "lfq_quantize_ref", "lfq_codes_from_indices_ref", "lfq_entropy_ref", "lfq_entropy_factorized_ref",
    "lfq_loss_ref",
    "bipartite_merge_ref", "compose_source_ref", "unmerge_ref", "tome_merge_dense_ref", "unmerge_dense_ref",
    "decode_attention_ref", "kv_append_ref", "decode_step_ref", "decode_attention_full_mask_ref",
    "segment_sum_ref",
]
