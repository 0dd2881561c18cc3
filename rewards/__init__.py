"""Rewards users can trust: math-verify equivalence for math, a namespace sandbox for code.

Modules: `math` (math-verify equivalence), `math_answer` (final-answer extraction), `pool` (killable worker
processes shared by concurrent callers), `sandbox` (run untrusted Python outside this process),
`code` (pass rate of a program on tests in any dataset's format), `code_formats` (each format parsed and
validated into one TestSet), `python_tests` (which statements of Python test code are tests, and whether they can
fail), `compare` (output and return-value comparison rules), `code_harness` / `assert_harness` (what runs in the
sandbox around a program), `labels` (label parsing, batch scoring), `openrlhf` (`reward_func` for OpenRLHF's
`--reward.remote_url`), `datasets` + `code_datasets` (GSM8K / MATH-500 / HumanEval, TACO / APPS / LiveCodeBench /
CodeContests / MBPP / KodCode prompt sets), `cli` (`sparrow reward`).
Heavy imports (math-verify/sympy, torch, datasets) happen inside the modules that need them.
"""
