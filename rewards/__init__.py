"""Rewards users can trust: math-verify equivalence for math, a namespace sandbox for code.

Modules: `math` (final-answer extraction + math-verify), `sandbox` (run untrusted Python outside this process),
`code` (pass rate of assert or stdin/stdout tests), `openrlhf` (`reward_func` for `--remote_rm_url`),
`datasets` (GSM8K / MATH-500 / HumanEval prompt sets), `cli` (`sparrow reward`).
Heavy imports (math-verify/sympy, torch, datasets) happen inside the modules that need them.
"""
