#!/usr/bin/env bash
# Issue 19's device calls on one H200 (bench/results/NOTES.md, "Phase 5"). FlashInfer comes from .gpu (the README
# of /work/shared/gpu), so `+fidense` (the phase-4 benchmark's FlashInfer dense layers) is timed beside the new
# defaults in the same process. Everything the call writes lands in $OUT.
#   call1: decode_e2e with the kernel profile and the drained rollout, the small-M GEMM sweep, GPU tests
#   call2: decode_e2e with the kernel-setting variants (decode splits / tile, all-heads scoring), their GPU tests
#   call3: decode_e2e, session 5's defaults vs session 4's (+old) and each switch alone; scoring/decode tiles
#   call4: decode_e2e with the shipped defaults, --profile and --drain (the results committed)
#   call5: A/B of top-k warps, one-launch selection and a wider scoring tile; the shipped GEMM-choice table's
#          and the per-machine GEMM-choice cache's GPU tests (session 7: none adopted)
#   call6: session 7's defaults (top-k search stops early, split merge fused into the decode launch) vs each
#          switched back, and the packed 2-bit top-k search; their GPU tests (the fused merge lost: reverted)
#   call7: graph batch sizes in steps of 8 (34 -> 40 rows, 24 -> 24) vs powers of two (+pow2), top-k in 8 warps
#          (neither adopted)
#   call8: session 7's shipped defaults vs session 6's (+old: the top-k searches all 32 bits), --profile --drain
#          (the results committed)
#   call9: decode loop pipelining: num_stages 1 / 3 and the page-id prefetch vs the default (2 stages, no
#          prefetch); the decode kernel's registers / shared memory / resident programs per SM (prefetch adopted)
#   call10: call8 again on session 7's final defaults (+ page-id prefetch); +old = session 6's defaults
#   call11: decode programs of 8 warps (register pressure) vs 4, alone and with 16 waves or 8-page tiles; resources
#   call12: page scoring with one program per (request, page chunk) over all KV heads (SPARROW_SCORE_HEADS=1) at
#          128 / 32 / 16 pages per program vs the per-head launch
#   call13: (never ran: folded into call14, the device was refused three times)
#   call14: SGLang's dense-layer FlashInfer decode vs the Triton kernel (bench.sglang_dense_decode); the small-M GEMM
#          with four more tiles (narrow N, 256-wide K): tune + layer stacks, auto vs auto-old; then the GEMM choice
#          table rebuilt from its tune rows (merged over the shipped rows) and call10 on it: the final rows of session 8 (--profile --drain; +old = session 7's committed
#          defaults, i.e. no page-id prefetch; the GEMM choices are process-wide, so +old shares the new table)
#   call15: FlashInfer's tensor-core decode for GQA group 4 (SGLang's rule, SPARROW_FLASHINFER_TENSOR_CORES=1) vs
#          its CUDA-core decode vs the Triton kernel: dense baseline, FlashInfer sparse layers, FlashInfer dense
#          layers of the sparse step (0.86 preset; 4B and 8B: 1.7B's group 2 stays on CUDA cores either way)
#   call16: programmatic dependent launch of every decode kernel (SPARROW_PDL=1: wait, then release the next grid)
#          and of the GEMMs alone (SPARROW_LINEAR_PDL=1, now releasing after the wait) vs the defaults; PDL GPU tests
#   call17 / call18 (session 13): the persistent layer and attention blocks' GPU tests, bench.mlp_block, and their
#          rollout A/B; both blocks lost and were removed (NOTES "Session 13"; the code and these calls: commit 6ccdfbb)
#   call19: the whole GPU test suite (pytest -m gpu) on the shipped kernels, its full log -> $OUT/tests.log
#   call20: decode_e2e with the shipped defaults (float32 key sums; the bf16 centroid copy timed beside them), --profile
#          and --drain on the shipped variants (the results committed; no +old variant)
#   call21 (session 14): the "centroid-bf16" scorer's GPU tests (the bf16 copy, the in-kernel rounding, the engine
#          against its reference), then call20's run, where sparse-triton-bf16c now runs that scorer's schedules
#   call22: scoring tiles (SPARROW_SCORE_TILE, all-heads) on the shipped float32 key sums, A/B vs the shipped default
#   call23: all-heads scoring of the float32 sums at 8 / 16 / 32 / 64 pages per program (16 adopted)
#   call24: the whole GPU suite on session 14's final tree, then call20's run (the committed rows)
#   call25 (session 15; ran on commit 60f9677, the prefilter since removed): the bf16 prefilter's GPU tests (exact
#          selection with the bf16 copy), then its A/B against the shipped defaults (SPARROW_SCORE_PREFILTER=1) with
#          the kernel profile at 2K / 16K / 32K
#   call26: steps sized by the pages the requests reached (the new default) vs by the pages allocated up front
#          (+alloc = SPARROW_TABLE_WIDTH=allocated), dense and sparse, with the GPU tests of the engine's decode
#   call27: top-k programs of 1 / 2 warps (SPARROW_TOPK_WARPS; the default is 4 up to 2048 pages) and all-heads
#          scoring at 8 pages per program, A/B per context now that short contexts run narrow tables
#   call28: call20's run on session 15's tree (8 pages per scoring program, 1-warp top-k up to 256 pages: the
#          committed rows)
#   call29 (ran on commit 283391a, the radix option since removed): the two-launch top-k by radix rounds
#          (SPARROW_TOPK_SEARCH=radix: the one-launch kernel's 8-bit histogram select) vs the bit-by-bit search, A/B;
#          the GPU tests of the selection kernels and the engine's decode (cut at 200 s, 84 passed)
#   call30: the whole GPU suite on session 15's tree (not run in session 15: no device time left)
#   call31 (session 16): the engine's graph-decode GPU tests (session 15's step widths and shared logits buffer),
#          then bench.l2_prefetch: does an L2 prefetch of o_proj / the next qkv weights in a latency-bound kernel
#          shorten a stand-in decode layer (it does not: 0.2-15 us slower per layer)
#   call32 (ran on commit 9f2996b, the switch since removed): SiLU x up in the gate_up GEMM's store
#          (SPARROW_LINEAR_GLU, on where timed faster) vs off (+noglu), dense and sparse, A/B in one process, with
#          the GEMM and engine GPU tests first (+0.4% 4B, +0.1-0.3% 8B, -0.2..-0.4% 1.7B: removed)
#   call33 (session 17): a sparse layer's selection and attention in two row halves on two streams, staggered
#          (SPARROW_ATTN_STREAMS=2, +2s) vs one stream, dense and sparse, A/B in one process, with the GPU tests of
#          the row-half kernels and the engine's decode first (ran on commit ee2d93f, the switch since removed:
#          0.2-5% slower)
#   call34: the decode split plan's programs per SM (SPARROW_DECODE_WAVES 2 / 4 / 16 vs the default 8), dense and
#          sparse, per context: does a short row (few pages per split) want fewer splits?
#   call35: bench.decode_splits, the decode kernel alone at forced split counts 1-16 on the three models' live
#          batches, 48-2048 pages per row (the data for a split plan that counts resident waves), with its GPU tests
#   call36: the resident-wave split plan (new default; live rows, the fitted model) vs the earlier rule (+w8 =
#          SPARROW_DECODE_WAVES=8), dense and sparse, A/B in one process, with the decode and engine GPU tests first
#          (ran on 41f7be5, where +w8 applied the earlier rule to the live rows, not every row: not the old plan)
#   call36b: call36's A/B again, +w8 now exactly the earlier plan (every row counted)
#   call37: call20's run on session 17's tree (the committed rows)
#   call38: the GPU tests of the decode kernels, their tiling and PDL on session 17's final tree
#   call39: the SGLang graph decode state's Triton path (all-heads scoring now) against its torch reference
#   call40 (prepared, not run): graph batch sizes in steps of 8 again (+g8), now that the split plan counts live
#          rows (session 7 measured them 4-5% slower under the earlier plan)
#   call42 (prepared, not run): bench.decode_splits on drain-size live batches (16 / 12 / 8 / 4 requests) to check
#          the resident-wave model where it was not fitted
#   call41 (prepared, not run): the engine's decode GPU tests with steps keyed by their live rows' split plan (a graph
#          per plan, new in session 17 after call39), then the drained rollouts of the shipped variants
# usage (repo root, .gpu carried): bash bench/issue19_device.sh callN (N as above)
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
final_rows() {  # final_rows SECONDS OLD: decode_e2e of the shipped defaults (+old: OLD), --profile --drain -> $out
  timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c,sparse-triton --unfused '' --wall-reps 1 --profile --drain \
    --env-variants "+old=$2" --profile-variants dense-triton,sparse-triton-bf16c \
    --profile-contexts 2k,32k 2>&1 | grep -v "it/s]" | grep -v '^{' | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
}
ab_run() {  # ab_run SECONDS SETTINGS NAME: decode_e2e A/B of env settings over dense and sparse -> $out
  timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c --env-variants "$2" \
    --env-base dense-triton,sparse-triton-bf16c,sparse-triton-bf16c@0.80 --unfused '' --wall-reps 0 \
    --results-dir "/tmp/$3" 2>&1 | grep -v "it/s]" | grep -v '^{' | tee "$out/ab.log"
  cp "/tmp/$3/decode_e2e.json" "$out/decode_e2e_ab.json"
}
gpu_tests() {  # gpu_tests SECONDS PATHS...: GPU tests, their full log -> $out/tests.log
  timeout "$1" python3 -m pytest -q -m gpu -p no:cacheprovider "${@:2}" > "$out/tests.log" 2>&1
  tail -15 "$out/tests.log"
}
gpu_suite() {  # gpu_suite SECONDS: the whole GPU test suite
  gpu_tests "$1" tests
}
ab_shipped() {  # ab_shipped SECONDS SETTINGS NAME: A/B of env settings over the shipped sparse variant -> $out
  # (its base as in session 14's calls 22-23: the per-head scoring launch, the default until call23)
  SPARROW_SCORE_HEADS=0 timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts \
    --presets 0.86,0.80 --variants dense-triton,sparse-triton --env-variants "$2" \
    --env-base sparse-triton,sparse-triton@0.80 --unfused '' --wall-reps 0 --results-dir "/tmp/$3" 2>&1 \
    | grep -v "it/s]" | grep -v '^{' | tee "$out/ab.log"
  cp "/tmp/$3/decode_e2e.json" "$out/decode_e2e_ab.json"
}
ab_profiled() {  # ab_profiled SECONDS SETTINGS NAME: A/B of env settings over the shipped defaults, profiled -> $out
  timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton --env-variants "$2" --env-base sparse-triton,sparse-triton@0.80 \
    --unfused '' --wall-reps 0 --profile --profile-variants sparse-triton --profile-contexts 2k,16k,32k \
    --results-dir "/tmp/$3" 2>&1 | grep -v "it/s]" | grep -v '^{' | tee "$out/ab.log"
  cp "/tmp/$3/decode_e2e.json" "$out/decode_e2e_ab.json"
  cp "/tmp/$3/decode_profile.json" "$out/decode_profile_ab.json"
}
ab_now() {  # ab_now SECONDS SETTINGS NAME [BASE]: A/B of env settings over the shipped defaults -> $out
  timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton --env-variants "$2" --env-base "${4:-sparse-triton,sparse-triton@0.80}" \
    --unfused '' --wall-reps 0 --results-dir "/tmp/$3" 2>&1 | grep -v "it/s]" | grep -v '^{' | tee "$out/ab.log"
  cp "/tmp/$3/decode_e2e.json" "$out/decode_e2e_ab.json"
}
# call20's run: the shipped variants and the bf16-centroid one in one process, --profile --drain (committed rows)
shipped_rows() {
  timeout "$1" python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton,sparse-triton-bf16c --unfused '' --wall-reps 1 --profile --drain \
    --profile-variants dense-triton,sparse-triton --profile-contexts 2k,32k 2>&1 | grep -v "it/s]" \
    | grep -v '^{' | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
}
if [ "$call" = call1 ]; then
  timeout 330 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,dense-fi,sparse-triton-bf16c,sparse-triton,sparse-triton-bf16c+fidense \
    --unfused '' --wall-reps 1 --profile --drain 2>&1 | grep -v "it/s]" | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
  timeout 45 python3 -m bench.gemm_small_m --m 32,64 --settings default,no-reduced-precision,cublaslt 2>&1 \
    | tee "$out/gemm.jsonl"
  tests="tests/test_decode_profile.py tests/test_graph_decode_gpu.py tests/test_kernels_gpu.py"
