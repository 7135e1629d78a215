// Torch-free CPU core of decode_attention (see decode.h for the arithmetic it shares with CUDA). The host
// code (decode_cpu.cpp) validates the arguments and parallelises over tasks, one task per
// (sequence, kv-head): a single pass over that kv-head's cache serves all of its G query heads.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "decode/decode.h"

namespace fastvq {

// Floats of per-thread scratch one task needs.
int64_t decode_attention_cpu_scratch_floats(const DecodeAttentionParams& p);

// Task (b, h) = (task / Hkv, task % Hkv): writes out[b, h*G : (h+1)*G, :] (p.out is fp32 [B, Hq, D]); for
// decode_step (p.k_new set) the token's own row is attended too, and where p.keep[b] the task writes it to
// row lengths[b] of its caches (the host bumps the lengths after every task). lengths[b] must be in
// [0, Lmax] ([0, Lmax - 1] for decode_step; the host checks).
void decode_attention_cpu_task(const DecodeAttentionParams& p, CpuIsa isa, int64_t task, float* scratch);

}  // namespace fastvq
