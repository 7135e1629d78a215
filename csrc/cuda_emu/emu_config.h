// CUDA emulator: public run-time configuration (schedules, execution mode, stacks, watchdog) and the
// error type. Part of the header-only layer; include "cuda_emu/cuda_emu.h", not this file.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#if defined(__SANITIZE_THREAD__)
#define FASTVQ_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FASTVQ_EMU_TSAN 1
#endif
#endif

namespace fastvq {
namespace emu {

/// Every error the emulator reports: an invalid launch, or CUDA undefined behaviour found while running a
/// kernel (divergent barrier, bad warp collective, deadlock, ...). Thrown out of FASTVQ_LAUNCH_KERNEL
/// after the failing block's threads were unwound, so the process stays usable for the next launch.
class EmuError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The order in which the threads of a block run between barriers and warp collectives, and the order
/// in which the blocks of a grid run. A correct kernel gives the same result under every schedule.
enum class Schedule : std::uint8_t {
  kForward,   // linear thread id 0, 1, 2, ...; blocks in increasing linear block id
  kReverse,   // highest id first
  kShuffled,  // a seeded random permutation, drawn afresh for every scheduling pass of every block
};

/// How the threads of a block are executed.
enum class Mode : std::uint8_t {
  kFibers,   // all threads of a block are fibers on the launching OS thread: deterministic, fast
  kThreads,  // every thread of a block is an OS thread, truly concurrent: for ThreadSanitizer
};

struct Config {
  Schedule schedule = Schedule::kForward;
  std::uint64_t seed = 0;  // for Schedule::kShuffled
#if defined(FASTVQ_EMU_TSAN)
  Mode mode = Mode::kThreads;
#else
  Mode mode = Mode::kFibers;
#endif
  std::size_t stack_bytes = 256 * 1024;  // per fiber, plus a guard region below it
  double watchdog_s = 60.0;  // abort when a launch makes no progress for this long (0: off)
  // A shuffle whose source lane is inactive or outside the mask is an error (true), or returns an
  // all-ones bit pattern (false: for kernels that deliberately read and discard such values).
  bool strict_shfl_source = true;
};

inline const char* to_string(Schedule s) {
  switch (s) {
    case Schedule::kForward: return "forward";
    case Schedule::kReverse: return "reverse";
    case Schedule::kShuffled: return "shuffled";
  }
  return "?";
}

inline const char* to_string(Mode m) { return m == Mode::kFibers ? "fibers" : "threads"; }

namespace detail {

struct ConfigState {
  std::mutex m;
  bool initialised = false;
  Config cfg;
  std::string env_error;  // an invalid FASTVQ_EMU_* variable: reported by every config() call
};

inline ConfigState& config_state() {
  static ConfigState s;
  return s;
}

inline std::string validate_config(const Config& c) {
  if (c.stack_bytes < 16 * 1024 || c.stack_bytes > (std::size_t{1} << 30)) {
    return "fastvq::emu: stack_bytes must be in [16 KiB, 1 GiB], got " + std::to_string(c.stack_bytes);
  }
  if (!(c.watchdog_s >= 0)) return "fastvq::emu: watchdog_s must be >= 0, got " + std::to_string(c.watchdog_s);
  return {};
}

inline bool parse_u64(const char* s, std::uint64_t* out) {
  if (!s || !*s || *s == '-' || *s == '+') return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 0);
  if (errno != 0 || *end != '\0') return false;
  *out = v;
  return true;
}

/// The configuration the FASTVQ_EMU_* environment variables ask for (defaults where unset). An invalid
/// value leaves the default and sets *error to a message naming the variable, its value and the choices.
inline Config config_from_env(std::string* error) {
  Config c;
  error->clear();
  auto bad = [&](const char* var, const char* value, const char* expected) {
    if (error->empty()) {
      *error = std::string("fastvq::emu: ") + var + " must be " + expected + ", got '" + value + "'";
    }
  };
  if (const char* v = std::getenv("FASTVQ_EMU_SCHEDULE")) {
    const std::string s(v);
    if (s == "forward") c.schedule = Schedule::kForward;
    else if (s == "reverse") c.schedule = Schedule::kReverse;
    else if (s == "shuffled") c.schedule = Schedule::kShuffled;
    else bad("FASTVQ_EMU_SCHEDULE", v, "forward, reverse or shuffled");
  }
  if (const char* v = std::getenv("FASTVQ_EMU_SEED")) {
    if (!parse_u64(v, &c.seed)) bad("FASTVQ_EMU_SEED", v, "an unsigned integer");
  }
  if (const char* v = std::getenv("FASTVQ_EMU_MODE")) {
    const std::string s(v);
    if (s == "fibers") c.mode = Mode::kFibers;
    else if (s == "threads") c.mode = Mode::kThreads;
    else bad("FASTVQ_EMU_MODE", v, "fibers or threads");
  }
  if (const char* v = std::getenv("FASTVQ_EMU_STACK_KB")) {
    std::uint64_t kb = 0;
    if (!parse_u64(v, &kb) || kb < 16 || kb > (1u << 20)) bad("FASTVQ_EMU_STACK_KB", v, "an integer in [16, 1048576]");
    else c.stack_bytes = static_cast<std::size_t>(kb) * 1024;
  }
  if (const char* v = std::getenv("FASTVQ_EMU_WATCHDOG_S")) {
    char* end = nullptr;
    const double s = std::strtod(v, &end);
    if (!*v || *end != '\0' || !(s >= 0)) bad("FASTVQ_EMU_WATCHDOG_S", v, "a number of seconds >= 0 (0: off)");
    else c.watchdog_s = s;
  }
  return c;
}

}  // namespace detail

/// The current configuration. The first call reads the FASTVQ_EMU_* environment variables
/// (FASTVQ_EMU_SCHEDULE=forward|reverse|shuffled, FASTVQ_EMU_SEED, FASTVQ_EMU_MODE=fibers|threads,
/// FASTVQ_EMU_STACK_KB, FASTVQ_EMU_WATCHDOG_S); throws EmuError while one of them is invalid, until
/// set_config() replaces the configuration.
inline Config config() {
  detail::ConfigState& s = detail::config_state();
  const std::lock_guard<std::mutex> lock(s.m);
  if (!s.initialised) {
    s.cfg = detail::config_from_env(&s.env_error);
    s.initialised = true;
  }
  if (!s.env_error.empty()) throw EmuError(s.env_error);
  return s.cfg;
}

/// Replaces the configuration for the launches that start after this call (process-wide).
inline void set_config(const Config& c) {
  const std::string err = detail::validate_config(c);
  if (!err.empty()) throw EmuError(err);
  detail::ConfigState& s = detail::config_state();
  const std::lock_guard<std::mutex> lock(s.m);
  s.cfg = c;
  s.initialised = true;
  s.env_error.clear();
}

inline void set_schedule(Schedule schedule, std::uint64_t seed = 0) {
  Config c = config();
  c.schedule = schedule;
  c.seed = seed;
  set_config(c);
}

inline void set_mode(Mode mode) {
  Config c = config();
  c.mode = mode;
  set_config(c);
}

/// Sets a configuration for the lifetime of the object and restores the previous one (tests).
class ScopedConfig {
 public:
  explicit ScopedConfig(const Config& c) : saved_(config()) { set_config(c); }
  ~ScopedConfig() { set_config(saved_); }
  ScopedConfig(const ScopedConfig&) = delete;
  ScopedConfig& operator=(const ScopedConfig&) = delete;

 private:
  Config saved_;
};

}  // namespace emu
}  // namespace fastvq