elif [ "$call" = call3 ]; then
  # session 5: the new defaults (Triton small-M linear chosen per shape, fused q/k norm + rotary + KV append,
  # 4-bit top-k search) against the session-4 defaults (+old) and each switch alone, one process; results to /tmp
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qkv_append_gpu.py \
    tests/test_graph_decode_gpu.py tests/test_decode_profile.py 2>&1 | tail -15 | tee "$out/tests.log"
  old="+old=SPARROW_LINEAR=cublas;SPARROW_FUSED_APPEND=0;SPARROW_TOPK_BITS=1"
  settings="$old,+cublas=SPARROW_LINEAR=cublas,+app0=SPARROW_FUSED_APPEND=0,+bits1=SPARROW_TOPK_BITS=1"
  timeout 250 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c --env-variants "$settings" \
    --env-base dense-triton,sparse-triton-bf16c,sparse-triton-bf16c@0.80 --unfused '' --wall-reps 0 \
    --results-dir /tmp/ab 2>&1 | grep -v "it/s]" | tee "$out/ab.log"
  cp /tmp/ab/decode_e2e.json "$out/decode_e2e_ab.json"
  # kernel tiles of the sparse step alone (scoring tile, decode splits) on the new defaults
  tiles="+t128=SPARROW_SCORE_TILE=128x128x4,+t256w8=SPARROW_SCORE_TILE=256x256x8"
  tiles="$tiles,+t512=SPARROW_SCORE_TILE=512x128x8,+t256b64=SPARROW_SCORE_TILE=256x64x4"
  tiles="$tiles,+w4=SPARROW_DECODE_WAVES=4,+w16=SPARROW_DECODE_WAVES=16"
  timeout 170 python3 -m bench.decode_e2e --models $models --contexts $contexts \
    --variants dense-triton,sparse-triton-bf16c --env-variants "$tiles" --env-base sparse-triton-bf16c \
    --unfused '' --wall-reps 0 --results-dir /tmp/tiles 2>&1 | grep -v "it/s]" | tee "$out/tiles.log"
  cp /tmp/tiles/decode_e2e.json "$out/decode_e2e_tiles.json"
  tests=""
