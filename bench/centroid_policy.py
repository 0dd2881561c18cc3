"""How far do bf16 centroids move the sparse policy? Teacher-forced, on a trained checkpoint (CPU).

The "centroid-bf16" scorer rounds each page centroid to bf16 (the GPU engine then scores a bf16 copy: half the
scoring bytes, +7-8% rollout speed on an H200) where the presets' "centroid" scores the float32 sums; near-ties then
pick other pages (`bench.centroid_agreement`: 0.1-0.6% of pages on random keys). This measures what that does to the
policy: on the same trajectories (sampled densely from the checkpoint), three teacher-forced passes — dense, sparse
with float32 centroids, sparse with the centroids rounded to bf16 — and per budget the lower tail (5th percentile)
of the acceptance rate of each sparse policy against dense, and of the two sparse policies against each other.

    python -m bench.centroid_policy                      # the demo checkpoint and its chain task
    python -m bench.centroid_policy --model DIR --prompts rewards/data/gsm8k/test.jsonl --page-size 16 \
        --budgets 64,128,256 --max-new-tokens 256

Prints one JSON line per budget (`kind: centroid_policy`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from sparrow_sgl.config import Schedule
from sparrow_sgl.mismatch import acceptance_rate

DEMO_MODEL = "sparrow_sgl/data/demo_model"


def tail(values: torch.Tensor, q: float = 0.05) -> float:
    return round(float(torch.quantile(values.double(), q)), 5)


def compare(model, prompts: list[list[int]], responses: list[list[int]], schedule: Schedule,
            dense: torch.Tensor, mask: torch.Tensor) -> dict:
    """Acceptance-rate tails of the float32- and bf16-centroid sparse policies over the masked response tokens."""
    from distill.sparse_forward import response_logprobs

    _, _, exact = response_logprobs(model, prompts, responses, schedule, return_full=True)
    bf16 = dataclasses.replace(schedule, scorer="centroid-bf16")
    _, _, rounded = response_logprobs(model, prompts, responses, bf16, return_full=True)
    a_exact = acceptance_rate(dense, exact)[mask]
    a_rounded = acceptance_rate(dense, rounded)[mask]
    a_between = acceptance_rate(exact, rounded)[mask]
    return {"tokens": int(mask.sum()), "tail_fp32_vs_dense": tail(a_exact), "tail_bf16_vs_dense": tail(a_rounded),
            "mean_fp32_vs_dense": round(float(a_exact.mean()), 5),
            "mean_bf16_vs_dense": round(float(a_rounded.mean()), 5),
            "tail_bf16_vs_fp32": tail(a_between), "min_bf16_vs_fp32": round(float(a_between.min()), 6),
            "tokens_changed": round(float((a_between < 1 - 1e-6).float().mean()), 5)}


def trajectories(engine, prompts: list[list[int]], samples: int, max_new_tokens: int, seed: int):
    """Dense samples (temperature 1): (prompt ids, response ids), one pair per sample."""
    from sparrow_sgl.engine import SamplingParams

    params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=max_new_tokens, n=samples)
    outs = engine.generate(prompts, params, schedule="dense", progress=False)
    return [list(o.prompt_ids) for o in outs], [list(o.token_ids) for o in outs]


def load_prompts(args, engine) -> list[list[int]]:
    from sparrow_sgl.rl.tasks import ChainTask, JsonlMathTask, encode_prompt

    if args.prompts:
        task = JsonlMathTask(args.prompts)
    else:
        from sparrow_sgl.demo import PROFILES

        task = ChainTask(**PROFILES["pretrained"].task, seed=args.seed)  # the demo checkpoint's task
    return [encode_prompt(engine.tokenizer, task.sample(i).prompt) for i in range(args.num_prompts)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--prompts", default="", help="a .jsonl of math problems (default: the demo's chain task)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=14)
    p.add_argument("--page-size", type=int, default=4)
    p.add_argument("--budgets", default="12,16,24,32", help="tokens, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    engine = Engine(EngineConfig(model=args.model, device="cpu", page_size=args.page_size, kv_gb=0.05, seed=args.seed))
    prompts, responses = trajectories(engine, load_prompts(args, engine), args.samples, args.max_new_tokens,
                                      args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        from distill.sparse_forward import response_logprobs

        _, mask, dense = response_logprobs(model, prompts, responses, None, return_full=True)
        mask[:, 0] = False  # response token 0 comes from the dense prefill under every policy
        for budget in (int(b) for b in args.budgets.split(",")):
            schedule = Schedule.fixed(budget, page_size=args.page_size, bin_tokens=1 << 20)
            row = {"kind": "centroid_policy", "model": args.model, "budget": budget, "page_size": args.page_size,
                   "sequences": len(prompts), "max_response": max(map(len, responses))}
            row |= compare(model, prompts, responses, schedule, dense, mask)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
