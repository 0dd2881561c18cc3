"""The sampler alone on a GPU: the Triton kernel (rows split into chunks, and one program per row), torch's top-k, and
the whole call (host included) of the fused and the torch sampler, at a rollout batch with Qwen3's vocabulary.

    python -m bench.sampler_speed [--batch 32 --vocab 151936 --topk 0,20]

Prints one JSON object (milliseconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.common import device_info, require_cuda, time_us


def wall_ms(fn, reps: int = 50) -> float:
    """Host wall per call, each call ending in its own device-to-host copy (as in the engine)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def measure(logits: torch.Tensor, k: int) -> dict:
    from sparrow_sgl.attention.kernels.triton_sample import sample
    from sparrow_sgl.engine.sampler import Sampler
    from sparrow_sgl.engine.sampling_params import SamplingParams
    from sparrow_sgl.engine.sequence import Sequence

    batch = logits.shape[0]
    ones, u, zeros = (torch.ones(batch, device="cuda"), torch.rand(batch, device="cuda"),
                      torch.zeros(batch, device="cuda"))
    params = SamplingParams(temperature=1.0, logprobs_topk=k)
    seqs = [Sequence(i, [1], params, 8, 0, generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    fused, plain = Sampler(fused=True), Sampler(fused=False)
    row = {
        "topk": k,
        "kernel_ms": time_us(lambda: sample(logits, ones, u, zeros), reps=50, flush=False)["median_us"] / 1e3,
        "kernel_ms_one_program_per_row": time_us(lambda: sample(logits, ones, u, zeros, chunks=1), reps=50,
                                                 flush=False)["median_us"] / 1e3,
        "fused_call_ms": wall_ms(lambda: fused(logits, seqs)),
        "torch_call_ms": wall_ms(lambda: plain(logits, seqs)),
    }
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (8192, 8), (8192, 16)):
        def launch(b=block, w=warps):
            return sample(logits, ones, u, zeros, b, w)

        row[f"kernel_ms_b{block}w{warps}"] = time_us(launch, reps=50, flush=False)["median_us"] / 1e3
    if k:
        row["topk_ms"] = time_us(lambda: logits.topk(k, dim=-1), reps=50, flush=False)["median_us"] / 1e3
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--topk", default="0,20")
    args = p.parse_args(argv)
    require_cuda()
    logits = torch.randn(args.batch, args.vocab, device="cuda") * 4
    rows = [measure(logits, int(k)) for k in args.topk.split(",")]
    print(json.dumps({"bench": "sampler_speed", **device_info(), "batch": args.batch, "vocab": args.vocab,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
