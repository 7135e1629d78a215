#!/usr/bin/env bash
# The main job: install + build, then every op against its reference (and faiss) as one table.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTVQ_EXTRAS="faiss-cpu ${FASTVQ_EXTRAS:-}" bash scripts/install.sh
"${PYTHON:-python3}" -m fastvq.bench "$@"
