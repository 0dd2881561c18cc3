"""The demo's reward plot: GRPO training reward per step (left) and held-out evaluation before/after (right).

`sparrow demo` draws it for its own run (`<out>/grpo_reward.png`); several runs (seeds) go into one figure with
`python -m sparrow_sgl.demo_plot OUT.png RUN_DIR [RUN_DIR ...]` (each RUN_DIR a `sparrow demo --out` directory).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

EVALS = (  # summary key, its standard-error key, label
    ("reward_mean", "reward_se", "reward\n(temp. 1)"),
    ("greedy_exact", "greedy_exact_se", "greedy\nexact"),
)


@dataclass(slots=True)
class DemoRun:
    label: str
    records: list[dict]  # grpo/metrics.jsonl rows
    before: dict  # Demo.evaluate() before GRPO
    after: dict


def load_run(run_dir: str | Path) -> DemoRun:
    """A finished `sparrow demo --out run_dir`."""
    from sparrow_sgl.rl.metrics import read_jsonl

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    seed = summary.get("seed")
    label = f"seed {seed}" if seed is not None else run_dir.name
    return DemoRun(label, read_jsonl(run_dir / "grpo" / "metrics.jsonl"), summary["reward_before"],
                   summary["reward_after"])


def plot_demo_reward(runs: list[DemoRun], path: str | Path, title: str = "") -> Path:
    import matplotlib

    from sparrow_sgl.rl.metrics import moving_mean

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps = [r["step"] for r in run.records]
        reward = [r["rollout/reward_mean"] for r in run.records]
        solved = [r.get("rollout/solved_frac", float("nan")) for r in run.records]
        ax.plot(steps, reward, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_mean(reward, 10), color=color, linewidth=2,
                label=f"{run.label}: reward (fraction of the chain right)")
        ax.plot(steps, moving_mean(solved, 10), color=color, linewidth=2, linestyle="--",
                label=f"{run.label}: fully solved fraction")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("training rollouts (10-step mean; faint: per step)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("training reward per step")
    _eval_bars(bx, runs)
    fig.suptitle(title or "sparrow demo: GRPO reward")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eval_bars(ax, runs: list[DemoRun]) -> None:
    """Per metric and run: before (light) and after (dark) bars with standard-error whiskers."""
    width = 0.8 / (2 * len(runs))
    for m, (key, se, _) in enumerate(EVALS):
        for i, run in enumerate(runs):
            for j, (when, alpha) in enumerate(((run.before, 0.35), (run.after, 1.0))):
                x = m + (2 * i + j + 0.5) * width - 0.4
                ax.bar(x, when[key], width, yerr=when[se], color=f"C{i}", alpha=alpha, capsize=2,
                       label=f"{run.label} {'after' if j else 'before'}" if m == 0 else None)
    ax.set_xticks(range(len(EVALS)), [label for *_, label in EVALS])
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(alpha=0.3, axis="y")
    n = runs[0].before.get("prompts", "?") if runs else "?"
    ax.set_title(f"held-out eval, {n} prompts (± s.e.)")
    ax.legend(fontsize=7, loc="upper center", ncol=3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m sparrow_sgl.demo_plot OUT.png RUN_DIR [RUN_DIR ...]")
        return 2
    runs = [load_run(d) for d in argv[1:]]
    steps = len(runs[0].records)
    path = plot_demo_reward(runs, argv[0], f"sparrow demo (CPU, pretrained checkpoint): {steps} GRPO steps, "
                                           f"{len(runs)} seed(s)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
