// ATen-side pieces of the token-merging ops shared by the CPU and CUDA host code: argument checks, output
// allocation and params. One place for both backends, so they reject the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "common/host_utils.h"
#include "merge/merge.h"

namespace fastvq {

inline at::ScalarType merge_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct MergeSetup {
  MergeParams p;
  at::Tensor merged, merged_sizes_acc, assign;  // outputs (merged_sizes in the merge precision)
  at::Tensor sizes_acc;                         // sizes in the merge precision, contiguous [B, T]
  at::Tensor score, best, unm_src, seg_off, seg_items;
  at::ScalarType score_type;                    // double for a double metric, else float
};

// Checks the arguments of bipartite_merge and allocates its outputs and scratch (not the backend-specific
// normalised metric). The caller computes p.score / p.best, then the selection and the merge.
inline MergeSetup bipartite_merge_setup(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& sizes,
                                        int64_t r, bool protect_first) {
  TORCH_CHECK(x.dim() == 3, "bipartite_merge: x must be [B, T, C], got shape ", x.sizes());
  TORCH_CHECK(metric.dim() == 3, "bipartite_merge: metric must be [B, T, Cm], got shape ", metric.sizes());
  TORCH_CHECK(sizes.dim() == 2, "bipartite_merge: sizes must be [B, T], got shape ", sizes.sizes());
  TORCH_CHECK(metric.size(0) == x.size(0) && metric.size(1) == x.size(1),
              "bipartite_merge: metric must be [B, T, Cm] with B, T of x ", x.sizes(), ", got shape ", metric.sizes());
  TORCH_CHECK(sizes.size(0) == x.size(0) && sizes.size(1) == x.size(1),
              "bipartite_merge: sizes must be [B, T] with B, T of x ", x.sizes(), ", got shape ", sizes.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"metric", metric}, {"sizes", sizes}}) {
    TORCH_CHECK(is_supported_float(t.scalar_type()), "bipartite_merge: ", name,
                " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "bipartite_merge: ", name, " must be on x's device ", x.device(), ", got ",
                t.device());
  }
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t mergeable = merge_mergeable(T, protect_first);
  TORCH_CHECK(r >= 0 && r <= mergeable, "bipartite_merge: r must be in [0, ", mergeable, "] (the mergeable tokens of A ",
              "for T=", T, protect_first ? " with protect_first" : "", "), got ", r);

  MergeSetup s;
  MergeParams& p = s.p;
  p.B = B, p.T = T, p.C = C, p.Cm = metric.size(2), p.nA = (T + 1) / 2, p.nB = T / 2, p.r = r;
  p.protect_first = protect_first;
  const auto acc = merge_acc_type(x.scalar_type());
  s.score_type = merge_acc_type(metric.scalar_type());
  s.sizes_acc = sizes.to(acc).contiguous();
  s.merged = advise_huge_pages(at::empty({B, T - r, C}, x.options().memory_format(at::MemoryFormat::Contiguous)));
  s.merged_sizes_acc = at::empty({B, T - r}, x.options().dtype(acc));
  s.assign = at::empty({B, T}, x.options().dtype(at::kLong));
  const auto lopt = x.options().dtype(at::kLong);
  s.score = at::empty({B, p.nA}, x.options().dtype(s.score_type));
  s.best = at::empty({B, p.nA}, lopt);
  s.unm_src = at::empty({B, p.nA}, lopt);
  s.seg_off = at::empty({B, p.nB + 1}, lopt);
  s.seg_items = at::empty({B, p.nA}, lopt);
  p.x = x.data_ptr(), p.x_sb = x.stride(0), p.x_st = x.stride(1), p.x_sc = x.stride(2);
  p.metric = metric.data_ptr(), p.m_sb = metric.stride(0), p.m_st = metric.stride(1), p.m_sc = metric.stride(2);
  p.sizes = s.sizes_acc.data_ptr();
  p.merged = s.merged.data_ptr(), p.merged_sizes = s.merged_sizes_acc.data_ptr();
  p.assign = s.assign.data_ptr<int64_t>();
  p.score = s.score.data_ptr(), p.best = s.best.data_ptr<int64_t>(), p.unm_src = s.unm_src.data_ptr<int64_t>();
  p.seg_off = s.seg_off.data_ptr<int64_t>(), p.seg_items = s.seg_items.data_ptr<int64_t>();
  return s;
}

