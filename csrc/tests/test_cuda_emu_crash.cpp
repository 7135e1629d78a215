// Self-tests of the CUDA emulator for bugs that end the process: each case runs in a child process (this
// executable re-executed with --child <case>), and the parent checks how the child ended and what it
// printed, with a deadline (a hang fails the test instead of blocking CI).
//   shared_oob / dynamic_oob  out-of-bounds shared memory: AddressSanitizer (-DFASTVQ_SANITIZE=ON builds)
//   stack_overflow            a fiber overflows its stack: the guard region faults, and the emulator (or
//                             the sanitizer that owns SIGSEGV) says so
//   watchdog_*                a kernel spins on another block: the watchdog aborts with a message
//   data_race                 a missing barrier in threads mode: ThreadSanitizer (-DFASTVQ_EMU_THREADS=ON);
//                             the racy accesses are forced to exist in every run (planted_race_kernel)
//   fork                      a child forked after threads-mode launches can launch and exit normally
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tests/test_cuda_emu_kernels.cuh"

using fastvq::emu::Config;
using fastvq::emu::Mode;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAsan = true;
#else
constexpr bool kAsan = false;
#endif
#if defined(__SANITIZE_THREAD__)
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif

// ---- the children ---------------------------------------------------------------------------------

static int child(const std::string& name) {
  std::vector<int> in(256, 1), out(256, 0);
  Config c;
  c.mode = Mode::kFibers;
  c.watchdog_s = 60;
  if (name == "ok") {
    fastvq::emu::set_config(c);
    emu_test::launch_block_sum(in.data(), 256, out.data());
    return out[0] == 256 ? 0 : 1;
  }
  if (name == "shared_oob") {
    fastvq::emu::set_config(c);
    emu_test::launch_shared_oob(in.data(), out.data());
    return 0;
  }
  if (name == "dynamic_oob") {
    fastvq::emu::set_config(c);
    emu_test::launch_dynamic_oob(out.data());
    return 0;
  }
  if (name == "stack_overflow") {
    fastvq::emu::set_config(c);
    emu_test::launch_stack_overflow(out.data());
    return 0;
  }
  if (name == "watchdog_fibers" || name == "watchdog_threads") {
    c.mode = name == "watchdog_fibers" ? Mode::kFibers : Mode::kThreads;
    c.watchdog_s = 1;
    fastvq::emu::set_config(c);
    int flag = 0;
    emu_test::launch_spin_wait(&flag);
    return 0;
  }
  if (name == "data_race") {
    c.mode = Mode::kThreads;
    fastvq::emu::set_config(c);
    int rendezvous[2] = {0, 0};
    emu_test::launch_planted_race(in.data(), out.data(), rendezvous);  // ThreadSanitizer reports the race
    return 0;
  }
  if (name == "fork") {
    // Threads mode starts worker threads and the watchdog; a forked child has none of them, must be
    // able to launch, and must exit normally (static destructors must not wait for the parent's threads).
    c.mode = Mode::kThreads;
    fastvq::emu::set_config(c);
    emu_test::launch_block_sum(in.data(), 256, out.data());
    const pid_t pid = fork();
    if (pid == 0) {
      out[0] = 0;
      emu_test::launch_block_sum(in.data(), 256, out.data());
      c.mode = Mode::kFibers;
      fastvq::emu::set_config(c);
      emu_test::launch_block_sum(in.data(), 256, out.data());
      std::exit(out[0] == 256 ? 0 : 3);
    }
    for (int waited_ms = 0; waited_ms < 30000; waited_ms += 10) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 4;
      usleep(10000);
    }
    kill(pid, SIGKILL);
    std::fprintf(stderr, "the forked child hung\n");
    return 5;
  }
  std::fprintf(stderr, "unknown child case '%s'\n", name.c_str());
  return 2;
}

// ---- the parent -----------------------------------------------------------------------------------

struct ChildResult {
  bool timed_out = false;
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string output;  // stdout and stderr
};

