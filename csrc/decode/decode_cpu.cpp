// CPU host functions of the decode ops: checks (decode_host.h), the lengths range check, and the parallel
// loop over (sequence, kv-head) tasks of the torch-free core (decode_attention_cpu_kernel.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/cpu_isa.h"
#include "decode/decode_attention_cpu_kernel.h"
#include "decode/decode_host.h"

namespace fastvq {
namespace {

// lengths[b] += 1 where keep[b] (after every row is written).
void bump_kept_lengths(void* lengths, DecodeIndex type, int64_t stride, const bool* keep, int64_t keep_stride,
                       int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    if (!keep[b * keep_stride]) continue;
    decode_store_index(lengths, type, b * stride, decode_load_index(lengths, type, b * stride) + 1);
  }
}

// Runs the attention tasks of p (one per (sequence, kv-head)) over the threads.
void run_tasks(const DecodeAttentionParams& p) {
  if (p.B * p.Hkv == 0) return;
  const CpuIsa isa = cpu_isa_active();
  const int64_t scratch_floats = decode_attention_cpu_scratch_floats(p);
  // A task reads about Lmax * D * 2 elements; small problems stay on one thread.
  const int64_t task_work = std::max<int64_t>(1, p.Lmax * p.D * 2 * std::max<int64_t>(p.G, 1));
  at::parallel_for(0, p.B * p.Hkv, std::max<int64_t>(1, 32768 / task_work), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t t = begin; t < end; ++t) decode_attention_cpu_task(p, isa, t, scratch.data());
  });
}

}  // namespace

// q [B, Hq, D], k_cache / v_cache [B, Hkv, Lmax, D], lengths [B], bias [B, Lmax] -> out [B, Hq, D] (q's dtype)
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lengths, std::optional<double> scale,
                                const std::optional<at::Tensor>& bias) {
  const DecodeAttentionShape s = decode_attention_check(q, k_cache, v_cache, lengths, bias, scale);
  at::Tensor out = at::empty({s.B, s.Hq, s.D}, q.options().dtype(at::kFloat));
  DecodeAttentionParams p = decode_attention_params(s, q, k_cache, v_cache, lengths, bias, scale, out);
  decode_check_length_values("decode_attention", LengthsRule::kAttention, lengths, nullptr, s.Lmax, ValueCheck::kLoop);
  if (out.numel() == 0) return out.to(q.scalar_type());
  run_tasks(p);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// One decode step, in place: out = attention of q over the cache rows [0, lengths[b]) and the token's own
// k_new[b] / v_new[b] (as row lengths[b]); then, where keep[b], the token's row is written at lengths[b]
// and lengths[b] grows by one. Equal, bit for bit, to kv_append(keep = all) + decode_attention + releasing
// the row where !keep. All checks come before any write.
at::Tensor decode_step_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& lengths, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& keep, std::optional<double> scale, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "decode_step";
  const DecodeAttentionShape s = decode_attention_check(q, k_cache, v_cache, lengths, bias, scale, op);
  kv_append_check(k_cache, v_cache, lengths, k_new, v_new, keep, op);
  at::Tensor out = at::empty({s.B, s.Hq, s.D}, q.options().dtype(at::kFloat));
  DecodeAttentionParams p = decode_attention_params(s, q, k_cache, v_cache, lengths, bias, scale, out);
  decode_step_params(p, k_new, v_new, keep);
  decode_check_length_values(op, LengthsRule::kStep, lengths, nullptr, s.Lmax, ValueCheck::kLoop);
  run_tasks(p);  // also where G == 0: the tasks write the kept rows
  bump_kept_lengths(lengths.data_ptr(), p.lengths_type, p.lengths_stride, p.keep, p.keep_stride, s.B);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// Mutates k_cache, v_cache [B, Hkv, Lmax, D] and lengths [B]: where keep[b], row lengths[b] of sequence b
// becomes k_new[b] / v_new[b] ([B, Hkv, D]) and lengths[b] grows by one. All checks come before any write.
void kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
                   const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& keep) {
  const KvAppendParams p = kv_append_check(k_cache, v_cache, lengths, k_new, v_new, keep);
  if (p.B == 0) return;
  decode_check_length_values("kv_append", LengthsRule::kAppend, lengths, &keep, p.Lmax, ValueCheck::kLoop);
  const int64_t elem = k_cache.element_size();
  at::parallel_for(0, p.B * p.Hkv, std::max<int64_t>(1, 8192 / std::max<int64_t>(p.D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.Hkv, h = i % p.Hkv;
      if (!p.keep[b * p.keep_stride]) continue;
      const int64_t n = decode_load_index(p.lengths, p.lengths_type, b * p.lengths_stride);
      auto copy = [&](void* cache, int64_t sb, int64_t sh, int64_t sl, int64_t sd, const void* src, int64_t nb,
                      int64_t nh, int64_t nd) {
        char* dst = static_cast<char*>(cache) + (b * sb + h * sh + n * sl) * elem;
        const char* from = static_cast<const char*>(src) + (b * nb + h * nh) * elem;
        if (sd == 1 && nd == 1) {
          std::memcpy(dst, from, p.D * elem);
        } else {
          for (int64_t d = 0; d < p.D; ++d) std::memcpy(dst + d * sd * elem, from + d * nd * elem, elem);
        }
      };
      copy(p.k_cache, p.kc_stride_b, p.kc_stride_h, p.kc_stride_l, p.kc_stride_d, p.k_new, p.kn_stride_b,
           p.kn_stride_h, p.kn_stride_d);
      copy(p.v_cache, p.vc_stride_b, p.vc_stride_h, p.vc_stride_l, p.vc_stride_d, p.v_new, p.vn_stride_b,
           p.vn_stride_h, p.vn_stride_d);
    }
  });
  bump_kept_lengths(p.lengths, p.lengths_type, p.lengths_stride, p.keep, p.keep_stride, p.B);
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("kv_append", &kv_append_cpu);
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace fastvq
