// CUDA kernels of the token-merging ops and their host launchers. The steps of merge.h, one kernel each:
// normalise (a thread per token), match (fused cosine + row argmax over shared-memory tiles of B rows, a
// thread per A token), select (a block per image: rank-count top-r over shared-memory tiles of scores,
// slots by a block scan, the merged segments of each B token in ascending order), and the size-weighted
// merge (a block per output token, threads over channels, each segment summed in a fixed order). No float
// atomics anywhere: every output is the same bits on every run, and the same bits as the CPU kernels.
// Plain CUDA C++ only (no inline PTX): the emulation build executes this source on the CPU.
#include "common/cuda_compat.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>

#include "merge/merge_host.h"

namespace fastvq {
namespace {

constexpr int kThreads = 256;         // element-wise kernels
constexpr int kMatchThreads = 128;    // A rows per match block
constexpr int kSelectThreads = 256;   // one block per image
constexpr int kScoreTile = 256;       // scores staged in shared memory per rank-count step
constexpr int kMergeThreads = 128;    // channels of one output token in flight
constexpr int64_t kMatchSmemBytes = 16384;  // shared-memory budget of one tile of B rows

inline unsigned grid_for(int64_t work, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 65535 * 64)));
}

// Step 1: m_hat rows, A tokens to a_hat [B, nA, Cm], B tokens to b_hat [B, nB, Cm].
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) merge_normalize_kernel(const MergeParams p, T* a_hat, T* b_hat) {
  const scalar_t* m = static_cast<const scalar_t*>(p.metric);
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < p.B * p.T; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = q / p.T, t = q % p.T;
    const scalar_t* row = m + b * p.m_sb + t * p.m_st;
    const T inv = merge_inv_norm<scalar_t, T>(row, p.Cm, p.m_sc);
    T* dst = (t % 2 == 0 ? a_hat + (b * p.nA + t / 2) * p.Cm : b_hat + (b * p.nB + t / 2) * p.Cm);
    for (int64_t k = 0; k < p.Cm; ++k) dst[k] = merge_mul(static_cast<T>(row[k * p.m_sc]), inv);
  }
}

// Step 2: a thread per A row; tiles of `tile_rows` B rows staged in shared memory, shared by the block.
template <typename T>
__global__ void __launch_bounds__(kMatchThreads)
    merge_match_kernel(const MergeParams p, const T* a_hat, const T* b_hat, int64_t tile_rows, int64_t blocks_per_image) {
  FASTVQ_DYNAMIC_SHARED(T, tile);  // [tile_rows, Cm]
  const int64_t b = blockIdx.x / blocks_per_image;
  const int64_t i = (blockIdx.x % blocks_per_image) * kMatchThreads + threadIdx.x;
  const bool active = i < p.nA;
  const T* a = a_hat + (b * p.nA + (active ? i : 0)) * p.Cm;
  T best_s = merge_neg_inf<T>();
  int64_t best_j = 0;
  for (int64_t j0 = 0; j0 < p.nB; j0 += tile_rows) {
    const int64_t rows = p.nB - j0 < tile_rows ? p.nB - j0 : tile_rows;
    const T* src = b_hat + (b * p.nB + j0) * p.Cm;
    for (int64_t e = threadIdx.x; e < rows * p.Cm; e += kMatchThreads) tile[e] = src[e];
    __syncthreads();
    if (active) {
      for (int64_t jj = 0; jj < rows; ++jj) {
        const T s = merge_dot(a, tile + jj * p.Cm, p.Cm);
        if (s > best_s) best_s = s, best_j = j0 + jj;  // strict: first j on ties; NaN never wins
      }
    }
    __syncthreads();
  }
  if (active) {
    static_cast<T*>(p.score)[b * p.nA + i] = best_s;
    p.best[b * p.nA + i] = best_j;
  }
}

// Exclusive scan of part[0 .. kSelectThreads) in place; returns the total. Block-wide (barriers inside).
__device__ int64_t merge_block_exclusive_scan(int64_t* part) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (int q = 0; q < kSelectThreads; ++q) {
      const int64_t v = part[q];
      part[q] = run;
      run += v;
    }
    part[kSelectThreads] = run;
  }
  __syncthreads();
  return part[kSelectThreads];
}

