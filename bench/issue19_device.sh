#!/usr/bin/env bash
# Issue 19's device calls on one H200 (bench/results/NOTES.md, "Phase 5"). FlashInfer comes from .gpu (the README
# of /work/shared/gpu), so `+fidense` (the phase-4 benchmark's FlashInfer dense layers) is timed beside the new
# defaults in the same process. Everything the call writes lands in $OUT.
#   call1: decode_e2e with the kernel profile and the drained rollout, the small-M GEMM sweep, GPU tests
#   call2: decode_e2e with the kernel-setting variants (decode splits / tile, all-heads scoring), their GPU tests
# usage (repo root, .gpu carried): bash bench/issue19_device.sh call1|call2
set -o pipefail
call=${1:-call2}
models=qwen3-1.7b,qwen3-4b,qwen3-8b
contexts=1k,2k,4k,8k,16k,24k,32k
out=${OUT:-/tmp/issue19}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl \
  && tar -xJf .gpu/fi.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c 'import flashinfer, torch, triton; print("flashinfer", flashinfer.__version__, "torch", torch.__version__,
"triton", triton.__version__)' 2>&1 | tee -a "$out/gpu.txt"
if [ "$call" = call1 ]; then
  timeout 330 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,dense-fi,sparse-triton-bf16c,sparse-triton,sparse-triton-bf16c+fidense \
    --unfused '' --wall-reps 1 --profile --drain 2>&1 | grep -v "it/s]" | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
  timeout 45 python3 -m bench.gemm_small_m --m 32,64 --settings default,no-reduced-precision,cublaslt 2>&1 \
    | tee "$out/gemm.jsonl"
  tests="tests/test_decode_profile.py tests/test_graph_decode_gpu.py tests/test_kernels_gpu.py"
else
  settings="+w8=SPARROW_DECODE_WAVES=8,+heads=SPARROW_SCORE_HEADS=1"
  settings="$settings,+all=SPARROW_DECODE_WAVES=8;SPARROW_DECODE_BLOCK_PAGES=8;SPARROW_SCORE_HEADS=1"
  timeout 200 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c,sparse-triton,sparse-triton-bf16c+fidense \
    --env-variants "$settings" --env-base dense-triton,sparse-triton-bf16c,sparse-triton-bf16c@0.80 \
    --profile-variants sparse-triton-bf16c --profile-contexts 32k --unfused '' --wall-reps 0 --profile 2>&1 \
    | grep -v "it/s]" | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
  tests="tests/test_decode_tiling.py tests/test_decode_profile.py"
fi
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tail -25 | tee "$out/tests.log"
