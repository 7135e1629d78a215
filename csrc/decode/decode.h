// Compressed-KV autoregressive decoding (MergeAR): parameter structs and the math every backend shares.
//
// decode_attention, per (sequence b, kv-head h) with G = Hq / Hkv query heads g (query head h*G + g):
//   s[g, t]  = dot(q[b, hG+g] * scale, k[b, h, t]) + bias[b, t]          t < lengths[b]
//   out      = softmax_t(s[g, :]) @ v[b, h, :lengths[b]]
// Both backends cut the cache into chunks of kDecodeChunk keys and compute, with the same fp32 operations
// in the same order, so the CPU core and the CUDA kernels return bit-identical results:
//   dot      16 partial sums, lane l accumulating d = l, l + 16, ... with fmaf (q and k zero-padded to a
//            multiple of 16), then the pairwise tree (l, l + 8), (l, l + 4), (l, l + 2), (0, 1)
//   chunk    m_c = max_t s, p_t = decode_exp(s_t - m_c), l_c = sum_t p_t (in t order),
//            acc_c[d] = sum_t p_t v[t, d] (fmaf, in t order)
//   combine  chunks folded left to right with decode_combine (the online-softmax merge)
//   out      acc * (1 / l) (zeros where l == 0: an empty cache, or every logit -inf)
// decode_step is the same with one more row t = lengths[b] read from the token's own k_new / v_new, and
// that row appended to the cache where keep[b].
// The CPU walks the chunks of one (b, h) in one pass; CUDA computes every chunk in its own block
// (flash-decoding's split-K) and a second kernel folds them in the same order.
// Torch-free.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/macros.h"

