"""What a person sees when an input is wrong: one line naming the problem (file, 1-based line or prompt), exit 2,
no traceback, and nothing heavy built first."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from sparrow_sgl.cli import attach_negative_values, main


def _write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_engine(monkeypatch):
    """Building an engine fails the test: input errors must surface before any model or KV pool is built."""
    from sparrow_sgl.engine import engine

    def refuse(self, config):
        raise AssertionError("the engine was built before the input was checked")

    monkeypatch.setattr(engine.Engine, "__init__", refuse)


def test_calibrate_malformed_jsonl_names_file_and_line(tiny_model_dir, tmp_path, capsys, no_engine):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, '{"prompt": "b"', {"prompt": "c"}])
    argv = ["calibrate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--budgets", "64",
            "--out", str(tmp_path / "t.json")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert f"{prompts}:2" in line and "line 2 is not valid JSON" in line


@pytest.mark.parametrize(
    "budgets, expected",
    [("256,abc", "'abc' is not a whole number"), ("-256,512", "-256 is negative"), ("0", "0 is zero")],
)
def test_calibrate_budgets_errors_name_the_bad_entry(tmp_path, capsys, budgets, expected):
    argv = ["calibrate", "--model", str(tmp_path), "--prompts", "p.jsonl", "--budgets", budgets]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --budgets" in err and expected in err and "expected one argument" not in err


def test_negative_values_attach_to_their_option():
    assert attach_negative_values(["calibrate", "--budgets", "-256,512", "--seed", "3"]) == [
        "calibrate", "--budgets=-256,512", "--seed", "3"]


def test_fixed_schedule_with_a_negative_budget_says_the_sign_is_the_problem(tiny_model_dir, tmp_path, capsys,
                                                                            no_engine):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
            "--schedule", "fixed:-256"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "negative" in line and "positive number of tokens" in line


def test_generate_checks_prompts_before_building_the_engine(tiny_model_dir, tmp_path, capsys, no_engine):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt_ids": []}])
    base = ["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o.jsonl")]
    assert main([*base, "--prompts", str(prompts)]) == 2
    assert "prompt 2: the prompt is empty" in _error_line(capsys)  # 1-based, like the file's lines
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, "[1, 2", {"prompt": "x"}])
    assert main([*base, "--prompts", str(bad)]) == 2
    assert f"{bad}:2" in _error_line(capsys)
    nofield = _write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "hi"}, {"body": "x"}])
    assert main([*base, "--prompts", str(nofield)]) == 2
    assert f"{nofield}:2: a row needs 'prompt', 'question'" in _error_line(capsys)
    assert main([*base, "--prompts", str(prompts), "--schedule", "qwen3-99b"]) == 2
    assert "unknown schedule" in _error_line(capsys)


def test_model_dir_without_tokenizer_is_refused_by_name(tiny_model_dir, tmp_path, capsys, no_engine):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, bare / f.name)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    assert main(["generate", "--model", str(bare), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert f"{bare} has no tokenizer (tokenizer.json / tokenizer_config.json)" in _error_line(capsys)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("tailguard=maybe", "tailguard must be true or false, got 'maybe'"),
        ("steps=2.5", "steps must be a whole number, got 2.5"),
        ("lr=fast", "lr must be a number, got 'fast'"),
        ("betas=[0.9]", "betas must be a list of 2 values"),
        ("distill.enabled=yes please", "distill: enabled must be true or false"),
    ],
)
def test_train_set_values_are_type_checked(tmp_path, capsys, override, expected):
    config = tmp_path / "c.yaml"
    config.write_text("model: /nowhere\nsteps: 2\n")
    assert main(["train", "--config", str(config), "--set", override]) == 2
    assert expected in _error_line(capsys).replace("config.distill", "config: distill")


def test_train_help_lists_the_config_keys_with_types_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    keys = ("tailguard: bool = False", "lr: float = 1e-06", "kv_gb: float | None = None", "distill.every: int = 1")
    assert all(key in out for key in keys)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
def test_serve_without_sglang_says_what_to_install(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "needs sglang" in line and "make setup-sglang" in line and "pip install -e '.[sglang]'" in line


def test_distill_and_train_check_the_schedule_before_loading_models(tiny_model_dir, tmp_path, capsys, no_engine):
    argv = ["distill", "--model", str(tiny_model_dir), "--schedule", "fixed:-48", "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "negative" in _error_line(capsys)
    config = tmp_path / "c.yaml"
    config.write_text("model: /nowhere\nschedule: qwen3-99b-0.86\n")  # the model dir is checked later
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown schedule" in _error_line(capsys)


def test_train_refuses_a_schedule_with_other_pages_before_loading_models(tiny_model_dir, tmp_path, capsys, no_engine):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"page_size": 4, "bin_tokens": 32, "budgets": [24, None]}))  # the CPU demo's
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\nschedule: {schedule}\npage_size: 16\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "uses 4-token pages but the config has page_size 16; set page_size: 4" in _error_line(capsys)


def test_cuda_device_without_cuda_is_one_line_before_any_model_loads(tiny_model_dir, tmp_path, capsys, no_engine,
                                                                     monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndevice: cuda\nout_dir: {tmp_path / 'run'}\n")
    model = str(tiny_model_dir)
    for argv in (
        ["generate", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--device",
         "cuda"],
        ["calibrate", "--model", model, "--prompts", str(prompts), "--budgets", "64", "--out",
         str(tmp_path / "t.json"), "--device", "cuda:0"],
        ["distill", "--model", model, "--schedule", "fixed:64", "--out", str(tmp_path / "a"), "--device", "cuda"],
        ["train", "--config", str(config)],
    ):
        assert main(argv) == 2, argv
        assert "no CUDA device is available to this torch" in _error_line(capsys)


def test_generate_refuses_outputs_and_prompt_counts_it_cannot_use_before_the_engine(tiny_model_dir, tmp_path,
                                                                                    capsys, no_engine):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "ho"}])
    (tmp_path / "afile").write_text("keep me\n")
    base = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    cases = [
        (["--out", str(tmp_path)], f"output {tmp_path} is a directory, not a file"),
        (["--out", str(tmp_path / "afile" / "o.jsonl")], f"{tmp_path / 'afile'} is a file, not a directory"),
        (["--out", str(tmp_path / "o.jsonl"), "--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
        (["--out", str(tmp_path / "o.jsonl"), "--num-prompts", "-1"], "--num-prompts must be >= 1, got -1"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2, extra
        assert expected in _error_line(capsys)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path), "--out", "o.jsonl"]) == 2
    assert f"prompts file {tmp_path} is a directory, not a file" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "p.jsonl"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--quantile", "2"], "--quantile must lie in [0, 1], got 2.0"),
        (["--mode", "topk", "--topk", "0"], "--mode topk needs 1 <= --topk <= 20, got 0"),
        (["--num-prompts", "-1"], "--num-prompts must be >= 1, got -1"),
        (["--plot", "."], "output . is a directory, not a file"),
    ],
)
def test_calibrate_settings_are_checked_before_the_engine(tiny_model_dir, tmp_path, capsys, no_engine, flags,
                                                          expected):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    argv = ["calibrate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--budgets", "64",
            "--out", str(tmp_path / "t.json"), *flags]
    assert main(argv) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "t.json").exists()


def test_train_config_that_does_not_parse_is_one_line_with_its_position(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: [unclosed\nsteps: 2\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be parsed: line 2, column 6: expected ',' or ']'" in err
    config.write_text("model: /nowhere\n")
    assert main(["train", "--config", str(config), "--set", "lr=[1e-5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot parse the value: line 1, column 6:" in err
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"train config {tmp_path} is a directory, not a file" in _error_line(capsys)


def test_distill_input_errors_keep_an_earlier_runs_log(tiny_model_dir, tmp_path, capsys, no_engine):
    out = tmp_path / "adapter"
    out.mkdir()
    log = out / "distill_log.jsonl"
    log.write_text('{"event": "step", "step": 1}\n')
    base = ["distill", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "1", "--eval-prompts", "1"]
    for extra, expected in [(["--schedule", "qwen3-99b"], "unknown schedule"),
                            (["--schedule", "fixed:64", "--rank", "0"], "distill.rank must be >= 1")]:
        assert main([*base, *extra]) == 2
        assert expected in _error_line(capsys)
    assert log.read_text() == '{"event": "step", "step": 1}\n'
    (tmp_path / "afile").write_text("keep me\n")
    assert main(["distill", "--model", str(tiny_model_dir), "--out", str(tmp_path / "afile"), "--schedule",
                 "fixed:64"]) == 2
    assert "is a file; the adapter is written to a directory" in _error_line(capsys)
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_train_refuses_an_out_dir_under_a_file_before_loading_models(tiny_model_dir, tmp_path, capsys, no_engine,
                                                                     monkeypatch):
    from sparrow_sgl.rl import trainer

    monkeypatch.setattr(trainer, "load_policy", lambda *a: pytest.fail("the policy loaded before the check"))
    (tmp_path / "afile").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\nout_dir: {tmp_path / 'afile' / 'run'}\nprogress: false\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "afile is a file, not a directory" in _error_line(capsys)
