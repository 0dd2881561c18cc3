"""`sparrow demo`: the whole method end to end on one machine, with a tiny Qwen3 and the synthetic chain task.

stages: build a tiny model (tokenizer trained on the task's text) -> supervised warm-up so rewards are non-zero ->
calibrate per-bin acceptance-rate tails over a budget grid -> plan the cheapest schedule with every tail >= tau ->
GRPO steps with sparse rollouts under that schedule (TailGuard optional) -> summary table (reward before/after,
per-bin tail vs tau, predicted and measured speedup) and plots under `--out` (default runs/demo/).
`--quick` is the reduced form the test suite runs; `--device cuda` runs a larger model on a longer task.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparrow_sgl.rl.config import TrainConfig


@dataclass(slots=True)
class DemoProfile:
    spec: dict  # TinyModelSpec overrides
    task: dict  # ChainTask arguments of calibration, GRPO and evaluation
    warmup_task: dict  # ChainTask arguments of the warm-up (shorter prompts: cheaper, and the lookup transfers)
    warmup_steps: int
    warmup_batch: int
    page_size: int
    bin_tokens: int
    budgets: list[int]  # calibration grid (tokens)
    grpo_steps: int
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    calib_prompts: int = 4
    calib_samples: int = 2
    eval_prompts: int = 8
    eval_samples: int = 2
    warmup_lr: float = 3e-3
    warmup_pool: int | None = None  # distinct warm-up samples, tokenized once and cycled (None: fresh samples)
    lr: float = 2e-4
    margin: float = 0.0
    min_count: int = 20
    hardware: str = "cpu"
    micro_batch_size: int = 8
    tokenizer_vocab: int = 512
    pretrained: bool = False  # start from the committed checkpoint (DEMO_MODEL) instead of build + warm-up
    train: dict = field(default_factory=dict)  # further TrainConfig fields of the GRPO stage (e.g. temperature)


PROFILES = {
    "quick": DemoProfile(
        spec=dict(hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=4),
        task=dict(num_vars=[6, 10], hops=2, filler=[10, 30]),
        warmup_task=dict(num_vars=[6, 10], hops=2, filler=[0, 20]),
        warmup_steps=80,
        warmup_batch=16,
        page_size=4,
        bin_tokens=128,
        budgets=[16, 32, 64],
        grpo_steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=16,
        calib_prompts=3,
        eval_prompts=4,
        min_count=10,
    ),
    "cpu": DemoProfile(
        spec=dict(hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=4),
        task=dict(num_vars=[8, 12], hops=2, filler=[20, 80]),
        warmup_task=dict(num_vars=[8, 12], hops=2, filler=[0, 20]),
        warmup_steps=150,
        warmup_batch=16,
        page_size=16,
        bin_tokens=256,
        budgets=[48, 64, 128, 256],
        grpo_steps=6,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=16,
    ),
    "cuda": DemoProfile(  # the lookups need ~300-900 warm-up steps of a 128-wide model at batch 32 (H100 run)
        spec=dict(
            hidden_size=256,
            head_dim=32,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
        task=dict(num_vars=[12, 24], hops=3, filler=[50, 150]),
        warmup_task=dict(num_vars=[12, 24], hops=3, filler=[0, 150]),
        warmup_steps=1500,
        warmup_batch=8,
        warmup_lr=1e-3,
        page_size=16,
        bin_tokens=1024,
        budgets=[64, 128, 256, 512, 1024],
        grpo_steps=10,
        prompts_per_step=8,
        group_size=8,
        max_new_tokens=24,
        calib_prompts=16,
        calib_samples=4,
        eval_prompts=32,
        eval_samples=4,
        hardware="h100",
        micro_batch_size=4,
        tokenizer_vocab=1024,
        warmup_pool=4096,
    ),
}
PROFILES["pretrained"] = DemoProfile(  # the CPU default: GRPO from the testbed's pretrained checkpoint
    spec={},
    # 4-hop chains over 5-8 variables (~45-65-token prompts): its last pretraining stage saw 1-2 hops, so it mostly
    # stops one hop early (greedy exact ~0.2-0.3); GRPO teaches it to follow the chain to the end. With 8-12
    # variables (names it barely saw) 80 steps did not move the reward (bench/results/testbed/README.md).
    task=dict(num_vars=[5, 8], hops=4, filler=[0, 4]),
    warmup_task=dict(num_vars=[5, 8], hops=4, filler=[0, 4]),
    warmup_steps=0,
    warmup_batch=0,
    page_size=4,
    bin_tokens=32,
    budgets=[12, 16, 24, 32, 48, 64],
    grpo_steps=60,
    prompts_per_step=4,
    group_size=8,
    max_new_tokens=14,
    eval_prompts=128,
    eval_samples=4,
    lr=2e-4,
    min_count=10,
    micro_batch_size=16,
    pretrained=True,
)
DEMO_MODEL = Path(__file__).parent / "data" / "demo_model"  # `sparrow testbed pretrain`: see its PROVENANCE.md
EVAL_OFFSET = 2_000_000_000  # task indices of evaluation prompts (never reached by the training cursor)
CALIB_OFFSET = 1_500_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="reduced form (tests, < ~60 s on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs a larger model on a longer task)")
    p.add_argument("--out", default="runs/demo", help="output directory (models, tables, logs, plots)")
    p.add_argument("--tau", type=float, default=0.86, help="tail threshold the planned schedule must hold")
    p.add_argument("--margin", type=float, default=None, help="plan for tau + margin (default: the profile's)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the profile's)")
    p.add_argument(
        "--tailguard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the TailGuard raise a bin's budget when its live tail dips below tau during GRPO (default: on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="CPU: build a random tiny model and warm it up (the old demo) instead of starting from the committed "
        "pretrained checkpoint",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    console = Console()
    cpu = "cpu" if getattr(args, "from_scratch", False) else "pretrained"
    profile = PROFILES["quick" if args.quick else ("cuda" if args.device.startswith("cuda") else cpu)]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[red]sparrow demo: --device cuda but no CUDA device is available[/red]")
        return 2
    _check_args(args)
    if args.steps is not None:
        profile.grpo_steps = args.steps
    if args.margin is not None:
        profile.margin = args.margin
    demo = Demo(profile, args, console)
    return demo.run()


def _check_args(args: argparse.Namespace) -> None:
    """Settings that would otherwise fail only after the model is built and calibrated."""
    from sparrow_sgl.config import ConfigError

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.tau < 1:
        raise ConfigError(f"--tau must lie in (0, 1), got {args.tau}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; the demo writes a directory")


class Demo:
    def __init__(self, profile: DemoProfile, args: argparse.Namespace, console) -> None:
        from sparrow_sgl.rl.tasks import ChainTask

        self.p, self.args, self.console = profile, args, console
        self.out = Path(args.out)
        self.progress = not args.no_progress
        self.task = ChainTask(**profile.task, seed=args.seed + 1)
        self.warmup_task = ChainTask(**profile.warmup_task, seed=args.seed + 2)
        self.times: dict[str, float] = {}
        self.threads: dict[int, int] = {}  # torch intra-op threads chosen -> stages that ran with them
        self.summary: dict = {"profile": asdict(profile), "device": args.device, "tau": args.tau, "seed": args.seed}

    def stage(self, name: str):
        demo = self

        class _Stage:
            def __enter__(self):
                demo.console.rule(f"[bold]{name}")
                demo.retune_threads()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                demo.times[name] = time.perf_counter() - self.start
                if exc[0] is None:
                    demo.console.print(f"{name}: {demo.times[name]:.1f} s")

        return _Stage()

    def retune_threads(self) -> None:
        """Intra-op threads from the machine's load now (a competing process may have started or stopped)."""
        from sparrow_sgl.threads import retune_torch_threads

        plan = retune_torch_threads()
        if plan is not None:
            self.threads[plan.threads] = self.threads.get(plan.threads, 0) + 1
            self.console.print(f"[dim]{plan.describe()}[/dim]")

    def run(self) -> int:
        import torch

        torch.manual_seed(self.args.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self.stage("model + warm-up"):
            model_dir = self.build_and_warm_up()
        with self.stage("engine"):
            engine = self.build_engine(model_dir)
        with self.stage("calibrate"):
            table = self.calibrate(engine, model_dir)
        with self.stage("plan"):
            schedule, plan = self.plan(table)
        with self.stage("evaluate before"):
            before = self.evaluate(engine, schedule)
        with self.stage("grpo"):
            trainer, records = self.grpo(engine, model_dir, schedule)
        with self.stage("evaluate after"):
            after = self.evaluate(engine, trainer.schedule)
        self.times["total"] = time.perf_counter() - start
        self.report(table, plan, trainer, records, before, after)
        return 0

    # -- stages -------------------------------------------------------------------------------------------------
    def build_and_warm_up(self) -> Path:
        import torch
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from sparrow_sgl.rl.warmup import response_accuracy, supervised_warmup
        from sparrow_sgl.tiny import TinyModelSpec, save_tiny_model

        p = self.p
        model_dir = self.out / "model"
        if p.pretrained:
            return self.copy_pretrained(model_dir)
        corpus = self.task.corpus(32) + self.warmup_task.corpus(64)
        spec = TinyModelSpec(**{**p.spec, "vocab_size": p.tokenizer_vocab, "seed": self.args.seed})
        save_tiny_model(model_dir, spec, extra_text=corpus)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.args.device)
        result = supervised_warmup(
            model,
            tokenizer,
            self.warmup_task,
            steps=p.warmup_steps,
            batch=p.warmup_batch,
            lr=p.warmup_lr,
            pool=p.warmup_pool,
            progress=self.progress,
        )
        eval_idx = range(EVAL_OFFSET, EVAL_OFFSET + 16)
        acc_short = response_accuracy(model, tokenizer, self.warmup_task, eval_idx)
        acc_long = response_accuracy(model, tokenizer, self.task, eval_idx)
        model.cpu().save_pretrained(model_dir)
        n_params = sum(t.numel() for t in model.parameters())
        self.console.print(
            f"tiny Qwen3: {n_params / 1e6:.2f} M parameters; warm-up loss {result.losses[0]:.3f} -> "
            f"{result.losses[-1]:.3f} nats/token over {p.warmup_steps} steps; teacher-forced answer-token accuracy "
            f"{acc_short:.3f} (warm-up lengths), {acc_long:.3f} (demo lengths)"
        )
        self.summary["warmup"] = {
            "loss_first": result.losses[0],
            "loss_last": result.losses[-1],
            "accuracy_warmup_task": acc_short,
            "accuracy_task": acc_long,
            "params": n_params,
        }
        return model_dir

    def copy_pretrained(self, model_dir: Path) -> Path:
        """The committed checkpoint, copied (GRPO checkpoints and plans then never touch the package's copy)."""
        import shutil

        shutil.copytree(DEMO_MODEL, model_dir, dirs_exist_ok=True)
        info = json.loads((DEMO_MODEL / "pretrain.json").read_text())
        self.console.print(
            f"pretrained Qwen3 from {DEMO_MODEL}: {info['params'] / 1e6:.2f} M parameters ({info['device']}, "
            f"{info['train_s']:.0f} s of its last stage; PROVENANCE.md there has the commands and seeds)"
        )
        self.summary["warmup"] = {"pretrained": str(DEMO_MODEL), "params": info["params"]}
        return model_dir

    def build_engine(self, model_dir: Path):
        from sparrow_sgl.config import EngineConfig
        from sparrow_sgl.engine import Engine

        kv_gb = 0.05 if self.args.device == "cpu" else 4.0
        return Engine(
            EngineConfig(
                model=str(model_dir),
                device=self.args.device,
                page_size=self.p.page_size,
                kv_gb=kv_gb,
                seed=self.args.seed,
            )
        )

    def prompts(self, engine, offset: int, count: int) -> list[list[int]]:
        from sparrow_sgl.rl.tasks import encode_prompt

        return [encode_prompt(engine.tokenizer, self.task.sample(offset + i).prompt) for i in range(count)]

    def calibrate(self, engine, model_dir: Path):
        from sparrow_sgl.calibrate import calibrate, plot_table

        p = self.p
        prompts = self.prompts(engine, CALIB_OFFSET, p.calib_prompts)
        lengths = [len(x) for x in prompts]
        self.console.print(
            f"calibration prompts: {len(prompts)} of {min(lengths)}-{max(lengths)} tokens; budgets "
            f"{p.budgets} tokens (page size {p.page_size}), {p.bin_tokens}-token bins"
        )
        sparsity = {
            "page_size": p.page_size,
            "sink_pages": engine.config.sink_pages,
            "local_pages": engine.config.local_pages,
            "scorer": engine.config.scorer,
        }
        table = calibrate(
            engine,
            prompts,
            p.budgets,
            samples=p.calib_samples,
            max_new_tokens=p.max_new_tokens,
            seed=self.args.seed,
            bin_tokens=p.bin_tokens,
            tau=self.args.tau,
            noise_floor=True,
            sparsity=sparsity,
            progress=self.progress,
        )
        table.model = str(model_dir.resolve())  # `sparrow plan` on the table works from any directory
        table.settings = {**table.settings, **sparsity}
        table.save(self.out / "calibration.json")
        plot_table(table, self.out / "calibration.png", tau=self.args.tau)
        return table

    def plan(self, table):
        from sparrow_sgl.plan import plan_schedule

        plan = plan_schedule(
            table, tau=self.args.tau, margin=self.p.margin, min_count=self.p.min_count, name=f"demo-{self.args.tau:g}"
        )
        plan.schedule.save(self.out / "schedule.json")
        self.console.print(plan.report())
        return plan.schedule, plan

    def evaluate(self, engine, schedule) -> dict:
        """Held-out prompts (the same before and after GRPO): mean reward of temperature-1 samples (what GRPO
        optimises) and greedy exact accuracy, each with its standard error over prompts."""
        from sparrow_sgl.engine import SamplingParams

        p = self.p
        samples = [self.task.sample(EVAL_OFFSET + i) for i in range(p.eval_prompts)]
        prompts = self.prompts(engine, EVAL_OFFSET, p.eval_prompts)
        sampled = SamplingParams(
            temperature=1.0, max_new_tokens=p.max_new_tokens, n=p.eval_samples, seed=self.args.seed + 99
        )
        greedy = SamplingParams(temperature=0.0, max_new_tokens=p.max_new_tokens, n=1)
        rollouts = engine.generate(prompts, sampled, schedule, progress=False)
        rewards = self.prompt_means(rollouts, samples)
        solved = self.prompt_means(rollouts, samples, exact=True)
        exact = self.prompt_means(engine.generate(prompts, greedy, schedule, progress=False), samples, exact=True)
        out = {
            "reward_mean": _mean(rewards),
            "reward_se": _se(rewards),
            "solved_frac": _mean(solved),
            "greedy_exact": _mean(exact),
            "greedy_exact_se": _se(exact),
            "prompts": p.eval_prompts,
            "samples": p.eval_prompts * p.eval_samples,
            "schedule": schedule.describe(),
        }
        self.console.print(
            f"{p.eval_prompts} held-out prompts: sampled reward {out['reward_mean']:.3f} ± {out['reward_se']:.3f} "
            f"(fraction of the chain right, {p.eval_samples} samples/prompt at temperature 1; fully solved "
            f"{out['solved_frac']:.3f}); greedy exact accuracy {out['greedy_exact']:.3f} ± "
            f"{out['greedy_exact_se']:.3f} (± = standard error over prompts), schedule {schedule.describe()}"
        )
        return out

    def prompt_means(self, rollouts, samples, exact: bool = False) -> list[float]:
        """Per-prompt mean reward (or exact-answer rate) of `rollouts`."""
        per: dict[int, list[float]] = {}
        for r in rollouts:
            score = self.task.score(r.text or "", samples[r.prompt_index])
            per.setdefault(r.prompt_index, []).append(float(score == 1.0) if exact else score)
        return [_mean(v) for _, v in sorted(per.items())]

    def grpo(self, engine, model_dir: Path, schedule):
        from sparrow_sgl.rl.trainer import Trainer

        cfg = self.train_config(model_dir)
        cfg.save(self.out / "grpo" / "config.json")
        trainer = Trainer(cfg, engine=engine)
        records = trainer.train()
        return trainer, records

    def train_config(self, model_dir: Path) -> TrainConfig:
        """The GRPO stage's TrainConfig: the profile's batch, lr and task, then its `train` overrides."""
        from sparrow_sgl.rl.config import TrainConfig

        p = self.p
        base = dict(
            model=str(model_dir),
            out_dir=str(self.out / "grpo"),
            device=self.args.device,
            seed=self.args.seed,
            steps=p.grpo_steps,
            task="chain",
            task_args={**p.task, "seed": self.args.seed + 1},
            prompts_per_step=p.prompts_per_step,
            group_size=p.group_size,
            schedule=str(self.out / "schedule.json"),
            tailguard=self.args.tailguard,
            max_new_tokens=p.max_new_tokens,
            page_size=p.page_size,
            lr=p.lr,
            bin_tokens=p.bin_tokens,
            tau=self.args.tau,
            micro_batch_size=p.micro_batch_size,
            hardware=p.hardware,
            progress=self.progress,
        )
        return TrainConfig.from_dict({**base, **p.train}, where="demo profile")

    # -- summary ------------------------------------------------------------------------------------------------
    def report(self, table, plan, trainer, records, before: dict, after: dict) -> None:
        from rich.table import Table

        tau = self.args.tau
        floor = table.stats(None)
        live = _live_tails(records)
        t = Table(title=f"per-bin 5th-percentile acceptance rate vs tau = {tau:g}")
        for col in (
            "bin (tokens)",
            "planned budget",
            "calibrated tail",
            "live tail (min over GRPO)",
            "dense noise floor",
            ">= tau",
        ):
            t.add_column(col)
        bins = []
        events = trainer.guard.events if trainer.guard is not None else None
        for d in plan.bins:
            lt = live.get(d.bin)
            fl = floor[d.bin].tail if d.bin < len(floor) else None
            final = trainer.schedule.budgets[min(d.bin, len(trainer.schedule.budgets) - 1)]
            verdict, note = bin_verdict(d, lt, tau, events, final)
            row = {
                "bin": d.bin,
                "start": d.start,
                "end": d.end,
                "budget": d.budget,
                "calibrated_tail": d.tail,
                "live_tail_min": lt,
                "noise_floor": fl,
                "status": d.status,
                "ok": verdict != "NO",
                "verdict": verdict,
                "note": note,
            }
            bins.append(row)
            t.add_row(
                f"{d.start}-{d.end}",
                "dense" if d.budget is None else f"{d.budget} tok",
                _fmt(d.tail),
                _fmt(lt),
                _fmt(fl),
                verdict,
            )
        self.console.print(t)
        for row in bins:
            if row["note"]:
                self.console.print(f"bin {row['start']}-{row['end']} tokens: {row['note']}")
        last = records[-1] if records else {}
        speed = Table(title="summary")
        speed.add_column("quantity")
        speed.add_column("value")
        speed.add_row(
            "reward before GRPO -> after (eval)",
            f"{before['reward_mean']:.3f} ± {before['reward_se']:.3f} -> {after['reward_mean']:.3f} ± "
            f"{after['reward_se']:.3f}",
        )
        speed.add_row(
            "greedy exact before GRPO -> after (eval)",
            f"{before['greedy_exact']:.3f} ± {before['greedy_exact_se']:.3f} -> {after['greedy_exact']:.3f} ± "
            f"{after['greedy_exact_se']:.3f}",
        )
        speed.add_row("GRPO train reward, mean of the first -> last 10 steps", _train_trend(records))
        speed.add_row(
            f"predicted rollout speedup ({self.p.hardware} cost model)",
            _fmt(last.get("sparse/speedup_predicted"), "{:.2f}x"),
        )
        speed.add_row(
            "measured rollout speedup (this machine, sparse vs dense tokens/s)",
            measured_speedup_text(last.get("sparse/speedup_measured"), self.args.device),
        )
        speed.add_row(
            "attended KV per sparse step / context",
            f"{_fmt(last.get('sparse/kv_budget_mean'), '{:.0f}')} / "
            f"{_fmt(last.get('sparse/kv_context_mean'), '{:.0f}')} tokens",
        )
        speed.add_row("TIS-truncated tokens (last step)", _fmt(last.get("sparse/is_truncated_frac"), "{:.4f}"))
        guard_events = len(trainer.guard.events) if trainer.guard is not None else 0
        speed.add_row("schedule after GRPO", trainer.schedule.describe())
        speed.add_row("TailGuard budget changes", str(guard_events) if trainer.guard is not None else "off")
        speed.add_row("stage times", ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items()))
        self.console.print(speed)
        self.console.print(
            f"eval: the same {before['prompts']} held-out prompts before and after GRPO; reward = fraction of the "
            f"chain restated correctly (0-1, mean of {self.p.eval_samples} temperature-1 samples per prompt); greedy "
            "exact = fraction of prompts whose greedy answer is the whole chain; ± = standard error over prompts"
        )
        self.summary.update(
            reward_before=before,
            reward_after=after,
            bins=bins,
            schedule=trainer.schedule.to_dict(),
            speedup_predicted=last.get("sparse/speedup_predicted"),
            speedup_measured=last.get("sparse/speedup_measured"),
            last_step=last,
            times=self.times,
            files={
                "calibration": "calibration.json",
                "calibration_plot": "calibration.png",
                "schedule": "schedule.json",
                "metrics": "grpo/metrics.jsonl",
                "plots": "grpo/plots/",
                "reward_plot": "grpo_reward.png",
            },
        )
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        from sparrow_sgl.demo_plot import DemoRun, plot_demo_reward

        p = self.p
        title = (f"sparrow demo ({self.args.device}, seed {self.args.seed}): GRPO reward per step "
                 f"({p.prompts_per_step} prompts x {p.group_size} samples, lr {p.lr:g})")
        plot_demo_reward([DemoRun(f"seed {self.args.seed}", records, before, after)], self.out / "grpo_reward.png",
                         title)
        self.console.print(f"wrote {self.out}/summary.json, grpo_reward.png, calibration.png, grpo/plots/*.png")


