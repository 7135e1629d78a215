// Transparent huge pages for large, freshly allocated CPU outputs: opt-in (FASTVQ_HUGE_PAGES=1). Torch-free,
// header-only (host code of every library: the extension, and the emulation build that compiles the .cu
// host code with g++).
//
// A large CPU tensor comes from a fresh mmap: its first write faults in every 4 KiB page, which can cost
// more than the write itself (filling a fresh 136 MB tensor: 37 ms; with MADV_HUGEPAGE advised first:
// 13 ms). With FASTVQ_HUGE_PAGES=1, ops that produce activation-sized outputs (merge) advise
// MADV_HUGEPAGE on blocks of at least kHugePageMinBytes right after allocating them (glibc serves those
// from their own mapping, so the advice never reaches memory reused for something else). It is off by
// default because on this project's machine (a KVM guest) the gain is not reliable: after warm-up the
// merge schedules ran 1.8-2x faster, but the first calls in a process, or an output just above the
// threshold (lfq_quantize's 33.5 MB codes), ran up to 4x slower, with no compaction recorded: first
// touches of fresh guest memory. Measure on your machine. Linux only; advice only (no result changes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastvq {

constexpr std::size_t kHugePageMinBytes = std::size_t{32} << 20;

// Whether advise_huge_pages does anything here (Linux, with FASTVQ_HUGE_PAGES=1 in the environment).
inline bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("FASTVQ_HUGE_PAGES");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return enabled;
#else
  return false;
#endif
}

// Advises the 2 MiB-aligned interior of [p, p + bytes) as huge pages when bytes >= kHugePageMinBytes.
inline void advise_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageMinBytes || !huge_pages_enabled()) return;
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace fastvq
