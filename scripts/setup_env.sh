#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sparrow-sgl with the given extras.
# Torch: the CPU build torch==2.13.0, unless the system Python already has a CUDA build (then the venv sees it).
# OpenRLHF (extra `openrlhf`): its pure dependencies from the extra (DeepSpeed with DS_BUILD_OPS=0: no op is built at
# install time), with the venv's torch/transformers/sglang held where they are, then openrlhf==0.11.2 itself with
# --no-deps (its transformers and flash-attn pins conflict with SGLang's), minus the stray top-level `tests` package
# its wheel puts into site-packages.
# Usage: scripts/setup_env.sh VENV_DIR [EXTRAS]      e.g. scripts/setup_env.sh .venv test,dev
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}
stamp="$venv/.sparrow-installed-${extras//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
# Installing needs room: SGLang's venv is ~11 GiB (its CUDA torch build alone ~5.5 GiB), the core's ~1.6 GiB.
# Check before, so a full disk is named here and not discovered half-way through pip as "[Errno 28]".
need_gib=3
if [[ ",$extras," == *",sglang,"* ]]; then need_gib=14; fi
mkdir -p "$venv"
free_gib=$(( $(df -Pk "$venv" | awk 'NR==2 {print $4}') / 1048576 ))
have_gib=$(du -sk "$venv" | awk '{print int($1 / 1048576)}')
if (( free_gib + have_gib < need_gib )); then
  echo "setup: only ${free_gib} GiB free on the disk of $venv (installing sparrow-sgl[$extras] needs ~${need_gib} GiB):" \
    "free some space (old CI clones, pip caches) and run again" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "setup: using the system's CUDA torch build"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
# No pip cache: on a fresh machine it only doubles what the downloads take on disk.
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)
# SGLang pins its own torch (2.14.1, from this machine's disk): no CPU build first in that case.
if [[ ",$extras," != *",sglang,"* ]] && ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${pip[@]}" torch==2.13.0
fi
hold=()
if [[ ",$extras," == *",openrlhf,"* ]]; then
  held="$venv/.sparrow-held-versions.txt"
  "$venv/bin/python" -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|sglang)==' > "$held" || true
  hold=(-c "$held")
fi
echo "setup: installing sparrow-sgl${extras:+[$extras]} into $venv"
DS_BUILD_OPS=0 "${pip[@]}" "${hold[@]}" -e ".${extras:+[$extras]}"
if [[ ",$extras," == *",openrlhf,"* ]]; then
  echo "setup: installing openrlhf==0.11.2 (--no-deps)"
  "${pip[@]}" --no-deps openrlhf==0.11.2
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if grep -q '^tests/' "$site"/openrlhf-0.11.2.dist-info/RECORD 2>/dev/null; then
    rm -rf "$site/tests"  # OpenRLHF's own test files, installed as a top-level package named `tests`
  fi
fi
touch "$stamp"
