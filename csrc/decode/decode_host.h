// ATen-side pieces of the decode ops shared by the CPU and CUDA host code: argument checks (one message
// per problem: op, argument, expectation, the value) and the params structs of decode.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common/dtype.h"
#include "common/host_utils.h"
#include "decode/decode.h"

namespace fastvq {

inline bool decode_supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline void decode_check_lengths(const char* op, const at::Tensor& lengths, int64_t B, const at::Tensor& ref) {
  TORCH_CHECK(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt, op,
              ": lengths must be int64 or int32, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be [B] = [", B, "], got shape ",
              lengths.sizes());
  TORCH_CHECK(lengths.device() == ref.device(), op, ": lengths must be on ", ref.device(), " like the cache, got ",
              lengths.device());
}

// What lengths [B] must satisfy, by op:
//   kAttention  decode_attention: every length in [0, Lmax]
//   kAppend     kv_append: every length in [0, Lmax], and < Lmax where keep (a free row to append to)
//   kStep       decode_step: every length in [0, Lmax - 1] (the token needs a free row even where not kept)
enum class LengthsRule { kAttention, kAppend, kStep };

// The value check of lengths (and keep, for kAppend), shared by both backends (ValueCheck: host_utils.h).
inline void decode_check_length_values(const char* op, LengthsRule rule, const at::Tensor& lengths,
                                       const at::Tensor* keep, int64_t Lmax, ValueCheck how) {
  const int64_t hi = rule == LengthsRule::kStep ? Lmax - 1 : Lmax;
  auto reduction_ok = [&](const at::Tensor& t) {
    if (!all_within(t, 0, hi)) return false;
    // kv_append: lengths + keep <= Lmax is "a free row wherever keep"
    return rule != LengthsRule::kAppend || all_within(t.to(at::kLong).add(keep->to(at::kLong)), 0, Lmax);
  };
  auto loop = [&](const at::Tensor& t) {
    const int64_t bad = first_outside(t, 0, hi);
    if (bad >= 0) {
      const int64_t n = int_at(t, bad);
      TORCH_CHECK(rule != LengthsRule::kStep || n != Lmax, op, ": the cache of sequence ", bad, " is full (lengths[",
                  bad, "] = Lmax = ", Lmax, "): the token needs a free row even where it is not kept; allocate a ",
                  "longer cache");
      TORCH_CHECK(false, op, ": lengths must be in [0, ", rule == LengthsRule::kStep ? "Lmax - 1] = [0, " : "Lmax] = [0, ",
                  hi, "], got ", n, " at sequence ", bad);
    }
    if (rule != LengthsRule::kAppend) return;
    const at::Tensor k = keep->cpu();
    const bool* kp = k.const_data_ptr<bool>();
    for (int64_t b = 0; b < t.numel(); ++b) {
      TORCH_CHECK(!kp[b * k.stride(0)] || int_at(t, b) < Lmax, op, ": the cache of sequence ", b, " is full (lengths[",
                  b, "] = Lmax = ", Lmax, "); allocate a longer cache");
    }
  };
  check_values(how, lengths, reduction_ok, loop);
}

struct DecodeAttentionShape {
  int64_t B, Hq, Hkv, G, Lmax, D;
};

// q [B, Hq, D], k_cache / v_cache [B, Hkv, Lmax, D], lengths [B], bias [B, Lmax] -> the shape, checked.
// `op` names the op in the messages (decode_attention or decode_step).
inline DecodeAttentionShape decode_attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& lengths, const std::optional<at::Tensor>& bias,
                                                   std::optional<double> scale, const char* op = "decode_attention") {
  TORCH_CHECK(decode_supported_dtype(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k_cache must be [B, Hkv, Lmax, D], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v_cache must have k_cache's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": k_cache and v_cache must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k_cache and v_cache must be on one device, got ", q.device(), ", ", k.device(), " and ",
              v.device());
  DecodeAttentionShape s{q.size(0), q.size(1), k.size(1), 0, k.size(2), q.size(2)};
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D, op, ": k_cache must be [B, Hkv, Lmax, D] with B=", s.B, " and D=",
              s.D, " from q, got shape ", k.sizes());
  TORCH_CHECK(s.D >= 1 && s.D <= kDecodeMaxDim, op, ": head dim D must be in [1, ", kDecodeMaxDim, "], got ", s.D);
  TORCH_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": the query heads Hq=", s.Hq,
              " must be a multiple of the kv-heads Hkv=", s.Hkv, " (grouped-query attention)");
  s.G = s.Hq / s.Hkv;
  TORCH_CHECK(s.G <= kDecodeMaxGroup, op, ": at most ", kDecodeMaxGroup, " query heads per kv-head, got Hq / Hkv = ",
              s.G);
  decode_check_lengths(op, lengths, s.B, q);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(decode_supported_dtype(bias->scalar_type()), op, ": bias must be float32, float16 or bfloat16, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == s.B && bias->size(1) == s.Lmax, op,
                ": bias must be [B, Lmax] = [", s.B, ", ", s.Lmax, "], got shape ", bias->sizes());
    TORCH_CHECK(bias->device() == q.device(), op, ": bias must be on ", q.device(), ", got ", bias->device());
  }
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
  return s;
}

