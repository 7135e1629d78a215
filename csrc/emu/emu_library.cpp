// The `fastvq_emu` library of the CUDA emulation build (setup.py: FASTVQ_EMU=1 / FASTVQ_EMU_ASAN=1).
// It defines every fastvq schema again under `fastvq_emu`; each .cu file, compiled by g++ against
// csrc/cuda_emu/, registers its CUDA launchers as this library's CPU kernels (see common/cuda_compat.h).
// So torch.ops.fastvq_emu.<op> runs the CUDA kernels' own source on CPU tensors. Not part of fastvq._C.
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "common/cuda_compat.h"
#include "schemas.h"

namespace {

void set_schedule(std::string_view name, int64_t seed) {
  namespace emu = fastvq::emu;
  emu::Schedule s;
  if (name == "forward") s = emu::Schedule::kForward;
  else if (name == "reverse") s = emu::Schedule::kReverse;
  else if (name == "shuffled") s = emu::Schedule::kShuffled;
  else TORCH_CHECK(false, "fastvq_emu._set_schedule: schedule must be forward, reverse or shuffled, got \"",
                   std::string(name), "\"");
  TORCH_CHECK(seed >= 0, "fastvq_emu._set_schedule: seed must be >= 0, got ", seed);
  emu::set_schedule(s, static_cast<uint64_t>(seed));
}

void set_mode(std::string_view name) {
  namespace emu = fastvq::emu;
  if (name == "fibers") emu::set_mode(emu::Mode::kFibers);
  else if (name == "threads") emu::set_mode(emu::Mode::kThreads);
  else TORCH_CHECK(false, "fastvq_emu._set_mode: mode must be fibers or threads, got \"", std::string(name), "\"");
}

// Unchecked mode: the .cu host code skips its value checks and FASTVQ_KERNEL_ASSERT is off, so bad indices,
// sizes and lengths reach the kernels, whose own guards must keep them in bounds (tests, under ASan).
void set_unchecked(bool unchecked) { fastvq::emu_unchecked().store(unchecked); }

}  // namespace

TORCH_LIBRARY(fastvq_emu, m) {
#define FASTVQ_DEFINE_OP(schema) m.def(schema);
  FASTVQ_FOR_EACH_SCHEMA(FASTVQ_DEFINE_OP)
#undef FASTVQ_DEFINE_OP
  m.def("_set_schedule(str schedule, int seed=0) -> ()", &set_schedule);
  m.def("_set_mode(str mode) -> ()", &set_mode);
  m.def("_set_unchecked(bool unchecked) -> ()", &set_unchecked);
}
