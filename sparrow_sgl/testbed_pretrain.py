"""Supervised pretraining of a small Qwen3 on the long-chain task (with filler), so that RL starts from a model that
does the lookups: the testbed's model and the demo's committed checkpoint.

Batches hold about `tokens_per_batch` tokens of one length bucket (many short prompts or a few long ones), hops
drawn per example from `hops`; the loss is cross-entropy on the response tokens only (reference chain + EOS).
Right padding with causal attention needs no mask (real tokens never see the pads), so attention runs its fused
causal path. With `minutes` set, the LR decays over wall time (cosine to 10%) and training stops at that budget.
The tokenizer is word-level (`build_chain_tokenizer`): every variable, number, filler word and symbol is one token
and a variable is the same token wherever it occurs, so a lookup is a two-token associative recall (`x7 =` -> the
token after it); with the byte-level BPE, `x7` splits into `x` + `7` and the response's first variable differs from
the listing's (`x` vs ` x`), and a 6-layer model pretrained 4 minutes on an H200 learned the answer format only.
Greedy accuracy is measured by teacher forcing: greedy decoding reproduces the reference exactly iff every
reference token (EOS included) is the argmax given the reference prefix.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparrow_sgl.rl.tasks import ChainTask
from sparrow_sgl.rl.warmup import reference_examples

EVAL_OFFSET = 2_000_000_000  # the demo's evaluation indices (never reached by training cursors)


@dataclass(slots=True)
class Bucket:
    num_vars: list[int]
    filler: list[int]
    weight: float = 1.0


@dataclass(slots=True)
class PretrainConfig:
    out: str = "runs/testbed/model"
    device: str = "cuda"
    seed: int = 0
    spec: dict = field(default_factory=dict)  # TinyModelSpec overrides
    vocab: int = 512  # byte-level BPE size (tokenizer "bpe"); the word-level one has its own ~190 tokens
    tokenizer: str = "word"  # "word" (build_chain_tokenizer) or "bpe" (sparrow_sgl.tiny.build_tokenizer)
    init: str | None = None  # continue from this model directory (its tokenizer too) instead of a random model
    buckets: list[Bucket] = field(default_factory=list)
    hops: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: int = 3000  # upper bound on optimizer steps
    minutes: float | None = None  # wall budget (the LR decays over it); None: decay over `steps`
    tokens_per_batch: int = 131072
    lr: float = 1.5e-3
    warmup_steps: int = 30
    workers: int = 6  # data-loader processes (prompt building + tokenizing)
    eval_every: int = 100
    eval_prompts: int = 64
    eval_tasks: dict = field(default_factory=dict)  # name -> ChainTask args, greedy accuracy reported per name

    def __post_init__(self) -> None:
        self.buckets = [b if isinstance(b, Bucket) else Bucket(**b) for b in self.buckets]
        if not self.buckets or self.tokens_per_batch < 1 or self.steps < 1:
            raise ValueError("pretrain needs buckets, tokens_per_batch >= 1 and steps >= 1")


def build_chain_tokenizer(max_vars: int = 64, max_number: int = 100):
    """Word-level tokenizer of the chain task's text (whitespace split, Qwen3 special tokens and chat template);
    decoding joins words with single spaces. Anything else maps to <unk>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparrow_sgl.rl.tasks import FILLER_WORDS
    from sparrow_sgl.tiny import QWEN3_CHAT_TEMPLATE, SPECIAL_TOKENS

    words = ["user", "assistant", "system", "find", "=", ";", ".", *FILLER_WORDS]
    words += [str(i) for i in range(max_number)] + [f"x{i}" for i in range(max_vars)]
    vocab = {w: i for i, w in enumerate(["<unk>", *SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", *SPECIAL_TOKENS]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", bos_token=None)
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast


def build_tasks(cfg: PretrainConfig) -> list[list[ChainTask]]:
    """tasks[bucket][hop index]; seeds differ from the RL and evaluation tasks' (seeds 1000 + ...)."""
    return [
        [ChainTask(num_vars=b.num_vars, filler=b.filler, hops=h, seed=1000 + 10 * i + h) for h in cfg.hops]
        for i, b in enumerate(cfg.buckets)
    ]


class ChainBatches(torch.utils.data.IterableDataset):
    """Endless packed batches: (ids [B, L] right-padded, targets [B, L - 1] bool: positions predicting response)."""

    def __init__(self, cfg: PretrainConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(self.cfg.seed * 7919 + worker)
        tasks = build_tasks(self.cfg)
        weights = [b.weight for b in self.cfg.buckets]
        counter = 0
        while True:
            bucket = rng.choices(range(len(tasks)), weights)[0]
            examples, tokens = [], 0
            while tokens < self.cfg.tokens_per_batch:
                task = rng.choice(tasks[bucket])
                ex = reference_examples(self.tokenizer, task, [worker + workers * counter])[0]
                counter += 1
                examples.append(ex)
                tokens += len(ex[0]) + len(ex[1])
            yield pack_right(examples, self.pad)


def pack_right(examples, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    target = torch.zeros(len(examples), length - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(examples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        target[i, len(p) - 1 : len(p) + len(r) - 1] = True
    return ids, target


def response_logits(model, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits at the target positions only ([N, V]): the LM head never sees the (many) prompt positions."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    return model.lm_head(hidden[target])


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: ChainTask, indices, batch_tokens: int = 65536) -> dict:
    """`exact`: fraction of prompts whose greedy answer is the reference chain; `token`: answer-token accuracy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = reference_examples(tokenizer, task, indices)
    exact, correct, total = 0, 0, 0
    start = 0
    while start < len(examples):
        chunk, tokens = [], 0
        while start < len(examples) and (not chunk or tokens < batch_tokens):
            chunk.append(examples[start])
            tokens += len(examples[start][0]) + len(examples[start][1])
            start += 1
        ids, target = pack_right(chunk, pad)
        ids, target = ids.to(device), target.to(device)
        with _autocast(device):
            hit = response_logits(model, ids, target).argmax(-1) == ids[:, 1:][target]
        counts = target.sum(1).tolist()
        for row in hit.split(counts):
            exact += int(bool(row.all()))
            correct += int(row.sum())
            total += len(row)
    model.train(was_training)
    return {"exact": exact / len(examples), "token": correct / max(total, 1)}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_factor(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    progress = elapsed_s / (60 * cfg.minutes) if cfg.minutes else step / cfg.steps
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pretrain(cfg: PretrainConfig, progress: bool = True, command: str = "") -> dict:
    """Train, evaluate, save the model (bf16 safetensors) + tokenizer + `pretrain.json` under `cfg.out`."""
    from tqdm.auto import tqdm

    from sparrow_sgl.tiny import TinyModelSpec, build_tiny_model, build_tokenizer

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.init:
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(cfg.init)
        model = Qwen3ForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
    elif cfg.tokenizer == "word":
        tokenizer = build_chain_tokenizer()
    else:
        corpus = [text for row in build_tasks(cfg) for task in row for text in task.corpus(8)]
        tokenizer = build_tokenizer(cfg.vocab, corpus)
    if not cfg.init:
        vocab = len(tokenizer) if cfg.tokenizer == "word" else cfg.vocab
        model = build_tiny_model(TinyModelSpec(**{**cfg.spec, "vocab_size": vocab, "seed": cfg.seed}), tokenizer)
    device = torch.device(cfg.device)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    loader = torch.utils.data.DataLoader(
        ChainBatches(cfg, tokenizer),
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False,
    )
    eval_tasks = {name: ChainTask(**args) for name, args in cfg.eval_tasks.items()}
    eval_idx = range(EVAL_OFFSET, EVAL_OFFSET + cfg.eval_prompts)
    log: list[dict] = []
    log_path = out / "pretrain_log.jsonl"
    log_path.unlink(missing_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", disable=not progress)
    tokens_seen, step = 0, 0
    for ids, target in loader:
        elapsed = time.perf_counter() - start
        if step >= cfg.steps or (cfg.minutes and elapsed > 60 * cfg.minutes):
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step, elapsed)
        ids, target = ids.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with _autocast(device):
            logits = response_logits(model, ids, target)
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += ids.numel()
        record = {"step": step, "loss": loss.item(), "elapsed_s": time.perf_counter() - start,
                  "tokens": tokens_seen, "seq_len": ids.shape[1], "batch": ids.shape[0]}
        if step % cfg.eval_every == 0:
            record.update(_evaluate(model, tokenizer, eval_tasks, eval_idx))
            if not progress:
                print(f"pretrain step {step}: loss {record['loss']:.4f} nats/token, {record['elapsed_s']:.0f} s, "
                      f"{tokens_seen / 1e6:.1f} M tokens, greedy exact " +
                      ", ".join(f"{k[4:]} {v:.3f}" for k, v in record.items() if k.startswith("acc/")), flush=True)
        log.append(record)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix_str(f"loss {record['loss']:.3f} nats/token, {tokens_seen / record['elapsed_s'] / 1e3:.0f} "
                            f"K tok/s" + "".join(f", {k} {v:.2f}" for k, v in record.items() if k.startswith("acc/")))
    bar.close()
    final = _evaluate(model, tokenizer, eval_tasks, range(EVAL_OFFSET, EVAL_OFFSET + 2 * cfg.eval_prompts))
    train_s = time.perf_counter() - start
    model.to(torch.bfloat16).cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "command": command,
        "seed": cfg.seed,
        "steps": step,
        "train_s": train_s,
        "tokens": tokens_seen,
        "params": n_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "final_loss": log[-1]["loss"] if log else None,
        "final_eval": final,
        "config": asdict(cfg),
    }
    (out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _evaluate(model, tokenizer, tasks: dict, indices) -> dict:
    out = {}
    for name, task in tasks.items():
        acc = greedy_accuracy(model, tokenizer, task, indices)
        out[f"acc/{name}"] = acc["exact"]
        out[f"token_acc/{name}"] = acc["token"]
    return out
