// CPU host functions of the token-merging ops (bipartite_merge, compose_source, unmerge, unmerge_backward):
// checks and allocation (merge_host.h), the per-ISA matching core (merge_cpu_kernel.cpp) and parallel loops
// over the shared scalar arithmetic of merge.h. Every reduction has a fixed order: deterministic output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/cpu_isa.h"
#include "merge/merge_cpu_kernel.h"
#include "merge/merge_host.h"

namespace fastvq {
namespace {

// ---- step 1-2, float32 scores: per-ISA core over a normalised copy of the metric -----------------------
void match_float(const MergeParams& p, const at::Tensor& metric) {
  // float32 rows with unit channel stride are read in place (e.g. a view of the first channels of x);
  // anything else is converted once to a contiguous float32 copy.
  const bool in_place = metric.scalar_type() == at::kFloat && (metric.stride(2) == 1 || metric.size(2) <= 1);
  const at::Tensor m = in_place ? metric : metric.to(at::kFloat).contiguous();  // [B, T, Cm]
  const float* mp = m.data_ptr<float>();
  const int64_t m_sb = m.stride(0), m_st = m.stride(1);
  const int64_t Cm = p.Cm, nA = p.nA, nB = p.nB;
  const int64_t ldb = std::max<int64_t>(kMergeCpuColAlign, (nB + kMergeCpuColAlign - 1) / kMergeCpuColAlign * kMergeCpuColAlign);
  const CpuIsa isa = cpu_isa_active();
  float* score = static_cast<float*>(p.score);
  if (p.B >= 2 * at::get_num_threads()) {
    // Enough images for every thread: one image per task, its normalised rows in thread-local scratch
    // (the transposed B side of an image stays in cache for all its A rows).
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> a_hat(nA * Cm), bt(Cm * ldb, 0.f), scratch(4 * ldb);  // padding columns stay 0
      for (int64_t b = b0; b < b1; ++b) {
        const float* img = mp + b * m_sb;
        merge_normalize_rows_cpu(isa, img, 2 * m_st, nA, Cm, a_hat.data(), Cm, 1);
        merge_normalize_rows_cpu(isa, img + m_st, 2 * m_st, nB, Cm, bt.data(), 1, ldb);
        merge_match_rows_cpu(isa, a_hat.data(), nA, Cm, bt.data(), ldb, nB, score + b * nA, p.best + b * nA,
                             scratch.data());
      }
    });
    return;
  }
  // Few images: normalise every image first, then split each image's A rows over tasks.
  const at::Tensor a_hat = at::empty({p.B, nA, Cm}, m.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor bt = at::zeros({p.B, Cm, ldb}, a_hat.options());  // transposed B side, zero padding columns
  float* ap = a_hat.data_ptr<float>();
  float* bp = bt.data_ptr<float>();
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* img = mp + b * m_sb;
      merge_normalize_rows_cpu(isa, img, 2 * m_st, nA, Cm, ap + b * nA * Cm, Cm, 1);
      merge_normalize_rows_cpu(isa, img + m_st, 2 * m_st, nB, Cm, bp + b * Cm * ldb, 1, ldb);
    }
  });
  constexpr int64_t kRowsPerTask = 64;
  const int64_t blocks = (nA + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, p.B * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(4 * ldb);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, i0 = (t % blocks) * kRowsPerTask, n = std::min(kRowsPerTask, nA - i0);
      merge_match_rows_cpu(isa, ap + (b * nA + i0) * Cm, n, Cm, bp + b * Cm * ldb, ldb, nB, score + b * nA + i0,
                           p.best + b * nA + i0, scratch.data());
    }
  });
}

