// Transparent huge pages for large, freshly allocated CPU outputs. Torch-free, header-only (host code of
// every library: the extension, and the emulation build that compiles the .cu host code with g++).
//
// A large CPU tensor comes from a fresh mmap: its first write faults in every 4 KiB page, and on this
// project's machines that costs more than the write itself (copying 142 MB into a fresh tensor: 72 ms;
// into an existing one: 25 ms). Advising MADV_HUGEPAGE on the block before the first write makes the kernel
// fault in 2 MiB pages (44 ms for the same copy). Ops that produce activation-sized outputs (merge) call
// this right after allocating them. Only blocks of at least kHugePageMinBytes are advised: glibc serves
// those from their own mapping, so the advice never leaks to memory that is reused for something else.
// Linux only (a no-op elsewhere); FASTVQ_HUGE_PAGES=0 in the environment turns it off. Advice only: it
// changes no result, and failure (THP disabled, "never") is ignored.
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

// Whether advise_huge_pages does anything here (Linux, and not turned off by FASTVQ_HUGE_PAGES=0).
inline bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("FASTVQ_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
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
