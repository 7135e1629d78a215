#!/usr/bin/env bash
# The main job: install + build (with the data, eval and train extras), then `fastvq pipeline`: train the tiny
# UniTok and MergeVQ and the plain VQ baseline on Fashion-MNIST, evaluate them against their untrained selves,
# and write runs/main/report.md (metrics, reconstructions, loss curves, op speed). docs/training.md.
#   FASTVQ_STEPS=N   optimizer steps per model (default 150)       extra arguments go to `fastvq pipeline`
set -euo pipefail
cd "$(dirname "$0")/.."
FASTVQ_DATA=1 bash scripts/install.sh
# one intra-op thread per process: on 2 shared cores the tiny models' small convolutions lose more to
# OpenMP barriers than they gain (docs/training.md, "Speed")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"${PYTHON:-python3}" -m fastvq pipeline --out runs/main ${FASTVQ_STEPS:+--steps "$FASTVQ_STEPS"} "$@"