// Block-wide: the items of each of `n_segs` segments, item i (of `n_items`) belonging to segment key(i) (or to
// none when key(i) < 0). seg_items[seg_off[j] .. seg_off[j + 1]) lists segment j's items in ascending order.
// Counting and filling scan the keys once per segment (O(n_items * n_segs) per block): deterministic, no atomics.
template <typename KeyFn>
__device__ void merge_build_segments(int64_t n_items, int64_t n_segs, KeyFn key, int64_t* seg_off, int64_t* seg_items,
                                     int64_t* part) {
  const int64_t chunk = (n_segs + kSelectThreads - 1) / kSelectThreads;
  const int64_t j0 = threadIdx.x * chunk, j1 = j0 + chunk < n_segs ? j0 + chunk : n_segs;
  int64_t local = 0;
  for (int64_t j = j0; j < j1; ++j) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < n_items; ++i) cnt += key(i) == j ? 1 : 0;
    seg_off[j + 1] = cnt;
    local += cnt;
  }
  part[threadIdx.x] = local;
  merge_block_exclusive_scan(part);
  // Each thread rewrites only its own entries seg_off[j + 1] (count -> end offset); seg_off[0] is 0.
  int64_t run = part[threadIdx.x];
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t cnt = seg_off[j + 1];
    int64_t pos = run;
    for (int64_t i = 0; i < n_items && pos < run + cnt; ++i) {
      if (key(i) == j) seg_items[pos++] = i;
    }
    run += cnt;
    seg_off[j + 1] = run;
  }
  if (threadIdx.x == 0) seg_off[0] = 0;
}

// Steps 3-4 for one image per block. Afterwards best[i] is -1 for every unmerged A token.
template <typename T>
__global__ void __launch_bounds__(kSelectThreads) merge_select_kernel(const MergeParams p) {
  __shared__ T tile_s[kScoreTile];
  __shared__ int64_t part[kSelectThreads + 1];
  const int64_t b = blockIdx.x, nA = p.nA, nB = p.nB, r = p.r, first = p.protect_first ? 1 : 0;
  const T* score = static_cast<const T*>(p.score) + b * nA;
  int64_t* best = p.best + b * nA;
  int64_t* assign = p.assign + b * p.T;
  int64_t* unm_src = p.unm_src + b * nA;
  int64_t* seg_off = p.seg_off + b * (nB + 1);
  int64_t* seg_items = p.seg_items + b * nA;

  // 3. rank of every mergeable A token in the (score desc, index asc) order; the first r merge.
  if (r > 0) {
    for (int64_t i0 = first; i0 < nA; i0 += kSelectThreads) {
      const int64_t i = i0 + threadIdx.x;
      const bool active = i < nA;
      const T si = active ? score[i] : T(0);
      int64_t rank = 0;
      for (int64_t q0 = first; q0 < nA; q0 += kScoreTile) {
        const int64_t n = nA - q0 < kScoreTile ? nA - q0 : kScoreTile;
        for (int64_t e = threadIdx.x; e < n; e += kSelectThreads) tile_s[e] = score[q0 + e];
        __syncthreads();
        if (active) {
          for (int64_t e = 0; e < n; ++e) rank += merge_ranks_before(tile_s[e], q0 + e, si, i) ? 1 : 0;
        }
        __syncthreads();
      }
      if (active && rank >= r) best[i] = -1;
    }
    if (first == 1 && threadIdx.x == 0) best[0] = -1;
  } else {
    for (int64_t i = threadIdx.x; i < nA; i += kSelectThreads) best[i] = -1;
  }
  __syncthreads();

  // 4a. slots of the unmerged A tokens, ascending: a scan over per-thread chunks.
  const int64_t chunk = (nA + kSelectThreads - 1) / kSelectThreads;
  const int64_t c0 = threadIdx.x * chunk, c1 = c0 + chunk < nA ? c0 + chunk : nA;
  int64_t local = 0;
  for (int64_t i = c0; i < c1; ++i) local += best[i] < 0 ? 1 : 0;
  part[threadIdx.x] = local;
  merge_block_exclusive_scan(part);
  int64_t slot = part[threadIdx.x];
  for (int64_t i = c0; i < c1; ++i) {
    if (best[i] < 0) {
      unm_src[slot] = 2 * i;
      assign[2 * i] = slot++;
    } else {
      assign[2 * i] = nA - r + best[i];
    }
  }
  for (int64_t j = threadIdx.x; j < nB; j += kSelectThreads) assign[2 * j + 1] = nA - r + j;

  // 4b. the merged A tokens of each B token j, in ascending i (unmerged ones have best -1).
  merge_build_segments(nA, nB, [best](int64_t i) { return best[i]; }, seg_off, seg_items, part);
}