static ChildResult run_child(const std::string& name, double timeout_s) {
  ChildResult r;
  int fds[2];
  if (pipe(fds) != 0) {
    r.output = "pipe failed";
    return r;
  }
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    execl("/proc/self/exe", "test_cuda_emu_crash", "--child", name.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(fds[1]);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  char buf[4096];
  for (;;) {
    using std::chrono::milliseconds;
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    const ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0) break;  // EOF: the child (and everything it started) has closed the pipe
    r.output.append(buf, static_cast<std::size_t>(n));
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  return r;
}

static int g_failures = 0;

// Runs a case; it must die (non-zero exit or a signal) without timing out, printing one of `any_of`.
static void expect_death(const std::string& name, const std::vector<std::string>& any_of, double timeout_s = 60) {
  const auto t0 = std::chrono::steady_clock::now();
  const ChildResult r = run_child(name, timeout_s);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bool found = false;
  for (const std::string& n : any_of) found = found || r.output.find(n) != std::string::npos;
  const bool died = r.signal != 0 || (r.exit_code != 0 && r.exit_code != 127);
  if (r.timed_out || !died || !found) {
    ++g_failures;
    std::fprintf(stderr, "FAILED %s: timed_out=%d exit=%d signal=%d, expected one of:", name.c_str(), r.timed_out,
                 r.exit_code, r.signal);
    for (const std::string& n : any_of) std::fprintf(stderr, " '%s'", n.c_str());
    std::fprintf(stderr, "\n--- child output (first 4000 bytes) ---\n%s\n--------------------\n",
                 r.output.substr(0, 4000).c_str());
    return;
  }
  std::string first_line;
  for (const std::string& n : any_of) {
    const std::size_t at = r.output.find(n);
    if (at == std::string::npos) continue;
    const std::size_t begin = r.output.rfind('\n', at) == std::string::npos ? 0 : r.output.rfind('\n', at) + 1;
    first_line = r.output.substr(begin, std::min<std::size_t>(r.output.find('\n', at) - begin, 200));
    break;
  }
  std::printf("  %-16s died as expected (%s %d, %.1f s): %s\n", name.c_str(), r.signal ? "signal" : "exit",
              r.signal ? r.signal : r.exit_code, s, first_line.c_str());
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--child") == 0) return child(argv[2]);

  const ChildResult ok = run_child("ok", 60);
  if (ok.exit_code != 0) {
    ++g_failures;
    std::fprintf(stderr, "FAILED the control child: exit=%d signal=%d\n%s\n", ok.exit_code, ok.signal,
                 ok.output.c_str());
  }
  if (!kTsan) {  // ThreadSanitizer does not support threads started after a multi-threaded fork
    const ChildResult f = run_child("fork", 60);
    if (f.exit_code != 0) {
      ++g_failures;
      std::fprintf(stderr, "FAILED fork: exit=%d signal=%d\n%s\n", f.exit_code, f.signal, f.output.c_str());
    } else {
      std::printf("  %-16s a forked child launches and exits normally\n", "fork");
    }
  }
  if (kAsan) {
    expect_death("shared_oob", {"AddressSanitizer: global-buffer-overflow", "runtime error: store to address"});
    expect_death("dynamic_oob", {"AddressSanitizer: heap-buffer-overflow"});
  } else {
    std::printf("  shared_oob, dynamic_oob: skipped (need AddressSanitizer: -DFASTVQ_SANITIZE=ON)\n");
  }
  // Ours without a sanitizer; AddressSanitizer's or ThreadSanitizer's report when they own SIGSEGV.
  expect_death("stack_overflow", {"fastvq::emu: stack overflow in kernel", "AddressSanitizer: stack-overflow",
                                  "ThreadSanitizer: stack-overflow"});
  expect_death("watchdog_fibers", {"fastvq::emu: watchdog: no progress for"});
  expect_death("watchdog_threads", {"fastvq::emu: watchdog: no progress for"});
  if (kTsan) {
    expect_death("data_race", {"ThreadSanitizer: data race"});
  } else {
    std::printf("  data_race: skipped (needs ThreadSanitizer: -DFASTVQ_EMU_THREADS=ON)\n");
  }
  if (g_failures) {
    std::fprintf(stderr, "test_cuda_emu_crash: %d case(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("test_cuda_emu_crash: all cases passed\n");
  return 0;
}
