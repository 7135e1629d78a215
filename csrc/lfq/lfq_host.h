// ATen-side pieces of the lfq ops shared by the CPU and CUDA host code: argument checks, and the entropy
// orchestration (row chunks, the P_B^T P_A GEMM, the codebook entropy), written once over the backend's
// row kernels.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/host_utils.h"
#include "lfq/lfq.h"

namespace fastvq {

constexpr int64_t kLfqMaxIndexBits = 62;       // an index is a non-negative int64
constexpr int64_t kLfqMaxEntropyBits = 24;  // exact code distribution: 2^g entries per group

// Bits per group for a [..., D] tensor: D when group_bits == 0, else group_bits (which must divide D).
inline int64_t lfq_group_width(const char* op, int64_t D, int64_t group_bits, int64_t max_bits) {
  TORCH_CHECK(group_bits >= 0, op, ": group_bits must be >= 0, got ", group_bits);
  if (group_bits == 0) {
    TORCH_CHECK(D <= max_bits, op, ": D=", D, " needs group_bits (one group of more than ", max_bits,
                max_bits == kLfqMaxIndexBits ? " bits does not fit an int64 index)"
                                             : " bits has no exact codebook entropy)");
    return D;
  }
  TORCH_CHECK(group_bits <= max_bits, op, ": group_bits must be <= ", max_bits, ", got ", group_bits);
  TORCH_CHECK(D % group_bits == 0, op, ": D=", D, " must be divisible by group_bits=", group_bits);
  return group_bits;
}

// bit_order "msb" (true) or "lsb" (false).
inline bool lfq_msb(const char* op, std::string_view bit_order) {
  TORCH_CHECK(bit_order == "msb" || bit_order == "lsb", op, ": bit_order must be \"msb\" or \"lsb\", got \"",
              std::string(bit_order), "\"");
  return bit_order == "msb";
}

inline void lfq_check_z(const char* op, const at::Tensor& z) {
  TORCH_CHECK(is_supported_float(z.scalar_type()), op, ": z must be float32, float16, bfloat16 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(z.dim() >= 1 && z.size(-1) >= 1, op, ": z must be [..., D] with D >= 1, got shape ", z.sizes());
}

// ---- quantize / unpack -----------------------------------------------------------------------------

struct LfqQuantizeSetup {
  int64_t N, D, g, G;
  bool msb;
  at::Tensor z2;       // z viewed (or copied) as [N, D]
  at::Tensor codes;    // [..., D] contiguous, z's dtype
  at::Tensor indices;  // [...] or [..., G] int64
};

// z [..., D] -> checked shape and allocated outputs of lfq_quantize.
inline LfqQuantizeSetup lfq_quantize_setup(const at::Tensor& z, int64_t group_bits, std::string_view bit_order) {
  lfq_check_z("lfq_quantize", z);
  LfqQuantizeSetup s;
  s.msb = lfq_msb("lfq_quantize", bit_order);
  s.D = z.size(-1), s.N = leading_numel(z, 1);
  s.g = lfq_group_width("lfq_quantize", s.D, group_bits, kLfqMaxIndexBits), s.G = s.D / s.g;
  s.codes = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  auto index_shape = z.sizes().vec();
  index_shape.pop_back();
  if (group_bits != 0) index_shape.push_back(s.G);
  s.indices = at::empty(index_shape, z.options().dtype(at::kLong));
  if (s.N > 0) s.z2 = z.reshape({s.N, s.D});
  return s;
}

struct LfqUnpackSetup {
  int64_t N, g, G;
  bool msb;
  at::Tensor indices2;  // indices viewed (or copied) as [N, G]
  at::Tensor codes;     // [..., dim]
};

// indices [...] or [..., dim / g] int64 -> checked shape and the allocated codes of lfq_codes_from_indices.
inline LfqUnpackSetup lfq_codes_from_indices_setup(const at::Tensor& indices, int64_t dim, int64_t group_bits,
                                                   std::optional<at::ScalarType> dtype, std::string_view bit_order) {
  constexpr const char* op = "lfq_codes_from_indices";
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(dim >= 1, op, ": dim must be >= 1, got ", dim);
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK(is_supported_float(out_dtype), op, ": dtype must be a floating type, got ", out_dtype);
  LfqUnpackSetup s;
  s.msb = lfq_msb(op, bit_order);
  s.g = lfq_group_width(op, dim, group_bits, kLfqMaxIndexBits), s.G = dim / s.g;
  if (group_bits != 0) {
    TORCH_CHECK(indices.dim() >= 1 && indices.size(-1) == s.G, op, ": indices must be [..., dim / group_bits] = [..., ",
                s.G, "], got shape ", indices.sizes());
  }
  auto shape = indices.sizes().vec();
  if (group_bits != 0) shape.pop_back();
  shape.push_back(dim);
  s.codes = at::empty(shape, indices.options().dtype(out_dtype));
  s.N = s.codes.numel() / dim;
  if (s.N > 0) s.indices2 = indices.reshape({s.N, s.G});
  return s;
}

// Every index of indices2 [N, G] must be in [0, 2^g): the first one that is not is named.
inline void lfq_check_indices(const at::Tensor& indices2, int64_t g, ValueCheck how) {
  const int64_t hi = g >= 63 ? std::numeric_limits<int64_t>::max() : (int64_t{1} << g) - 1;
  check_values(
      how, indices2, [&](const at::Tensor& t) { return all_within(t, 0, hi); },
      [&](const at::Tensor& t) {
        const int64_t bad = first_outside(t, 0, hi), G = t.size(1);
        TORCH_CHECK(bad < 0, "lfq_codes_from_indices: indices must be in [0, 2^", g, "), got ", int_at(t, bad),
                    " at row ", bad / G, ", group ", bad % G);
      });
}

// ---- entropy ---------------------------------------------------------------------------------------

struct LfqEntropyShape {
  int64_t N, D, g, G, a, b;
  bool msb;
};

inline LfqEntropyShape lfq_entropy_shape(const at::Tensor& z, double temperature, int64_t group_bits,
                                         std::string_view bit_order) {
  lfq_check_z("lfq_entropy", z);
  const bool msb = lfq_msb("lfq_entropy", bit_order);
  TORCH_CHECK(temperature > 0.0, "lfq_entropy: temperature must be > 0, got ", temperature);
  const int64_t D = z.size(-1);
  const int64_t N = leading_numel(z, 1);
  TORCH_CHECK(N >= 1, "lfq_entropy: z must have at least one row, got shape ", z.sizes());
  TORCH_CHECK(group_bits == 0 || group_bits <= kLfqMaxEntropyBits,
              "lfq_entropy: an exact whole-codebook entropy needs group bits <= ", kLfqMaxEntropyBits, ", got ",
              group_bits);
  const int64_t g = lfq_group_width("lfq_entropy", D, group_bits, kLfqMaxEntropyBits);
  const int64_t a = g / 2;
  return {N, D, g, D / g, a, g - a, msb};
}

// The row weights as [N] in the compute dtype (nullopt without weights), after checking them against z.
inline std::optional<at::Tensor> lfq_entropy_weight(const std::optional<at::Tensor>& weight, const at::Tensor& z,
                                                    const LfqEntropyShape& s, at::ScalarType acc) {
  if (!weight.has_value() || !weight->defined()) return std::nullopt;
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.scalar_type() == at::kBool || is_supported_float(w.scalar_type()),
              "lfq_entropy: weight must be bool or float32/float16/bfloat16/float64, got ", w.scalar_type());
  TORCH_CHECK(w.sizes() == z.sizes().slice(0, z.dim() - 1), "lfq_entropy: weight must have z's leading shape ",
              z.sizes().slice(0, z.dim() - 1), " (one weight per row), got ", w.sizes());
  TORCH_CHECK(w.device() == z.device(), "lfq_entropy: weight must be on z's device ", z.device(), ", got ", w.device());
  return w.reshape({s.N}).to(acc).contiguous();
}

// sum_n w_n as a 0-dim tensor, 1 where it is 0 (every term it divides is then 0 too): no host synchronisation.
inline at::Tensor lfq_weight_divisor(const at::Tensor& w) {
  const at::Tensor total = w.sum();
  return at::where(total.gt(0), total, at::ones_like(total));
}

// The entropy's GEMMs (and every other ATen call of the orchestration) in IEEE fp32 for fp32/half/bf16 z, as
// the docs promise, whatever the caller's settings: autocast (whose CPU and CUDA kernels would run bmm in
// bf16/fp16: the dispatch keys are excluded for this thread), and torch.backends.cuda.matmul.allow_tf32 /
// torch.set_float32_matmul_precision("high" | "medium") (TF32 on CUDA, bf16 or TF32 in oneDNN on CPUs that
// have them). Those two are process-wide settings with no per-call form, so while an entropy runs they are
// IEEE and then restored, under a mutex that orders concurrent entropies; a matmul another thread runs in
// that window is computed in IEEE fp32 too (more precise, never less). Nothing is written when the settings
// already say IEEE.
class LfqFp32Gemms {
 public:
  LfqFp32Gemms() {
    auto& ctx = at::globalContext();
    cuda_ = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
    onednn_ = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    if (cuda_ == at::Float32Precision::IEEE && onednn_ == at::Float32Precision::IEEE) return;
    lock_ = std::unique_lock<std::mutex>(mutex());
    cuda_ = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);  // (re-read under the lock)
    onednn_ = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
    ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
  ~LfqFp32Gemms() {
    if (!lock_.owns_lock()) return;
    auto& ctx = at::globalContext();
    ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, cuda_);
    ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, onednn_);
  }
  LfqFp32Gemms(const LfqFp32Gemms&) = delete;
  LfqFp32Gemms& operator=(const LfqFp32Gemms&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{c10::autocast_dispatch_keyset};
  at::Float32Precision cuda_, onednn_;
  std::unique_lock<std::mutex> lock_;
};

