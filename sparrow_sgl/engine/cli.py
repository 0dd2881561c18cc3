"""`sparrow generate`: rollouts from a JSONL file of prompts with the embedded engine, written as JSONL.

Input rows hold "prompt" / "question" / "problem" (text; the chat template is applied with --chat), "messages" (a
chat, with --chat) or "prompt_ids" (token ids). Every output row is the input row's fields (id, label, answer, ...)
plus a `Rollout` (see sparrow_sgl/rollout.py) and `response` (the generated text, also kept as `text`), so that

    sparrow generate --model DIR --prompts rewards/data/gsm8k/test.jsonl --num-prompts 8 --out r.jsonl
    sparrow reward --file r.jsonl --kind math

scores the rollouts against the rows' own answers.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (Qwen3)")
    parser.add_argument(
        "--prompts",
        required=True,
        help="JSONL, one object a line with 'prompt', 'question' or 'problem' (text), 'prompt_ids' or, with --chat, "
        "'messages'; e.g. rewards/data/gsm8k/test.jsonl",
    )
    parser.add_argument("--prompt-field", default=None, help="the row field holding the text prompt")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts of the file")
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


PROMPT_FIELDS = ("prompt", "question", "problem")  # text prompt fields, first present wins (or --prompt-field)


def read_prompts(
    path: str,
    tokenizer,
    chat: bool,
    enable_thinking: bool = True,
    field: str | None = None,
    limit: int | None = None,
) -> tuple[list[list[int]], list[dict]]:
    """(prompt token ids, the input rows), at most `limit`; errors name the file and its 1-based line."""
    from sparrow_sgl.config import ConfigError
    from sparrow_sgl.jsonio import read_jsonl

    if limit is not None and limit < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {limit}")
    prompts, rows = [], []
    for line_no, row in read_jsonl(path, "prompts file")[:limit]:
        where = f"{path}:{line_no}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        prompts.append(_prompt_ids(row, tokenizer, chat, enable_thinking, field, where))
        rows.append(row)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts, rows


def _prompt_ids(row: dict, tokenizer, chat: bool, enable_thinking: bool, field: str | None, where: str) -> list[int]:
    from sparrow_sgl.config import ConfigError

    if "prompt_ids" in row and not field:
        return [int(t) for t in row["prompt_ids"]]
    names = [field] if field else PROMPT_FIELDS
    text_field = next((name for name in names if name in row), None)
    if chat and ("messages" in row or text_field):
        messages = row.get("messages") or [{"role": "user", "content": str(row[text_field])}]
        kw = {} if enable_thinking else {"enable_thinking": False}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return tokenizer.encode(text, add_special_tokens=False)
    if text_field:
        return tokenizer.encode(str(row[text_field]))
    wanted = f"'{field}'" if field else "'prompt', 'question', 'problem', 'prompt_ids' (or 'messages' with --chat)"
    raise ConfigError(f"{where}: a row needs {wanted}; this one has {', '.join(map(repr, row)) or 'no fields'}")


def output_row(row: dict, rollout) -> dict:
    """The input row's fields (id, label, answer, question, ...) + the rollout; `response` = the generated text, so
    `sparrow reward --file` scores the file as it is."""
    record = {**row, **rollout.to_dict()}
    record["response"] = rollout.text or ""
    return record


def run(args: argparse.Namespace) -> int:
    from sparrow_sgl.config import EngineConfig, check_device
    from sparrow_sgl.engine import Engine, SamplingParams
    from sparrow_sgl.engine.engine import check_prompt, schedule_for_engine
    from sparrow_sgl.engine.loader import load_tokenizer, read_hf_config
    from sparrow_sgl.jsonio import check_output_file, write_jsonl_atomic

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
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        kv_gb=args.kv_gb,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
    )
    # every input error surfaces before the model and the KV pool are built
    check_device(config.device)
    out = check_output_file(args.out)
    schedule = schedule_for_engine(config, args.schedule)
    hf_config = read_hf_config(args.model)
    tokenizer = load_tokenizer(args.model)
    prompts, rows = read_prompts(
        args.prompts, tokenizer, args.chat, not args.no_thinking, args.prompt_field, args.num_prompts
    )
    max_len = config.max_model_len or hf_config.max_position_embeddings
    for j, ids in enumerate(prompts):
        check_prompt(ids, 1, hf_config.vocab_size, max_len, f"{args.prompts}: prompt {j + 1}")
    engine = Engine(config)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params, schedule=schedule, progress=True)
    seconds = time.perf_counter() - start
    write_jsonl_atomic(out, (output_row(rows[r.prompt_index], r) for r in rollouts))
    tokens, times = sum(len(r.token_ids) for r in rollouts), engine.last_run
    step_ms = f"{times.decode_s / times.decode_steps * 1e3:.2f} ms" if times.decode_steps else "-"
    print(
        f"sparrow generate: {len(rollouts)} rollouts, {tokens} tokens in {seconds:.2f} s "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s; prefill {times.prefill_s:.2f} s, {times.decode_steps} decode "
        f"steps of {step_ms}), schedule {schedule.name or args.schedule} -> {out}",
        file=sys.stderr,
    )
    return 0