def bin_verdict(decision, live_tail: float | None, tau: float, events, final_budget=...) -> tuple[str, str]:
    """(yes | NO | no data, one sentence on why and what TailGuard did) for one bin of the summary table.
    `events`: the TailGuard's budget changes (None when it was off); `final_budget`: the bin's budget after GRPO."""
    if decision.tail is None and live_tail is None:
        borrowed = ", its budget comes from a measured neighbour" if decision.status == "missing" else ""
        return "no data", f"no response reached this bin{borrowed}"
    if decision.status == "unsatisfiable" and (live_tail is None or live_tail >= tau):
        return "yes (dense)", "no calibrated budget reached tau here: planned dense, which holds it"
    if decision.status == "unsatisfiable":
        return "NO", f"no calibrated budget reached tau here: planned dense, yet the live tail dipped to " \
                     f"{live_tail:.2f} (the dense noise floor column shows how far numerics alone go)"
    if all(x is None or x >= tau for x in (decision.tail, live_tail)):
        return "yes", "raised to keep budgets growing with position" if decision.status == "raised" else ""
    low = f"live tail dipped to {live_tail:.2f} < tau" if live_tail is not None and live_tail < tau else (
        f"calibrated tail {decision.tail:.2f} < tau")
    end = "" if final_budget is ... else f"; after GRPO it decodes with {_tokens(final_budget)}"
    if events is None:
        return "NO", f"{low}; TailGuard off (--tailguard turns it on), budget kept"
    moves = [e for e in events if e.bin == decision.bin]
    if not moves:
        return "NO", f"{low}; TailGuard made no change to it{end}"
    what = {"raise": "raised", "lower": "lowered", "monotone": "lifted with an earlier bin"}
    told = ", ".join(f"{what.get(e.reason, e.reason)} {_tokens(e.old)} -> {_tokens(e.new)} at step {e.step}"
                     for e in moves)
    return "NO", f"{low}; TailGuard {told}{end}"


