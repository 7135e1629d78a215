#!/usr/bin/env bash
# The full test suite: install + build, native tests of the torch-free cores (CMake/ctest), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

bash scripts/install.sh

cmake -S . -B build/native -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build/native -j "${MAX_JOBS:-2}"
ctest --test-dir build/native --output-on-failure

"$PY" -m pytest python_tests -q "$@"
