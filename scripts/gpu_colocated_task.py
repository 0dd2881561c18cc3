"""The long-context task of the single-GPU colocated OpenRLHF run (issue 20): the testbed's chain lookup.

- `python scripts/gpu_colocated_task.py MODEL_DIR OUT.jsonl N [TASK]`: N prompts of a `testbed.SWEEP_TASKS` task
  (default `long`, ~1.3-10K tokens), rendered with the model's chat template exactly as the testbed trained it
  (no thinking block), one `{"prompt", "label"}` row each; run OpenRLHF without `--data.apply_chat_template`.
- `reward_func(queries, prompts, labels)`: OpenRLHF's `--reward.remote_url` contract. The label is the chain
  (`x21 = x10 = x16 = 1`); the reward is the fraction of it the response restates in order (the testbed's partial
  credit). Never raises: a malformed sample scores 0 with `reward_error` 1. `reward_ms` is the time spent scoring.
"""

from __future__ import annotations

import json
import re
import sys
import time

ASSISTANT_END = "</think>"  # the prompt ends with the empty thinking block; the response follows it
TOKEN = re.compile(r"x\d+|\d+")


def score(response: str, chain: list[str]) -> float:
    """The testbed's partial credit (`ChainTask.score`): the share of the chain restated in order."""
    from sparrow_sgl.rl.tasks import ChainTask, TaskSample

    return ChainTask().score(response, TaskSample(prompt="", answer=chain[-1], meta={"chain": chain}))


def response_of(query: str) -> str:
    return query.rsplit(ASSISTANT_END, 1)[-1].split("<|im_end|>")[0]


def reward_func(queries, prompts, labels, **kw):
    import torch

    rewards, errors, spent = [], [], []
    for query, label in zip(queries, labels):
        start = time.perf_counter()
        try:
            rewards.append(score(response_of(query), TOKEN.findall(label)))
            errors.append(0.0)
        except Exception:  # noqa: BLE001 (a reward never raises: OpenRLHF would hide it and fail later)
            rewards.append(0.0)
            errors.append(1.0)
        spent.append(1000 * (time.perf_counter() - start))
    r = torch.tensor(rewards)
    return {"rewards": r, "scores": r,
            "extra_logs": {"reward_error": torch.tensor(errors), "reward_ms": torch.tensor(spent)}}


def write_prompts(model_dir: str, out: str, count: int, task: str = "long") -> int:
    from transformers import AutoTokenizer

    from sparrow_sgl.rl.tasks import ChainTask
    from sparrow_sgl.testbed import SWEEP_TASKS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chain = ChainTask(**SWEEP_TASKS[task][0])
    with open(out, "w") as f:
        for i in range(count):
            s = chain.sample(i)
            text = tokenizer.apply_chat_template([{"role": "user", "content": s.prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
            f.write(json.dumps({"prompt": text, "label": " = ".join(s.meta["chain"])}) + "\n")
    return count


if __name__ == "__main__":
    model_dir, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    write_prompts(model_dir, out, count, *(sys.argv[4:5] or []))
    print(f"wrote {count} prompts to {out}")