// Step 5: one output token per block, threads over channels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads) merge_slots_kernel(const MergeParams p) {
  const int64_t Tout = p.T - p.r, kept = p.nA - p.r;
  const int64_t s = blockIdx.x, b = s / Tout, slot = s % Tout;
  const acc_t* sz = static_cast<const acc_t*>(p.sizes) + b * p.T;
  const scalar_t* xb = static_cast<const scalar_t*>(p.x) + b * p.x_sb;
  scalar_t* o = static_cast<scalar_t*>(p.merged) + s * p.C;
  int64_t t, lo = 0, hi = 0;
  if (slot < kept) {
    t = p.unm_src[b * p.nA + slot];
  } else {
    const int64_t j = slot - kept;
    t = 2 * j + 1;
    lo = p.seg_off[b * (p.nB + 1) + j], hi = p.seg_off[b * (p.nB + 1) + j + 1];
  }
  const scalar_t* xt = xb + t * p.x_st;
  acc_t S = sz[t];
  if (lo == hi) {  // nothing merged: an exact copy
    for (int64_t c = threadIdx.x; c < p.C; c += kMergeThreads) o[c] = xt[c * p.x_sc];
    if (threadIdx.x == 0) static_cast<acc_t*>(p.merged_sizes)[s] = S;
    return;
  }
  for (int64_t q = lo; q < hi; ++q) {
    S = merge_add(S, sz[2 * p.seg_items[b * p.nA + q]]);
  }
  const acc_t st = sz[t];
  for (int64_t c = threadIdx.x; c < p.C; c += kMergeThreads) {
    acc_t acc = merge_mul(static_cast<acc_t>(xt[c * p.x_sc]), st);
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t ta = 2 * p.seg_items[b * p.nA + q];
      acc = merge_add(acc, merge_mul(static_cast<acc_t>(xb[ta * p.x_st + c * p.x_sc]), sz[ta]));
    }
    o[c] = static_cast<scalar_t>(merge_div(acc, S));
  }
  if (threadIdx.x == 0) static_cast<acc_t*>(p.merged_sizes)[s] = S;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_backward_kernel(const scalar_t* grad, int64_t g_sb, int64_t g_st, int64_t g_sc, const acc_t* w_sizes,
                          const acc_t* w_merged, const int64_t* assign, int64_t a_sb, int64_t a_st, int64_t B, int64_t T,
                          int64_t Tm, int64_t C, scalar_t* out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < B * T * C; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e / C, c = e % C, b = q / T;
    const int64_t slot = assign[b * a_sb + (q % T) * a_st];
    const bool in_range = slot >= 0 && slot < Tm;  // checked on the host; guarded here all the same
    FASTVQ_KERNEL_ASSERT(in_range && "bipartite_merge_backward: assign out of range");
    if (!in_range) {
      out[e] = static_cast<scalar_t>(merge_nan<acc_t>());
      continue;
    }
    const acc_t w = merge_grad_weight(w_sizes[q], w_merged[b * Tm + slot]);
    out[e] = static_cast<scalar_t>(merge_mul(static_cast<acc_t>(grad[b * g_sb + slot * g_st + c * g_sc]), w));
  }
}

