#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sparrow-sgl with the given extras.
# Torch: the CPU build torch==2.13.0, unless the system Python already has a CUDA build (then the venv sees it).
# Usage: scripts/setup_env.sh VENV_DIR [EXTRAS]      e.g. scripts/setup_env.sh .venv test,dev
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}
stamp="$venv/.sparrow-installed-${extras//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "setup: using the system's CUDA torch build"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# SGLang pins its own torch (2.14.1, from this machine's disk): no CPU build first in that case.
if [[ ",$extras," != *",sglang,"* ]] && ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${pip[@]}" torch==2.13.0
fi
echo "setup: installing sparrow-sgl${extras:+[$extras]} into $venv"
"${pip[@]}" -e ".${extras:+[$extras]}"
touch "$stamp"
