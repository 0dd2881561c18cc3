"""`sparrow generate`: rollouts from a JSONL file of prompts with the embedded engine, written as JSONL.

Input rows hold "prompt" (text; the chat template is applied with --chat), "messages" (a chat, with --chat) or
"prompt_ids" (token ids). Every output row is a `Rollout` (see sparrow_sgl/rollout.py) plus the input row's "id".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (Qwen3)")
    parser.add_argument("--prompts", required=True, help="JSONL with 'prompt', 'messages' or 'prompt_ids' per row")
    parser.add_argument("--out", required=True, help="output JSONL of rollouts")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--schedule", default="dense", help="dense | fixed:N | preset name | schedule JSON path")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--logprobs-topk", type=int, default=0, help="also keep the top-k log-probs (k <= 20)")
    parser.add_argument("--stop-token-ids", type=int, nargs="*", default=())
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to text prompts")
    parser.add_argument("--no-thinking", action="store_true", help="with --chat: pass enable_thinking=False")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kv-gb", type=float, default=None, help="GiB of KV cache (default: 0.8 of free GPU / 1 CPU)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None)


def read_prompts(path: str, tokenizer, chat: bool, enable_thinking: bool = True) -> tuple[list, list[dict]]:
    """(prompts as text or token ids, the input rows)."""
    from sparrow_sgl.config import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompts file not found: {file}")
    prompts, rows = [], []
    for line_no, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{line_no}: not valid JSON: {e}") from e
        if "prompt_ids" in row:
            prompts.append([int(t) for t in row["prompt_ids"]])
        elif chat and ("messages" in row or "prompt" in row):
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            kw = {} if enable_thinking else {"enable_thinking": False}
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        elif "prompt" in row:
            prompts.append(str(row["prompt"]))
        else:
            raise ConfigError(f"{file}:{line_no}: a row needs 'prompt', 'prompt_ids' (or 'messages' with --chat)")
        rows.append(row)
    if not prompts:
        raise ConfigError(f"{file} holds no prompts")
    return prompts, rows


def run(args: argparse.Namespace) -> int:
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine, SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        n=args.n,
        seed=args.seed,
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
        logprobs_topk=args.logprobs_topk,
    )
    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            page_size=args.page_size,
            kv_gb=args.kv_gb,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        )
    )
    schedule = engine.resolve_schedule(args.schedule)
    prompts, rows = read_prompts(args.prompts, engine.tokenizer, args.chat, not args.no_thinking)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params, schedule=schedule, progress=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for rollout in rollouts:
            record = rollout.to_dict()
            if "id" in rows[rollout.prompt_index]:
                record["id"] = rows[rollout.prompt_index]["id"]
            f.write(json.dumps(record) + "\n")
    tokens = sum(len(r.token_ids) for r in rollouts)
    print(
        f"sparrow generate: {len(rollouts)} rollouts, {tokens} tokens in {seconds:.2f} s "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s), schedule {schedule.name or args.schedule} -> {out}",
        file=sys.stderr,
    )
    return 0