__global__ void __launch_bounds__(kThreads)
    compose_source_kernel(const int64_t* source, int64_t src_sb, int64_t src_st, const int64_t* assign, int64_t a_sb,
                          int64_t a_st, int64_t B, int64_t T0, int64_t T, int64_t* out) {
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < B * T0; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = q / T0, v = source[b * src_sb + (q % T0) * src_st];
    const bool in_range = v >= 0 && v < T;  // checked on the host; guarded here all the same
    FASTVQ_KERNEL_ASSERT(in_range && "compose_source: source out of range [0, T)");
    out[q] = in_range ? assign[b * a_sb + v * a_st] : int64_t(-1);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) unmerge_kernel(const UnmergeParams p) {
  const scalar_t* in = static_cast<const scalar_t*>(p.merged);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.B * p.T0 * p.C; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e / p.C, c = e % p.C, b = q / p.T0;
    const int64_t v = p.source[b * p.src_sb + (q % p.T0) * p.src_st];
    const bool in_range = v >= 0 && v < p.T;  // checked on the host; guarded here all the same
    FASTVQ_KERNEL_ASSERT(in_range && "unmerge: source out of range [0, T)");
    out[e] = in_range ? in[b * p.in_sb + v * p.in_st + c * p.in_sc] : static_cast<scalar_t>(merge_nan<float>());
  }
}

// unmerge_backward, part 1 (a block per image): the positions p of each token j, ascending. A source entry
// outside [0, T) (checked on the host) belongs to no segment: it is dropped, never an out-of-bounds write.
__global__ void __launch_bounds__(kSelectThreads) unmerge_segments_kernel(const UnmergeParams p) {
  __shared__ int64_t part[kSelectThreads + 1];
  const int64_t b = blockIdx.x;
  const int64_t* src = p.source + b * p.src_sb;
  int64_t* seg_off = p.seg_off + b * (p.T + 1);
  int64_t* seg_items = p.seg_items + b * p.T0;
  for (int64_t q = threadIdx.x; q < p.T0; q += kSelectThreads) {
    const int64_t v = src[q * p.src_st];
    FASTVQ_KERNEL_ASSERT(v >= 0 && v < p.T && "unmerge_backward: source out of range [0, num_tokens)");
  }
  const int64_t st = p.src_st;
  merge_build_segments(p.T0, p.T, [src, st](int64_t q) { return src[q * st]; }, seg_off, seg_items, part);
}

// unmerge_backward, part 2: one token j per block, threads over channels, its positions summed in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads) unmerge_backward_kernel(const UnmergeParams p) {
  const int64_t s = blockIdx.x, b = s / p.T, j = s % p.T;
  const scalar_t* g = static_cast<const scalar_t*>(p.merged) + b * p.in_sb;
  scalar_t* o = static_cast<scalar_t*>(p.out) + s * p.C;
  const int64_t lo = p.seg_off[b * (p.T + 1) + j], hi = p.seg_off[b * (p.T + 1) + j + 1];
  const int64_t* items = p.seg_items + b * p.T0;
  for (int64_t c = threadIdx.x; c < p.C; c += kMergeThreads) {
    acc_t acc = acc_t(0);
    for (int64_t q = lo; q < hi; ++q) acc = merge_add(acc, static_cast<acc_t>(g[items[q] * p.in_st + c * p.in_sc]));
    o[c] = static_cast<scalar_t>(acc);
  }
}

// ---- host launchers ---------------------------------------------------------------------------------

