#!/usr/bin/env bash
# Everything a GPU must confirm, in one call (designed for < 10 minutes on one H100):
#   1. build fastvq._C for the present GPU's architecture only (TORCH_CUDA_ARCH_LIST from
#      torch.cuda.get_device_capability), CUDA required
#   2. every CUDA test: pytest -m cuda (the `cuda` marker: python_tests/conftest.py), i.e. every CUDA
#      kernel against the CPU op (bit-identical where docs/conventions.md says so), bad values raising the
#      CPU's errors without poisoning the context, d = 0, grid-limit shapes, a bf16/fp16 decode loop, and
#      lfq_entropy's GEMMs under TF32 / matmul-precision / autocast settings
#   3. compute-sanitizer memcheck and racecheck over a subset of those tests, where a compute-sanitizer is
#      found ($CUDA_HOME/bin, PATH, or the pip package nvidia-cuda-sanitizer-api; installed if pip can)
#   4. the benchmarks on the GPU (python -m fastvq.bench --device cuda, CUDA-event timing), written with
#      the machine's description to docs/benchmarks-gpu.md
# Without a GPU it stops at once with exit status 2. `--collect-only` (no GPU needed) only lists the tests
# step 2 would run. Logs go to build/gpu_check/.
#   GPU_CHECK_QUICK=0  full-size benchmarks (default 1: --quick, to stay within the time budget)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=build/gpu_check
mkdir -p "$LOG"
step() { echo; echo "=== $(date -u +%H:%M:%S) $* ==="; }

if [ "${1:-}" = "--collect-only" ]; then
  FASTVQ_TEST_CUDA=1 "$PY" -m pytest python_tests -m cuda --collect-only -q -p no:cacheprovider | tail -n 3
  exit 0
fi

step "GPU"
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); this script needs one" >&2
  exit 2
fi
nvidia-smi -L
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device" >&2
  exit 2
fi
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
echo "device: $GPU, compute capability $ARCH"

step "build fastvq._C for sm_${ARCH/./} (CUDA required)"
export TORCH_CUDA_ARCH_LIST="$ARCH" FASTVQ_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" setup.py build_ext --inplace > "$LOG/build.log" 2>&1 || { tail -n 40 "$LOG/build.log"; exit 1; }
"$PY" -c "import fastvq, json; i = fastvq.build_info(); print(json.dumps(i)); assert i['cuda'], 'not a CUDA build'"

status=0
step "CUDA tests (pytest -m cuda)"
"$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider -rfE 2>&1 | tee "$LOG/pytest.log" | tail -n 25 \
  || status=1

step "compute-sanitizer"
SAN=""
for c in "$CUDA_HOME/bin/compute-sanitizer" "$(command -v compute-sanitizer || true)"; do
  [ -n "$c" ] && [ -x "$c" ] && SAN="$c" && break
done
find_pip_sanitizer() {
  "$PY" - << 'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for p in pathlib.Path(root).glob("**/compute-sanitizer"):
        if p.is_file():
            print(p)
            raise SystemExit
EOF
}
[ -z "$SAN" ] && SAN="$(find_pip_sanitizer || true)"
if [ -z "$SAN" ] && timeout 120 "$PY" -m pip install -q "nvidia-cuda-sanitizer-api==${CUDA_SANITIZER_VERSION:-13.*}" \
     > "$LOG/sanitizer-pip.log" 2>&1; then
  SAN="$(find_pip_sanitizer || true)"
fi
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found (no \$CUDA_HOME/bin/compute-sanitizer, none on PATH, pip could not install" \
       "nvidia-cuda-sanitizer-api): memcheck/racecheck SKIPPED"
else
  chmod +x "$SAN" 2> /dev/null || true
  echo "using $SAN"
  # A subset that launches every kernel once or twice (sanitizers slow kernels down 10-100x).
  SUBSET=(python_tests/test_cuda_errors.py python_tests/test_cuda_device.py python_tests/test_cuda_emulated.py
          python_tests/test_merge.py python_tests/test_decode.py python_tests/test_lfq.py)
  for tool in memcheck racecheck; do
    if "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
         "$PY" -m pytest "${SUBSET[@]}" -m cuda -q -p no:cacheprovider -x \
         -k "not grid_y and not gemms and (forward or not emulated)" > "$LOG/sanitizer-$tool.log" 2>&1; then
      echo "$tool: clean ($(tail -n 1 "$LOG/sanitizer-$tool.log"))"
    else
      echo "$tool: FAILED (see $LOG/sanitizer-$tool.log)"; grep -m 20 -E "=========|FAILED" "$LOG/sanitizer-$tool.log" || true
      status=1
    fi
  done
fi

step "benchmarks on the GPU"
QUICK=(--quick)
[ "${GPU_CHECK_QUICK:-1}" = "0" ] && QUICK=()
if "$PY" -c "import pytest_benchmark" 2> /dev/null; then
  "$PY" -m fastvq.bench --device cuda "${QUICK[@]}" --json "$LOG/benchmarks.json" 2>&1 | tee "$LOG/bench.log" \
    | tail -n 40 || status=1
  {
    echo "# Benchmarks on a GPU"
    echo
    echo "Written by \`scripts/gpu_check.sh\` on $(date -u +%Y-%m-%d): $GPU (compute capability $ARCH),"
    echo "$(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader | head -n 1) (driver, memory);"
    echo "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'). Times are CUDA-event"
    echo "medians (fastvq.bench --device cuda${QUICK:+ --quick}); the CUDA test results of the same run: $(tail -n 1 "$LOG/pytest.log")."
    echo
    echo '```'
    sed -n '/^fastvq .* benchmarks/,$p' "$LOG/bench.log"
    echo '```'
  } > docs/benchmarks-gpu.md
  echo "wrote docs/benchmarks-gpu.md"
else
  echo "pytest-benchmark is not installed: benchmarks SKIPPED"; status=1
fi

step "done (status $status)"
exit "$status"
