// CUDA kernels of the decode ops and their host launchers.
//
// decode_attention is flash-decoding (split-K over the cache) with the CPU core's arithmetic (decode.h),
// so the two devices return bit-identical results:
//   decode_chunk_kernel    grid (B * Hkv, min(ceil(Lmax / 32), 65535)): a block owns a chunk of 32 keys of one
//                          (sequence, kv-head). It stages the chunk's keys as fp32 in shared memory
//                          (16-byte vector loads when the rows allow), 8 half-warps compute the scores of
//                          all G query heads against it (16 lanes of partial sums, a butterfly for the
//                          shared tree), G threads take the chunk's max, exps and sum, the values replace
//                          the keys in shared memory, and a thread per (g, d) writes the chunk's
//                          un-normalised output. Blocks past a sequence's length exit at once.
//   decode_combine_kernel  a block per (sequence, query head) folds its chunks left to right with the
//                          online-softmax merge and normalises.
// kv_append: a block per (sequence, kv-head) copies the new rows; a second launch bumps the lengths (in one
// launch a block could bump a length before another block of the same sequence read it).
// decode_step: the two attention kernels with the token's own row staged after the cache rows (in the
// chunk holding row lengths[b]), then kv_append's two kernels.
// Plain CUDA C++ only (no inline PTX): the emulation build executes this source on the CPU.
#include "common/cuda_compat.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode/decode_host.h"

namespace fastvq {
namespace {

constexpr int kChunkThreads = 128;  // 4 warps = 8 half-warps
constexpr int kHalfWarps = kChunkThreads / 16;
constexpr int kCombineThreads = 128;
constexpr int kAppendThreads = 64;

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t x) {
  return static_cast<float>(x);
}

// The elements of one 32-bit word of a 16-byte pack, as fp32 (exact conversions from the bits).
template <typename scalar_t>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int kPerWord = 1;
  static __device__ __forceinline__ void unpack(unsigned w, float* out) { out[0] = __uint_as_float(w); }
};
template <>
struct Pack<c10::Half> {
  static constexpr int kPerWord = 2;
  static __device__ __forceinline__ void unpack(unsigned w, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};
template <>
struct Pack<c10::BFloat16> {
  static constexpr int kPerWord = 2;
  static __device__ __forceinline__ void unpack(unsigned w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
};

// tile[t, 0, Dp) = rows t0 + t of a [Lmax, D] slice (base, strides in elements) as fp32, zero past D.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(float* tile, const scalar_t* base, int64_t stride_l, int64_t stride_d,
                                           bool vec, int nt, int64_t D, int64_t Dp) {
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int kPerPack = 4 * Pack<scalar_t>::kPerWord;  // elements per 16 bytes
    const int packs = static_cast<int>(D / kPerPack);
    for (int i = tid; i < nt * packs; i += kChunkThreads) {
      const int t = i / packs, j = i % packs;
      const uint4 raw = *reinterpret_cast<const uint4*>(base + t * stride_l + int64_t(j) * kPerPack);
      float* dst = tile + t * Dp + j * kPerPack;
      Pack<scalar_t>::unpack(raw.x, dst);
      Pack<scalar_t>::unpack(raw.y, dst + Pack<scalar_t>::kPerWord);
      Pack<scalar_t>::unpack(raw.z, dst + 2 * Pack<scalar_t>::kPerWord);
      Pack<scalar_t>::unpack(raw.w, dst + 3 * Pack<scalar_t>::kPerWord);
    }
    const int pad = static_cast<int>(Dp - D);
    for (int i = tid; i < nt * pad; i += kChunkThreads) tile[(i / pad) * Dp + D + i % pad] = 0.f;
  } else {
    for (int i = tid; i < nt * Dp; i += kChunkThreads) {
      const int t = static_cast<int>(i / Dp), d = static_cast<int>(i % Dp);
      tile[i] = d < D ? to_float(base[t * stride_l + d * stride_d]) : 0.f;
    }
  }
}

