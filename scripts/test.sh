#!/usr/bin/env bash
# The full test suite:
#   1. install + build: the extension and the CUDA emulation builds (plain and ASan+UBSan), and the
#      data/eval packages (FASTVQ_DATA=1 unless set to 0)
#   2. native tests of the torch-free cores and the emulation layer (CMake/ctest): plain, ASan+UBSan,
#      and the emulator's OS-thread mode under TSan
#   3. strict compile of every .cu for sm_80/sm_90 + the kernel resource report check (where nvcc exists)
#   4. pytest: ops vs references, and every CUDA kernel emulated on the CPU under each schedule
#   5. the emulated CUDA kernels again, under AddressSanitizer + UBSan
# Extra arguments go to the main pytest run (4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-2}"
export FASTVQ_EMU="${FASTVQ_EMU:-1}" FASTVQ_EMU_ASAN="${FASTVQ_EMU_ASAN:-1}"
export FASTVQ_DATA="${FASTVQ_DATA:-1}"   # the data/eval packages too (fastvq.data, fastvq.eval tests)
step() { echo; echo "=== $* ==="; }

step "install and build"
bash scripts/install.sh

step "native tests"
cmake -S . -B build/native -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build/native -j "$JOBS"
ctest --test-dir build/native --output-on-failure
step "native tests under ASan + UBSan"
cmake -S . -B build/native-san -DFASTVQ_SANITIZE=ON > /dev/null
cmake --build build/native-san -j "$JOBS"
ctest --test-dir build/native-san --output-on-failure
step "CUDA emulator self-tests in OS-thread mode under ThreadSanitizer"
cmake -S . -B build/native-tsan -DFASTVQ_EMU_THREADS=ON > /dev/null
cmake --build build/native-tsan -j "$JOBS"
ctest --test-dir build/native-tsan --output-on-failure -R cuda_emu

if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  step "strict CUDA compile (sm_80, sm_90) and docs/kernels.md"
  "$PY" scripts/cuda_strict.py --check
elif [ "${FASTVQ_REQUIRE_CUDA:-0}" = "1" ]; then
  echo "nvcc not found under CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}" >&2
  exit 1
fi

step "pytest"
"$PY" -m pytest python_tests -q "$@"

if [ "$FASTVQ_EMU_ASAN" = "1" ]; then
  step "emulated CUDA kernels under ASan + UBSan"
  # libasan must come first; libstdc++ too, or ASan cannot intercept C++ throws from the emulator.
  LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1" \
  FASTVQ_EMU_VARIANT=asan FASTVQ_REQUIRE_EMU=1 \
    "$PY" -m pytest python_tests/test_cuda_emulated.py python_tests/test_lfq.py python_tests/test_merge.py \
      python_tests/test_decode.py python_tests/test_mcq_gemm.py python_tests/test_cuda_errors.py \
      python_tests/test_cuda_device.py -k "emulated or every_op or emu" \
      -q -p no:cacheprovider
fi
