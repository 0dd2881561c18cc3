"""CPU throughput of the embedded engine, dense vs sparse decode, on a small random Qwen3 (regression check only).

    python bench/engine_cpu.py [--batch 8 --prompt-len 1024 --new-tokens 64 --budget 256 --threads 2]

Prints one JSON object. Speed targets are measured on GPU (the GPU issue); on CPU the sparse path pays its
selection overhead without the memory-bandwidth win, so only compare numbers of the same machine over time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch

from sparrow_sgl.config import EngineConfig
from sparrow_sgl.engine import Engine, SamplingParams
from sparrow_sgl.tiny import TinyModelSpec, save_tiny_model


def _best_time(engine: Engine, prompts, params: SamplingParams, schedule: str, repeats: int):
    best, rollouts = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        rollouts = engine.generate(prompts, params, schedule=schedule, progress=False)
        best = min(best, time.perf_counter() - start)
    return best, rollouts


def measure(engine: Engine, prompts: list[list[int]], params: SamplingParams, schedule: str, repeats: int) -> dict:
    """Whole-generate throughput, and decode-only throughput (a 1-token run's prefill time subtracted)."""
    engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=4), schedule=schedule, progress=False)
    prefill_only = SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
    prefill_s, _ = _best_time(engine, prompts, prefill_only, schedule, repeats)
    total_s, rollouts = _best_time(engine, prompts, params, schedule, repeats)
    tokens = sum(len(r.token_ids) for r in rollouts)
    decode_tokens = tokens - len(rollouts)
    kv = sum(r.meta["kv_tokens_mean"] for r in rollouts) / len(rollouts)
    return {
        "schedule": schedule,
        "seconds": round(total_s, 4),
        "prefill_seconds": round(prefill_s, 4),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / total_s, 2),
        "decode_tokens_per_s": round(decode_tokens / max(total_s - prefill_s, 1e-9), 2),
        "kv_tokens_mean": round(kv, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256, help="sparse KV budget in tokens (fixed schedule)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the regression number) or cuda (a smoke check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = TinyModelSpec(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=768,
        vocab_size=1024,
    )
    with tempfile.TemporaryDirectory() as model_dir:
        save_tiny_model(model_dir, spec)
        engine = Engine(EngineConfig(model=model_dir, kv_gb=0.25, device=args.device))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 1000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
        params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0, ignore_eos=True)
        dense = measure(engine, prompts, params, "dense", args.repeats)
        sparse = measure(engine, prompts, params, f"fixed:{args.budget}", args.repeats)
    result = {
        "bench": "engine_cpu",
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "model": {
            "layers": spec.num_hidden_layers,
            "hidden": spec.hidden_size,
            "q_heads": spec.num_attention_heads,
            "kv_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim,
        },
        "batch": args.batch,
        "prompt_len_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "dense": dense,
        "sparse": sparse,
        "sparse_over_dense_decode_speed": round(sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