// The rows sequence b attends: its len_cache cache rows, then (decode_step) the token's own row. The host has
// checked the lengths; one out of range anyway is clamped into [0, Lmax - own row], so no access leaves the
// cache (the assert is for diagnosis only).
__device__ __forceinline__ int64_t attended_rows(const DecodeAttentionParams& p, int64_t b, int64_t& len_cache) {
  const int64_t own = p.k_new != nullptr ? 1 : 0;
  len_cache = decode_load_index(p.lengths, p.lengths_type, b * p.lengths_stride);
  FASTVQ_KERNEL_ASSERT(len_cache >= 0 && len_cache + own <= p.Lmax &&
                       "decode: lengths must be in [0, Lmax] (decode_attention), [0, Lmax - 1] (decode_step)");
  len_cache = len_cache < 0 ? 0 : (len_cache > p.Lmax - own ? p.Lmax - own : len_cache);
  return len_cache + own;
}

// row[0, Dp) = one row (stride_d) as fp32, zero past D: decode_step's own key or value.
template <typename scalar_t>
__device__ __forceinline__ void stage_self(float* row, const scalar_t* src, int64_t stride_d, int64_t D, int64_t Dp) {
  for (int64_t d = threadIdx.x; d < Dp; d += kChunkThreads) row[d] = d < D ? to_float(src[d * stride_d]) : 0.f;
}

template <typename scalar_t>
__device__ __forceinline__ void decode_chunk_block(const DecodeAttentionParams& p, float* smem, int64_t c) {
  const int64_t C = kDecodeChunk, G = p.G, D = p.D, Dp = p.Dp;
  float* tile = smem;         // [C, Dp] the chunk's keys, then its values
  float* sc = smem + C * Dp;  // [G, C] scores, then probabilities
  const int64_t bh = blockIdx.x, b = bh / p.Hkv, h = bh % p.Hkv;
  int64_t len_cache;
  const int64_t len = attended_rows(p, b, len_cache);
  const int64_t t0 = c * C;
  if (t0 >= len) return;  // uniform over the block
  const int nt = static_cast<int>(len - t0 < C ? len - t0 : C);
  const int nt_cache = static_cast<int>(len_cache - t0 < nt ? len_cache - t0 : nt);  // the rest: the token's row
  const int tid = threadIdx.x, hw = tid / 16, lane = tid % 16;

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride_b + h * G * p.q_stride_h;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride_b + h * p.k_stride_h + t0 * p.k_stride_l;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_stride_b + h * p.v_stride_h + t0 * p.v_stride_l;

  stage_rows<scalar_t>(tile, k, p.k_stride_l, p.k_stride_d, p.k_vec, nt_cache, D, Dp);
  if (nt_cache < nt) {
    stage_self<scalar_t>(tile + nt_cache * Dp, static_cast<const scalar_t*>(p.k_new) + b * p.kn_stride_b + h * p.kn_stride_h,
                         p.kn_stride_d, D, Dp);
  }
  __syncthreads();
  // Scores: a half-warp per (g, t); the loop's trip count is uniform, so every lane reaches the shuffles.
  const int64_t work = G * nt;
  for (int64_t w0 = 0; w0 < work; w0 += kHalfWarps) {
    const int64_t w = w0 + hw;
    const bool active = w < work;
    const int64_t g = active ? w / nt : 0, t = active ? w % nt : 0;
    float acc = 0.f;
    if (active) {
      for (int64_t d = lane; d < Dp; d += 16) {
        const float qv = d < D ? to_float(q[g * p.q_stride_h + d * p.q_stride_d]) * p.scale : 0.f;
        acc = fmaf(qv, tile[t * Dp + d], acc);
      }
    }
    acc = acc + __shfl_xor_sync(0xffffffffu, acc, 8);  // the tree of decode.h: (l, l + 8), (l, l + 4), ...
    acc = acc + __shfl_xor_sync(0xffffffffu, acc, 4);
    acc = acc + __shfl_xor_sync(0xffffffffu, acc, 2);
    acc = acc + __shfl_xor_sync(0xffffffffu, acc, 1);
    if (active && lane == 0) {
      if (p.bias != nullptr) {
        const int64_t off = b * p.bias_stride_b + (t0 + t) * p.bias_stride_l;
        const DType bt = static_cast<DType>(p.bias_dtype);
        const float bv = bt == DType::kFloat32   ? static_cast<const float*>(p.bias)[off]
                         : bt == DType::kFloat16 ? to_float(static_cast<const c10::Half*>(p.bias)[off])
                                                 : to_float(static_cast<const c10::BFloat16*>(p.bias)[off]);
        acc = acc + bv;
      }
      sc[g * C + t] = acc;
    }
  }
  __syncthreads();
  // The chunk's softmax statistics, one thread per query head, in the CPU's order.
  float* ml = p.part_ml + ((bh * p.num_chunks + c) * G) * 2;
  for (int64_t g = tid; g < G; g += kChunkThreads) {
    float* s = sc + g * C;
    float mc = s[0];
    for (int t = 1; t < nt; ++t) mc = decode_max(mc, s[t]);
    float lc = 0.f;
    for (int t = 0; t < nt; ++t) {
      s[t] = decode_exp_shift(s[t], mc);
      lc += s[t];
    }
    ml[2 * g] = mc;
    ml[2 * g + 1] = lc;
  }
  stage_rows<scalar_t>(tile, v, p.v_stride_l, p.v_stride_d, p.v_vec, nt_cache, D, Dp);  // the keys are no longer read
  if (nt_cache < nt) {
    stage_self<scalar_t>(tile + nt_cache * Dp, static_cast<const scalar_t*>(p.v_new) + b * p.vn_stride_b + h * p.vn_stride_h,
                         p.vn_stride_d, D, Dp);
  }
  __syncthreads();
  float* part = p.part_acc + (bh * p.num_chunks + c) * G * D;
  for (int64_t i = tid; i < G * D; i += kChunkThreads) {
    const int64_t g = i / D, d = i % D;
    float acc = 0.f;
    for (int t = 0; t < nt; ++t) acc = fmaf(sc[g * C + t], tile[t * Dp + d], acc);
    part[i] = acc;
  }
}