elif [ "$call" = call4 ]; then
  # session 5, the shipped defaults: the table, the kernel profile and the drained rollout -> bench/results
  # +old: session 4's defaults in the same process (cuBLAS, two launches for q/k norm and KV append, scoring
  # programs of 256 pages from 4K on, where the old rule gave 256 from 4-8K on; 128 below, as before)
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qkv_append_gpu.py tests/test_kernels_gpu.py \
    -k "engine or selection or topk" 2>&1 | tail -5 | tee "$out/tests.log"
  timeout 330 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c,sparse-triton --unfused '' --wall-reps 1 --profile --drain \
    --env-variants "+old=SPARROW_LINEAR=cublas;SPARROW_FUSED_APPEND=0;SPARROW_SCORE_TILE=256x128x4" \
    --profile-variants dense-triton,sparse-triton-bf16c --profile-contexts 2k,32k 2>&1 | grep -v "it/s]" \
    | tee "$out/e2e.log"
  cp bench/results/decode_e2e.json bench/results/decode_profile.json "$out/"
  tests=""
elif [ "$call" = call5 ]; then
  # prepared in session 5, not yet run: top-k in 1 / 2 warps, one-launch selection, the 256x256x8 scoring tile
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_triton_linear.py \
    -k "selection or shipped or remembered" 2>&1 | tail -5 | tee "$out/tests.log"
  settings="+tw1=SPARROW_TOPK_WARPS=1,+tw2=SPARROW_TOPK_WARPS=2,+sel1=SPARROW_SELECT_LAUNCHES=1"
  settings="$settings,+t256w8=SPARROW_SCORE_TILE=256x256x8"
  timeout 300 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton-bf16c --env-variants "$settings" \
    --env-base sparse-triton-bf16c,sparse-triton-bf16c@0.80 --unfused '' --wall-reps 0 --results-dir /tmp/ab5 \
    2>&1 | grep -v "it/s]" | tee "$out/ab.log"
  cp /tmp/ab5/decode_e2e.json "$out/decode_e2e_ab.json"
  tests=""
