"""`sparrow calibrate`: per-bin acceptance-rate tails over a grid of fixed KV budgets -> a JSON table + PNG.

For each budget: sample responses with sparse decode at that fixed budget, re-score the same tokens densely and
sparsely (teacher forced, exactly the selection the sparse decode made), take the per-token acceptance rate and
its 5th percentile per position bin (absolute position = prompt length + response index). `sparrow plan` reads
the table. Table (JSON):
    {"model": ..., "bin_tokens": 2048, "quantile": 0.05, "mode": "full" | "topk", "tau": 0.86,
     "budgets": {"512": [{"start", "end", "count", "tail", "mean"}, ...], ..., "dense": [...]},
     "settings": {...}}
"dense" (optional) is the dense engine scored against itself: the noise floor. The file is rewritten (atomic
replace) after every budget, and a rerun skips budgets already in it.

`--engine sglang` measures through an SGLang server with the sparrow backend (`--sglang-url`, or one started on
`--model`): always top-k mode, since SGLang returns top-k log-probs only (the sparse side is the rollout's own top-k,
the dense side a dense teacher-forced prefill on the same server).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from sparrow_sgl.config import SCORERS, ConfigError, Schedule, check_device
from sparrow_sgl.jsonio import read_json, read_jsonl, write_json_atomic
from sparrow_sgl.mismatch import BinStat

MODES = ("full", "topk")
DENSE_KEY = "dense"


@dataclass(slots=True)
class CalibrationTable:
    """Tail statistics per budget (tokens; "dense" = noise floor) and position bin."""

    model: str = ""
    bin_tokens: int = 2048
    quantile: float = 0.05
    mode: str = "full"
    tau: float = 0.86
    budgets: dict[str, list[BinStat]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"calibration mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.bin_tokens, int) or self.bin_tokens < 1:
            raise ConfigError(f"bin_tokens must be a positive integer, got {self.bin_tokens!r}")
        for key in self.budgets:
            if key != DENSE_KEY and not str(key).isdigit():
                raise ConfigError(f"calibration budget keys must be token counts or 'dense', got {key!r}")

    # -- queries ------------------------------------------------------------------------------------------------
    def budget_values(self) -> list[int]:
        """Measured sparse budgets in tokens, ascending (the noise floor excluded)."""
        return sorted(int(k) for k in self.budgets if k != DENSE_KEY)

    def stats(self, budget: int | str | None) -> list[BinStat]:
        key = DENSE_KEY if budget in (None, DENSE_KEY) else str(int(budget))
        return self.budgets.get(key, [])

    def has(self, budget: int | str | None) -> bool:
        return (DENSE_KEY if budget in (None, DENSE_KEY) else str(int(budget))) in self.budgets

    @property
    def num_bins(self) -> int:
        return max((len(v) for v in self.budgets.values()), default=0)

    def tail(self, budget: int | None, bin_index: int, min_count: int = 1) -> float | None:
        """Tail of `budget` in bin `bin_index`, None when unmeasured or with fewer than `min_count` tokens."""
        stats = self.stats(budget)
        if bin_index >= len(stats):
            return None
        s = stats[bin_index]
        return s.tail if s.tail is not None and s.count >= min_count else None

    def set(self, budget: int | str | None, stats: list[BinStat]) -> None:
        key = DENSE_KEY if budget in (None, DENSE_KEY) else str(int(budget))
        self.budgets[key] = list(stats)

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        order = sorted(self.budgets, key=lambda k: (k == DENSE_KEY, int(k) if k.isdigit() else 0))
        return {
            "model": self.model,
            "bin_tokens": self.bin_tokens,
            "quantile": self.quantile,
            "mode": self.mode,
            "tau": self.tau,
            "budgets": {k: [s.to_dict() for s in self.budgets[k]] for k in order},
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration table") -> CalibrationTable:
        if not isinstance(data, dict) or not isinstance(data.get("budgets"), dict):
            raise ConfigError(f"{where}: expected an object with a 'budgets' mapping")
        try:
            budgets = {str(k): [BinStat(**s) for s in v] for k, v in data["budgets"].items()}
        except TypeError as e:
            raise ConfigError(f"{where}: bin entries need start, end, count, tail, mean: {e}") from e
        return cls(
            model=str(data.get("model", "")),
            bin_tokens=int(data.get("bin_tokens", 2048)),
            quantile=float(data.get("quantile", 0.05)),
            mode=str(data.get("mode", "full")),
            tau=float(data.get("tau", 0.86)),
            budgets=budgets,
            settings=dict(data.get("settings", {})),
        )

    def model_path(self, table_path: str | os.PathLike) -> str:
        """The model dir as stored (absolute since tables record it so) or, for an older relative entry that does
        not exist from here, relative to the table's own directory, where it is found."""
        return resolve_model_path(self.model, Path(table_path).parent)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationTable:
        return cls.from_dict(read_json(path, "calibration table"), where=f"calibration table {path}")


