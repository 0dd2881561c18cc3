"""Rewards users can trust: math-verify equivalence for math, a namespace sandbox for code.

Modules: `math` (math-verify equivalence), `math_answer` (final-answer extraction), `pool` (killable worker
processes shared by concurrent callers), `sandbox` (run untrusted Python outside this process),
`code` (pass rate of assert or stdin/stdout tests), `openrlhf` (`reward_func` for OpenRLHF's
`--reward.remote_url`),
`datasets` (GSM8K / MATH-500 / HumanEval prompt sets), `cli` (`sparrow reward`).
Heavy imports (math-verify/sympy, torch, datasets) happen inside the modules that need them.
"""
