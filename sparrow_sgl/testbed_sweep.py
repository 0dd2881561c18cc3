"""The testbed sweep: calibrate the pretrained model, plan one schedule per tail target, measure rollout speed of
each schedule alone, then run GRPO for every configuration (dense, each target, the 0.80 schedule + DistillSparse)
with the same seeds and steps, as concurrent processes on one device.

Every run logs the trainer's per-step metrics (`metrics.jsonl`: reward, response length, live tail per bin, TIS
truncation fraction, rollout tokens/s) plus `evals.jsonl`: greedy accuracy of the dense policy on held-out prompts
(teacher-forced: see `testbed_pretrain.greedy_accuracy`) at step 0, every `eval_every` steps and at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparrow_sgl.testbed_pretrain import EVAL_OFFSET, greedy_accuracy

CALIB_OFFSET = 1_500_000_000
SPEED_OFFSET = 1_700_000_000


@dataclass(slots=True)
class SweepConfig:
    model: str = "sparrow_sgl/data/demo_model"
    out: str = "runs/testbed/sweep"
    device: str = "cuda"
    seed: int = 0
    task: dict = field(default_factory=dict)  # ChainTask arguments (seed included) of calibration, GRPO and eval
    targets: list[float] = field(default_factory=lambda: [0.75, 0.80, 0.86, 0.92])
    distill_target: float = 0.80
    distill_schedule: str | None = None  # e.g. "fixed:1024": DistillSparse on that schedule instead of the planned one
    fixed_budgets: list[int] = field(default_factory=list)  # also run flat `fixed:<tokens>` schedules (below tau)
    plans_from: str | None = None  # a sweep directory whose schedule_<target>.json are reused (no calibration)
    guard_targets: list[float] = field(default_factory=list)  # also run these planned targets with the TailGuard on
    only: list[str] = field(default_factory=list)  # run only these configurations (names as in the report; [] = all)
    budgets: list[int] = field(default_factory=list)  # calibration grid (tokens)
    page_size: int = 16
    dense_layers: list[int] = field(default_factory=lambda: [0])  # 1 of 4 layers (the paper: 2 of 28-40)
    bin_tokens: int = 2048
    min_count: int = 20
    calib_prompts: int = 32
    calib_samples: int = 4
    max_new_tokens: int = 24
    speed_prompts: int = 16
    speed_samples: int = 8
    speed_new_tokens: int = 128
    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4
    mini_batches: int = 2
    micro_batch_size: int = 8
    kv_gb: float = 4.0
    hardware: str = "h200"
    eval_prompts: int = 128
    eval_every: int = 10
    minutes: float | None = None  # wall cap per run (stops early and says so)
    deadline: float | None = None  # unix time by which every run stops (a device call's limit), with a final eval
    jobs: int = 6  # concurrent runs (0: one after another in this process)
    distill: dict = field(default_factory=lambda: {"enabled": True, "replan_every": 0})
    train_extra: dict = field(default_factory=dict)  # more TrainConfig fields for every run


def engine_for(cfg: SweepConfig):
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    return Engine(EngineConfig(model=cfg.model, device=cfg.device, page_size=cfg.page_size, kv_gb=cfg.kv_gb,
                               seed=cfg.seed))


def task_prompts(engine, task, offset: int, count: int) -> list[list[int]]:
    from sparrow_sgl.rl.tasks import encode_prompt

    return [encode_prompt(engine.tokenizer, task.sample(offset + i).prompt) for i in range(count)]


def calibrate_and_plan(cfg: SweepConfig, engine, progress: bool = True) -> dict[str, str]:
    """calibration.json/png + schedule_<target>.json per target; returns {target label: schedule path}."""
    from sparrow_sgl.calibrate import calibrate, plot_table
    from sparrow_sgl.plan import plan_schedule
    from sparrow_sgl.rl.tasks import ChainTask

    out = Path(cfg.out)
    prompts = task_prompts(engine, ChainTask(**cfg.task), CALIB_OFFSET, cfg.calib_prompts)
    sparsity = {"page_size": cfg.page_size, "sink_pages": engine.config.sink_pages,
                "local_pages": engine.config.local_pages, "scorer": engine.config.scorer,
                "dense_layers": list(cfg.dense_layers)}
    table = calibrate(engine, prompts, cfg.budgets, samples=cfg.calib_samples, max_new_tokens=cfg.max_new_tokens,
                      seed=cfg.seed, bin_tokens=cfg.bin_tokens, noise_floor=True, sparsity=sparsity,
                      progress=progress)
    table.model = cfg.model
    table.settings = {**table.settings, **sparsity}
    table.save(out / "calibration.json")
    plot_table(table, out / "calibration.png", tau=0.86)
    paths, reports = {}, []
    for tau in cfg.targets:
        plan = plan_schedule(table, tau=tau, min_count=cfg.min_count, name=f"testbed-{tau:g}")
        path = out / f"schedule_{tau:.2f}.json"
        plan.schedule.save(path)
        paths[f"{tau:.2f}"] = str(path)
        reports.append(f"tau {tau:g}: {plan.report()}")
    (out / "plans.txt").write_text("\n".join(reports) + "\n")
    print("\n".join(reports))
    return paths


def measure_speed(cfg: SweepConfig, engine, schedules: dict[str, str]) -> dict:
    """Rollout tokens/s of each schedule alone (ignore_eos, `speed_new_tokens` new tokens, one warm-up pass)."""
    from sparrow_sgl.engine import SamplingParams
    from sparrow_sgl.rl.tasks import ChainTask

    prompts = task_prompts(engine, ChainTask(**cfg.task), SPEED_OFFSET, cfg.speed_prompts)
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.speed_new_tokens, n=cfg.speed_samples,
                            seed=cfg.seed, ignore_eos=True)
    rows = {}
    for name, schedule in {"dense": "dense", **schedules}.items():
        engine.generate(prompts, params, schedule, progress=False)  # warm-up: graph capture, kernel compile
        _sync(cfg.device)
        start = time.perf_counter()
        rollouts = engine.generate(prompts, params, schedule, progress=False)
        _sync(cfg.device)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in rollouts)
        rows[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    for row in rows.values():
        row["speedup"] = row["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    info = {"prompts": cfg.speed_prompts, "samples": cfg.speed_samples, "new_tokens": cfg.speed_new_tokens,
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "device": _device_name(cfg.device),
            "rows": rows}
    (Path(cfg.out) / "speed.json").write_text(json.dumps(info, indent=1) + "\n")
    for name, row in rows.items():
        print(f"speed {name}: {row['tokens_per_s']:.0f} tokens/s ({row['speedup']:.2f}x dense)")
    return info


def fixed_schedules(cfg: SweepConfig) -> dict[str, str]:
    """{label: schedule} of the flat-budget runs (`fixed-256`: every sparse layer reads 256 tokens)."""
    return {f"fixed-{budget}": f"fixed:{budget}" for budget in cfg.fixed_budgets}


def reused_plans(cfg: SweepConfig) -> dict[str, str]:
    """The schedules an earlier sweep planned for `cfg.targets` (its calibration.json is copied beside them)."""
    import shutil

    from sparrow_sgl.errors import ConfigError

    src, out = Path(cfg.plans_from), Path(cfg.out)
    paths = {f"{tau:.2f}": src / f"schedule_{tau:.2f}.json" for tau in cfg.targets}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"plans_from={cfg.plans_from}: no planned schedule {', '.join(missing)}")
    for name in ("calibration.json", "calibration.png", "plans.txt", *(p.name for p in paths.values())):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return {label: str(out / p.name) for label, p in paths.items()}


def run_specs(cfg: SweepConfig, schedules: dict[str, str]) -> dict[str, dict]:
    """One spec per configuration: the TrainConfig fields and the evaluation settings."""
    base = dict(model=cfg.model, device=cfg.device, seed=cfg.seed, steps=cfg.steps, task="chain",
                task_args=cfg.task, prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                tailguard=False, max_new_tokens=cfg.max_new_tokens, page_size=cfg.page_size,
                bin_tokens=cfg.bin_tokens, lr=cfg.lr, mini_batches=cfg.mini_batches,
                micro_batch_size=cfg.micro_batch_size, kv_gb=cfg.kv_gb, hardware=cfg.hardware, save_every=0,
                progress=False, plot=True, **cfg.train_extra)
    configs = {"dense": {"schedule": "dense"}}
    for label, path in schedules.items():
        configs[f"tau-{label}"] = {"schedule": path}
    for label, schedule in fixed_schedules(cfg).items():
        configs[label] = {"schedule": schedule}
    for tau in cfg.guard_targets:
        configs[f"tau-{tau:.2f}+guard"] = {"schedule": schedules[f"{tau:.2f}"], "tailguard": True, "tau": tau}
    if cfg.distill.get("enabled", True) and cfg.distill_schedule:
        label = cfg.distill_schedule.replace(":", "-")
        configs[f"{label}+distill"] = {"schedule": cfg.distill_schedule, "distill": cfg.distill}
    elif cfg.distill.get("enabled", True):
        configs[f"tau-{cfg.distill_target:.2f}+distill"] = {"schedule": schedules[f"{cfg.distill_target:.2f}"],
                                                          "distill": cfg.distill}
    unknown = sorted(set(cfg.only) - set(configs))
    if unknown:
        from sparrow_sgl.errors import ConfigError

        raise ConfigError(f"only={unknown}: no such configuration (known: {', '.join(configs)})")
    specs = {}
    for name, extra in configs.items():
        if cfg.only and name not in cfg.only:
            continue
        train = {**base, **extra, "out_dir": str(Path(cfg.out) / "runs" / name)}
        specs[name] = {"name": name, "train": train, "eval_prompts": cfg.eval_prompts, "eval_every": cfg.eval_every,
                       "minutes": cfg.minutes, "deadline": cfg.deadline}
    return specs


def run_one(spec: dict) -> list[dict]:
    """One GRPO run with periodic dense-policy evaluations; writes metrics.jsonl, evals.jsonl, summary.json."""
    import torch

    from sparrow_sgl.rl.config import TrainConfig
    from sparrow_sgl.rl.metrics import plot_run
    from sparrow_sgl.rl.tasks import ChainTask
    from sparrow_sgl.rl.trainer import Trainer

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = TrainConfig.from_dict(spec["train"], where=f"testbed run {spec['name']}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    task = ChainTask(**cfg.task_args)
    indices = range(EVAL_OFFSET, EVAL_OFFSET + spec["eval_prompts"])
    evals_path = out / "evals.jsonl"
    evals_path.unlink(missing_ok=True)

    def evaluate(step: int) -> None:
        acc = greedy_accuracy(trainer.policy, trainer.tokenizer, task, indices)
        with evals_path.open("a") as f:
            f.write(json.dumps({"step": step, "greedy_exact": acc["exact"], "greedy_token": acc["token"]}) + "\n")
        print(f"[{spec['name']}] step {step}: dense greedy accuracy {acc['exact']:.3f} (answer tokens "
              f"{acc['token']:.3f})", flush=True)

    evaluate(0)
    start, records, stopped = time.perf_counter(), [], None
    while trainer.step < cfg.steps:
        m = trainer.train_step()
        records.append(m)
        tail = m.get("sparse/tail_p5/min")
        print(f"[{spec['name']}] step {trainer.step}: reward {m['rollout/reward_mean']:.3f}, tail_p5 "
              f"{'-' if tail is None else f'{tail:.3f}'}, {m['rollout/tokens_per_s']:.0f} rollout tokens/s, "
              f"step {m['timing/step']:.1f} s", flush=True)
        if trainer.step % spec["eval_every"] == 0 or trainer.step == cfg.steps:
            evaluate(trainer.step)
        if spec.get("minutes") and time.perf_counter() - start > 60 * spec["minutes"]:
            stopped = f"wall cap of {spec['minutes']} min reached after {trainer.step} steps"
        elif spec.get("deadline") and time.time() > spec["deadline"]:
            stopped = f"deadline reached after {trainer.step} steps"
        if stopped:
            if trainer.step % spec["eval_every"]:
                evaluate(trainer.step)
            break
    if cfg.plot:
        plot_run(trainer.log.records(), out / "plots", tau=cfg.tau)
    summary = {"name": spec["name"], "steps": trainer.step, "seconds": time.perf_counter() - start,
               "stopped_early": stopped, "schedule": trainer.schedule.describe()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    trainer.close()
    return records


def launch(specs: dict[str, dict], out: Path, jobs: int) -> dict[str, int]:
    """Run every spec: `jobs` concurrent `sparrow testbed run` processes (jobs 0: in this process, in turn)."""
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs.values():
        (out / f"spec_{spec['name']}.json").write_text(json.dumps(spec, indent=1) + "\n")
    if jobs == 0:
        for spec in specs.values():
            run_one(spec)
        return dict.fromkeys(specs, 0)
    pending, running, codes = list(specs.values()), {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            path = out / f"spec_{spec['name']}.json"
            log = (out / f"log_{spec['name']}.txt").open("w")
            cmd = [sys.executable, "-m", "sparrow_sgl.cli", "testbed", "run", "--spec", str(path)]
            running[spec["name"]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            print(f"started {spec['name']}: {' '.join(cmd)}", flush=True)
        time.sleep(2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del running[name]
                print(f"finished {name}: exit code {proc.returncode}", flush=True)
    return codes


def sweep(cfg: SweepConfig, progress: bool = True, command: str = "") -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_config.json").write_text(json.dumps({"command": command, **asdict(cfg)}, indent=1) + "\n")
    times = {}
    start = time.perf_counter()
    engine = engine_for(cfg)
    schedules = reused_plans(cfg) if cfg.plans_from else calibrate_and_plan(cfg, engine, progress)
    times["calibrate_s"] = time.perf_counter() - start
    specs = run_specs(cfg, schedules)  # a bad `only` fails here, before any run
    start = time.perf_counter()
    measure_speed(cfg, engine, {**schedules, **fixed_schedules(cfg)})
    times["speed_s"] = time.perf_counter() - start
    del engine
    _free(cfg.device)
    start = time.perf_counter()
    codes = launch(specs, out / "runs", cfg.jobs)
    times["runs_s"] = time.perf_counter() - start
    result = {"exit_codes": codes, "times": times}
    (out / "sweep_result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
