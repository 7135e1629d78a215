// CPU kernel of segment_sum: a stable counting sort of the elements by segment, then every segment summed
// in ascending row order (segment.h has the contract).
//   1. histogram: the elements are cut into C chunks of consecutive ids; chunk c counts its elements per
//      segment, and checks the index range on the way (no separate min/max pass);
//   2. offsets: a serial scan over (segment, chunk) turns the counts into each chunk's first slot per segment;
//   3. scatter: each chunk writes its row ids into its slots in ascending order, so the order is the stable
//      sort of the elements by segment, whatever C is;
//   4. sums: tasks of consecutive segments, balanced by element count, add their rows one by one.
// Every output element is one sequential chain in a fixed order: results do not depend on the number of
// threads or on how at::parallel_for splits the work.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/cpu_isa.h"
#include "segment/segment_host.h"

namespace fastvq {
namespace {

template <typename index_t>
inline int64_t load_index(const SegmentSumParams& p, int64_t n, int64_t g) {
  return static_cast<int64_t>(static_cast<const index_t*>(p.index)[n * p.i_stride_n + g * p.i_stride_g]);
}

// Stable counting sort; returns the first out-of-range element id, or -1. Fills offsets [S + 1] and order.
// Chunks are ranges of rows (all G groups of a row in one chunk), walked without divisions.
template <typename index_t>
int64_t segment_sort_cpu(const SegmentSumParams& p, std::vector<int64_t>& offsets, std::vector<int64_t>& order) {
  const int64_t M = p.N * p.G, S = p.G * p.K;
  // Chunks: one per thread for large inputs; C * S histogram slots stay O(M + S).
  int64_t C = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, M / 32768));
  C = std::max<int64_t>(1, std::min<int64_t>({C, (4 * M) / std::max<int64_t>(S, 1), p.N}));
  std::vector<int64_t> slots(static_cast<size_t>(C * S), 0);  // [C, S]
  std::vector<int64_t> first_bad(static_cast<size_t>(C), -1);
  auto chunk_begin = [&](int64_t c) { return p.N / C * c + std::min(c, p.N % C); };  // in rows
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = slots.data() + c * S;
      for (int64_t n = chunk_begin(c), end = chunk_begin(c + 1); n < end && first_bad[c] < 0; ++n) {
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t k = load_index<index_t>(p, n, g);
          if (k == -1) continue;
          if (k < -1 || k >= p.K) {
            first_bad[c] = n * p.G + g;
            break;
          }
          ++h[g * p.K + k];
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    if (first_bad[c] >= 0) return first_bad[c];
  }
  offsets.assign(static_cast<size_t>(S + 1), 0);
  int64_t pos = 0;
  for (int64_t s = 0; s < S; ++s) {
    offsets[s] = pos;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t count = slots[c * S + s];
      slots[c * S + s] = pos;
      pos += count;
    }
  }
  offsets[S] = pos;
  order.resize(static_cast<size_t>(pos));
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = slots.data() + c * S;
      for (int64_t n = chunk_begin(c), end = chunk_begin(c + 1); n < end; ++n) {
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t k = load_index<index_t>(p, n, g);
          if (k >= 0) order[next[g * p.K + k]++] = n;  // the row id: the segment implies g
        }
      }
    }
  });
  return -1;
}

// Columns [0, D) of one segment from its rows' contiguous values: a compile-time width keeps the row's
// accumulators in registers (d = 8 is the codebook width of UniTok and LlamaGen).
template <int D, typename scalar_t, typename acc_t, bool kWeighted>
FASTVQ_ALWAYS_INLINE void segment_sum_fixed(const SegmentSumParams& p, int64_t s, int64_t g, acc_t* out,
                                            acc_t& count) {
  const scalar_t* values = static_cast<const scalar_t*>(p.values);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t acc[D];
  for (int j = 0; j < D; ++j) acc[j] = acc_t(0);
  for (int64_t r = p.offsets[s], end = p.offsets[s + 1]; r < end; ++r) {
    const int64_t n = p.order[r];
    const scalar_t* FASTVQ_RESTRICT v = values + n * p.v_stride_n + g * p.v_stride_g;
    const acc_t w = kWeighted ? weight[n * p.w_stride_n + g * p.w_stride_g] : acc_t(1);
    if constexpr (kWeighted) count = count + w;
    for (int j = 0; j < D; ++j) acc[j] = segment_add<kWeighted>(acc[j], static_cast<acc_t>(v[j]), w);
  }
  for (int j = 0; j < D; ++j) out[j] = acc[j];
}

// out[j] = out[j] + v[j] (kWeighted: out[j] + w * v[j]) over one contiguous fp32 row, in 256-bit lanes where
// the CPU has AVX2. Each element is the same two roundings either way (host code is built with
// -ffp-contract=off, so no fma is formed): lanes only change which elements share an instruction.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTVQ_SEGMENT_AVX2 1
template <bool kWeighted>
__attribute__((target("avx2"))) void segment_row_avx2(float* FASTVQ_RESTRICT out, const float* FASTVQ_RESTRICT v,
                                                       float w, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = kWeighted ? out[j] + w * v[j] : out[j] + v[j];
}
#endif

