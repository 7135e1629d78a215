// The fastvq library: every op's schema (the API contract, listed in schemas.h), and the small `fastvq._C` Python module
// that loads the library and reports how it was built. Kernels register in their own files with
// TORCH_LIBRARY_IMPL(fastvq, CPU|CUDA, m); autograd and fake (meta) kernels live in Python
// (fastvq/ops/), so there is exactly one place for each op's shape logic.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_isa.h"
#include "common/macros.h"
#include "schemas.h"

#ifndef FASTVQ_VERSION
#define FASTVQ_VERSION "0+unknown"
#endif

namespace fastvq {
#if defined(FASTVQ_WITH_CUDA)
// Defined in csrc/common/build_info_cuda.cu, compiled by nvcc: linking it proves the CUDA sources built.
std::string cuda_compiler_version();
std::vector<std::string> cuda_archs_compiled();
#endif
}  // namespace fastvq

TORCH_LIBRARY(fastvq, m) {
#define FASTVQ_DEFINE_OP(schema) m.def(schema, {at::Tag::pt2_compliant_tag});
  FASTVQ_FOR_EACH_SCHEMA(FASTVQ_DEFINE_OP)
#undef FASTVQ_DEFINE_OP
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fastvq native library: registers torch.ops.fastvq.* and reports build information";
  mod.def("build_info", [] {
    py::dict info;
    info["version"] = FASTVQ_VERSION;
    info["torch"] = TORCH_VERSION;
#if defined(FASTVQ_WITH_CUDA)
    info["cuda"] = true;
    info["cuda_archs"] = fastvq::cuda_archs_compiled();
    info["nvcc"] = fastvq::cuda_compiler_version();
#else
    info["cuda"] = false;
    info["cuda_archs"] = std::vector<std::string>{};
    info["nvcc"] = py::none();
#endif
    info["cxx"] = std::string(
#if defined(__clang__)
        "clang "
#elif defined(__GNUC__)
        "gcc "
#endif
        __VERSION__);
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["num_threads"] = at::get_num_threads();
    info["cpu_isa"] = fastvq::cpu_isa_name(fastvq::cpu_isa_active());
    info["cpu_isa_supported"] = fastvq::cpu_isa_name(fastvq::cpu_isa_supported());
#if defined(NDEBUG)
    info["debug"] = false;
#else
    info["debug"] = true;
#endif
    return info;
  });
  mod.def("set_cpu_isa", &fastvq::set_cpu_isa, py::arg("name"),
          "Force the CPU kernels' ISA ('scalar', 'avx2', 'avx512' or 'auto'); returns the previous one.");
  mod.def("cpu_isa", [] { return std::string(fastvq::cpu_isa_name(fastvq::cpu_isa_active())); },
          "The ISA the CPU kernels use now.");
}