elif [ "$call" = call6 ]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_decode_tiling.py \
    tests/test_graph_decode_gpu.py 2>&1 | tail -8 | tee "$out/tests.log"
  settings="+exit0=SPARROW_TOPK_EXIT=0,+bits2=SPARROW_TOPK_BITS=2,+merge2=SPARROW_DECODE_MERGE=launch"
  ab_run 330 "$settings,+old=SPARROW_TOPK_EXIT=0;SPARROW_DECODE_MERGE=launch" ab6
  tests=""
elif [ "$call" = call11 ]; then
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_tiling.py -k "pipeline" 2>&1 \
    | tail -5 | tee "$out/tests.log"
  timeout 60 python3 -m bench.kernel_resources 2>&1 | tee "$out/resources.jsonl"
  dw8="+dw8=SPARROW_DECODE_WARPS=8,+dw8w16=SPARROW_DECODE_WARPS=8;SPARROW_DECODE_WAVES=16"
  ab_run 330 "$dw8,+dw8b8=SPARROW_DECODE_WARPS=8;SPARROW_DECODE_BLOCK_PAGES=8" ab11
  tests=""
elif [ "$call" = call19 ]; then
  gpu_suite 420
  tests=""
elif [ "$call" = call20 ]; then
  shipped_rows 420
  tests=""
