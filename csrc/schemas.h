// Every op's schema, written once. fastvq.cpp defines them in the `fastvq` library; the CUDA emulation
// build (csrc/emu/) defines the same schemas in `fastvq_emu`, where the CUDA launchers run on the CPU.
// Add an op here, then register its kernels with TORCH_LIBRARY_IMPL in its family's files.
#pragma once

#define FASTVQ_FOR_EACH_SCHEMA(X)                                                                    \
  /* Multi-codebook nearest-code search (UniTok MCQ). docs/ops/mcq.md */                             \
  X("mcq_search(Tensor z, Tensor codebooks, str metric=\"l2\") -> (Tensor indices, Tensor scores)")  \
  X("mcq_gather(Tensor indices, Tensor codebooks) -> Tensor")                                        \
  /* Lookup-free / binary quantization (MergeVQ LFQ, BSQ, UniWeTok). docs/ops/lfq.md */              \
  X("lfq_quantize(Tensor z, int group_bits=0, str bit_order=\"msb\") -> (Tensor codes, Tensor indices)") \
  X("lfq_codes_from_indices(Tensor indices, int dim, int group_bits=0, ScalarType? dtype=None, "     \
    "str bit_order=\"msb\") -> Tensor")                                                               \
  X("lfq_entropy(Tensor z, float temperature=0.01, int group_bits=0, Tensor? weight=None, "          \
    "str bit_order=\"msb\") -> (Tensor sample_entropy, Tensor codebook_entropy, Tensor code_probs)")  \
  X("lfq_entropy_backward(Tensor? grad_sample, Tensor? grad_codebook, Tensor? grad_code_probs, "     \
    "Tensor z, Tensor code_probs, float temperature, int group_bits, Tensor? weight, str bit_order) "  \
    "-> Tensor")                                                                                     \
  /* Token merging with a source map (ToMe / MergeVQ). docs/ops/merge.md */                          \
  X("bipartite_merge(Tensor x, Tensor metric, Tensor sizes, int r, bool protect_first=False) -> "    \
    "(Tensor merged, Tensor merged_sizes, Tensor assign)")                                           \
  X("bipartite_merge_backward(Tensor grad_merged, Tensor sizes, Tensor merged_sizes, Tensor assign) -> " \
    "Tensor")                                                                                        \
  X("compose_source(Tensor source, Tensor assign) -> Tensor")                                        \
  X("unmerge(Tensor merged, Tensor source) -> Tensor")                                               \
  X("unmerge_backward(Tensor grad, Tensor source, int num_tokens) -> Tensor")                        \
  /* Compressed-KV autoregressive decoding (MergeAR). docs/ops/decode.md */                          \
  X("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float? scale=None, " \
    "Tensor? bias=None) -> Tensor")                                                                  \
  X("kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, Tensor k_new, "           \
    "Tensor v_new, Tensor keep) -> ()")                                                              \
  X("decode_step(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, "             \
    "Tensor k_new, Tensor v_new, Tensor keep, float? scale=None, Tensor? bias=None) -> Tensor")      \
  /* Deterministic segmented sums (EMA codebooks, k-means, mcq_gather's backward). docs/ops/segment.md */\
  X("segment_sum(Tensor values, Tensor index, int num_segments, Tensor? weight=None) -> "            \
    "(Tensor sums, Tensor counts)")
