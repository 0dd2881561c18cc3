"""Per-step metrics: names, per-bin tails, JSON lines, PNG plots.

Names follow the ecosystem so a run's log reads next to OpenRLHF's and verl's: `timing/*` (seconds),
`rollout/*`, `train/*`, and the `sparse/` family — `sparse/tail_p5/bin_{i}` (5th percentile of the acceptance rate
in position bin i), `sparse/tail_p5/min`, `sparse/kv_budget_mean` (attended KV tokens per sparse step),
`sparse/is_truncated_frac`, `sparse/speedup_predicted`, ... Every per-token statistic counts response tokens only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from sparrow_sgl.mismatch import BinStat, min_tail, tail_by_bin


def tail_metrics(
    alpha: torch.Tensor,
    positions: torch.Tensor,
    response_mask: torch.Tensor,
    bin_tokens: int,
    quantile: float = 0.05,
    prefix: str = "sparse",
) -> tuple[dict[str, float], list[BinStat]]:
    """Per-bin q-quantile of the acceptance rate over response tokens: `{prefix}/tail_p5/bin_i`, `.../min`."""
    mask = response_mask.bool() & ~torch.isnan(alpha)
    stats = tail_by_bin(alpha[mask], positions[mask], bin_tokens=bin_tokens, q=quantile)
    tag = f"tail_p{round(100 * quantile):g}"
    out = {f"{prefix}/{tag}/bin_{i}": s.tail for i, s in enumerate(stats) if s.tail is not None}
    lowest = min_tail(stats)
    if lowest is not None:
        out[f"{prefix}/{tag}/min"] = lowest
        out[f"{prefix}/alpha_mean"] = float(alpha[mask].mean())
    return out, stats


def masked_stats(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    return float(values[mask].float().mean()) if bool(mask.any()) else float("nan")


def rollout_metrics(batch, rollouts, tokens_per_s: float) -> dict:
    """`rollout/*` (reward, lengths in tokens, throughput) and the attended vs available KV per decode step."""
    lens = batch.response_lens.float()
    steps = sum(r.meta.get("decode_steps", 0) for r in rollouts)
    kv_sum = sum(r.meta.get("kv_tokens_mean", 0.0) * r.meta.get("decode_steps", 0) for r in rollouts)
    return {
        "rollout/reward_mean": float(batch.rewards.mean()),
        "rollout/reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
        "rollout/solved_frac": float((batch.rewards >= 1.0).float().mean()),  # full-reward rollouts
        "rollout/response_length_mean": float(lens.mean()),
        "rollout/response_length_max": float(lens.max()),
        "rollout/prompt_length_mean": float(batch.prompt_lens.float().mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / max(len(rollouts), 1),
        "rollout/tokens_per_s": tokens_per_s,
        "sparse/kv_budget_mean": kv_sum / steps if steps else float("nan"),
        "sparse/kv_context_mean": mean_decode_context(batch),
    }


def mean_decode_context(batch) -> float:
    """Mean KV length over decode steps (what a dense step attends), for comparison with kv_budget_mean."""
    p, t = batch.prompt_lens.float(), batch.response_lens.float()
    steps = (t - 1).clamp(min=0)  # the first response token comes from the prefill
    total = (steps * (p + 1) + steps * (steps + 1) / 2).sum()
    return float(total / steps.sum()) if float(steps.sum()) else float("nan")


def mismatch_metrics(batch, old, weights, bin_tokens: int, quantile: float, tau: float) -> tuple[dict, list | None]:
    """Importance-weight statistics and, when the acceptance rate was measured, the per-bin tails."""
    mask = batch.response_mask
    out = {
        "sparse/is_truncated_frac": masked_stats(weights.truncated.float(), mask),
        "sparse/is_weight_mean": masked_stats(weights.weights, mask),
        "sparse/log_ratio_abs_mean": masked_stats((old.logprobs - batch.rollout_logprobs).abs(), mask),
        "train/entropy_old": masked_stats(old.entropy, mask),
    }
    stats = None
    if old.alpha is not None:
        tails, stats = tail_metrics(old.alpha, batch.positions, mask, bin_tokens, quantile)
        out.update(tails)
        out["sparse/bins_below_tau"] = sum(1 for s in stats if s.tail is not None and s.tail < tau)
    return out, stats


def predicted_speedup(schedule, batch, model: str, hardware: str) -> float | None:
    """Cost-model rollout speedup of `schedule` over dense for this batch's lengths (None if unavailable); the batch
    starts together and drains as its requests finish, as the rollout did."""
    if schedule.is_dense:
        return 1.0
    from sparrow_sgl.config import ConfigError
    from sparrow_sgl.costmodel import speedup

    try:
        lengths = batch.response_lens.clamp(min=1).numpy()
        return float(
            speedup(schedule, lengths, len(batch), model=model, hardware=hardware, prompt_len=batch.prompt_lens.numpy(),
                    drain=True)
        )
    except (ConfigError, ValueError, KeyError):
        return None


class MetricsLog:
    """Append-only `metrics.jsonl` (one object per step) plus `events.jsonl` (one-off records)."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.events_path = self.dir / "events.jsonl"
        if resume_step is None:
            for p in (self.path, self.events_path):
                p.unlink(missing_ok=True)
        else:  # drop steps logged after the checkpoint we resume from (they will be redone)
            self._truncate(resume_step)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def event(self, step: int, kind: str, **data) -> None:
        with self.events_path.open("a") as f:
            f.write(json.dumps({"step": step, "event": kind, **{k: _plain(v) for k, v in data.items()}}) + "\n")

    def records(self) -> list[dict]:
        return read_jsonl(self.path)

    def _truncate(self, step: int) -> None:
        for p in (self.path, self.events_path):
            if p.exists():
                keep = [r for r in read_jsonl(p) if r.get("step", 0) <= step]
                p.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window_mean(values: list[float | None], size: int, end: bool = True) -> float | None:
    """Mean of the last (end) or first `size` values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    part = values[-size:] if end else values[:size]
    return sum(part) / len(part)


def moving_mean(values: list[float | None], window: int) -> list[float]:
    """Trailing mean over `window` steps at every step (None skipped; NaN where a window holds no value)."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def plot_run(
    records: list[dict], out_dir: str | os.PathLike, tau: float | None = None, bin_tokens: int | None = None
) -> list[Path]:
    """reward.png (reward vs step), tails.png (per-bin tail vs step, tau drawn; bins labelled by their token range
    when `bin_tokens` is given), timing.png (seconds per phase vs step); returns the paths."""
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    fig, ax = _step_axes(plt, "GRPO: mean reward of each step's rollouts", "reward (0-1)")
    ax.plot(steps, series("rollout/reward_mean"), marker="o", label="reward (mean over the step's rollouts)")
    paths = [_save(fig, ax, out_dir / "reward.png")]

    tail_keys = sorted(
        {k for r in records for k in r if k.startswith("sparse/tail_p5/bin_")}, key=lambda k: int(k.rsplit("_", 1)[1])
    )
    fig, ax = _step_axes(plt, "GRPO: live tail per position bin (5th percentile of acceptance rate)",
                         "5th-percentile acceptance rate")
    for key in tail_keys:
        ax.plot(steps, series(key), marker=".", label=bin_label(int(key.rsplit("_", 1)[1]), bin_tokens))
    if tau is not None:
        ax.axhline(tau, color="red", linestyle="--", label=f"tau = {tau:g}")
    paths.append(_save(fig, ax, out_dir / "tails.png"))

    timing_keys = sorted({k for r in records for k in r if k.startswith("timing/")})
    fig, ax = _step_axes(plt, "GRPO: time per step, by phase", "seconds")
    for key in timing_keys:
        name = key.removeprefix("timing/")
        ax.plot(steps, series(key), marker=".", label="whole step" if name == "step" else name)
    paths.append(_save(fig, ax, out_dir / "timing.png"))
    return paths


def bin_label(index: int, bin_tokens: int | None) -> str:
    """`tokens 2048-4096` (or `bin 1` when the width is unknown)."""
    if not bin_tokens:
        return f"bin {index}"
    return f"tokens {index * bin_tokens}-{(index + 1) * bin_tokens}"


def _step_axes(plt, title: str, ylabel: str):
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