// Rows per chunk: P_A and P_B of a chunk take at most ~64 MB.
inline int64_t lfq_chunk_rows(const LfqEntropyShape& s, int64_t elem) {
  const int64_t per_row = s.G * ((int64_t{1} << s.a) + (int64_t{1} << s.b)) * elem;
  return std::max<int64_t>(1, std::min<int64_t>(s.N, (int64_t{64} << 20) / per_row));
}

template <typename acc_t>
LfqEntropyParams<acc_t> lfq_entropy_params(const at::Tensor& z2, const LfqEntropyShape& s, double temperature,
                                           const std::optional<at::Tensor>& w) {
  LfqEntropyParams<acc_t> p{};
  p.z = z2.data_ptr();
  p.z_stride_n = z2.stride(0), p.z_stride_d = z2.stride(1);
  p.N = s.N, p.D = s.D, p.g = s.g, p.a = s.a, p.b = s.b, p.msb = s.msb;
  p.scale = static_cast<acc_t>(4.0 / temperature);
  p.weight = w.has_value() ? w->data_ptr<acc_t>() : nullptr;
  return p;
}

// Forward over row chunks. run_rows(params, false) fills pa / pb (and h_rows) for rows [row0, row0 + rows).
template <typename acc_t, typename RunRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy_forward_impl(const at::Tensor& z, double temperature,
                                                                        int64_t group_bits,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        std::string_view bit_order,
                                                                        RunRows&& run_rows) {
  const LfqEntropyShape s = lfq_entropy_shape(z, temperature, group_bits, bit_order);
  const LfqFp32Gemms fp32_gemms;
  const auto opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const std::optional<at::Tensor> w = lfq_entropy_weight(weight, z, s, opts.dtype().toScalarType());
  const at::Tensor z2 = z.reshape({s.N, s.D});
  at::Tensor probs_t = at::zeros({s.G, int64_t{1} << s.b, int64_t{1} << s.a}, opts);  // [G, 2^b, 2^a]
  at::Tensor h_rows = at::empty({s.N, s.G}, opts);
  LfqEntropyParams<acc_t> p = lfq_entropy_params<acc_t>(z2, s, temperature, w);
  p.h_rows = h_rows.data_ptr<acc_t>();
  const int64_t chunk = lfq_chunk_rows(s, sizeof(acc_t));
  for (int64_t r0 = 0; r0 < s.N; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.N - r0);
    at::Tensor pa = at::empty({s.G, rows, int64_t{1} << s.a}, opts);
    at::Tensor pb = at::empty({s.G, rows, int64_t{1} << s.b}, opts);
    p.row0 = r0, p.rows = rows, p.pa = pa.data_ptr<acc_t>(), p.pb = pb.data_ptr<acc_t>();
    run_rows(p, /*backward=*/false);
    probs_t.baddbmm_(pb.transpose(1, 2), pa);  // += P_B^T P_A per group
  }
  at::Tensor code_probs, sample;
  if (w.has_value()) {
    const at::Tensor total = lfq_weight_divisor(*w);
    code_probs = probs_t.div_(total).reshape({s.G, int64_t{1} << s.g});
    sample = h_rows.sum().div_(total).div_(static_cast<double>(s.G));
  } else {
    code_probs = probs_t.div_(static_cast<double>(s.N)).reshape({s.G, int64_t{1} << s.g});
    sample = h_rows.sum().div_(static_cast<double>(s.N * s.G));
  }
  const double tiny = std::numeric_limits<acc_t>::min();
  at::Tensor codebook = code_probs.mul(code_probs.clamp_min(tiny).log()).sum(-1).mean().neg_();
  return {sample, codebook, code_probs};
}