def resolve_model_path(model: str, base: Path) -> str:
    """`model` if absolute, a preset-like name or present from the working directory; else `base / model`, or
    `base / <its last part>` (a run directory moved together with its table), when that is a directory."""
    path = Path(model)
    if not model or path.is_absolute() or path.exists():
        return model
    for candidate in (base / path, base / path.name):
        if candidate.is_dir():
            return str(candidate.resolve())
    return model


# -- measurement --------------------------------------------------------------------------------------------------
def paper_budget_grid() -> list[int]:
    """Every budget (tokens) used by the paper's released presets, ascending."""
    from sparrow_sgl.schedule import load_preset, preset_names

    return sorted({b for name in preset_names() for b in load_preset(name).budgets if b is not None})


def calibrate(
    engine,
    prompts: list[list[int]],
    budgets: list[int],
    *,
    samples: int = 4,
    max_new_tokens: int = 4096,
    seed: int = 0,
    bin_tokens: int = 2048,
    quantile: float = 0.05,
    tau: float = 0.86,
    mode: str = "full",
    topk: int = 20,
    noise_floor: bool = False,
    ignore_eos: bool = False,
    score_batch: int = 4,
    full_max_gib: float = 8.0,
    sparsity: dict | None = None,
    table: CalibrationTable | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> CalibrationTable:
    """Fill `table` (new or resumed) with per-bin tails for every budget not yet in it; save to `out` after each.

    `engine` is anything with the embedded engine's `generate(prompts, params, schedule=, progress=)` and
    `score(prompt_ids, response_ids, sparse=, topk=, return_full=)`; `sparsity` holds the Schedule page settings
    (page_size, sink_pages, local_pages, scorer, dense_layers) matching the engine's. Full mode holds the dense and
    sparse float32 log-distributions [T, vocab] of the responses it re-scores at once: at most `full_max_gib`.
    """
    from tqdm.auto import tqdm


    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    sparsity = dict(sparsity or {})
    table = table or CalibrationTable(bin_tokens=bin_tokens, quantile=quantile, mode=mode, tau=tau)
    if not full_max_gib > 0:
        raise ConfigError(f"full_max_gib must be > 0 GiB, got {full_max_gib}")
    full_max_bytes = int(full_max_gib * 2**30)
    if table.mode == "full":
        check_full_mode_memory(max_new_tokens, _vocab_size(engine), full_max_bytes)
    num_bins = -(-(max(len(p) for p in prompts) + max_new_tokens) // table.bin_tokens)
    todo: list[int | None] = [b for b in sorted(set(budgets)) if not table.has(b)]
    if noise_floor and not table.has(None):
        todo.append(None)
    bar = tqdm(todo, desc="calibrate", unit="budget", disable=not progress)
    for budget in bar:
        bar.set_postfix_str("dense" if budget is None else f"{budget} tok")
        if budget is None:
            schedule = Schedule.dense(**sparsity)
        else:
            schedule = Schedule.fixed(budget, **sparsity)
        stats = measure_budget(
            engine,
            prompts,
            schedule,
            samples=samples,
            max_new_tokens=max_new_tokens,
            seed=seed,
            bin_tokens=table.bin_tokens,
            quantile=table.quantile,
            num_bins=num_bins,
            mode=table.mode,
            topk=topk,
            ignore_eos=ignore_eos,
            score_batch=score_batch,
            full_max_bytes=full_max_bytes,
            progress=progress,
        )
        table.set(budget, stats)
        if out is not None:
            table.save(out)
    return table


def measure_budget(
    engine,
    prompts,
    schedule,
    *,
    samples,
    max_new_tokens,
    seed,
    bin_tokens,
    quantile,
    num_bins,
    mode,
    topk,
    ignore_eos=False,
    score_batch=4,
    full_max_bytes=None,
    progress=True,
) -> list[BinStat]:
    """Generate with `schedule`, score the same tokens dense vs sparse, and bin the per-token acceptance rates."""
    import numpy as np
    from tqdm.auto import tqdm

    from sparrow_sgl.engine.sampling_params import SamplingParams
    from sparrow_sgl.mismatch import tail_by_bin

    params = SamplingParams(
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        n=samples,
        seed=seed,
        ignore_eos=ignore_eos,
        logprobs_topk=topk if mode == "topk" else 0,
    )
    rollouts = [r for r in engine.generate(prompts, params, schedule=schedule, progress=False) if r.token_ids]
    alphas, positions = [], []
    vocab = _vocab_size(engine) if mode == "full" and full_max_bytes else None
    per_token = full_mode_bytes(1, vocab) if vocab else 0
    chunks = score_chunks([len(r.token_ids) for r in rollouts], score_batch, per_token, full_max_bytes)
    for chunk_idx in tqdm(chunks, desc="score", unit="batch", leave=False, disable=not progress):
        chunk = [rollouts[i] for i in chunk_idx]
        for rollout, alpha in zip(chunk, _acceptance(engine, chunk, schedule, mode, topk)):
            alphas.append(alpha.float().cpu().numpy())
            positions.append(np.arange(len(rollout.token_ids)) + len(rollout.prompt_ids))
    if not alphas:
        return tail_by_bin([], [], bin_tokens, quantile, num_bins)
    return tail_by_bin(np.concatenate(alphas), np.concatenate(positions), bin_tokens, quantile, num_bins)


def full_mode_bytes(num_tokens: int, vocab: int) -> int:
    """Bytes full mode holds for `num_tokens` re-scored tokens: dense + sparse float32 [T, vocab]."""
    return 2 * 4 * num_tokens * vocab


def check_full_mode_memory(max_new_tokens: int, vocab: int | None, max_bytes: int) -> None:
    """Refuse, before generating anything, a full-mode run whose longest response alone would exceed the cap."""
    if vocab is None:
        return
    need = full_mode_bytes(max_new_tokens, vocab)
    if need > max_bytes:
        raise ConfigError(
            f"full-vocabulary mode would hold {need / 2**30:.1f} GiB of log-probs for one {max_new_tokens}-token "
            f"response (2 x {max_new_tokens} x {vocab} float32), over the {max_bytes / 2**30:.1f} GiB cap: use "
            f"--mode topk, fewer --max-new-tokens, or a larger --full-max-gib"
        )


def score_chunks(lengths: list[int], score_batch: int, bytes_per_token: int = 0,
                 max_bytes: int | None = None) -> list[list[int]]:
    """Consecutive groups of at most `score_batch` responses (and, when bytes_per_token is given, at most
    `max_bytes` of re-scored log-probs; a response over it alone still gets its own group)."""
    chunks: list[list[int]] = []
    for i, n in enumerate(lengths):
        last = chunks[-1] if chunks else None
        fits = last is not None and len(last) < score_batch
        if fits and bytes_per_token and max_bytes:
            fits = (sum(lengths[j] for j in last) + n) * bytes_per_token <= max_bytes
        if fits:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def _vocab_size(engine) -> int | None:
    config = getattr(engine, "hf_config", None)
    return getattr(config, "vocab_size", None)


def _acceptance(engine, rollouts, schedule, mode: str, topk: int):
    """Per-token acceptance rate of each rollout, sparse (or, for a dense schedule, decode-path) vs dense."""
    import torch

    from sparrow_sgl.mismatch import acceptance_rate, acceptance_rate_topk

    prompt_ids = [r.prompt_ids for r in rollouts]
    response_ids = [r.token_ids for r in rollouts]
    if mode == "full":
        dense = engine.score(prompt_ids, response_ids, sparse=None, return_full=True)
        sparse = engine.score(prompt_ids, response_ids, sparse=schedule, return_full=True)
        return [acceptance_rate(d.full_logprobs, s.full_logprobs) for d, s in zip(dense, sparse)]
    # top-k: the sparse side is what the rollout engine returned while sampling; the dense side is re-scored.
    dense = engine.score(prompt_ids, response_ids, sparse=None, topk=topk)
    out = []
    for r, d in zip(rollouts, dense):
        if r.topk_ids is None:
            raise ConfigError("top-k mode needs rollouts with topk_ids/topk_logprobs (logprobs_topk > 0)")
        ids, logp = torch.tensor(r.topk_ids), torch.tensor(r.topk_logprobs)
        out.append(acceptance_rate_topk(d.topk_ids, d.topk_logprobs, ids.to(d.topk_ids), logp.to(d.topk_logprobs)))
    return out


# -- plot ---------------------------------------------------------------------------------------------------------
def plot_table(table: CalibrationTable, path: str | os.PathLike, tau: float | None = None) -> Path:
    """PNG of the table with tau as a horizontal line and the legend beside the axes (never over the lines).

    Several populated bins: tail vs position (bin middle), one line per budget, noise floor dashed. One or two
    populated bins (short responses): tail vs budget, one line per bin, each bin's noise floor dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = table.tau if tau is None else tau
    fig, ax = plt.subplots(figsize=(9, 5))
    populated = _populated_bins(table)
    if len(populated) <= 2 and table.budget_values():
        _plot_by_budget(ax, table, populated)
    else:
        _plot_by_position(ax, table, plt.get_cmap("viridis"))
    ax.axhline(tau, color="red", linewidth=1.2, label=f"tau = {tau:g}")
    ax.set_ylabel(f"{100 * table.quantile:g}th percentile of acceptance rate")
    ax.set_title(f"{Path(table.model).name or 'model'}: tail per {table.bin_tokens}-token bin ({table.mode} mode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _populated_bins(table: CalibrationTable) -> list[int]:
    return sorted({i for key in table.budgets for i, s in enumerate(table.budgets[key]) if s.tail is not None})


def _plot_by_position(ax, table: CalibrationTable, cmap) -> None:
    budgets = table.budget_values()
    for i, budget in enumerate(budgets):
        _plot_line(ax, table.stats(budget), f"{budget} tok", color=cmap(i / max(1, len(budgets) - 1)))
    if table.has(None):
        _plot_line(ax, table.stats(None), "dense (noise floor)", color="black", linestyle="--")
    ax.set_xlabel("position (tokens, bin middle)")


def _plot_by_budget(ax, table: CalibrationTable, bins: list[int]) -> None:
    budgets = table.budget_values()
    for n, i in enumerate(bins):
        color = f"C{n}"
        span = f"tokens {i * table.bin_tokens}-{(i + 1) * table.bin_tokens}"
        xs = [b for b in budgets if table.tail(b, i) is not None]
        ax.plot(xs, [table.tail(b, i) for b in xs], marker="o", color=color, label=span)
        floor = table.tail(None, i)
        if floor is not None:
            ax.axhline(floor, color=color, linestyle=":", linewidth=1, label=f"dense noise floor, {span}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("KV budget (tokens per request and KV head)")


def _plot_line(ax, stats: list[BinStat], label: str, **style) -> None:
    xs = [(s.start + s.end) / 2 for s in stats if s.tail is not None]
    ys = [s.tail for s in stats if s.tail is not None]
    if xs:
        ax.plot(xs, ys, marker="o", markersize=3, label=label, **style)


# -- prompts ------------------------------------------------------------------------------------------------------
PROMPT_FIELDS = ("prompt", "question", "problem", "messages", "text", "input")


def load_prompts(source: str | os.PathLike, field_name: str | None = None, limit: int | None = None) -> list:
    """Prompts from a .jsonl file (one object or string per line) or a `datasets` dataset saved to disk.

    Returns strings or chat message lists, in file order, at most `limit`. Errors name the file and 1-based line.
    """
    path = Path(source)
    if limit is not None and limit < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {limit}")
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its first split
            dataset = dataset[next(iter(dataset.keys()))]
        rows = dataset.select(range(min(limit or len(dataset), len(dataset))))
        numbered = [(f"{path}: row {i}", row) for i, row in enumerate(rows, 1)]
    elif path.is_file():
        numbered = [(f"{path}:{n}", row) for n, row in read_jsonl(path, "prompts file")]
    else:
        raise ConfigError(f"prompt source not found: {path} (give a .jsonl file or a datasets dir)")
    numbered = numbered[:limit] if limit else numbered
    prompts = [_prompt_of(row, field_name, where) for where, row in numbered]
    if not prompts:
        raise ConfigError(f"no prompts in {path}")
    return prompts


def _prompt_of(row, field_name: str | None, where: str):
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: each prompt must be a string or an object, got {type(row).__name__}")
    names = [field_name] if field_name else [f for f in PROMPT_FIELDS if f in row]
    if not names or names[0] not in row:
        raise ConfigError(
            f"{where}: no prompt field among {field_name or ', '.join(PROMPT_FIELDS)} (fields: {', '.join(row)}); "
            "use --prompt-field"
        )
    return row[names[0]]


def encode_prompts(tokenizer, prompts: list, chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt; with `chat`, strings become one user turn in the model's chat template."""
    out = []
    for p in prompts:
        if isinstance(p, list) or (chat and getattr(tokenizer, "chat_template", None)):
            messages = p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(str(p), add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out


# -- CLI ----------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="local HF model dir")
    p.add_argument("--prompts", required=True,
                   help="prompt set: .jsonl file (e.g. rewards/data/gsm8k/test.jsonl) or a `datasets` dataset on disk")
    p.add_argument("--prompt-field", help=f"field holding the prompt (default: first of {', '.join(PROMPT_FIELDS)})")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw instead of through the chat template")
    p.add_argument("--budgets", type=parse_budgets,
                   help="KV budgets in tokens, comma-separated, e.g. 256,512,1024 (default: all paper-preset budgets)")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response length cap (default 4096)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (covers late bins)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bin-tokens", type=int, default=2048, help="position bin width in tokens (default 2048)")
    p.add_argument("--quantile", type=float, default=0.05, help="tail quantile (default 0.05)")
    p.add_argument("--tau", type=float, default=0.86, help="threshold drawn in the plot and stored (default 0.86)")
    p.add_argument("--mode", choices=MODES, default="full", help="full-vocabulary or top-k acceptance rate")
    p.add_argument("--topk", type=int, default=20, help="list length in top-k mode (default 20)")
    p.add_argument("--noise-floor", action="store_true", help="also measure the dense engine against itself")
    p.add_argument("--score-batch", type=int, default=4, help="responses re-scored per call (memory: T x vocab each)")
    p.add_argument("--full-max-gib", type=float, default=8.0,
                   help="full mode: cap on the dense + sparse float32 log-probs held at once (default 8 GiB)")
    p.add_argument("--out", "-o", default="calibration.json", help="table JSON (resumed if it exists)")
    p.add_argument("--plot", help="PNG path (default: the table path with .png)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing table at --out")
    p.add_argument("--engine", choices=("embedded", "sglang"), default="embedded")
    p.add_argument("--device", default="cpu", help="engine device: cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="engine dtype: auto | float32 | bfloat16 | float16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--scorer", choices=SCORERS, default="centroid")
    p.add_argument("--kv-gb", type=float, default=None, help="embedded engine KV cache size in GiB")
    p.add_argument("--sglang-url", help="--engine sglang: a running `sparrow serve` (default: start one on --model)")
    p.add_argument("--sglang-dense-url", help="--engine sglang: a `sparrow serve --dense` baseline for --noise-floor")
    p.add_argument("--sglang-kv-tokens", type=int, default=None, help="KV pool (tokens) of a started SGLang server")


def parse_budgets(text: str) -> list[int]:
    """`--budgets 256,512,1024`: positive whole numbers of KV tokens (argparse type; errors say which entry)."""
    budgets = []
    for item in (x.strip() for x in text.split(",")):
        if not item.lstrip("+-").isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not a whole number of tokens (e.g. --budgets 256,512,1024)")
        if int(item) <= 0:
            sign = "negative" if int(item) < 0 else "zero"
            raise argparse.ArgumentTypeError(f"{item} is {sign}: a budget is a positive number of KV tokens")
        budgets.append(int(item))
    return budgets


def run(args) -> int:
    budgets = args.budgets or paper_budget_grid()
    if args.engine == "sglang":
        _check_sglang_args(args)
    else:
        check_device(args.device)
    _check_args(args)
    out = Path(args.out)
    sparsity = {"page_size": args.page_size, "scorer": args.scorer}
    settings = {
        "prompts": str(args.prompts),
        "num_prompts": args.num_prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "engine": args.engine,
        "temperature": 1.0,
        "ignore_eos": args.ignore_eos,
        "topk": args.topk if args.mode == "topk" else 0,
        **sparsity,
        "sink_pages": 1,
        "local_pages": 2,
        "dense_layers": [0, 1],
    }
    for budget in budgets:  # schedule errors surface before any model is loaded
        Schedule.fixed(budget, **sparsity)
    table = _resume_or_new(out, args, settings)
    done = [b for b in budgets if table.has(b)]
    if done:
        print(f"resuming {out}: budgets {done} already measured")
    if len(done) < len(set(budgets)) or (args.noise_floor and not table.has(None)):
        from sparrow_sgl.engine.loader import load_tokenizer

        prompts = load_prompts(args.prompts, args.prompt_field, args.num_prompts)
        prompt_ids = encode_prompts(load_tokenizer(args.model), prompts, chat=not args.no_chat)
        engine = _build_engine(args)
        try:
            calibrate(
                engine,
                prompt_ids,
                budgets,
                samples=args.samples,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                topk=args.topk,
                noise_floor=args.noise_floor,
                ignore_eos=args.ignore_eos,
                score_batch=args.score_batch,
                full_max_gib=args.full_max_gib,
                sparsity=sparsity,
                table=table,
                out=out,
            )
        finally:
            if hasattr(engine, "close"):
                engine.close()  # an SGLang server started for this run goes down with it
    plot = plot_table(table, args.plot or out.with_suffix(".png"), args.tau)
    print(f"wrote {out} and {plot}")
    print(_summary(table, args.tau))
    return 0


def _resume_or_new(out: Path, args, settings: dict) -> CalibrationTable:
    fresh = CalibrationTable(
        model=str(Path(args.model).resolve()),  # absolute: `sparrow plan` may run from another directory
        bin_tokens=args.bin_tokens,
        quantile=args.quantile,
        mode=args.mode,
        tau=args.tau,
        settings=settings,
    )
    if args.fresh or not out.exists():
        return fresh
    old = CalibrationTable.load(out)
    keys = ("max_new_tokens", "samples", "seed", "page_size", "scorer", "prompts", "num_prompts", "topk")
    clash = [k for k in keys if old.settings.get(k) != settings.get(k)]
    clash += [k for k in ("bin_tokens", "quantile", "mode") if getattr(old, k) != getattr(fresh, k)]
    clash += ["model"] if Path(old.model_path(out)).resolve() != Path(fresh.model).resolve() else []
    if clash:
        raise ConfigError(f"{out} was measured with different {', '.join(clash)}; use --fresh or another --out")
    return old


def _check_args(args) -> None:
    """Settings that would otherwise fail only once the engine is built and measuring."""
    from sparrow_sgl.engine.sampling_params import MAX_LOGPROBS_TOPK
    from sparrow_sgl.jsonio import check_output_file

    for name in ("samples", "max_new_tokens", "score_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.quantile <= 1:
        raise ConfigError(f"--quantile must lie in [0, 1], got {args.quantile}")
    if args.mode == "topk" and not 1 <= args.topk <= MAX_LOGPROBS_TOPK:
        raise ConfigError(f"--mode topk needs 1 <= --topk <= {MAX_LOGPROBS_TOPK}, got {args.topk}")
    for path in (args.out, args.plot):
        if path:
            check_output_file(path)


def _check_sglang_args(args) -> None:
    """SGLang returns top-k log-probs only and keeps 16-token pages: switch to top-k mode, refuse other pages."""
    if args.page_size != 16:
        raise ConfigError(f"--engine sglang keeps 16-token KV pages; got --page-size {args.page_size}")
    if args.mode == "full":
        print(
            f"calibrate: SGLang returns top-k log-probs only: measuring in top-k mode (k = {args.topk}, a lower "
            "bound on the acceptance rate)"
        )
        args.mode = "topk"


def _build_engine(args):
    if args.engine == "sglang":
        return _build_sglang_engine(args)
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    return Engine(
        EngineConfig(
            model=str(args.model),
            device=args.device,
            dtype=args.dtype,
            page_size=args.page_size,
            scorer=args.scorer,
            kv_gb=args.kv_gb,
            seed=args.seed,
        )
    )


def _build_sglang_engine(args):
    """Connect to --sglang-url, or start a sparrow SGLang server on --model (stopped when calibration ends).

    The noise floor's dense rollouts come from --sglang-dense-url when given, else from the same server with a dense
    schedule (every step then runs SGLang's stock backend, as `sparrow serve --dense` does); both sides of it are
    SGLang (dense rollout vs dense teacher-forced scoring), so it measures the engine's own numerics.
    """
    from sparrow_sgl.config import Schedule
    from sparrow_sgl.sglang.engine_adapter import SGLangEngine

    default = Schedule.dense(page_size=args.page_size, scorer=args.scorer)
    if args.sglang_url:
        return SGLangEngine(
            args.sglang_url, model=str(args.model), default_schedule=default, dense_url=args.sglang_dense_url
        )
    if args.sglang_dense_url:
        raise ConfigError("--sglang-dense-url needs --sglang-url (a started server has no separate dense baseline)")
    return SGLangEngine.launch(
        str(args.model), default, device=args.device, dtype=args.dtype, kv_tokens=args.sglang_kv_tokens
    )


def _summary(table: CalibrationTable, tau: float) -> str:
    lines = [f"lowest {100 * table.quantile:g}th-percentile acceptance rate over bins (tau = {tau:g}):"]
    from sparrow_sgl.mismatch import min_tail

    rows = [(f"{b} tok", str(b)) for b in table.budget_values()]
    if table.has(None):
        rows.append(("dense (noise floor)", DENSE_KEY))
    for label, key in rows:
        low = min_tail(table.budgets[key])
        mark = "" if low is None else ("  ok" if low >= tau else "  below tau")
        lines.append(f"  {label:>19}: {'n/a' if low is None else f'{low:.4f}'}{mark}")
    return "\n".join(lines)