def _tokens(budget: int | None) -> str:
    return "dense" if budget is None else f"{budget} tok"


def measured_speedup_text(speedup: float | None, device: str) -> str:
    if speedup is None:
        return "-"
    if device.startswith("cuda"):
        return f"{speedup:.2f}x"
    return (f"{speedup:.2f}x: not meaningful on CPU (a tiny model's decode time is per-step overhead and timing "
            "noise, not KV reads; see the prediction above)")


def _live_tails(records: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("sparse/tail_p5/bin_") and v is not None:
                i = int(k.rsplit("_", 1)[1])
                out[i] = min(out.get(i, 1.0), v)
    return out


def _train_trend(records: list[dict], window: int = 10) -> str:
    """`0.812 -> 0.990` (means of the first and last `window` steps' rollout rewards), '-' without records."""
    if not records:
        return "-"
    from sparrow_sgl.rl.metrics import window_mean

    rewards = [r["rollout/reward_mean"] for r in records]
    w = min(window, len(rewards))
    return f"{window_mean(rewards, w, end=False):.3f} -> {window_mean(rewards, w):.3f} ({w}-step means)"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _se(xs: list[float]) -> float:
    """Standard error of the mean (0 for fewer than 2 values)."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def _fmt(x, pattern: str = "{:.4f}") -> str:
    return "-" if x is None else pattern.format(x)