// bipartite_merge_backward(grad_merged [B, T', C], sizes [B, T], merged_sizes [B, T'], assign [B, T]) -> [B, T, C]:
// grad_x[b, t] = grad_merged[b, assign[b, t]] * sizes[b, t] / merged_sizes[b, assign[b, t]].
struct MergeBackwardSetup {
  at::Tensor grad_x, w_sizes, w_merged;  // output; sizes and merged_sizes in the precision of grad, contiguous
};

inline MergeBackwardSetup bipartite_merge_backward_setup(const at::Tensor& grad, const at::Tensor& sizes,
                                                         const at::Tensor& merged_sizes, const at::Tensor& assign) {
  constexpr const char* op = "bipartite_merge_backward";
  TORCH_CHECK(grad.dim() == 3, op, ": grad_merged must be [B, T', C], got shape ", grad.sizes());
  TORCH_CHECK(is_supported_float(grad.scalar_type()), op, ": grad_merged must be float32, float16, bfloat16 or float64, got ",
              grad.scalar_type());
  TORCH_CHECK(assign.scalar_type() == at::kLong && assign.dim() == 2 && assign.size(0) == grad.size(0), op,
              ": assign must be [B, T] int64 with B=", grad.size(0), ", got ", assign.scalar_type(), " shape ", assign.sizes());
  TORCH_CHECK(sizes.dim() == 2 && sizes.sizes() == assign.sizes() && is_supported_float(sizes.scalar_type()), op,
              ": sizes must be a float [B, T] tensor like assign ", assign.sizes(), ", got ", sizes.scalar_type(), " shape ",
              sizes.sizes());
  TORCH_CHECK(merged_sizes.dim() == 2 && merged_sizes.size(0) == grad.size(0) && merged_sizes.size(1) == grad.size(1) &&
                  is_supported_float(merged_sizes.scalar_type()),
              op, ": merged_sizes must be a float [B, T'] tensor with B, T' of grad_merged ", grad.sizes(), ", got ",
              merged_sizes.scalar_type(), " shape ", merged_sizes.sizes());
  for (const auto* t : {&sizes, &merged_sizes, &assign}) {
    TORCH_CHECK(t->device() == grad.device(), op, ": every argument must be on grad_merged's device ", grad.device(),
                ", got ", t->device());
  }
  MergeBackwardSetup s;
  const auto acc = merge_acc_type(grad.scalar_type());
  s.w_sizes = sizes.to(acc).contiguous();
  s.w_merged = merged_sizes.to(acc).contiguous();
  s.grad_x = advise_huge_pages(
      at::empty({grad.size(0), assign.size(1), grad.size(2)}, grad.options().memory_format(at::MemoryFormat::Contiguous)));
  return s;
}

// sizes [B, T] (merge precision, contiguous) must be > 0 (a NaN fails too): the merge divides by their sums.
inline void merge_check_sizes(const at::Tensor& sizes_acc, ValueCheck how) {
  check_values(how, sizes_acc, all_positive, [](const at::Tensor& t) {
    const int64_t T = t.size(1);
    const bool dbl = t.scalar_type() == at::kDouble;
    const void* sz = t.const_data_ptr();
    for (int64_t q = 0; q < t.numel(); ++q) {
      const double v = dbl ? static_cast<const double*>(sz)[q] : static_cast<const float*>(sz)[q];
      TORCH_CHECK(v > 0, "bipartite_merge: sizes must be > 0, got sizes[", q / T, ", ", q % T, "] = ", v);
    }
  });
}

// assign [B, T] must name tokens of grad_merged [B, Tm, C]: entries in [0, Tm).
inline void merge_check_assign(const at::Tensor& assign, int64_t Tm, ValueCheck how) {
  check_values(
      how, assign, [&](const at::Tensor& t) { return all_within(t, 0, Tm - 1); },
      [&](const at::Tensor& t) {
        const int64_t bad = first_outside(t, 0, Tm - 1);
        TORCH_CHECK(bad < 0, "bipartite_merge_backward: assign[", bad / t.size(1), ", ", bad % t.size(1), "] = ",
                    int_at(t, bad), " is out of range [0, ", Tm, ") (the tokens of grad_merged)");
      });
}