// Params for the kernels; out is [B, Hq, D] contiguous.
inline DecodeAttentionParams decode_attention_params(const DecodeAttentionShape& s, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& lengths, const std::optional<at::Tensor>& bias,
                                                     std::optional<double> scale, at::Tensor& out) {
  DecodeAttentionParams p{};
  p.q = q.data_ptr(), p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_d = q.stride(2);
  p.k = k.data_ptr(), p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_l = k.stride(2);
  p.k_stride_d = k.stride(3);
  p.v = v.data_ptr(), p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_l = v.stride(2);
  p.v_stride_d = v.stride(3);
  p.lengths = lengths.data_ptr(), p.lengths_stride = lengths.stride(0);
  p.lengths_type = lengths.scalar_type() == at::kLong ? DecodeIndex::kInt64 : DecodeIndex::kInt32;
  if (bias.has_value() && bias->defined()) {
    p.bias = bias->data_ptr(), p.bias_stride_b = bias->stride(0), p.bias_stride_l = bias->stride(1);
    p.bias_dtype = static_cast<int32_t>(to_dtype(bias->scalar_type()));
  }
  p.dtype = static_cast<int32_t>(to_dtype(q.scalar_type()));
  p.out = out.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.G = s.G, p.Lmax = s.Lmax, p.D = s.D;
  p.Dp = (s.D + kDecodeLanes - 1) / kDecodeLanes * kDecodeLanes;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D)));
  p.num_chunks = (s.Lmax + kDecodeChunk - 1) / kDecodeChunk;
  return p;
}

// k_cache / v_cache [B, Hkv, Lmax, D], lengths [B], k_new / v_new [B, Hkv, D], keep [B] bool: checked.
// `op` names the op in the messages (kv_append or decode_step).
inline KvAppendParams kv_append_check(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
                                      const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& keep,
                                      const char* op = "kv_append") {
  TORCH_CHECK(decode_supported_dtype(k_cache.scalar_type()), op,
              ": k_cache must be float32, float16 or bfloat16, got ", k_cache.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [B, Hkv, Lmax, D], got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), D = k_cache.size(3);
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(0) == B && k_new.size(1) == Hkv && k_new.size(2) == D, op,
              ": k_new must be [B, Hkv, D] = [", B, ", ", Hkv, ", ", D, "], got shape ", k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), op, ": v_new must have k_new's shape ", k_new.sizes(), ", got ",
              v_new.sizes());
  for (const at::Tensor* t : {&v_cache, &k_new, &v_new}) {
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": v_cache, k_new and v_new must have k_cache's dtype ",
                k_cache.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == k_cache.device(), op, ": every tensor must be on k_cache's device ", k_cache.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(!k_cache.is_same(v_cache), op, ": k_cache and v_cache must be different tensors");
  decode_check_lengths(op, lengths, B, k_cache);
  TORCH_CHECK(keep.scalar_type() == at::kBool, op, ": keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == B, op, ": keep must be [B] = [", B, "], got shape ", keep.sizes());
  TORCH_CHECK(keep.device() == k_cache.device(), op, ": keep must be on ", k_cache.device(), ", got ", keep.device());

  KvAppendParams p{};
  p.k_cache = k_cache.data_ptr(), p.kc_stride_b = k_cache.stride(0), p.kc_stride_h = k_cache.stride(1);
  p.kc_stride_l = k_cache.stride(2), p.kc_stride_d = k_cache.stride(3);
  p.v_cache = v_cache.data_ptr(), p.vc_stride_b = v_cache.stride(0), p.vc_stride_h = v_cache.stride(1);
  p.vc_stride_l = v_cache.stride(2), p.vc_stride_d = v_cache.stride(3);
  p.lengths = lengths.data_ptr(), p.lengths_stride = lengths.stride(0);
  p.lengths_type = lengths.scalar_type() == at::kLong ? DecodeIndex::kInt64 : DecodeIndex::kInt32;
  p.k_new = k_new.data_ptr(), p.kn_stride_b = k_new.stride(0), p.kn_stride_h = k_new.stride(1);
  p.kn_stride_d = k_new.stride(2);
  p.v_new = v_new.data_ptr(), p.vn_stride_b = v_new.stride(0), p.vn_stride_h = v_new.stride(1);
  p.vn_stride_d = v_new.stride(2);
  p.keep = keep.data_ptr<bool>(), p.keep_stride = keep.stride(0);
  p.B = B, p.Hkv = Hkv, p.Lmax = k_cache.size(2), p.D = D;
  return p;
}

// decode_step: the token's rows and keep flags into the attention params (checked by kv_append_check).
inline void decode_step_params(DecodeAttentionParams& p, const at::Tensor& k_new, const at::Tensor& v_new,
                               const at::Tensor& keep) {
  p.k_new = k_new.data_ptr(), p.kn_stride_b = k_new.stride(0), p.kn_stride_h = k_new.stride(1);
  p.kn_stride_d = k_new.stride(2);
  p.v_new = v_new.data_ptr(), p.vn_stride_b = v_new.stride(0), p.vn_stride_h = v_new.stride(1);
  p.vn_stride_d = v_new.stride(2);
  p.keep = keep.data_ptr<bool>(), p.keep_stride = keep.stride(0);
}

}  // namespace fastvq
