"""One table and one figure over several seeds of a sweep (`sparrow testbed seeds`).

Reads each seed's sweep directory (the same table as `sparrow testbed report`, and the runs' evals); writes `seeds.md`
(final dense greedy accuracy and live tail per seed, their mean, how many seeds collapsed by the stated rule) and
`seeds.png` (dense greedy accuracy vs step, mean over seeds, one line per configuration).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sparrow_sgl.testbed_report import load_runs, make_table, target_of


def load_seeds(sweeps: list[Path]) -> dict[str, list[dict]]:
    """{config: [its table row of each seed]} (configurations present in every seed only)."""
    tables = [make_table(Path(s)) for s in sweeps]
    names = set.intersection(*({row["config"] for row in t} for t in tables))
    order = sorted(names, key=lambda n: (n != "dense", n.startswith("fixed"), -(target_of(n) or 0.0), n))
    return {n: [next(row for row in t if row["config"] == n) for t in tables] for n in order}


def seeds_markdown(rows: dict[str, list[dict]]) -> str:
    def per_seed(rs: list[dict], key: str, pattern: str = "{:.3f}") -> str:
        return " / ".join("-" if r[key] is None else pattern.format(r[key]) for r in rs)

    lines = ["| config | final dense greedy accuracy per seed | mean | live tail (median) per seed | "
             "live tail, first half | final training reward | collapsed (rule) |", "|" + " --- |" * 7]
    for name, rs in rows.items():
        accs = [r["greedy_acc_final"] for r in rs if r["greedy_acc_final"] is not None]
        lines.append(f"| {name} | {per_seed(rs, 'greedy_acc_final')} | "
                     f"{statistics.mean(accs) if accs else float('nan'):.3f} | {per_seed(rs, 'tail_median')} | "
                     f"{per_seed(rs, 'tail_first_half', '{:.2f}')} | {per_seed(rs, 'reward_final', '{:.2f}')} | "
                     f"{sum(r['collapsed'] for r in rs)} of {len(rs)} |")
    return "\n".join(lines) + "\n"


def plot_seeds(sweeps: list[Path], names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_runs(Path(s)) for s in sweeps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        by_step: dict[int, list[float]] = {}
        for seed_runs in runs:
            for e in seed_runs[name]["evals"]:
                by_step.setdefault(e["step"], []).append(e["greedy_exact"])
        steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
        style = {"linestyle": "--"} if "+" in name else {}
        ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], marker="o", label=name, **style)
    ax.set_title(f"dense greedy accuracy on held-out prompts, mean of {len(runs)} seeds", fontsize=10)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seeds_report(sweeps: list[str | Path], out: str | Path) -> dict[str, list[dict]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_seeds([Path(s) for s in sweeps])
    (out / "seeds.md").write_text(seeds_markdown(rows))
    plot_seeds([Path(s) for s in sweeps], list(rows), out / "seeds.png")
    print(seeds_markdown(rows))
    return rows
