// CPU host functions of the mcq ops: checks, allocation, and the parallel loop over the torch-free
// cores in mcq_search_cpu_kernel.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "common/cpu_isa.h"
#include "mcq/mcq_gemm_search_cpu_kernel.h"
#include "mcq/mcq_host.h"
#include "mcq/mcq_search_cpu_kernel.h"

namespace fastvq {

// z [..., G, d], codebooks [G, K, d] -> (indices [..., G] int64, scores [..., G] float32)
std::tuple<at::Tensor, at::Tensor> mcq_search_cpu(const at::Tensor& z, const at::Tensor& codebooks,
                                                  std::string_view metric) {
  const McqMetric m = parse_mcq_metric(metric);
  const McqShape s = check_mcq_search_args(z, codebooks);
  auto [indices, scores] = mcq_search_outputs(z);
  if (s.N == 0 || s.G == 0) return {indices, scores};

  const at::Tensor z3 = z.reshape({s.N, s.G, s.d});  // a view whenever z's strides allow one
  McqSearchParams p = mcq_search_params(z3, codebooks, s, m, indices, scores);
  const CpuIsa isa = cpu_isa_active();
  if (s.d >= kMcqGemmMinD) {  // GEMM-shaped: the packed GEMM path (mcq_gemm_search_cpu_kernel.h), same bits
    mcq_gemm_search_cpu_run(p, isa, at::get_num_threads(), [](int64_t n, int64_t grain, const auto& fn) {
      at::parallel_for(0, n, grain, fn);
    });
    return {indices, scores};
  }
  p.K_pad = round_up(s.K, kMcqCpuKAlign);
  at::Tensor cb_prep = at::empty({s.G, s.d, p.K_pad}, z.options().dtype(at::kFloat));  // [G, d, K_pad]
  at::Tensor bias_prep = at::empty({s.G, p.K_pad}, z.options().dtype(at::kFloat));     // [G, K_pad]
  p.cb_prep = cb_prep.data_ptr<float>();
  p.bias_prep = bias_prep.data_ptr<float>();

  // Work estimates keep tiny problems on one thread (a parallel region costs more than they do).
  const int64_t prep_work = s.K * std::max<int64_t>(s.d, 1);
  at::parallel_for(0, s.G, std::max<int64_t>(1, 32768 / prep_work), [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) mcq_prepare_codebook_cpu(p, isa, g);
  });
  const McqSearchCpuPlan plan = mcq_search_cpu_plan(p, isa);
  const int64_t task_work = plan.rows_per_task * p.K_pad * std::max<int64_t>(s.d, 1);
  at::parallel_for(0, plan.num_tasks, std::max<int64_t>(1, 262144 / task_work), [&](int64_t b, int64_t e) {
    std::vector<float> scratch(plan.scratch_floats);
    for (int64_t t = b; t < e; ++t) mcq_search_cpu_task(p, isa, t, scratch.data());
  });
  return {indices, scores};
}

// indices [..., G] int64/int32, codebooks [G, K, d] -> [..., G, d]
at::Tensor mcq_gather_cpu(const at::Tensor& indices, const at::Tensor& codebooks) {
  const McqShape s = check_mcq_gather_args(indices, codebooks);
  at::Tensor out = mcq_gather_output(indices, codebooks);
  if (out.numel() == 0) {
    if (s.N * s.G > 0) mcq_gather_check_indices(indices.reshape({s.N, s.G}), s.K, ValueCheck::kLoop);  // d == 0
    return out;
  }
  const at::Tensor idx2 = indices.reshape({s.N, s.G});
  const McqGatherParams p = mcq_gather_params(idx2, codebooks, s, out);
  const DType dt = to_dtype(codebooks.scalar_type());
  std::atomic<int64_t> first_bad{-1};
  at::parallel_for(0, s.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(s.G * s.d, 1)), [&](int64_t b, int64_t e) {
    const int64_t bad = mcq_gather_cpu_rows(p, dt, b, e);
    if (bad >= 0) {
      int64_t cur = first_bad.load();
      while ((cur < 0 || bad < cur) && !first_bad.compare_exchange_weak(cur, bad)) {
      }
    }
  });
  // The kernel found a bad index (and wrote NaN rows); the shared check names the first one.
  if (first_bad.load() >= 0) mcq_gather_check_indices(idx2, s.K, ValueCheck::kLoop);
  return out;
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("mcq_search", &mcq_search_cpu);
  m.impl("mcq_gather", &mcq_gather_cpu);
}

}  // namespace fastvq
