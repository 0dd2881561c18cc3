#!/usr/bin/env bash
# Issue 20's GPU kit: every wheel the GPU image lacks for the colocated OpenRLHF run (scripts/gpu_kit.txt, pins as
# .venv-sglang holds them), for CPython 3.12 manylinux x86_64, into the ignored .whl/; deepspeed (an sdist only) is
# built here as a pure-Python wheel (DS_BUILD_OPS=0). Then the kit is split for two device calls of one warm lease
# (64 MiB each, working tree included): .whl_a/ (call 1) and .whl_b/ (call 2), files above PART_MIB as parts, a
# sha256 manifest in both. Prints the size each call carries.
# Usage: bash scripts/gpu_kit.sh      env: PYTHON (builds deepspeed: needs torch + setuptools), PART_MIB (default 36)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
source scripts/gpu_kit_lib.sh
PYTHON=${PYTHON:-$REPO/.venv-sglang/bin/python}
PART_MIB=${PART_MIB:-36}
for p in /.whl/ /.whl_a/ /.whl_b/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
norm() { tr 'A-Z_.' 'a-z--'; }
pins=$(sed 's/#.*//' scripts/gpu_kit.txt | grep -v '^ *$')
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl $(grep -v '^deepspeed==' <<<"$pins")
ds=$(grep '^deepspeed==' <<<"$pins")
if ! ls .whl/deepspeed-"${ds#*==}"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w .whl "$ds"
fi
if unzip -l .whl/deepspeed-*.whl | grep -qE '\.so$'; then
  echo "gpu_kit: the deepspeed wheel holds compiled ops; build it with DS_BUILD_OPS=0" >&2
  exit 1
fi
# one version of each: drop wheels of other versions (earlier runs)
want=$(sed 's/==/-/' <<<"$pins" | norm)
for f in .whl/*.whl; do
  nv=$(basename "$f" | cut -d- -f1-2 | norm)
  grep -qxF "$nv" <<<"$want" || { echo "gpu_kit: removing $f (not pinned)"; rm -f "$f"; }
done
[ "$(ls .whl/*.whl | wc -l)" -eq "$(wc -l <<<"$pins")" ] || { echo "gpu_kit: wheels missing in .whl" >&2; exit 1; }
# run-time requirements neither the image nor the kit has (gpu_kit_check.py shows the run does not import them)
have=$( (sed 's/#.*//' scripts/gpu_image_packages.txt; sed 's/==.*//' <<<"$pins") | grep -v '^ *$' | norm | sort -u)
for f in .whl/*.whl; do unzip -p "$f" '*.dist-info/METADATA'; done \
  | sed -nE '/extra ==/d; s/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/p' | norm | sort -u | comm -23 - <(echo "$have") \
  | tr '\n' ' ' | sed 's/^/gpu_kit: required by a kit wheel, not carried: /; s/$/\n/'
kit_split .whl .whl_a .whl_b $((PART_MIB * 1024 * 1024))
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "gpu_kit: $(ls .whl/*.whl | wc -l) wheels, $(mib "$(du -cb .whl/*.whl | tail -1 | cut -f1)"); working tree $(mib "$tree")"
for d in .whl_a .whl_b; do
  kit=$(du -cb "$d"/* | tail -1 | cut -f1)
  echo "gpu_kit: $d: $(ls "$d" | tr '\n' ' ')"
  echo "gpu_kit: call carrying $d: $(mib "$kit") + tree $(mib "$tree") = $(mib $((kit + tree))) (limit 64 MiB)"
done