// Every source [B, T0] entry must name a token in [0, T): the first one that does not is reported.
inline void merge_check_source_range(const char* op, const at::Tensor& source, int64_t T, const char* what,
                                     ValueCheck how) {
  check_values(
      how, source, [&](const at::Tensor& t) { return all_within(t, 0, T - 1); },
      [&](const at::Tensor& t) {
        const int64_t bad = first_outside(t, 0, T - 1);
        TORCH_CHECK(bad < 0, op, ": source[", bad / t.size(1), ", ", bad % t.size(1), "] = ", int_at(t, bad),
                    " is out of range [0, ", T, ") (", what, ")");
      });
}

// [B, T0] int64 source map checks shared by compose_source / unmerge / unmerge_backward.
inline void merge_check_source(const char* op, const at::Tensor& source, int64_t B, const at::Device& device) {
  TORCH_CHECK(source.scalar_type() == at::kLong, op, ": source must be int64, got ", source.scalar_type());
  TORCH_CHECK(source.dim() == 2 && source.size(0) == B, op, ": source must be [B, T0] with B=", B, ", got shape ",
              source.sizes());
  TORCH_CHECK(source.device() == device, op, ": source must be on device ", device, ", got ", source.device());
}

inline UnmergeParams unmerge_params(const at::Tensor& in, const at::Tensor& source, const at::Tensor& out,
                                    int64_t T) {
  UnmergeParams p;
  p.B = in.size(0), p.T = T, p.T0 = source.size(1), p.C = in.size(2);
  p.merged = in.data_ptr(), p.in_sb = in.stride(0), p.in_st = in.stride(1), p.in_sc = in.stride(2);
  p.source = source.data_ptr<int64_t>(), p.src_sb = source.stride(0), p.src_st = source.stride(1);
  p.out = out.data_ptr();
  return p;
}

// unmerge(merged [B, T, C], source [B, T0]) -> [B, T0, C]
inline at::Tensor unmerge_setup(const at::Tensor& merged, const at::Tensor& source) {
  TORCH_CHECK(merged.dim() == 3, "unmerge: merged must be [B, T, C], got shape ", merged.sizes());
  TORCH_CHECK(is_supported_float(merged.scalar_type()),
              "unmerge: merged must be float32, float16, bfloat16 or float64, got ", merged.scalar_type());
  merge_check_source("unmerge", source, merged.size(0), merged.device());
  return advise_huge_pages(at::empty({merged.size(0), source.size(1), merged.size(2)},
                                     merged.options().memory_format(at::MemoryFormat::Contiguous)));
}

// unmerge_backward(grad [B, T0, C], source [B, T0], num_tokens T) -> [B, T, C]
inline at::Tensor unmerge_backward_setup(const at::Tensor& grad, const at::Tensor& source, int64_t num_tokens) {
  TORCH_CHECK(grad.dim() == 3, "unmerge_backward: grad must be [B, T0, C], got shape ", grad.sizes());
  TORCH_CHECK(is_supported_float(grad.scalar_type()),
              "unmerge_backward: grad must be float32, float16, bfloat16 or float64, got ", grad.scalar_type());
  merge_check_source("unmerge_backward", source, grad.size(0), grad.device());
  TORCH_CHECK(source.size(1) == grad.size(1), "unmerge_backward: source must be [B, T0] with T0=", grad.size(1),
              ", got shape ", source.sizes());
  TORCH_CHECK(num_tokens >= 0, "unmerge_backward: num_tokens must be >= 0, got ", num_tokens);
  return advise_huge_pages(
      at::empty({grad.size(0), num_tokens, grad.size(2)}, grad.options().memory_format(at::MemoryFormat::Contiguous)));
}

// compose_source(source [B, T0], assign [B, T]) -> [B, T0]
inline at::Tensor compose_source_setup(const at::Tensor& source, const at::Tensor& assign) {
  TORCH_CHECK(assign.scalar_type() == at::kLong, "compose_source: assign must be int64, got ", assign.scalar_type());
  TORCH_CHECK(assign.dim() == 2, "compose_source: assign must be [B, T], got shape ", assign.sizes());
  merge_check_source("compose_source", source, assign.size(0), assign.device());
  return at::empty(source.sizes(), source.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace fastvq
