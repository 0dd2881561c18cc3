"""`sparrow generate` end to end on the tiny model."""

from __future__ import annotations

import json

from sparrow_sgl.cli import main


def _write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_cli_writes_rollouts(tiny_model_dir, tmp_path, capsys):
    prompts = _write_prompts(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "what is the value of x?"},
            {"prompt_ids": [5, 6, 7, 8]},
            {"messages": [{"role": "user", "content": "2 + 2"}]},
        ],
    )
    out = tmp_path / "out" / "r.jsonl"
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--n",
        "2",
        "--schedule",
        "fixed:16",
        "--page-size",
        "4",
        "--max-new-tokens",
        "12",
        "--seed",
        "0",
        "--chat",
        "--logprobs-topk",
        "3",
        "--kv-gb",
        "0.01",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["id"] == "a" and "id" not in rows[2]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    assert rows[2]["prompt_ids"] == [5, 6, 7, 8]
    assert all(len(r["topk_ids"]) == len(r["token_ids"]) for r in rows)
    assert all(r["meta"]["schedule"] == "fixed:16" for r in rows)
    err = capsys.readouterr().err
    assert "KV pool of" in err and "tokens/s" in err and "decode steps of" in err


def test_generate_cli_errors(tiny_model_dir, tmp_path, capsys):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    base = ["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o.jsonl"), "--kv-gb", "0.01"]
    assert main([*base, "--prompts", str(prompts), "--schedule", "bogus"]) == 2
    assert "unknown schedule" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    bad = _write_prompts(tmp_path / "bad.jsonl", [{"text": "hi"}])
    assert main([*base, "--prompts", str(bad)]) == 2
    assert "needs 'prompt'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_generate_output_feeds_reward_unchanged(tiny_model_dir, tmp_path, capsys):
    """The shipped GSM8K rows (`question`, `answer`) -> generate -> reward: every input field survives, the text is
    `response`, and `sparrow reward --file` scores the file as written."""
    from pathlib import Path

    gsm8k = Path(__file__).resolve().parents[1] / "rewards" / "data" / "gsm8k" / "test.jsonl"
    first = [json.loads(line) for line in gsm8k.read_text().splitlines()[:2]]
    out = tmp_path / "rollouts.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(gsm8k), "--num-prompts", "2", "--n", "2",
            "--out", str(out), "--page-size", "4", "--max-new-tokens", "6", "--kv-gb", "0.01", "--seed", "0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        source = first[row["prompt_index"]]
        assert row["question"] == source["question"] and row["answer"] == source["answer"]
        assert isinstance(row["response"], str) and row["response"] == row["text"]
    capsys.readouterr()
    assert main(["reward", "--file", str(out), "--kind", "math", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 4 and 0.0 <= summary["accuracy"] <= 1.0


def test_generate_keeps_labels_and_reads_a_prompt_field(tiny_model_dir, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"problem": "1 + 1 = ?", "label": {"kind": "math", "answer": "2"}}])
    out = tmp_path / "r.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--page-size", "4", "--max-new-tokens", "4", "--kv-gb", "0.01", "--seed", "0"]
    assert main(argv) == 0
    row = json.loads(out.read_text())
    assert row["label"] == {"kind": "math", "answer": "2"} and row["problem"] == "1 + 1 = ?"
