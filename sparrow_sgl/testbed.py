"""`sparrow testbed`: does the tail statistic predict stability on a model we train ourselves?

stages (scripts/testbed/README.md has the exact commands and the collapse rule):
  pretrain  supervised training of a small Qwen3 on the long-chain task with filler (contexts up to ~12K tokens)
  sweep     calibrate it, plan schedules for tail targets 0.75 / 0.80 / 0.86 / 0.92, measure each schedule's rollout
            speed alone, run GRPO for dense + each target + the 0.80 schedule with DistillSparse (same seeds and
            steps) as concurrent processes, then report
  report    figure + table (+ JSON) from a sweep directory
  seeds     one table + figure over several seeds' sweep directories
  run       one GRPO run of a sweep (what `sweep` launches per configuration)
Profiles: `h200` (the real thing, one GPU), `cpu-4hop` (the CPU demo's learning setting as a sweep, minutes on 2
cores) and `toy` (seconds on CPU: the tests).
"""

from __future__ import annotations

import argparse
import shlex

DEMO_TASK = dict(num_vars=[8, 12], hops=2, filler=[20, 80], seed=1)  # the first pretraining stages' "demo" eval
SWEEP_TASK = dict(num_vars=[12, 24], hops=2, filler=[100, 400], seed=1)  # prompts of ~1.3K-10K tokens

# Candidate sweep tasks, longest first, each with the sweep settings its lengths need (bins, budget grid, pages;
# a budget keeps at least the 3 sink + local pages).
# The sweep runs the longest one the pretrained model solves: `pick_sweep_task` (rule fixed before the sweep ran).
SWEEP_TASKS: dict[str, tuple[dict, dict]] = {
    "long": (SWEEP_TASK, {}),  # ~1.3-10K tokens
    "mid": (dict(num_vars=[8, 16], hops=2, filler=[50, 200], seed=1),  # ~0.4-3.5K
            dict(bin_tokens=1024, budgets=[48, 64, 96, 128, 192, 256, 384, 512, 1024])),
    "short": (dict(num_vars=[8, 12], hops=2, filler=[20, 80], seed=1),  # ~0.2-1K
              dict(bin_tokens=256, budgets=[48, 64, 96, 128, 192, 256, 384, 512])),
    "minimal": (dict(num_vars=[8, 12], hops=2, filler=[0, 10], seed=1),  # ~60-250 tokens
                dict(page_size=4, bin_tokens=64, budgets=[12, 16, 24, 32, 48, 64, 96, 128])),
}
PICK_MIN_ACCURACY = 0.25  # greedy exact accuracy (pretraining's final evaluation) a sweep task needs


def pick_sweep_task(final_eval: dict, min_accuracy: float = PICK_MIN_ACCURACY) -> str:
    """The longest candidate of SWEEP_TASKS whose greedy exact accuracy reaches `min_accuracy` ("minimal" if none)."""
    for name in SWEEP_TASKS:
        if final_eval.get(f"acc/{name}", 0.0) >= min_accuracy:
            return name
    return "minimal"


PRETRAIN_PROFILES: dict[str, dict] = {
    "h200": dict(
        device="cuda",
        spec=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=512, max_position_embeddings=16384),
        buckets=[  # word-level tokens: about one per word
            dict(num_vars=[6, 16], filler=[0, 20], weight=3.0),  # ~30-400 tokens: where the lookup is learned
            dict(num_vars=[8, 12], filler=[20, 80]),  # ~0.2-1K (the CPU demo's lengths)
            dict(num_vars=[12, 24], filler=[100, 400]),  # ~1.3-10K (the sweep's lengths)
            dict(num_vars=[16, 28], filler=[200, 500]),  # ~3-14K
        ],
        hops=[1, 2, 3, 4],
        tokens_per_batch=131072,
        minutes=3.5,
        steps=20000,
        lr=1.5e-3,
        workers=10,
        eval_every=100,
        eval_prompts=64,
        eval_tasks={"demo": DEMO_TASK, "sweep": SWEEP_TASK},
    ),
    # stage 4: from the demo checkpoint (lookups learned on short prompts) to the sweep's lengths, filler added
    # gradually; short prompts stay in the mix so the lookups are not forgotten
    "h200-lengths": dict(
        device="cuda",
        init="sparrow_sgl/data/demo_model",
        buckets=[
            dict(num_vars=[5, 12], filler=[0, 10], weight=2.0),  # ~40-250 tokens
            dict(num_vars=[8, 12], filler=[20, 80], weight=2.0),  # ~0.2-1K
            dict(num_vars=[8, 16], filler=[50, 200], weight=2.0),  # ~0.4-3.5K
            dict(num_vars=[12, 24], filler=[100, 400]),  # ~1.3-10K
        ],
        hops=[1, 2, 3],
        tokens_per_batch=65536,
        minutes=4.0,
        steps=20000,
        lr=1e-3,
        warmup_steps=10,
        workers=10,
        eval_every=500,
        eval_prompts=64,
        eval_tasks={name: task for name, (task, _) in SWEEP_TASKS.items()},
    ),
    "toy": dict(
        device="cpu",
        spec=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  intermediate_size=64),
        buckets=[dict(num_vars=[4, 6], filler=[0, 4])],
        tokens_per_batch=1024,
        steps=4,
        lr=3e-3,
        workers=0,
        eval_every=2,
        eval_prompts=4,
        eval_tasks={"toy": dict(num_vars=[4, 6], hops=2, filler=[0, 4], seed=1)},
    ),
}