elif [ "$call" = call22 ]; then
  # the scoring tile for the shipped float32 key sums (every earlier tile sweep ran on the bf16 copy)
  settings="+t64=SPARROW_SCORE_TILE=128x64x4,+t32=SPARROW_SCORE_TILE=128x32x4,+t128w8=SPARROW_SCORE_TILE=128x128x8"
  ab_shipped 400 "$settings,+t64p=SPARROW_SCORE_TILE=64x64x4,+sh32=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=32" ab22
  tests=""
elif [ "$call" = call23 ]; then
  # call22's winner (all-heads scoring, 32 pages per program) at 8 / 16 / 32 / 64 pages per program
  settings="+sh8=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=8,+sh16=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=16"
  settings="$settings,+sh32=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=32"
  ab_shipped 300 "$settings,+sh64=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=64" ab23
  tests=""
elif [ "$call" = call24 ]; then
  # the final tree of session 14 (all-heads scoring at 16 pages per program by default): the whole GPU suite, then
  # call20's run -> the committed rows
  gpu_suite 400
  shipped_rows 170
  tests=""
elif [ "$call" = call25 ]; then
  gpu_tests 200 tests/test_prefilter_select.py tests/test_graph_decode_gpu.py tests/test_decode_tiling.py \
    tests/test_kernels_gpu.py
  ab_profiled 360 "+pf=SPARROW_SCORE_PREFILTER=1,+pf32=SPARROW_SCORE_PREFILTER=1;SPARROW_SCORE_HEADS_PAGES=32" ab25
  tests=""
elif [ "$call" = call26 ]; then
  gpu_tests 200 tests/test_graph_decode_gpu.py tests/test_engine_gpu.py tests/test_engine_overlap.py \
    tests/test_sampler_fused.py tests/test_decode_profile.py
  ab_now 380 "+alloc=SPARROW_TABLE_WIDTH=allocated" ab26 dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call27 ]; then
  ab_now 400 "+tw1=SPARROW_TOPK_WARPS=1,+tw2=SPARROW_TOPK_WARPS=2,+sh8=SPARROW_SCORE_HEADS_PAGES=8" ab27
  tests=""
elif [ "$call" = call28 ]; then
  shipped_rows 540
  tests=""
elif [ "$call" = call29 ]; then
  gpu_tests 200 tests/test_kernels_gpu.py tests/test_decode_tiling.py tests/test_graph_decode_gpu.py
  ab_now 300 "+radix=SPARROW_TOPK_SEARCH=radix" ab29
  tests=""