// Segments [s0, s1): sums[s, :] and counts[s].
template <typename scalar_t, typename acc_t, bool kWeighted>
void segment_sum_cpu_segments(const SegmentSumParams& p, int64_t s0, int64_t s1) {
  const scalar_t* values = static_cast<const scalar_t*>(p.values);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t* sums = static_cast<acc_t*>(p.sums);
  acc_t* counts = static_cast<acc_t*>(p.counts);
  const int64_t d = p.d, sd = p.v_stride_d;
  [[maybe_unused]] const bool avx2 = cpu_isa_active() != CpuIsa::kScalar;
  int64_t g = s0 / p.K, k = s0 - g * p.K;
  for (int64_t s = s0; s < s1; ++s) {
    acc_t* FASTVQ_RESTRICT out = sums + s * d;
    acc_t count = acc_t(0);
    if (sd == 1 && d == 8) {
      segment_sum_fixed<8, scalar_t, acc_t, kWeighted>(p, s, g, out, count);
    } else if (sd == 1 && d == 16) {
      segment_sum_fixed<16, scalar_t, acc_t, kWeighted>(p, s, g, out, count);
    } else if (sd == 1 && d == 4) {
      segment_sum_fixed<4, scalar_t, acc_t, kWeighted>(p, s, g, out, count);
    } else {
      for (int64_t j = 0; j < d; ++j) out[j] = acc_t(0);
      for (int64_t r = p.offsets[s], end = p.offsets[s + 1]; r < end; ++r) {
        const int64_t n = p.order[r];
        const scalar_t* FASTVQ_RESTRICT v = values + n * p.v_stride_n + g * p.v_stride_g;
        const acc_t w = kWeighted ? weight[n * p.w_stride_n + g * p.w_stride_g] : acc_t(1);
        if constexpr (kWeighted) count = count + w;
        if (sd == 1) {
#if defined(FASTVQ_SEGMENT_AVX2)
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (avx2) {
              segment_row_avx2<kWeighted>(out, v, w, d);
              continue;
            }
          }
#endif
          for (int64_t j = 0; j < d; ++j) out[j] = segment_add<kWeighted>(out[j], static_cast<acc_t>(v[j]), w);
        } else {
          for (int64_t j = 0; j < d; ++j) out[j] = segment_add<kWeighted>(out[j], static_cast<acc_t>(v[j * sd]), w);
        }
      }
    }
    counts[s] = kWeighted ? count : static_cast<acc_t>(p.offsets[s + 1] - p.offsets[s]);
    if (++k == p.K) k = 0, ++g;
  }
}

}  // namespace

// values [N, d] / [N, G, d], index [N] / [N, G] int64/int32, weight like index (accumulation dtype)
//   -> (sums [K, d] / [G, K, d], counts [K] / [G, K]) in the accumulation dtype
std::tuple<at::Tensor, at::Tensor> segment_sum_cpu(const at::Tensor& values, const at::Tensor& index,
                                                   int64_t num_segments, const std::optional<at::Tensor>& weight) {
  const SegmentShape s = check_segment_sum_args(values, index, num_segments, weight);
  auto [sums, counts] = segment_sum_outputs(values, s);
  const at::Tensor values3 = segment_grouped(values, s);
  const at::Tensor index2 = segment_grouped(index, s);
  std::optional<at::Tensor> weight2;
  if (weight.has_value()) weight2 = segment_grouped(*weight, s);
  SegmentSumParams p = segment_sum_params(values3, index2, weight2, s, sums, counts);
  const int64_t S = s.G * s.K;

  std::vector<int64_t> offsets, order;
  TORCH_CHECK(S <= std::numeric_limits<int64_t>::max() / 4, "segment_sum: G * num_segments too large, got ", S);
  const int64_t bad = index.scalar_type() == at::kLong ? segment_sort_cpu<int64_t>(p, offsets, order)
                                                        : segment_sort_cpu<int32_t>(p, offsets, order);
  if (bad >= 0) segment_sum_index_error(index2, s);
  if (S == 0) return {sums, counts};
  p.offsets = offsets.data();
  p.order = order.data();

  // Tasks of consecutive segments, cut where the running cost (a segment's elements, plus one for writing
  // it) crosses equal shares of the total: balanced however the elements are distributed.
  const int64_t cost = offsets[S] + S;
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(S, std::min<int64_t>(4 * at::get_num_threads(), cost * std::max<int64_t>(s.d, 1) / 16384 + 1)));
  std::vector<int64_t> task_begin(static_cast<size_t>(tasks + 1));
  for (int64_t t = 0; t <= tasks; ++t) {
    // the first segment s with offsets[s] + s >= cost * t / tasks
    const int64_t target = cost * t / tasks;
    int64_t lo = 0, hi = S;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (offsets[mid] + mid < target) lo = mid + 1;
      else hi = mid;
    }
    task_begin[t] = t == tasks ? S : lo;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_sum_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (p.weight) segment_sum_cpu_segments<scalar_t, acc_t, true>(p, task_begin[t], task_begin[t + 1]);
        else segment_sum_cpu_segments<scalar_t, acc_t, false>(p, task_begin[t], task_begin[t + 1]);
      }
    });
  });
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("segment_sum", &segment_sum_cpu); }

}  // namespace fastvq
