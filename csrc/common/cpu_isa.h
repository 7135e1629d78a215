// Which CPU vector ISA the CPU kernels use. Detected once at run time (so one build runs on any x86-64
// machine); FASTVQ_CPU_ISA=scalar|avx2|avx512 or set_cpu_isa() forces a lower one (tests use this to
// exercise every path on one machine). Torch-free.
#pragma once

#include <string>

namespace fastvq {

enum class CpuIsa : int { kScalar = 0, kAVX2 = 1, kAVX512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// The best ISA both compiled in and supported by this CPU.
CpuIsa cpu_isa_supported();
// The ISA kernels use now: FASTVQ_CPU_ISA if set at first use, else cpu_isa_supported().
CpuIsa cpu_isa_active();
// Force an ISA by name ("scalar", "avx2", "avx512", or "auto"); throws std::invalid_argument for an
// unknown name or one this machine cannot run. Returns the previous setting ("auto" or an ISA name).
std::string set_cpu_isa(const std::string& name);

}  // namespace fastvq

// Per-ISA kernel files compile one algorithm several times, each copy in a namespace <prefix>_scalar, and on
// x86-64 with GCC/Clang also <prefix>_avx2 and <prefix>_avx512 (under `#pragma GCC target`).
// FASTVQ_CPU_ISA_SWITCH(isa, prefix, stmt) runs `stmt` with `ns` naming the namespace of `isa`.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTVQ_CPU_X86_PATHS 1
#define FASTVQ_CPU_ISA_SWITCH(isa, prefix, ...)                                           \
  switch (isa) {                                                                          \
    case ::fastvq::CpuIsa::kAVX512: { namespace ns = prefix##_avx512; __VA_ARGS__; } break; \
    case ::fastvq::CpuIsa::kAVX2: { namespace ns = prefix##_avx2; __VA_ARGS__; } break;     \
    default: { namespace ns = prefix##_scalar; __VA_ARGS__; } break;                        \
  }
#else
#define FASTVQ_CPU_ISA_SWITCH(isa, prefix, ...) \
  { namespace ns = prefix##_scalar; __VA_ARGS__; }
#endif
