"""Where an engine decode step's wall time goes on a GPU: the captured graph vs everything around it.

    python -m bench.engine_overhead [--shape qwen3-1.7b --batch 32 --prompt-len 4096 --new-tokens 256 --topk 0,20
                                     --overlap 0,auto]

`Engine.generate` on a Qwen3-shaped model with random weights and the real vocabulary (151936: the sampler's cost
depends on it), every request ignoring EOS. Per schedule and top-k: decode wall per step (the engine's own phase
clock, `Engine.last_run`; best of 2 runs), the decode graph's own replay time at the run's last step, the sampler
alone (synchronised, outside the graph), and the difference (host work the GPU waits for), with and without
overlapped decoding (`SPARROW_OVERLAP`: the next step launched before this one is read). One more run under
cProfile lists the host functions that cost the most. Prints one JSON object; `--out` appends it to a JSON list.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_info, require_cuda, time_us
from sparrow_sgl.hardware import MODEL_SHAPES, ModelShape


def build_model(shape: ModelShape, path: Path) -> Path:
    """A random bf16 Qwen3 of `shape` (its real vocabulary) and a small tokenizer (token ids are used)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparrow_sgl.tiny import build_tokenizer

    tokenizer = build_tokenizer(512)
    config = Qwen3Config(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                         head_dim=shape.head_dim, max_position_embeddings=40960,
                         tie_word_embeddings=shape.tie_word_embeddings, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def timed_generate(engine, prompts, params, schedule) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, params, schedule=schedule, progress=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def sampler_ms(engine, batch: int, vocab: int, topk: int) -> float:
    """The sampler alone on [batch, vocab] float32 logits, synchronised (what each decode step waits for)."""
    from sparrow_sgl.engine.sampling_params import SamplingParams
    from sparrow_sgl.engine.sequence import Sequence

    params = SamplingParams(temperature=1.0, logprobs_topk=topk)
    seqs = [Sequence(i, [1, 2, 3], params, 8, 0, generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    logits = torch.randn(batch, vocab, device="cuda")

    def run():
        engine.sampler(logits, seqs)

    return time_us(run, reps=30, warmup=3, flush=False)["median_us"] / 1e3


def host_profile(engine, prompts, params, schedule, top: int = 15) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    timed_generate(engine, prompts, params, schedule)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}:{func}", "calls": calls,
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    return sorted(rows, key=lambda r: -r["tottime_s"])[:top]


def measure(engine, prompts, schedule: str, new_tokens: int, topk: int, overlap: str) -> dict:
    import os

    from sparrow_sgl.engine.sampling_params import SamplingParams

    os.environ["SPARROW_OVERLAP"] = overlap

    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0, ignore_eos=True, logprobs_topk=topk)
    timed_generate(engine, prompts, params, schedule)  # compiles and captures
    runs = []
    for _ in range(2):
        total = timed_generate(engine, prompts, params, schedule)
        runs.append((engine.last_run.decode_s / engine.last_run.decode_steps, engine.last_run.prefill_s, total))
    decode_s, prefill_s, total_s = min(runs)
    steps = engine.last_run.decode_steps
    step = engine.runner.gpu_decoder().last_step
    replay_ms = time_us(step.graph.replay, reps=30, warmup=3, flush=False)["median_us"] / 1e3
    wall_ms = decode_s * 1e3
    sample_ms = sampler_ms(engine, len(prompts), engine.hf_config.vocab_size, topk)
    return {
        "schedule": schedule, "topk": topk, "overlap": overlap, "decode_steps": steps,
        "prefill_s": round(prefill_s, 4), "total_s": round(total_s, 4),
        "decode_wall_ms_per_step": round(wall_ms, 4),
        "graph_replay_ms_last_step": round(replay_ms, 4),
        "sampler_ms": round(sample_ms, 4),
        "outside_graph_ms": round(wall_ms - replay_ms, 4),
        "outside_graph_share": round(1 - replay_ms / wall_ms, 4),
        "host_profile_top": host_profile(engine, prompts, params, schedule),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=4096, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--schedules", default="dense,qwen3-1.7b-0.86")
    p.add_argument("--topk", default="0,20", help="rollout top-k log-probs per token, comma-separated")
    p.add_argument("--overlap", default="0,auto", help="SPARROW_OVERLAP modes to measure, comma-separated")
    p.add_argument("--kv-gb", type=float, default=24.0)
    p.add_argument("--out", type=Path, default=None, help="append the result to this JSON list")
    args = p.parse_args(argv)
    require_cuda()
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        shape = MODEL_SHAPES[args.shape]
        model_dir = build_model(shape, Path(tmp))
        max_len = args.prompt_len + args.new_tokens + 16
        engine = Engine(EngineConfig(model=str(model_dir), device="cuda", dtype="bfloat16", kv_gb=args.kv_gb,
                                     max_num_seqs=max(args.batch, 1), max_model_len=max_len))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(600, shape.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.batch)]
        rows = [measure(engine, prompts, s, args.new_tokens, int(k), o) for s in args.schedules.split(",")
                for k in args.topk.split(",") for o in args.overlap.split(",")]
    result = {"bench": "engine_overhead", **device_info(), "shape": args.shape, "batch": args.batch,
              "prompt_len_tokens": args.prompt_len, "new_tokens": args.new_tokens, "date": time.strftime(
                  "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        from sparrow_sgl.jsonio import read_json, write_json_atomic

        previous = read_json(args.out) if args.out.exists() else []
        write_json_atomic(args.out, [*previous, result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
