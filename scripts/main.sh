#!/usr/bin/env bash
# The main job: install + build (with the data, eval and train extras), then `fastvq pipeline`: train the tiny
# UniTok and MergeVQ and the plain VQ baseline on Fashion-MNIST, evaluate them against their untrained selves,
# train the tiny MLLM on the UniTok's codes (text-to-image, captions, QA) and evaluate it against its untrained self
# and image-free baselines, train MergeAR briefly on the MergeVQ's tokens and sample it at two keep counts (accuracy
# against its untrained self, KV rows of the compacted cache against the full one), and write runs/main/report.md
# (metrics, reconstructions, generated images, captions, MergeAR samples, loss curves, op speed). docs/training.md.
#   FASTVQ_STEPS=N        optimizer steps per tokenizer (default 100)   extra arguments go to `fastvq pipeline`
#   FASTVQ_MLLM_STEPS=N   optimizer steps of the MLLM (default 800; 0: no MLLM stage)
#   FASTVQ_MERGEAR_STEPS=N optimizer steps of MergeAR (default 250; 0: no MergeAR stage)
set -euo pipefail
cd "$(dirname "$0")/.."
FASTVQ_DATA=1 bash scripts/install.sh
# one intra-op thread per process: on 2 shared cores the tiny models' small convolutions lose more to
# OpenMP barriers than they gain (docs/training.md, "Speed")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"${PYTHON:-python3}" -m fastvq pipeline --out runs/main ${FASTVQ_STEPS:+--steps "$FASTVQ_STEPS"} \
    ${FASTVQ_MLLM_STEPS:+--mllm-steps "$FASTVQ_MLLM_STEPS"} \
    ${FASTVQ_MERGEAR_STEPS:+--mergear-steps "$FASTVQ_MERGEAR_STEPS"} "$@"