// ---- step 1-2, float64 scores: the shared scalar functions (the same chains the CUDA kernel runs) -------
void match_double(const MergeParams& p) {
  const double* m = static_cast<const double*>(p.metric);
  const int64_t Cm = p.Cm, T = p.T;
  const at::Tensor nrm_t = at::empty({p.B, T, Cm}, at::TensorOptions().dtype(at::kDouble));
  double* nrm = nrm_t.data_ptr<double>();
  at::parallel_for(0, p.B * T, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const double* row = m + b * p.m_sb + t * p.m_st;
      const double inv = merge_inv_norm<double, double>(row, Cm, p.m_sc);
      for (int64_t k = 0; k < Cm; ++k) nrm[r * Cm + k] = merge_mul(row[k * p.m_sc], inv);
    }
  });
  double* score = static_cast<double*>(p.score);
  at::parallel_for(0, p.B * p.nA, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.nA, i = r % p.nA;
      const double* a = nrm + (b * T + 2 * i) * Cm;
      double s = merge_neg_inf<double>();
      int64_t arg = 0;
      for (int64_t j = 0; j < p.nB; ++j) {
        const double v = merge_dot(a, nrm + (b * T + 2 * j + 1) * Cm, Cm);
        if (v > s) s = v, arg = j;
      }
      score[r] = s;
      p.best[r] = arg;
    }
  });
}

// ---- step 3-4: top-r selection, slots, the merged segments of each B token (one image per call) ---------
template <typename score_t>
void select_image(const MergeParams& p, int64_t b, std::vector<int64_t>& cand, std::vector<uint8_t>& merged) {
  const score_t* score = static_cast<const score_t*>(p.score) + b * p.nA;
  const int64_t* best = p.best + b * p.nA;
  int64_t* assign = p.assign + b * p.T;
  const int64_t nA = p.nA, nB = p.nB, r = p.r, first = p.protect_first ? 1 : 0;
  merged.assign(nA, 0);
  if (r > 0) {
    cand.resize(nA - first);
    std::iota(cand.begin(), cand.end(), first);
    std::nth_element(cand.begin(), cand.begin() + (r - 1), cand.end(), [&](int64_t i, int64_t j) {
      return merge_ranks_before(score[i], i, score[j], j);
    });
    for (int64_t q = 0; q < r; ++q) merged[cand[q]] = 1;
  }
  int64_t* unm_src = p.unm_src + b * nA;
  int64_t* seg_off = p.seg_off + b * (nB + 1);
  int64_t* seg_items = p.seg_items + b * nA;
  int64_t slot = 0;
  std::fill(seg_off, seg_off + nB + 1, 0);
  for (int64_t i = 0; i < nA; ++i) {
    if (merged[i]) {
      ++seg_off[best[i] + 1];
      assign[2 * i] = nA - r + best[i];
    } else {
      unm_src[slot] = 2 * i;
      assign[2 * i] = slot++;
    }
  }
  for (int64_t j = 0; j < nB; ++j) {
    assign[2 * j + 1] = nA - r + j;
    seg_off[j + 1] += seg_off[j];
  }
  // counting sort of the merged A tokens by partner, ascending i within a segment
  std::vector<int64_t> fill(seg_off, seg_off + nB);
  for (int64_t i = 0; i < nA; ++i) {
    if (merged[i]) seg_items[fill[best[i]]++] = i;
  }
}

