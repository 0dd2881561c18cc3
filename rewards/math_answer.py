"""Final answers of math texts (responses and references), for `rewards.math`.

Final answer of a text (response or reference), after dropping `<think>` blocks: the last marked answer by
position, among `\\boxed{...}` / `\\fbox{...}` (nested braces) and what follows a marker on its line ("The (final)
answer is X", "answer is X", "Final answer: X", "**Answer:** X" opening a line, "The result is X", GSM8K `#### X`),
cut at the first sentence break; a marker followed by prose is no answer when another exists. Without any
marked answer, a short text without words is taken whole (a bare `0.5`, `\\frac12`, `x^2+1`); a short sentence
("It is 42") is no answer, and scores 0.

Several answers as one: answers of one kind just before the last, with nothing but separators between them
(commas, and/or, `\\quad`, `x_1 =` labels), form a list with it (`x = \\boxed{2}, \\boxed{-3}`). A reference's list
is its answer ("several boxes are several parts"); a response's list is compared whole only when the reference has
several parts (a list, a set `\\{a, b\\}`), else the response is judged on its last answer alone, so an intermediate
box before the final one never counts. Where the reference is a single number, a decimal comma (`1000,99`) reads
as a decimal point; `1,000` is a thousands separator and `1, 2` a list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rewards.text import strip_thinking

_BARE_MAX_CHARS = 100  # a reference or response without markers is taken whole only when this short
_MARK_MAX_CHARS = 1000  # what follows a marker is read up to the end of its line, at most this far
_MAX_MARKS = 64  # only the last answers of each kind are read (bounded work on adversarial texts)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_SAID = re.compile(  # "(final) answer is", "Final answer:", "Answer:" opening a line, "the result is", GSM8K "####"
    r"(?im)(?:\b(?:final\s+)?answers?\s+(?:is|are|would\s+be|will\s+be|should\s+be)\b\s*:?"
    r"|\bfinal\s+answers?\s*[:=]|^[ \t#>*_-]*answers?\s*[:=]"
    r"|\bthe\s+(?:final\s+)?(?:results?|solutions?)\s+(?:is|are)\b\s*:?"
    r"|(?P<hashes>####))[\s*]*")
_CLAUSE_END = re.compile(r"\.\s|;\s|,?\s+(?:because|since|so|as|which|where|and\s+so)\b"
                         r"|,\s+(?!and\b|or\b)[A-Za-z]{3,}\b")
_UNITS = re.compile(r"(?:\s+[A-Za-z]{2,})+\s*$")  # trailing words (no nested repeats: no catastrophic backtracking)
_ENDS_IN_NUMBER = re.compile(r"\d[^A-Za-z]*$")
_BARE_WORD = re.compile(r"[^\s$]+")
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# Between two answers that form one ("x_1 = \boxed{2}, \quad x_2 = \boxed{-3}", "\boxed{1} and \boxed{2}"): only
# separators, math delimiters, and/or, and "x =" labels; any other word means a new sentence, not a list.
_JOIN_GAP = re.compile(r"(?:\s|[,;&$.]|\\[()\[\]]|\\\\|\\[,;:! ]|\\q?quad\b|\\text\s*\{\s*(?:and|or)?\s*\}"
                       r"|\b(?:and|or)\b|[A-Za-z](?:_\{?\w+\}?)?\s*&?=|\*\*)*")
_JOIN_GAP_MAX_CHARS = 80
_TEXT_ARG = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname|mbox)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_MATH_WORDS = {"and", "or", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "lg", "exp", "lim", "max",
               "min", "gcd", "lcm", "mod", "det", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "inf",
               "sup", "deg", "sqrt", "frac", "pi"}
_SHORT_WORDS = {"is", "it", "so", "we", "be", "to", "of", "as", "at", "by", "an", "if", "on", "in", "the"}


@dataclass(frozen=True, slots=True)
class _Mark:
    """One marked answer in a text: a box, or what follows a phrase such as "the answer is"."""

    start: int  # where its marker begins: position decides which answer is the last
    end: int  # end of what it covers (closing brace, end of the line)
    kind: str  # "box" | "said" (answers only join others of their kind)
    answer: str  # cleaned


def _closing_brace(text: str, i: int) -> int:
    """Index of the brace closing the one at text[i], or -1."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return -1


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of the `}` closing it, for the whole text in one pass."""
    pairs, open_at = {}, []
    for j, ch in enumerate(text):
        if ch == "{":
            open_at.append(j)
        elif ch == "}" and open_at:
            pairs[open_at.pop()] = j
    return pairs


def _box_spans(text: str) -> list[tuple[int, int, int, int]]:
    """(start, content start, content end, end) of every `\\boxed{...}` / `\\fbox{...}` (braces balanced) and
    `\\boxed 5`; no slicing here, so a text of many nested boxes stays linear."""
    found: list[tuple[int, int, int, int]] = []
    pairs = None
    for m in _BOX.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            if i in pairs:  # else unbalanced: not an answer
                found.append((m.start(), i + 1, pairs[i], pairs[i] + 1))
            continue
        word = _BARE_WORD.match(text, i)
        if word:
            found.append((m.start(), i, word.end(), word.end()))
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (braces balanced), or `\\boxed 5` without braces."""
    spans = _box_spans(text)
    return text[spans[-1][1] : spans[-1][2]].strip() if spans else None


def clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    answer = re.sub(r"^\*\*|\*\*$", "", answer).strip()  # markdown bold
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 2:
        answer = _UNESCAPED_DOLLAR.sub("", answer).strip()  # "$x=2$ and $x=-3$" -> "x=2 and x=-3"
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer.replace(left, "").replace(right, "").strip()  # "\\(x=2\\) and \\(x=-3\\)" too
    answer = answer.rstrip(".").strip()
    if _THOUSANDS.match(answer):  # "1,000" would parse as a tuple
        answer = answer.replace(",", "")
    return answer


def _first_clause(answer: str) -> str:
    """'18. Done' -> '18', '5, since x' -> '5', '18 dollars' -> '18': the answer ends at the first sentence
    break or connective outside brackets; trailing plain words after a number are units."""
    depth = 0
    for i, ch in enumerate(answer):
        depth += (ch in "([{") - (ch in ")]}")
        if depth <= 0 and _CLAUSE_END.match(answer, i):
            answer = answer[:i]
            break
    answer = answer.strip()
    units = _UNITS.search(answer)
    if units and _ENDS_IN_NUMBER.search(answer, 0, units.start()):
        return answer[: units.start()]
    return answer


def has_words(text: str) -> bool:
    """True when a text holds prose: an English-looking word outside LaTeX commands and `\\text{}` (a run of 3+
    letters with a vowel, other than a function name such as `sin`, or a short word such as "is")."""
    text = _COMMAND.sub(" ", _TEXT_ARG.sub(" ", text))
    for word in re.findall(r"[A-Za-z]+", text):
        low = word.lower()
        if low in _SHORT_WORDS or (len(low) >= 3 and low not in _MATH_WORDS and re.search("[aeiou]", low)):
            return True
    return False


def parts(answer: str) -> int:
    """How many answers a final answer lists: top-level items separated by commas, semicolons, "and"/"or"
    (a set `\\{a, b\\}` counts its elements; a tuple `(1, 2)` or an interval `[1, 2)` is one part)."""
    s = re.sub(r"\\left|\\right", "", answer.strip())
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    elif s.startswith("{") and _closing_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    s = re.sub(r"\\text\s*\{\s*(?:and|or)\s*\}|\s(?:and|or)\s", ",", s)
    depth, count = 0, 1
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        count += depth == 0 and ch in ",;"
    return count


def _said(text: str) -> list[_Mark]:
    """Answers that follow a phrase marker; a GSM8K `####` line counts only when it holds no words (headings)."""
    marks = []
    for m in list(_SAID.finditer(text))[-_MAX_MARKS:]:  # markers do not overlap; an answer runs to its line's end
        cap = min(len(text), m.end() + _MARK_MAX_CHARS)  # bounded work per marker, whatever the text
        end = text.find("\n", m.end(), cap)
        end = cap if end < 0 else end
        raw = text[m.end() : end]
        if m.group("hashes") and has_words(raw):
            continue
        answer = clean(raw) if m.group("hashes") else clean(_first_clause(clean(raw)))
        if answer:
            marks.append(_Mark(m.start(), end, "said", answer))
    return marks


def _marks(text: str) -> list[_Mark]:
    """Every marked answer, by position; a phrase marker followed by prose ("the answer is not obvious") is
    dropped when any other answer exists."""
    boxes = [_Mark(start, end, "box", clean(text[a:b])) for start, a, b, end in _box_spans(text)[-_MAX_MARKS:]]
    said = _said(text)
    plain = [m for m in said if not has_words(m.answer)]
    return sorted(boxes + (plain if boxes or plain else said), key=lambda m: m.start)


def _final_group(text: str, marks: list[_Mark]) -> list[_Mark]:
    """The last answer, with the answers of its kind just before it when they read as one list (only separators
    between them, and each a single part): `x = \\boxed{2}, \\boxed{-3}`."""
    group = [marks[-1]]
    if parts(group[0].answer) > 1:
        return group
    for prev in reversed(marks[:-1]):
        gap = text[prev.end : group[0].start] if prev.end <= group[0].start else None
        if (prev.kind != group[0].kind or gap is None or len(gap) > _JOIN_GAP_MAX_CHARS
                or not _JOIN_GAP.fullmatch(gap) or parts(prev.answer) > 1):
            break
        group.insert(0, prev)
    return group


def extract_answers(text: str) -> list[str] | None:
    """The final answer of a text as a list: the last marked answer by position (a `\\boxed{}`, "The (final)
    answer is X", "Answer: X", "the result is X", "#### X"), preceded by the answers that list with it; else a
    short bare answer without words, taken whole; else None."""
    text = strip_thinking(text)
    marks = _marks(text)
    if marks:
        return [m.answer for m in _final_group(text, marks)]
    text = text.strip()
    if text and len(text) <= _BARE_MAX_CHARS and not has_words(text):
        return [clean(text)]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response or reference (see `extract_answers`), several answers joined by ", "."""
    answers = extract_answers(text)
    return ", ".join(answers) if answers else None


def decimal_comma(pred: str, gold: str) -> str:
    """`1000,99` -> `1000.99` where the reference is a single number (`1,000` was already read as thousands)."""
    if _NUMBER.fullmatch(gold) and _DECIMAL_COMMA.fullmatch(pred):
        return pred.replace(",", ".")
    return pred
