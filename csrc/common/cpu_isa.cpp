#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fastvq {
namespace {

bool parse_isa(const std::string& name, CpuIsa* out) {
  if (name == "scalar") *out = CpuIsa::kScalar;
  else if (name == "avx2") *out = CpuIsa::kAVX2;
  else if (name == "avx512") *out = CpuIsa::kAVX512;
  else if (name == "auto" || name.empty()) *out = cpu_isa_supported();
  else return false;
  return true;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot([] {
    CpuIsa isa = cpu_isa_supported();
    if (const char* env = std::getenv("FASTVQ_CPU_ISA")) {
      CpuIsa want;
      // An unknown or unsupported name falls back to the detected ISA rather than failing at import.
      if (parse_isa(env, &want) && want <= isa) isa = want;
    }
    return static_cast<int>(isa);
  }());
  return slot;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAVX2: return "avx2";
    case CpuIsa::kAVX512: return "avx512";
  }
  return "?";
}

CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return CpuIsa::kAVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAVX2;
    return CpuIsa::kScalar;
  }();
  return isa;
#else
  return CpuIsa::kScalar;
#endif
}

CpuIsa cpu_isa_active() { return static_cast<CpuIsa>(active_slot().load(std::memory_order_relaxed)); }

std::string set_cpu_isa(const std::string& name) {
  CpuIsa want;
  if (!parse_isa(name, &want)) {
    throw std::invalid_argument("fastvq.set_cpu_isa: unknown ISA '" + name +
                                "', expected one of scalar, avx2, avx512, auto");
  }
  if (want > cpu_isa_supported()) {
    throw std::invalid_argument("fastvq.set_cpu_isa: '" + name + "' is not supported by this CPU (best: " +
                                cpu_isa_name(cpu_isa_supported()) + ")");
  }
  const CpuIsa prev = static_cast<CpuIsa>(active_slot().exchange(static_cast<int>(want)));
  return cpu_isa_name(prev);
}

}  // namespace fastvq