template <typename T>
void match_cuda(const MergeParams& p, const at::Tensor& metric, decltype(FASTVQ_CUDA_STREAM()) stream) {
  const int64_t row_bytes = std::max<int64_t>(1, p.Cm) * static_cast<int64_t>(sizeof(T));
  TORCH_CHECK(row_bytes <= 48 * 1024, "bipartite_merge: metric rows of ", p.Cm, " channels do not fit a shared-memory ",
              "tile on CUDA (at most ", 48 * 1024 / sizeof(T), " channels for ", metric.scalar_type(), ")");
  const auto opts = metric.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a_hat = at::empty({p.B, p.nA, p.Cm}, opts), b_hat = at::empty({p.B, p.nB, p.Cm}, opts);
  if constexpr (std::is_same_v<T, double>) {  // scores in double only for a double metric
    FASTVQ_LAUNCH_KERNEL((merge_normalize_kernel<double, double>), dim3(grid_for(p.B * p.T, kThreads)), dim3(kThreads),
                         0, stream, p, a_hat.data_ptr<T>(), b_hat.data_ptr<T>());
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "bipartite_merge_normalize", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        FASTVQ_LAUNCH_KERNEL((merge_normalize_kernel<scalar_t, float>), dim3(grid_for(p.B * p.T, kThreads)),
                             dim3(kThreads), 0, stream, p, a_hat.data_ptr<T>(), b_hat.data_ptr<T>());
      }
    });
  }
  FASTVQ_CUDA_LAUNCH_CHECK();
  const int64_t tile_rows = std::max<int64_t>(1, std::min<int64_t>(64, kMatchSmemBytes / row_bytes));
  const int64_t blocks_per_image = (p.nA + kMatchThreads - 1) / kMatchThreads;
  FASTVQ_LAUNCH_KERNEL(merge_match_kernel<T>, dim3(static_cast<unsigned>(p.B * blocks_per_image)), dim3(kMatchThreads),
                       static_cast<size_t>(tile_rows * row_bytes), stream, p, a_hat.data_ptr<T>(), b_hat.data_ptr<T>(),
                       tile_rows, blocks_per_image);
  FASTVQ_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cuda(const at::Tensor& x, const at::Tensor& metric,
                                                                    const at::Tensor& sizes, int64_t r,
                                                                    bool protect_first) {
  FASTVQ_CUDA_DEVICE_GUARD(x.device());
  MergeSetup s = bipartite_merge_setup(x, metric, sizes, r, protect_first);
  const MergeParams& p = s.p;
  if (p.B > 0 && p.T > 0) {
    TORCH_CHECK(p.B * (p.T - p.r) < (int64_t{1} << 31), "bipartite_merge: B * (T - r) must be < 2^31 on CUDA, got ",
                p.B * (p.T - p.r));
    const auto stream = FASTVQ_CUDA_STREAM();
    const bool dbl = s.score_type == at::kDouble;
    merge_check_sizes(s.sizes_acc, cuda_value_check());
    if (p.nB > 0 && p.r > 0) {
      if (dbl) match_cuda<double>(p, metric, stream);
      else match_cuda<float>(p, metric, stream);
    }
    if (dbl) FASTVQ_LAUNCH_KERNEL(merge_select_kernel<double>, dim3(static_cast<unsigned>(p.B)), dim3(kSelectThreads), 0, stream, p);
    else FASTVQ_LAUNCH_KERNEL(merge_select_kernel<float>, dim3(static_cast<unsigned>(p.B)), dim3(kSelectThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bipartite_merge_cuda", [&] {
      FASTVQ_LAUNCH_KERNEL((merge_slots_kernel<scalar_t, at::opmath_type<scalar_t>>),
                           dim3(static_cast<unsigned>(p.B * (p.T - p.r))), dim3(kMergeThreads), 0, stream, p);
      FASTVQ_CUDA_LAUNCH_CHECK();
    });
  }
  return {s.merged, s.merged_sizes_acc.to(sizes.scalar_type()), s.assign};
}

at::Tensor bipartite_merge_backward_cuda(const at::Tensor& grad, const at::Tensor& sizes, const at::Tensor& merged_sizes,
                                         const at::Tensor& assign) {
  FASTVQ_CUDA_DEVICE_GUARD(grad.device());
  MergeBackwardSetup s = bipartite_merge_backward_setup(grad, sizes, merged_sizes, assign);
  const int64_t B = grad.size(0), Tm = grad.size(1), C = grad.size(2), T = assign.size(1);
  merge_check_assign(assign, Tm, cuda_value_check());
  if (s.grad_x.numel() == 0) return s.grad_x;
  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bipartite_merge_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FASTVQ_LAUNCH_KERNEL((merge_backward_kernel<scalar_t, acc_t>), dim3(grid_for(B * T * C, kThreads)), dim3(kThreads), 0,
                         stream, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
                         s.w_sizes.data_ptr<acc_t>(), s.w_merged.data_ptr<acc_t>(), assign.data_ptr<int64_t>(),
                         assign.stride(0), assign.stride(1), B, T, Tm, C, s.grad_x.data_ptr<scalar_t>());
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return s.grad_x;
}