// Grid (B * Hkv, min(chunks, 65535)): a block loops over chunks blockIdx.y, + gridDim.y, ... (caches longer
// than 65535 chunks pass CUDA's grid.y limit, as on the CPU).
template <typename scalar_t>
__global__ void __launch_bounds__(kChunkThreads) decode_chunk_kernel(const DecodeAttentionParams p) {
  FASTVQ_DYNAMIC_SHARED(float, smem);
  for (int64_t c = blockIdx.y; c < p.num_chunks; c += gridDim.y) {
    if (c != blockIdx.y) __syncthreads();  // the previous chunk's readers of shared memory are done
    decode_chunk_block<scalar_t>(p, smem, c);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeAttentionParams p) {
  const int64_t bq = blockIdx.x, b = bq / p.Hq, hq = bq % p.Hq, h = hq / p.G, g = hq % p.G, bh = b * p.Hkv + h;
  int64_t len_cache;
  const int64_t len = attended_rows(p, b, len_cache);
  const int64_t chunks = (len + kDecodeChunk - 1) / kDecodeChunk;
  scalar_t* out = static_cast<scalar_t*>(p.out) + bq * p.D;
  const float* ml = p.part_ml + (bh * p.num_chunks * p.G + g) * 2;  // chunk c at + c * G * 2
  const float* part = p.part_acc + (bh * p.num_chunks * p.G + g) * p.D;  // chunk c at + c * G * D
  for (int64_t d = threadIdx.x; d < p.D; d += kCombineThreads) {
    if (chunks == 0) {
      out[d] = static_cast<scalar_t>(0.f);
      continue;
    }
    float m = ml[0], l = ml[1], acc = part[d];
    for (int64_t c = 1; c < chunks; ++c) {
      const DecodeMerge f = decode_merge_factors(m, ml[c * p.G * 2]);
      l = decode_merge(l, ml[c * p.G * 2 + 1], f);
      acc = decode_merge(acc, part[c * p.G * p.D + d], f);
      m = f.m;
    }
    out[d] = static_cast<scalar_t>(decode_finish(acc, decode_inverse(l)));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kAppendThreads) kv_append_copy_kernel(const KvAppendParams p) {
  const int64_t bh = blockIdx.x, b = bh / p.Hkv, h = bh % p.Hkv;
  if (!p.keep[b * p.keep_stride]) return;
  const int64_t n = decode_load_index(p.lengths, p.lengths_type, b * p.lengths_stride);
  const bool free_row = n >= 0 && n < p.Lmax;  // checked on the host; guarded here all the same
  FASTVQ_KERNEL_ASSERT(free_row && "kv_append: a sequence to append to has a full cache (or lengths out of range)");
  if (!free_row) return;
  scalar_t* kc = static_cast<scalar_t*>(p.k_cache) + b * p.kc_stride_b + h * p.kc_stride_h + n * p.kc_stride_l;
  scalar_t* vc = static_cast<scalar_t*>(p.v_cache) + b * p.vc_stride_b + h * p.vc_stride_h + n * p.vc_stride_l;
  const scalar_t* kn = static_cast<const scalar_t*>(p.k_new) + b * p.kn_stride_b + h * p.kn_stride_h;
  const scalar_t* vn = static_cast<const scalar_t*>(p.v_new) + b * p.vn_stride_b + h * p.vn_stride_h;
  for (int64_t d = threadIdx.x; d < p.D; d += kAppendThreads) {
    kc[d * p.kc_stride_d] = kn[d * p.kn_stride_d];
    vc[d * p.vc_stride_d] = vn[d * p.vn_stride_d];
  }
}

__global__ void __launch_bounds__(kAppendThreads) kv_append_lengths_kernel(const KvAppendParams p) {
  const int64_t b = int64_t(blockIdx.x) * kAppendThreads + threadIdx.x;
  if (b >= p.B || !p.keep[b * p.keep_stride]) return;
  const int64_t i = b * p.lengths_stride;
  const int64_t n = decode_load_index(p.lengths, p.lengths_type, i);
  const bool free_row = n >= 0 && n < p.Lmax;  // as kv_append_copy_kernel: no row written, no bump
  FASTVQ_KERNEL_ASSERT(free_row && "kv_append: a sequence to append to has a full cache");
  if (free_row) decode_store_index(p.lengths, p.lengths_type, i, n + 1);
}

// f(scalar_t{}) for the three cache dtypes (the checks have rejected others).
template <typename F>
void decode_dispatch(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// 16-byte packs are possible when a row is contiguous, whole packs long, and every row starts aligned.
bool rows_vectorisable(const at::Tensor& t) {
  const int64_t pack = 16 / t.element_size();
  const auto aligned = [&](int64_t stride) { return (stride * t.element_size()) % 16 == 0; };
  return t.stride(3) == 1 && t.size(3) % pack == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         aligned(t.stride(0)) && aligned(t.stride(1)) && aligned(t.stride(2));
}

}  // namespace

namespace {

// The attention kernels of p (decode_attention, or decode_step's attention when p.k_new is set) into out.
void launch_attention(DecodeAttentionParams& p, const DecodeAttentionShape& s, const at::Tensor& q,
                      const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  const int64_t chunks = std::max<int64_t>(p.num_chunks, 1);
  at::Tensor part_acc = at::empty({s.B * s.Hkv, chunks, s.G, s.D}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({s.B * s.Hkv, chunks, s.G, 2}, q.options().dtype(at::kFloat));
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.k_vec = rows_vectorisable(k_cache);
  p.v_vec = rows_vectorisable(v_cache);
  TORCH_CHECK(s.B * s.Hkv <= 0x7fffffff && s.B * s.Hq <= 0x7fffffff, op,
              ": the problem is too large for one launch (B * Hq = ", s.B * s.Hq, ")");
  const size_t smem = static_cast<size_t>(kDecodeChunk * p.Dp + s.G * kDecodeChunk) * sizeof(float);
  decode_dispatch(q.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto stream = FASTVQ_CUDA_STREAM();
    if (p.num_chunks > 0) {
      FASTVQ_LAUNCH_KERNEL(decode_chunk_kernel<scalar_t>,
                           dim3(static_cast<unsigned>(s.B * s.Hkv),
                                static_cast<unsigned>(std::min<int64_t>(p.num_chunks, 65535))),
                           dim3(kChunkThreads), smem, stream, p);
      FASTVQ_CUDA_LAUNCH_CHECK();
    }
    FASTVQ_LAUNCH_KERNEL(decode_combine_kernel<scalar_t>, dim3(static_cast<unsigned>(s.B * s.Hq)),
                         dim3(kCombineThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
}

// The append kernels: the kept rows, then (a second launch, after every block read the lengths) the lengths.
void launch_append(const KvAppendParams& p, at::ScalarType dtype, const char* op) {
  if (p.B == 0) return;
  const auto stream = FASTVQ_CUDA_STREAM();
  decode_dispatch(dtype, op, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (p.Hkv > 0 && p.D > 0) {
      FASTVQ_LAUNCH_KERNEL(kv_append_copy_kernel<scalar_t>, dim3(static_cast<unsigned>(p.B * p.Hkv)),
                           dim3(kAppendThreads), 0, stream, p);
      FASTVQ_CUDA_LAUNCH_CHECK();
    }
  });
  FASTVQ_LAUNCH_KERNEL(kv_append_lengths_kernel, dim3(static_cast<unsigned>((p.B + kAppendThreads - 1) / kAppendThreads)),
                       dim3(kAppendThreads), 0, stream, p);
  FASTVQ_CUDA_LAUNCH_CHECK();
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& lengths, std::optional<double> scale,
                                 const std::optional<at::Tensor>& bias) {
  FASTVQ_CUDA_DEVICE_GUARD(q.device());
  const DecodeAttentionShape s = decode_attention_check(q, k_cache, v_cache, lengths, bias, scale);
  decode_check_length_values("decode_attention", LengthsRule::kAttention, lengths, nullptr, s.Lmax, cuda_value_check());
  at::Tensor out = at::empty({s.B, s.Hq, s.D}, q.options());
  if (out.numel() == 0) return out;
  DecodeAttentionParams p = decode_attention_params(s, q, k_cache, v_cache, lengths, bias, scale, out);
  launch_attention(p, s, q, k_cache, v_cache, "decode_attention");
  return out;
}

void kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
                    const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& keep) {
  FASTVQ_CUDA_DEVICE_GUARD(k_cache.device());
  const KvAppendParams p = kv_append_check(k_cache, v_cache, lengths, k_new, v_new, keep);
  decode_check_length_values("kv_append", LengthsRule::kAppend, lengths, &keep, p.Lmax, cuda_value_check());
  launch_append(p, k_cache.scalar_type(), "kv_append");
}

// decode_step: the attention over the cache and the token's own row, then the append of the kept rows
// (stream order: every attention block has read its lengths before they change). The lengths are checked on
// the host first (one device reduction), with the CPU's messages.
at::Tensor decode_step_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& keep, std::optional<double> scale, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "decode_step";
  FASTVQ_CUDA_DEVICE_GUARD(q.device());
  const DecodeAttentionShape s = decode_attention_check(q, k_cache, v_cache, lengths, bias, scale, op);
  const KvAppendParams ap = kv_append_check(k_cache, v_cache, lengths, k_new, v_new, keep, op);
  decode_check_length_values(op, LengthsRule::kStep, lengths, nullptr, s.Lmax, cuda_value_check());
  at::Tensor out = at::empty({s.B, s.Hq, s.D}, q.options());
  if (out.numel() > 0) {
    DecodeAttentionParams p = decode_attention_params(s, q, k_cache, v_cache, lengths, bias, scale, out);
    decode_step_params(p, k_new, v_new, keep);
    p.keep = nullptr;  // the append kernels write the rows
    launch_attention(p, s, q, k_cache, v_cache, op);
  }
  launch_append(ap, k_cache.scalar_type(), op);
  return out;
}

TORCH_LIBRARY_IMPL(FASTVQ_CUDA_LIBRARY, FASTVQ_CUDA_DISPATCH_KEY, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("kv_append", &kv_append_cuda);
  m.impl("decode_step", &decode_step_cuda);
}

}  // namespace fastvq
