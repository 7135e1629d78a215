#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fastvq {
namespace {

constexpr int kAuto = -1;  // the setting "auto": the best supported ISA

// "auto" -> kAuto, an ISA name -> its value; false for anything else.
bool parse_setting(const std::string& name, int* out) {
  if (name == "scalar") *out = static_cast<int>(CpuIsa::kScalar);
  else if (name == "avx2") *out = static_cast<int>(CpuIsa::kAVX2);
  else if (name == "avx512") *out = static_cast<int>(CpuIsa::kAVX512);
  else if (name == "auto" || name.empty()) *out = kAuto;
  else return false;
  return true;
}

// The current setting (kAuto or a forced ISA).
std::atomic<int>& setting_slot() {
  static std::atomic<int> slot([] {
    int setting = kAuto;
    if (const char* env = std::getenv("FASTVQ_CPU_ISA")) {
      // An unknown or unsupported name falls back to "auto" rather than failing at import.
      if (!parse_setting(env, &setting) || setting > static_cast<int>(cpu_isa_supported())) setting = kAuto;
    }
    return setting;
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

CpuIsa cpu_isa_active() {
  const int setting = setting_slot().load(std::memory_order_relaxed);
  return setting == kAuto ? cpu_isa_supported() : static_cast<CpuIsa>(setting);
}

std::string set_cpu_isa(const std::string& name) {
  int want;
  if (!parse_setting(name, &want)) {
    throw std::invalid_argument("fastvq.set_cpu_isa: unknown ISA '" + name +
                                "', expected one of scalar, avx2, avx512, auto");
  }
  if (want > static_cast<int>(cpu_isa_supported())) {
    throw std::invalid_argument("fastvq.set_cpu_isa: '" + name + "' is not supported by this CPU (best: " +
                                cpu_isa_name(cpu_isa_supported()) + ")");
  }
  const int prev = setting_slot().exchange(want);
  return prev == kAuto ? "auto" : cpu_isa_name(static_cast<CpuIsa>(prev));
}

}  // namespace fastvq