at::Tensor compose_source_cuda(const at::Tensor& source, const at::Tensor& assign) {
  FASTVQ_CUDA_DEVICE_GUARD(source.device());
  at::Tensor out = compose_source_setup(source, assign);
  const int64_t B = source.size(0), T0 = source.size(1);
  merge_check_source_range("compose_source", source, assign.size(1), "the tokens of assign", cuda_value_check());
  if (B * T0 > 0) {
    const auto stream = FASTVQ_CUDA_STREAM();
    FASTVQ_LAUNCH_KERNEL(compose_source_kernel, dim3(grid_for(B * T0, kThreads)), dim3(kThreads), 0, stream,
                         source.data_ptr<int64_t>(), source.stride(0), source.stride(1), assign.data_ptr<int64_t>(),
                         assign.stride(0), assign.stride(1), B, T0, assign.size(1), out.data_ptr<int64_t>());
    FASTVQ_CUDA_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor unmerge_cuda(const at::Tensor& merged, const at::Tensor& source) {
  FASTVQ_CUDA_DEVICE_GUARD(merged.device());
  at::Tensor out = unmerge_setup(merged, source);
  merge_check_source_range("unmerge", source, merged.size(1), "the tokens of merged", cuda_value_check());
  if (out.numel() == 0) return out;
  const UnmergeParams p = unmerge_params(merged, source, out, merged.size(1));
  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, merged.scalar_type(), "unmerge_cuda", [&] {
    FASTVQ_LAUNCH_KERNEL(unmerge_kernel<scalar_t>, dim3(grid_for(out.numel(), kThreads)), dim3(kThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unmerge_backward_cuda(const at::Tensor& grad, const at::Tensor& source, int64_t num_tokens) {
  FASTVQ_CUDA_DEVICE_GUARD(grad.device());
  at::Tensor out = unmerge_backward_setup(grad, source, num_tokens);
  merge_check_source_range("unmerge_backward", source, num_tokens, "num_tokens", cuda_value_check());
  const int64_t B = grad.size(0), T0 = grad.size(1);
  if (B == 0) return out;  // (T0 == 0 still runs: the sums of empty segments are zeros)
  TORCH_CHECK(B * num_tokens < (int64_t{1} << 31), "unmerge_backward: B * num_tokens must be < 2^31 on CUDA, got ",
              B * num_tokens);
  UnmergeParams p = unmerge_params(grad, source, out, num_tokens);
  const auto lopt = source.options();
  const at::Tensor seg_off = at::empty({B, num_tokens + 1}, lopt), seg_items = at::empty({B, T0}, lopt);
  p.seg_off = seg_off.data_ptr<int64_t>(), p.seg_items = seg_items.data_ptr<int64_t>();
  const auto stream = FASTVQ_CUDA_STREAM();
  FASTVQ_LAUNCH_KERNEL(unmerge_segments_kernel, dim3(static_cast<unsigned>(B)), dim3(kSelectThreads), 0, stream, p);
  FASTVQ_CUDA_LAUNCH_CHECK();
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unmerge_backward_cuda", [&] {
    FASTVQ_LAUNCH_KERNEL((unmerge_backward_kernel<scalar_t, at::opmath_type<scalar_t>>),
                         dim3(static_cast<unsigned>(B * num_tokens)), dim3(kMergeThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTVQ_CUDA_LIBRARY, FASTVQ_CUDA_DISPATCH_KEY, m) {
  m.impl("bipartite_merge", &bipartite_merge_cuda);
  m.impl("bipartite_merge_backward", &bipartite_merge_backward_cuda);
  m.impl("compose_source", &compose_source_cuda);
  m.impl("unmerge", &unmerge_cuda);
  m.impl("unmerge_backward", &unmerge_backward_cuda);
}

}  // namespace fastvq