namespace fastvq {

constexpr int64_t kDecodeChunk = 32;     // keys per chunk (one CUDA block, one CPU step)
constexpr int64_t kDecodeLanes = 16;     // partial sums of a dot product
constexpr int64_t kDecodeMaxDim = 256;   // head dim limit (a CUDA block stages a [chunk, D] fp32 tile)
constexpr int64_t kDecodeMaxGroup = 64;  // query heads per kv-head limit (scores of a chunk in shared memory)

enum class DecodeIndex : int32_t { kInt32 = 0, kInt64 = 1 };

struct DecodeAttentionParams {
  const void* q;  // [B, Hq, D] element strides, cache dtype
  int64_t q_stride_b, q_stride_h, q_stride_d;
  const void* k;  // [B, Hkv, Lmax, D] element strides
  int64_t k_stride_b, k_stride_h, k_stride_l, k_stride_d;
  const void* v;  // [B, Hkv, Lmax, D] element strides
  int64_t v_stride_b, v_stride_h, v_stride_l, v_stride_d;
  const void* lengths;  // [B] int32 / int64, stride lengths_stride
  int64_t lengths_stride;
  DecodeIndex lengths_type;
  const void* bias;  // [B, Lmax] element strides, bias_dtype; null for no bias
  int64_t bias_stride_b, bias_stride_l;
  int32_t bias_dtype;  // DType (common/dtype.h) of bias
  int32_t dtype;       // DType of q, k, v
  void* out;           // [B, Hq, D] contiguous: float32 on the CPU (the host casts), the cache dtype on CUDA
  int64_t B, Hq, Hkv, G, Lmax, D;
  int64_t Dp;  // D rounded up to kDecodeLanes
  float scale;
  // decode_step only (null otherwise): the token's own key and value ([B, Hkv, D] element strides, the
  // cache dtype), attended as if they were row lengths[b] of the cache (whose bias is bias[b, lengths[b]])
  const void* k_new;
  int64_t kn_stride_b, kn_stride_h, kn_stride_d;
  const void* v_new;
  int64_t vn_stride_b, vn_stride_h, vn_stride_d;
  // decode_step on the CPU: where keep[b], each task also writes its row lengths[b] of the caches (the
  // host bumps the lengths afterwards); null: nothing is written
  const bool* keep;
  int64_t keep_stride;
  // CUDA split-K partials: [B * Hkv, num_chunks, G, D] and [B * Hkv, num_chunks, G, 2] (m, l)
  float* part_acc;
  float* part_ml;
  int64_t num_chunks;  // ceil(Lmax / kDecodeChunk)
  bool k_vec, v_vec;   // CUDA: rows are 16-byte aligned and contiguous in whole 16-byte packs
};

struct KvAppendParams {
  void* k_cache;  // [B, Hkv, Lmax, D] element strides
  int64_t kc_stride_b, kc_stride_h, kc_stride_l, kc_stride_d;
  void* v_cache;
  int64_t vc_stride_b, vc_stride_h, vc_stride_l, vc_stride_d;
  void* lengths;  // [B] int32 / int64
  int64_t lengths_stride;
  DecodeIndex lengths_type;
  const void* k_new;  // [B, Hkv, D] element strides
  int64_t kn_stride_b, kn_stride_h, kn_stride_d;
  const void* v_new;
  int64_t vn_stride_b, vn_stride_h, vn_stride_d;
  const bool* keep;  // [B]
  int64_t keep_stride;
  int64_t B, Hkv, Lmax, D;
};

FASTVQ_HOST_DEVICE int64_t decode_load_index(const void* base, DecodeIndex t, int64_t i) {
  return t == DecodeIndex::kInt64 ? static_cast<const int64_t*>(base)[i]
                                  : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

FASTVQ_HOST_DEVICE void decode_store_index(void* base, DecodeIndex t, int64_t i, int64_t value) {
  if (t == DecodeIndex::kInt64) {
    static_cast<int64_t*>(base)[i] = value;
  } else {
    static_cast<int32_t*>(base)[i] = static_cast<int32_t>(value);
  }
}

FASTVQ_HOST_DEVICE float decode_neg_inf() { return -INFINITY; }

FASTVQ_HOST_DEVICE float decode_int_bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

// exp(x) for the softmax's x = s - max <= 0, in fp32 operations that every backend computes identically
// (the host's expf and CUDA's differ in the last bit, and neither vectorises): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (relative error < 2e-7, about 1 ulp), and
// 2^n through the exponent bits. x < -87.33 (e^x below FLT_MIN) gives 0, -inf gives 0, NaN gives NaN.
// Every multiply-add is an explicit fmaf, so no compiler contracts differently. The CPU core's vector exp
// (decode_attention_cpu_kernel.inc) runs the same operations on these constants.
constexpr float kDecodeExpMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer (nearest even)
constexpr float kDecodeExpLog2e = 1.44269504088896341f;
constexpr float kDecodeExpLn2Hi = 0.693145751953125f;  // ln2 split into a 16-bit head and the rest
constexpr float kDecodeExpLn2Lo = 1.42860682030941723e-06f;
constexpr float kDecodeExpC6 = 1.38888889e-3f, kDecodeExpC5 = 8.33333333e-3f, kDecodeExpC4 = 4.16666667e-2f;
constexpr float kDecodeExpC3 = 1.66666667e-1f, kDecodeExpC2 = 0.5f;  // (1/720, 1/120, 1/24, 1/6, 1/2, 1, 1)
constexpr float kDecodeExpMin = -87.33f;

// 2^n for an integral float n, through the exponent bits; n is clamped to [-126, 127] (n <= 0 for x <= 0;
// the clamp keeps the conversion defined for huge or NaN x, whose result is selected away or NaN anyway).
FASTVQ_HOST_DEVICE float decode_pow2(float n) {
  const float nc = n >= -126.f ? (n <= 127.f ? n : 127.f) : -126.f;
  return decode_int_bits_to_float((static_cast<int32_t>(nc) + 127) << 23);
}

FASTVQ_HOST_DEVICE float decode_exp(float x) {
  const float n = fmaf(x, kDecodeExpLog2e, kDecodeExpMagic) - kDecodeExpMagic;
  float r = fmaf(n, -kDecodeExpLn2Hi, x);
  r = fmaf(n, -kDecodeExpLn2Lo, r);
  float p = kDecodeExpC6;
  p = fmaf(p, r, kDecodeExpC5);
  p = fmaf(p, r, kDecodeExpC4);
  p = fmaf(p, r, kDecodeExpC3);
  p = fmaf(p, r, kDecodeExpC2);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  const float y = p * decode_pow2(n);
  return x < kDecodeExpMin ? 0.f : y;
}

// exp(s - m) for a chunk whose maximum is m; an all -inf chunk (m == -inf) contributes nothing.
FASTVQ_HOST_DEVICE float decode_exp_shift(float s, float m) { return m == decode_neg_inf() ? 0.f : decode_exp(s - m); }

FASTVQ_HOST_DEVICE float decode_max(float a, float b) { return b > a ? b : a; }

// The online-softmax merge of two partial states (m1, l1, acc1) and (m2, l2, acc2): the factors that
// rescale each to the common maximum m. combine: l = l1 a1 + l2 a2, acc = acc1 a1 + acc2 a2.
struct DecodeMerge {
  float m, a1, a2;
};

FASTVQ_HOST_DEVICE DecodeMerge decode_merge_factors(float m1, float m2) {
  DecodeMerge f;
  f.m = decode_max(m1, m2);
  f.a1 = decode_exp_shift(m1, f.m);
  f.a2 = decode_exp_shift(m2, f.m);
  return f;
}

FASTVQ_HOST_DEVICE float decode_merge(float x1, float x2, const DecodeMerge& f) { return fmaf(x1, f.a1, x2 * f.a2); }

// The final normalisation out = acc * (1 / l): one IEEE division per query head, then a multiply per element
// (both backends; acc / l per element would cost D divisions). Zeros for an empty softmax (l == 0: the
// inverse is 0 and acc is 0); a NaN l (NaN logits) stays NaN.
FASTVQ_HOST_DEVICE float decode_inverse(float l) { return l == 0.f ? 0.f : 1.f / l; }
FASTVQ_HOST_DEVICE float decode_finish(float acc, float inv_l) { return acc * inv_l; }

}  // namespace fastvq