SWEEP_PROFILES: dict[str, dict] = {
    "h200": dict(
        device="cuda",
        task=SWEEP_TASK,
        budgets=[48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048],
        page_size=16,
        bin_tokens=2048,
        calib_prompts=32,
        calib_samples=4,
        steps=40,
        micro_batch_size=4,
        jobs=6,
        minutes=7.0,
        hardware="h200",
    ),
    # the CPU demo's setting (GRPO that learns in ~60 steps: 4-hop chains the checkpoint stops a hop early on) as a
    # sweep on 2 CPU cores: ~45-80-token contexts, 4-token pages, plus a flat 3-page budget far below tau
    "cpu-4hop": dict(
        device="cpu",
        task=dict(num_vars=[5, 8], hops=4, filler=[0, 4], seed=1),
        budgets=[12, 16, 24, 32, 48, 64],
        page_size=4,
        bin_tokens=32,
        min_count=10,
        calib_prompts=32,
        calib_samples=4,
        max_new_tokens=14,
        speed_prompts=8,
        speed_samples=4,
        speed_new_tokens=14,
        steps=60,
        prompts_per_step=4,
        group_size=8,
        lr=2e-4,
        micro_batch_size=16,
        kv_gb=0.05,
        hardware="cpu",
        eval_prompts=128,
        eval_every=20,
        jobs=2,
        fixed_budgets=[12],
    ),
    "toy": dict(
        device="cpu",
        task=dict(num_vars=[4, 6], hops=2, filler=[0, 4], seed=1),
        budgets=[12, 16, 32],
        page_size=4,
        bin_tokens=32,
        min_count=2,
        calib_prompts=3,
        calib_samples=2,
        max_new_tokens=8,
        speed_prompts=2,
        speed_samples=2,
        speed_new_tokens=4,
        steps=2,
        prompts_per_step=2,
        group_size=2,
        micro_batch_size=4,
        kv_gb=0.01,
        hardware="cpu",
        eval_prompts=4,
        eval_every=1,
        jobs=0,
        distill={"enabled": True, "replan_every": 0, "rank": 2},
        train_extra={"noise_floor": False},
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    pre = sub.add_parser("pretrain", help="supervised pretraining on the long-chain task")
    pre.add_argument("--profile", default="h200", choices=sorted(PRETRAIN_PROFILES))
    pre.add_argument("--out", default="runs/testbed/model")
    pre.add_argument("--minutes", type=float, default=None, help="wall budget in minutes (LR decays over it)")
    sw = sub.add_parser("sweep", help="calibrate, plan, measure speed, run GRPO per configuration, report")
    sw.add_argument("--profile", default="h200", choices=sorted(SWEEP_PROFILES))
    sw.add_argument("--model", required=True, help="pretrained model directory (HF format)")
    sw.add_argument("--out", default="runs/testbed/sweep")
    sw.add_argument("--results", default=None, help="also write the report here (e.g. bench/results/testbed)")
    sw.add_argument("--task", default=None, metavar="NAME|auto=PRETRAIN_JSON",
                    help=f"a task of SWEEP_TASKS ({', '.join(SWEEP_TASKS)}) with its settings, or "
                         f"auto=<pretrain.json>: the longest with greedy exact accuracy >= {PICK_MIN_ACCURACY} there")
    for q in (pre, sw):
        q.add_argument("--device", default=None, help="cpu or cuda (default: the profile's)")
        q.add_argument("--steps", type=int, default=None)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        q.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="figure + table from a sweep directory")
    rep.add_argument("--sweep", required=True)
    rep.add_argument("--out", default="bench/results/testbed")
    seeds = sub.add_parser("seeds", help="table + figure over several seeds' sweep directories")
    seeds.add_argument("--sweep", action="append", required=True, help="a sweep directory (once per seed)")
    seeds.add_argument("--out", required=True)
    one = sub.add_parser("run", help="one GRPO run of a sweep (launched by `sweep`)")
    one.add_argument("--spec", required=True)


def build_config(cls, profile: dict, args: argparse.Namespace, **fixed):
    from sparrow_sgl.rl.config import apply_override

    data = {**profile, **fixed, "seed": args.seed}
    for key in ("device", "steps"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    for item in args.set:
        apply_override(data, item)
    return cls(**data)


def sweep_task_settings(choice: str | None) -> dict:
    """`--task` -> SweepConfig fields (task + its bins/budgets/pages); {} keeps the profile's."""
    from sparrow_sgl.errors import ConfigError
    from sparrow_sgl.jsonio import read_json

    if not choice:
        return {}
    if choice.startswith("auto="):
        path = choice[len("auto="):]
        record = read_json(path, f"--task {choice}: the pretraining record")
        final_eval = record.get("final_eval") if isinstance(record, dict) else None
        if not isinstance(final_eval, dict):
            raise ConfigError(f"--task {choice}: {path} has no final_eval (not a `sparrow testbed pretrain` record)")
        choice = pick_sweep_task(final_eval)
        print(f"sweep task: {choice} (greedy exact accuracy " +
              ", ".join(f"{k[4:]} {v:.3f}" for k, v in final_eval.items() if k.startswith("acc/")) +
              f"; rule: the longest with >= {PICK_MIN_ACCURACY})")
    if choice not in SWEEP_TASKS:
        raise ConfigError(f"--task {choice!r}: not one of {', '.join(SWEEP_TASKS)} or auto=<pretrain.json>")
    task, settings = SWEEP_TASKS[choice]
    return {"task": task, **settings}


def command_line(args: argparse.Namespace) -> str:
    """The `sparrow testbed ...` command that reproduces this run (from the parsed options)."""
    parts = ["sparrow", "testbed", args.stage]
    for key, value in vars(args).items():
        if key in ("stage", "command", "_run") or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts += [f"{flag} {shlex.quote(str(v))}" for v in (value if isinstance(value, list) else [value])]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    command = command_line(args)
    if args.stage == "pretrain":
        from sparrow_sgl.testbed_pretrain import PretrainConfig, pretrain

        extra = {"minutes": args.minutes} if args.minutes is not None else {}
        cfg = build_config(PretrainConfig, PRETRAIN_PROFILES[args.profile], args, out=args.out, **extra)
        info = pretrain(cfg, progress=not args.no_progress, command=command)
        acc = ", ".join(f"{k} {v:.3f}" for k, v in info["final_eval"].items())
        print(f"pretrained {info['params'] / 1e6:.2f} M parameters: {info['steps']} steps, {info['train_s']:.0f} s, "
              f"{info['tokens'] / 1e6:.1f} M tokens, final loss {info['final_loss']:.4f} nats/token; {acc}; "
              f"saved to {cfg.out}")
        return 0
    if args.stage == "sweep":
        from sparrow_sgl.testbed_report import report
        from sparrow_sgl.testbed_sweep import SweepConfig, sweep

        cfg = build_config(SweepConfig, SWEEP_PROFILES[args.profile], args, model=args.model, out=args.out,
                           **sweep_task_settings(args.task))
        result = sweep(cfg, progress=not args.no_progress, command=command)
        print(f"sweep: exit codes {result['exit_codes']}, times " +
              ", ".join(f"{k} {v:.0f} s" for k, v in result["times"].items()))
        report(cfg.out, args.results or f"{cfg.out}/report")
        return 0 if all(c == 0 for c in result["exit_codes"].values()) else 1
    if args.stage == "report":
        from sparrow_sgl.testbed_report import report

        report(args.sweep, args.out)
        return 0
    if args.stage == "seeds":
        from sparrow_sgl.testbed_seeds import seeds_report

        seeds_report(args.sweep, args.out)
        return 0
    if args.stage == "run":
        from sparrow_sgl.jsonio import read_json
        from sparrow_sgl.testbed_sweep import run_one

        run_one(read_json(args.spec, "testbed run spec"))
        return 0
    return 2