// ---- step 5: the size-weighted merge, one output slot per iteration -------------------------------------
// kUnit: channels contiguous in x (the common case: a vectorised loop without a stride).
template <typename scalar_t, typename acc_t, bool kUnit>
void merge_slots(const MergeParams& p) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const acc_t* sizes = static_cast<const acc_t*>(p.sizes);
  scalar_t* out = static_cast<scalar_t*>(p.merged);
  acc_t* out_sizes = static_cast<acc_t*>(p.merged_sizes);
  const int64_t Tout = p.T - p.r, C = p.C, kept = p.nA - p.r, sc = kUnit ? 1 : p.x_sc;
  at::parallel_for(0, p.B * Tout, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t s0, int64_t s1) {
    std::vector<acc_t> acc_buf(C);
    acc_t* FASTVQ_RESTRICT acc = acc_buf.data();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b = s / Tout, slot = s % Tout;
      const acc_t* sz = sizes + b * p.T;
      const scalar_t* xb = x + b * p.x_sb;
      scalar_t* FASTVQ_RESTRICT o = out + s * C;
      int64_t t, lo = 0, hi = 0;
      if (slot < kept) {
        t = p.unm_src[b * p.nA + slot];
      } else {
        const int64_t j = slot - kept;
        t = 2 * j + 1;
        lo = p.seg_off[b * (p.nB + 1) + j], hi = p.seg_off[b * (p.nB + 1) + j + 1];
      }
      const scalar_t* FASTVQ_RESTRICT xt = xb + t * p.x_st;
      if (lo == hi) {  // nothing merged: an exact copy
        if (kUnit) std::memcpy(o, xt, sizeof(scalar_t) * C);
        else for (int64_t c = 0; c < C; ++c) o[c] = xt[c * sc];
        out_sizes[s] = sz[t];
        continue;
      }
      acc_t S = sz[t];
      for (int64_t c = 0; c < C; ++c) acc[c] = merge_mul(static_cast<acc_t>(xt[c * sc]), S);
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t ta = 2 * p.seg_items[b * p.nA + q];
        const acc_t sa = sz[ta];
        const scalar_t* FASTVQ_RESTRICT xa = xb + ta * p.x_st;
        S = merge_add(S, sa);
        for (int64_t c = 0; c < C; ++c) acc[c] = merge_add(acc[c], merge_mul(static_cast<acc_t>(xa[c * sc]), sa));
      }
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(merge_div(acc[c], S));
      out_sizes[s] = S;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cpu(const at::Tensor& x, const at::Tensor& metric,
                                                                   const at::Tensor& sizes, int64_t r,
                                                                   bool protect_first) {
  MergeSetup s = bipartite_merge_setup(x, metric, sizes, r, protect_first);
  const MergeParams& p = s.p;
  if (p.B > 0 && p.T > 0) {
    merge_check_sizes(s.sizes_acc, ValueCheck::kLoop);
    if (p.nB > 0 && p.r > 0) {
      if (s.score_type == at::kDouble) match_double(p);
      else match_float(p, metric);
    }
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> cand;
      std::vector<uint8_t> merged;
      for (int64_t b = b0; b < b1; ++b) {
        if (s.score_type == at::kDouble) select_image<double>(p, b, cand, merged);
        else select_image<float>(p, b, cand, merged);
      }
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bipartite_merge_cpu", [&] {
      if (p.x_sc == 1) merge_slots<scalar_t, at::opmath_type<scalar_t>, true>(p);
      else merge_slots<scalar_t, at::opmath_type<scalar_t>, false>(p);
    });
  }
  return {s.merged, s.merged_sizes_acc.to(sizes.scalar_type()), s.assign};
}

// grad_x[b, t] = grad_merged[b, assign[b, t]] * sizes[b, t] / merged_sizes[b, assign[b, t]]: a scaled gather.
at::Tensor bipartite_merge_backward_cpu(const at::Tensor& grad, const at::Tensor& sizes, const at::Tensor& merged_sizes,
                                        const at::Tensor& assign) {
  MergeBackwardSetup s = bipartite_merge_backward_setup(grad, sizes, merged_sizes, assign);
  const int64_t B = grad.size(0), Tm = grad.size(1), C = grad.size(2), T = assign.size(1);
  const int64_t* a = assign.data_ptr<int64_t>();
  const int64_t a_sb = assign.stride(0), a_st = assign.stride(1);
  merge_check_assign(assign, Tm, ValueCheck::kLoop);
  if (s.grad_x.numel() == 0) return s.grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bipartite_merge_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t g_sb = grad.stride(0), g_st = grad.stride(1), g_sc = grad.stride(2);
    const acc_t* ws = s.w_sizes.data_ptr<acc_t>();
    const acc_t* wm = s.w_merged.data_ptr<acc_t>();
    scalar_t* o = s.grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 16384 / C), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / T, slot = a[b * a_sb + (q % T) * a_st];
        const acc_t w = merge_grad_weight(ws[q], wm[b * Tm + slot]);
        const scalar_t* FASTVQ_RESTRICT row = g + b * g_sb + slot * g_st;
        scalar_t* FASTVQ_RESTRICT out = o + q * C;
        if (g_sc == 1) {
          for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(merge_mul(static_cast<acc_t>(row[c]), w));
        } else {
          for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(merge_mul(static_cast<acc_t>(row[c * g_sc]), w));
        }
      }
    });
  });
  return s.grad_x;
}

