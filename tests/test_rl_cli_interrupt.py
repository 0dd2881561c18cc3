"""`sparrow train` from a person's side: Ctrl-C names the last checkpoint and the resume command; a checkpoint's
model dir carries the tokenizer, so `sparrow generate` runs on it."""

from __future__ import annotations

import json

from sparrow_sgl.cli import main
from sparrow_sgl.rl import trainer as trainer_mod


def _config(tmp_path, model_dir, **extra) -> tuple:
    run = tmp_path / "run"
    lines = {
        "model": str(model_dir), "out_dir": str(run), "steps": 3, "prompts_per_step": 1, "group_size": 2,
        "max_new_tokens": 4, "page_size": 4, "schedule": "fixed:16", "bin_tokens": 16, "progress": False,
        "plot": False, "kv_gb": 0.002, "task_args": {"num_vars": 6, "hops": 1}, **extra,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(lines))
    return path, run


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    config, run = _config(tmp_path, tiny_model_dir, save_every=1)
    real_step = trainer_mod.Trainer.train_step

    def step_then_interrupt(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_then_interrupt)
    assert main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(x for x in err.splitlines() if "interrupted" in x)
    assert "after 2 completed step(s)" in line and str(run / "checkpoints" / "step_000002") in line
    assert f"--resume {run}`" in line and f"--config {run / 'config.json'}" in line

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    assert main(["train", "--config", str(run / "config.json"), "--resume", str(run)]) == 0
    assert "resumed at step 2" in capsys.readouterr().out


def test_ctrl_c_before_any_checkpoint_says_so(tiny_model_dir, tmp_path, capsys, monkeypatch):
    config, run = _config(tmp_path, tiny_model_dir)

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", interrupt)
    assert main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and "save_every: 0" in err and "Traceback" not in err


def test_checkpoint_carries_the_tokenizer_and_generate_runs_on_it(tiny_model_dir, tmp_path, capsys):
    config, run = _config(tmp_path, tiny_model_dir, steps=1)
    assert main(["train", "--config", str(config)]) == 0
    model = run / "checkpoints" / "step_000001" / "model"
    assert (model / "tokenizer.json").is_file() and (model / "tokenizer_config.json").is_file()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is the value of x?"}) + "\n")
    out = tmp_path / "r.jsonl"
    argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--page-size", "4",
            "--max-new-tokens", "4", "--kv-gb", "0.01", "--seed", "0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "what is the value of x?" and len(rows[0]["token_ids"]) >= 1
