// Torch glue for CUDA host code that must also build in the CPU emulation build. Every .cu includes this
// first. Under nvcc it is c10's CUDA headers; under g++ (the emulation build, csrc/cuda_emu/, setup.py's
// FASTVQ_EMU) the device guard, stream and launch check become no-ops and the .cu's launchers register
// as CPU kernels of the `fastvq_emu` library, so tests can run the CUDA kernels' own source on the CPU.
#pragma once

#include "cuda_emu/cuda_emu.h"
// (after the emulator, which must precede every c10 header)
#include "common/host_utils.h"

#if FASTVQ_CUDA_EMU

#include <atomic>

namespace fastvq {
// The emulation build's unchecked mode (torch.ops.fastvq_emu._set_unchecked): the host value checks and the
// kernel asserts are off, as in a build without them, so tests can hand bad values straight to the kernels
// and check (under AddressSanitizer) that the kernels' own guards keep every access in bounds.
inline std::atomic<bool>& emu_unchecked() {
  static std::atomic<bool> unchecked{false};
  return unchecked;
}
// How CUDA host code checks values (host_utils.h): a device reduction, then the CPU's loop on failure.
inline ValueCheck cuda_value_check() { return emu_unchecked().load() ? ValueCheck::kNone : ValueCheck::kReduction; }
}  // namespace fastvq

#define FASTVQ_CUDA_LIBRARY fastvq_emu
#define FASTVQ_CUDA_DISPATCH_KEY CPU
#define FASTVQ_CUDA_DEVICE_GUARD(device) ((void)(device))
#define FASTVQ_CUDA_STREAM() nullptr  // the emulator runs launches in order; no streams
#define FASTVQ_CUDA_LAUNCH_CHECK() ((void)0)  // the emulator throws from the launch itself
// A failed device assertion ends the emulated launch with an error naming the site (not in unchecked mode).
// Diagnosis only: no kernel's memory safety may depend on it (each guards its data-dependent indices).
#define FASTVQ_KERNEL_ASSERT(cond)                                          \
  do {                                                                      \
    if (!::fastvq::emu_unchecked().load(std::memory_order_relaxed) && !(cond)) __trap(); \
  } while (0)

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#define FASTVQ_CUDA_LIBRARY fastvq
#define FASTVQ_CUDA_DISPATCH_KEY CUDA
#define FASTVQ_CUDA_DEVICE_GUARD(device) const c10::cuda::CUDAGuard fastvq_device_guard_(device)
#define FASTVQ_CUDA_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#define FASTVQ_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define FASTVQ_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)  // diagnosis only: kernels guard their indices

namespace fastvq {
inline ValueCheck cuda_value_check() { return ValueCheck::kReduction; }
}  // namespace fastvq

#endif
