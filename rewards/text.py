"""Response text helpers shared by the math and code rewards: thinking removal and fenced-code extraction."""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}


def strip_thinking(text: str) -> str:
    """Drop Qwen3-style `<think>...</think>` blocks.

    A `</think>` without an opening tag (chat templates often put `<think>` in the prompt) drops everything before
    it; an unclosed leading `<think>` (generation cut inside the thoughts) leaves nothing to grade.
    """
    text = _drop_closed_thinking(text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if text.lstrip().startswith("<think>"):
        return ""
    return text


def _drop_closed_thinking(text: str) -> str:
    """Remove each `<think>` ... first following `</think>` span, in linear time (a lazy regex rescans the rest of the
    text for every unclosed `<think>`: quadratic on a degenerate generation that repeats the tag)."""
    kept, pos = [], 0
    while (start := text.find("<think>", pos)) >= 0:
        end = text.find("</think>", start + len("<think>"))
        if end < 0:
            break
        kept.append(text[pos:start])
        pos = end + len("</think>")
    kept.append(text[pos:])
    return "".join(kept)


def extract_code(response: str) -> str:
    """The program in a response: the last fenced python block, else the last fenced block, else the whole text."""
    text = strip_thinking(response)
    blocks = _FENCE.findall(text)
    python = [body for tag, body in blocks if tag.lower() in _PY_TAGS]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip() + "\n"  # keep the first line's indent (a bare body)