at::Tensor compose_source_cpu(const at::Tensor& source, const at::Tensor& assign) {
  at::Tensor out = compose_source_setup(source, assign);
  UnmergeParams p;
  p.B = source.size(0), p.T0 = source.size(1);
  p.source = source.data_ptr<int64_t>(), p.src_sb = source.stride(0), p.src_st = source.stride(1);
  merge_check_source_range("compose_source", source, assign.size(1), "the tokens of assign", ValueCheck::kLoop);
  const int64_t* a = assign.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t a_sb = assign.stride(0), a_st = assign.stride(1);
  at::parallel_for(0, p.B * p.T0, 4096, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / p.T0, t = q % p.T0;
      o[q] = a[b * a_sb + p.source[b * p.src_sb + t * p.src_st] * a_st];
    }
  });
  return out;
}

at::Tensor unmerge_cpu(const at::Tensor& merged, const at::Tensor& source) {
  at::Tensor out = unmerge_setup(merged, source);
  const UnmergeParams p = unmerge_params(merged, source, out, merged.size(1));
  merge_check_source_range("unmerge", source, p.T, "the tokens of merged", ValueCheck::kLoop);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, merged.scalar_type(), "unmerge_cpu", [&] {
    const scalar_t* in = static_cast<const scalar_t*>(p.merged);
    scalar_t* o = static_cast<scalar_t*>(p.out);
    at::parallel_for(0, p.B * p.T0, std::max<int64_t>(1, 16384 / p.C), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / p.T0, t = q % p.T0;
        const scalar_t* row = in + b * p.in_sb + p.source[b * p.src_sb + t * p.src_st] * p.in_st;
        if (p.in_sc == 1) std::memcpy(o + q * p.C, row, sizeof(scalar_t) * p.C);
        else for (int64_t c = 0; c < p.C; ++c) o[q * p.C + c] = row[c * p.in_sc];
      }
    });
  });
  return out;
}

// grad_merged[b, j] = sum of grad[b, p] over p with source[b, p] == j, in ascending p (from 0): a segmented
// sum in a fixed order, no atomics.
at::Tensor unmerge_backward_cpu(const at::Tensor& grad, const at::Tensor& source, int64_t num_tokens) {
  at::Tensor out = unmerge_backward_setup(grad, source, num_tokens);
  const UnmergeParams p = unmerge_params(grad, source, out, num_tokens);
  merge_check_source_range("unmerge_backward", source, num_tokens, "num_tokens", ValueCheck::kLoop);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unmerge_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = static_cast<const scalar_t*>(p.merged);
    scalar_t* o = static_cast<scalar_t*>(p.out);
    constexpr int64_t kChunk = 256;  // channels per task
    const int64_t chunks = (p.C + kChunk - 1) / kChunk;
    at::parallel_for(0, p.B * chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / chunks, c0 = (task % chunks) * kChunk, nc = std::min(kChunk, p.C - c0);
        acc.assign(p.T * nc, acc_t(0));
        for (int64_t t = 0; t < p.T0; ++t) {
          const int64_t j = p.source[b * p.src_sb + t * p.src_st];
          const scalar_t* row = g + b * p.in_sb + t * p.in_st + c0 * p.in_sc;
          acc_t* a = acc.data() + j * nc;
          for (int64_t c = 0; c < nc; ++c) a[c] = merge_add(a[c], static_cast<acc_t>(row[c * p.in_sc]));
        }
        for (int64_t j = 0; j < p.T; ++j) {
          for (int64_t c = 0; c < nc; ++c) o[(b * p.T + j) * p.C + c0 + c] = static_cast<scalar_t>(acc[j * nc + c]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("bipartite_merge", &bipartite_merge_cpu);
  m.impl("bipartite_merge_backward", &bipartite_merge_backward_cpu);
  m.impl("compose_source", &compose_source_cpu);
  m.impl("unmerge", &unmerge_cpu);
  m.impl("unmerge_backward", &unmerge_backward_cpu);
}

}  // namespace fastvq
