"""The testbed's result: one figure (reward, live tail and dense-policy accuracy vs step, a line per configuration)
and one table (target tail, measured tail, rollout speedup, final reward vs dense, collapsed yes/no).

COLLAPSE RULE (fixed before the sweep ran; see scripts/testbed/README.md): a configuration has collapsed if any of
  (a) its final dense greedy accuracy is more than ACC_DROP below its own step-0 accuracy (training made the policy
      worse),
  (b) its final dense greedy accuracy is more than ACC_DROP below the dense-rollout run's final accuracy,
  (c) its mean training reward over the last WINDOW steps is below REWARD_CRASH x its best WINDOW-step mean (the
      reward curve crashed).
Dense greedy accuracy: exact greedy chain on `eval_prompts` held-out prompts, the policy scored densely.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sparrow_sgl.rl.metrics import moving_mean, read_jsonl, window_mean

ACC_DROP = 0.10
REWARD_CRASH = 0.5
WINDOW = 10


def load_runs(sweep_dir: Path) -> dict[str, dict]:
    runs = {}
    for spec_path in sorted((sweep_dir / "runs").glob("spec_*.json")):
        spec = json.loads(spec_path.read_text())
        run_dir = sweep_dir / "runs" / spec["name"]  # where `sweep` puts it, also after the directory moved
        if not run_dir.exists():
            run_dir = Path(spec["train"]["out_dir"])
        runs[spec["name"]] = {
            "spec": spec,
            "metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "evals": read_jsonl(run_dir / "evals.jsonl"),
            "summary": json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists()
            else {},
        }
    return runs


def best_window(values: list[float], size: int = WINDOW) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < size:
        return window_mean(values, WINDOW)
    return max(sum(values[i : i + size]) / size for i in range(len(values) - size + 1))


def target_of(name: str) -> float | None:
    return float(name.split("-", 1)[1].split("+")[0]) if name.startswith("tau-") else None


def common_steps(runs: dict[str, dict]) -> tuple[int, int]:
    """Steps every run completed, and the last step at which every run was evaluated (runs stopped by a deadline
    end at different steps; the table compares them at these)."""
    longest = max((len(r["metrics"]) for r in runs.values()), default=0)
    # a run that stopped before half the longest run's steps (crashed, or far slower) is reported at its own end
    ran = [r for r in runs.values() if len(r["metrics"]) >= longest / 2 and r["metrics"]]
    steps = min((len(r["metrics"]) for r in ran), default=0)
    evaluated = [{e["step"] for e in r["evals"]} for r in ran]
    shared = set.intersection(*evaluated) if evaluated else set()
    return steps, max((s for s in shared if s <= steps), default=0)


def acc_at(run: dict | None, step: int) -> float | None:
    hits = [e["greedy_exact"] for e in (run or {}).get("evals", []) if e["step"] == step]
    return hits[0] if hits else None


def row_for(name: str, run: dict, dense: dict | None, speed: dict, steps: int, eval_step: int) -> dict:
    if len(run["metrics"]) < steps:  # stopped early: compared at its own last step and last evaluation
        steps, eval_step = len(run["metrics"]), max((e["step"] for e in run["evals"]), default=0)
    m = run["metrics"][:steps]
    rewards = [r.get("rollout/reward_mean") for r in m]
    tails = [r.get("sparse/tail_p5/min") for r in m]
    tails = [t for t in tails if t is not None]
    acc0, acc, dense_acc = acc_at(run, 0), acc_at(run, eval_step), acc_at(dense, eval_step)
    final = window_mean(rewards, WINDOW)
    dense_rewards = [r.get("rollout/reward_mean") for r in dense["metrics"][:steps]] if dense else []
    dense_final = window_mean(dense_rewards, WINDOW)
    label = name.split("+")[0].removeprefix("tau-")
    speed_row = speed.get("rows", {}).get("dense" if name == "dense" else label, {})
    reasons = []
    if acc is not None and acc0 is not None and acc < acc0 - ACC_DROP:
        reasons.append(f"(a) accuracy {acc0:.3f} -> {acc:.3f}")
    if acc is not None and dense_acc is not None and acc < dense_acc - ACC_DROP:
        reasons.append(f"(b) accuracy {acc:.3f} vs dense {dense_acc:.3f}")
    best = best_window(rewards)
    if final is not None and best and final < REWARD_CRASH * best:
        reasons.append(f"(c) reward {final:.3f} vs best {best:.3f}")
    half = max(len(tails) // 2, 1)
    return {
        "config": name,
        "target_tail": target_of(name),
        "schedule": run["summary"].get("schedule"),
        "steps": len(m),
        "steps_run": len(run["metrics"]),
        "eval_step": eval_step,
        "tail_median": statistics.median(tails) if tails else None,
        "tail_first_half": statistics.median(tails[:half]) if tails else None,
        "tail_second_half": statistics.median(tails[half:]) if len(tails) > 1 else None,
        "is_truncated_frac": window_mean([r.get("sparse/is_truncated_frac") for r in m], size=len(m) or 1),
        "rollout_speedup": speed_row.get("speedup"),
        "rollout_tokens_per_s_alone": speed_row.get("tokens_per_s"),
        "rollout_tokens_per_s_in_sweep": window_mean([r.get("rollout/tokens_per_s") for r in m], size=len(m) or 1),
        "reward_first": window_mean(rewards, WINDOW, end=False),
        "reward_final": final,
        "reward_vs_dense": final / dense_final if final is not None and dense_final else None,
        "greedy_acc_start": acc0,
        "greedy_acc_final": acc,
        "completed": bool(run["summary"]),  # run_one writes summary.json last: absent = the run crashed
        "collapsed": bool(reasons),
        "collapse_reasons": reasons,
    }


def make_table(sweep_dir: Path) -> list[dict]:
    runs = load_runs(sweep_dir)
    speed_path = sweep_dir / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else {}
    order = sorted(runs, key=lambda n: (n != "dense", target_of(n) or 0.0, "+" in n))
    steps, eval_step = common_steps(runs)
    return [row_for(n, runs[n], runs.get("dense"), speed, steps, eval_step) for n in order]


def _verdict(row: dict) -> str:
    if not row["completed"]:
        return f"run failed after {row['steps_run']} steps (see its log)"
    return "yes: " + "; ".join(row["collapse_reasons"]) if row["collapsed"] else "no"


def _f(x, pattern: str = "{:.3f}") -> str:
    return "-" if x is None else pattern.format(x)


def markdown(rows: list[dict]) -> str:
    head = ("| config | target tail | steps | measured tail (median of per-step min-bin p5) | "
            "first half -> second half | TIS-truncated tokens | rollout speedup (alone) | "
            "final reward (last 10 steps) | reward vs dense | "
            "dense greedy accuracy start -> end | collapsed |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        lines.append(
            f"| {r['config']} | {_f(r['target_tail'], '{:.2f}')} | {r['steps']} (eval at {r['eval_step']}) | "
            f"{_f(r['tail_median'])} | "
            f"{_f(r['tail_first_half'])} -> {_f(r['tail_second_half'])} | {_f(r['is_truncated_frac'], '{:.4f}')} | "
            f"{_f(r['rollout_speedup'], '{:.2f}x')} | {_f(r['reward_final'])} | {_f(r['reward_vs_dense'], '{:.2f}')} | "
            f"{_f(r['greedy_acc_start'])} -> {_f(r['greedy_acc_final'])} | "
            f"{_verdict(r)} |"
        )
    return "\n".join(lines) + "\n"


def plot(sweep_dir: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(sweep_dir)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in sorted(runs, key=lambda n: (n != "dense", target_of(n) or 0.0, "+" in n)):
        m, ev = runs[name]["metrics"], runs[name]["evals"]
        steps = [r["step"] for r in m]
        rewards = moving_mean([r.get("rollout/reward_mean") for r in m], 5)
        style = {"linestyle": "--"} if "+" in name else {}
        axes[0].plot(steps, rewards, label=name, **style)
        tail = [r.get("sparse/tail_p5/min") for r in m]
        axes[1].plot(steps, [float("nan") if t is None else t for t in tail], label=name, marker=".", **style)
        axes[2].plot([e["step"] for e in ev], [e["greedy_exact"] for e in ev], label=name, marker="o", **style)
    for tau in (0.86,):
        axes[1].axhline(tau, color="grey", linestyle=":", label=f"tau = {tau}")
    titles = ("training reward (rollout, 5-step mean)", "live tail: min over bins of the 5th-pct acceptance rate",
              "dense greedy accuracy (held-out prompts)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(sweep_dir: str | Path, out: str | Path) -> list[dict]:
    sweep_dir, out = Path(sweep_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_table(sweep_dir)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "table.md").write_text(markdown(rows))
    plot(sweep_dir, out / "sweep.png")
    print(markdown(rows))
    return rows
