// Every op's schema, written once. fastvq.cpp defines them in the `fastvq` library; the CUDA emulation
// build (csrc/emu/) defines the same schemas in `fastvq_emu`, where the CUDA launchers run on the CPU.
// Add an op here, then register its kernels with TORCH_LIBRARY_IMPL in its family's files.
#pragma once

#define FASTVQ_FOR_EACH_SCHEMA(X)                                                                    \
  /* Multi-codebook nearest-code search (UniTok MCQ). docs/ops/mcq.md */                             \
  X("mcq_search(Tensor z, Tensor codebooks, str metric=\"l2\") -> (Tensor indices, Tensor scores)") \
  X("mcq_gather(Tensor indices, Tensor codebooks) -> Tensor")