elif [ "$call" = call36 ]; then
  gpu_tests 200 tests/test_decode_tiling.py tests/test_graph_decode_gpu.py tests/test_engine_gpu.py \
    tests/test_decode_splits_bench.py
  ab_now 360 "+w8=SPARROW_DECODE_WAVES=8" ab36 dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call36b ]; then
  ab_now 360 "+w8=SPARROW_DECODE_WAVES=8" ab36b dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call42 ]; then
  timeout 420 python3 -m bench.decode_splits --live 16,12,8,4 --entries 48,192,512,2048 2>&1 \
    | tee "$out/decode_splits.jsonl" | grep -v '"model"' | tail -3
  tests=""
elif [ "$call" = call41 ]; then
  gpu_tests 200 tests/test_graph_decode_gpu.py tests/test_engine_gpu.py tests/test_engine_overlap.py
  timeout 360 python3 -m bench.decode_e2e --models $models --contexts $contexts --presets 0.86,0.80 \
    --variants dense-triton,sparse-triton --unfused '' --wall-reps 0 --drain --results-dir /tmp/drain41 2>&1 \
    | grep -v "it/s]" | grep -v '^{' | tee "$out/e2e.log"
  tests=""
elif [ "$call" = call40 ]; then
  ab_now 360 "+g8=SPARROW_GRAPH_BATCHES=1:2:4:8:16:24:32:40:48:56:64:128:256" ab40 \
    dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call39 ]; then
  gpu_tests 100 tests/test_graph_state_gpu.py
  tests=""
elif [ "$call" = call38 ]; then
  gpu_tests 230 tests/test_decode_tiling.py tests/test_kernels_gpu.py tests/test_pdl.py tests/test_attention.py
  tests=""
elif [ "$call" = call37 ]; then
  shipped_rows 560
  tests=""
elif [ "$call" = call35 ]; then
  gpu_tests 120 tests/test_decode_splits_bench.py
  timeout 420 python3 -m bench.decode_splits 2>&1 | tee "$out/decode_splits.jsonl" | grep -v '^{"bench": "decode_splits", "model' | tail -5
  tests=""
elif [ "$call" = call34 ]; then
  ab_now 420 "+w2=SPARROW_DECODE_WAVES=2,+w4=SPARROW_DECODE_WAVES=4,+w16=SPARROW_DECODE_WAVES=16" ab34 \
    dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call33 ]; then
  gpu_tests 200 tests/test_decode_tiling.py tests/test_graph_decode_gpu.py tests/test_engine_gpu.py
  ab_now 360 "+2s=SPARROW_ATTN_STREAMS=2" ab33 dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call32 ]; then
  gpu_tests 200 tests/test_triton_linear.py tests/test_engine_gpu.py tests/test_pdl.py
  ab_now 330 "+noglu=SPARROW_LINEAR_GLU=0" ab32 dense-triton,sparse-triton,sparse-triton@0.80
  tests=""
elif [ "$call" = call31 ]; then
  gpu_tests 170 tests/test_graph_decode_gpu.py tests/test_engine_gpu.py
  timeout 240 python3 -m bench.l2_prefetch 2>&1 | tee "$out/l2_prefetch.jsonl" | grep -v '^{'
  tests=""
elif [ "$call" = call30 ]; then
  gpu_suite 540
  tests=""
elif [ "$call" = call21 ]; then
  gpu_tests 240 tests/test_graph_decode_gpu.py tests/test_qkv_append_gpu.py tests/test_kernels_gpu.py \
    tests/test_attention.py
  shipped_rows 300
  tests=""
elif [ "$call" = call16 ]; then
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pdl.py tests/test_triton_linear.py \
    -k "pdl or graph" 2>&1 | tail -5 | tee "$out/tests.log"
  ab_run 330 "+pdl=SPARROW_PDL=1,+lpdl=SPARROW_LINEAR_PDL=1" ab16
  tests=""