// Backward over row chunks: run_rows(params, false) recomputes pa / pb, run_rows(params, true) writes the
// chunk's grad_z rows from wa / wb.
template <typename acc_t, typename RunRows>
at::Tensor lfq_entropy_backward_impl(const std::optional<at::Tensor>& grad_sample,
                                     const std::optional<at::Tensor>& grad_codebook,
                                     const std::optional<at::Tensor>& grad_code_probs, const at::Tensor& z,
                                     const at::Tensor& code_probs, double temperature, int64_t group_bits,
                                     const std::optional<at::Tensor>& weight, std::string_view bit_order,
                                     RunRows&& run_rows) {
  const LfqEntropyShape s = lfq_entropy_shape(z, temperature, group_bits, bit_order);
  const LfqFp32Gemms fp32_gemms;
  const auto opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const std::optional<at::Tensor> w = lfq_entropy_weight(weight, z, s, opts.dtype().toScalarType());
  TORCH_CHECK(code_probs.sizes() == at::IntArrayRef({s.G, int64_t{1} << s.g}) && code_probs.scalar_type() == opts.dtype(),
              "lfq_entropy_backward: code_probs must be the forward's [G, 2^g] output, got ", code_probs.sizes());
  // dL/dq: the codebook entropy term -q log max(q, tiny), averaged over groups, plus any direct gradient.
  const double tiny = std::numeric_limits<acc_t>::min();
  at::Tensor gq = at::zeros({s.G, int64_t{1} << s.g}, opts);
  if (grad_codebook.has_value() && grad_codebook->defined()) {
    at::Tensor dh = code_probs.clamp_min(tiny).log().add_(code_probs.gt(tiny).to(opts.dtype())).neg_();
    gq.add_(dh.mul_(grad_codebook->to(opts.dtype()).div(static_cast<double>(s.G))));
  }
  if (grad_code_probs.has_value() && grad_code_probs->defined()) gq.add_(grad_code_probs->to(opts.dtype()));
  // the forward's means divide by N, or by the total weight
  const at::Tensor total = w.has_value() ? lfq_weight_divisor(*w) : at::full({}, static_cast<double>(s.N), opts);
  const at::Tensor gt = gq.view({s.G, int64_t{1} << s.b, int64_t{1} << s.a}).div(total);
  at::Tensor grad_h = (grad_sample.has_value() && grad_sample->defined())
                          ? grad_sample->to(opts.dtype()).div(total).div_(static_cast<double>(s.G)).contiguous()
                          : at::zeros({}, opts);

  const at::Tensor z2 = z.reshape({s.N, s.D});
  at::Tensor grad_z = at::empty({s.N, s.D}, opts);
  LfqEntropyParams<acc_t> p = lfq_entropy_params<acc_t>(z2, s, temperature, w);
  p.grad_h = grad_h.data_ptr<acc_t>();
  p.grad_z = grad_z.data_ptr<acc_t>();
  const int64_t chunk = lfq_chunk_rows(s, 2 * sizeof(acc_t));
  const int64_t scratch_len = int64_t{1} << (std::max(s.a, s.b) > 0 ? std::max(s.a, s.b) - 1 : 0);
  for (int64_t r0 = 0; r0 < s.N; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.N - r0);
    at::Tensor pa = at::empty({s.G, rows, int64_t{1} << s.a}, opts);
    at::Tensor pb = at::empty({s.G, rows, int64_t{1} << s.b}, opts);
    at::Tensor scratch = at::empty({s.G, rows, scratch_len}, opts);
    p.row0 = r0, p.rows = rows, p.pa = pa.data_ptr<acc_t>(), p.pb = pb.data_ptr<acc_t>(), p.h_rows = nullptr;
    p.scratch = scratch.data_ptr<acc_t>();
    p.wa = nullptr, p.wb = nullptr;
    p.weight = nullptr;               // the backward's products use the unweighted expansions ...
    run_rows(p, /*backward=*/false);  // recompute the expansions
    p.weight = w.has_value() ? w->data_ptr<acc_t>() : nullptr;  // ... and the kernel scales each row's gradient
    const at::Tensor wa = at::bmm(pb, gt).contiguous();                   // [G, rows, 2^a] = P_B Gt / N
    const at::Tensor wb = at::bmm(pa, gt.transpose(1, 2)).contiguous();   // [G, rows, 2^b] = P_A Gt^T / N
    p.wa = wa.data_ptr<acc_t>(), p.wb = wb.data_ptr<acc_t>();
    run_rows(p, /*backward=*/true);
  }
  return grad_z.to(z.scalar_type()).view(z.sizes());
}

}  // namespace fastvq