elif [ "$call" = call12 ]; then
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_tiling.py -k "all_heads" 2>&1 \
    | tail -5 | tee "$out/tests.log"
  sh="+sh128=SPARROW_SCORE_HEADS=1,+sh32=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=32"
  ab_run 400 "$sh,+sh16=SPARROW_SCORE_HEADS=1;SPARROW_SCORE_HEADS_PAGES=16" ab12
  tests=""
elif [ "$call" = call14 ]; then
  timeout 70 python3 -m bench.sglang_dense_decode --results-dir "$out" 2>&1 | grep -v '^{' | tee "$out/sglang_dense.log"
  timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_linear.py \
    tests/test_sglang_dense_bench.py 2>&1 | tail -5 | tee "$out/tests.log"
  SPARROW_LINEAR_TABLE=0 SPARROW_LINEAR_CACHE=0 timeout 170 python3 -m bench.gemm_small_m --m 32,64 \
    --settings auto-old,auto > "$out/gemm.jsonl" 2> "$out/gemm.err"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
new = [json.loads(line) for line in open(f"{out}/gemm.jsonl") if line.startswith("{")]
old = json.load(open("bench/results/gemm_small_m.json"))
json.dump(old + new, open(f"{out}/gemm_rows.json", "w"))
print(f"{len(new)} new gemm rows ({sum(r.get('kind') == 'tune' for r in new)} tune)")
PY
  python3 -m bench.gemm_small_m --write-choices "$out/gemm_rows.json" && cp sparrow_sgl/data/linear_choices.json "$out/"
  final_rows 300 "SPARROW_DECODE_PREFETCH=0"
  tests=""
elif [ "$call" = call15 ]; then
  SPARROW_FLASHINFER_TENSOR_CORES=1 timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_kernels_gpu.py -k "flashinfer" 2>&1 | tail -5 | tee "$out/tests.log"
  timeout 240 python3 -m bench.decode_e2e --models qwen3-4b,qwen3-8b --contexts $contexts --presets 0.86 \
    --variants dense-triton,dense-fi,sparse-triton-bf16c,sparse-fi-bf16c,sparse-triton-bf16c+fidense \
    --env-variants "+tc=SPARROW_FLASHINFER_TENSOR_CORES=1" \
    --env-base dense-fi,sparse-fi-bf16c,sparse-triton-bf16c+fidense --unfused '' --wall-reps 0 \
    --results-dir /tmp/ab15 2>&1 | grep -v "it/s]" | grep -v '^{' | tee "$out/ab.log"
  cp /tmp/ab15/decode_e2e.json "$out/decode_e2e_ab.json"
  tests=""
elif [ "$call" = call9 ]; then
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_tiling.py tests/test_kernels_gpu.py \
    -k "decode" 2>&1 | tail -5 | tee "$out/tests.log"
  timeout 60 python3 -m bench.kernel_resources 2>&1 | tee "$out/resources.jsonl"
  ab_run 330 "+st1=SPARROW_DECODE_STAGES=1,+st3=SPARROW_DECODE_STAGES=3,+pf=SPARROW_DECODE_PREFETCH=1,+pfst1=SPARROW_DECODE_PREFETCH=1;SPARROW_DECODE_STAGES=1" ab9
  tests=""
elif [ "$call" = call8 ] || [ "$call" = call10 ]; then
  old="SPARROW_TOPK_EXIT=0"
  [ "$call" = call8 ] || old="$old;SPARROW_DECODE_PREFETCH=0"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qkv_append_gpu.py tests/test_kernels_gpu.py \
    tests/test_decode_tiling.py -k "engine or selection or topk or decode" 2>&1 | tail -5 | tee "$out/tests.log"
  final_rows 400 "$old"
  tests=""
elif [ "$call" = call7 ]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_graph_decode_gpu.py tests/test_engine_gpu.py \
    tests/test_kernels_gpu.py -k "graph or engine or selection or topk" 2>&1 | tail -8 | tee "$out/tests.log"
  ab_run 300 "+pow2=SPARROW_GRAPH_BATCHES=1:2:4:8:16:32:64:128:256,+tw8=SPARROW_TOPK_WARPS=8" ab7
  tests=""
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
[ -z "$tests" ] || timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tail -25 \
  | tee -a "$out/tests.log"
