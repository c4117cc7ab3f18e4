"""The meta path's text, read and scored (docs/method.md §1): MASA's own part of the reward.

    prediction = parse_meta(text, group_size=16, max_length=8192)   # MetaPrediction or None
    meta_reward(prediction, [Outcome(correct, length, text), ...], problem, group_size=16)
    # {"score", "pass_rate", "length", "notion"}

A module of its own, apart from the answer grader (rewards.py): nothing here grades an answer, and a
reader looking for what MASA adds to GRPO's reward finds all of it in this file. rewards.py re-exports
these names, so `from rewards import parse_meta, meta_reward` (the public API) works as before.

- `parse_meta`: a small lenient JSON reader (no `eval`: model text is never executed) that accepts
  what models write: pretty-printed or compact, single quotes, Python literals, trailing commas,
  code fences, prose around it. The last object that carries a meta key wins.
- `meta_reward`: pass-rate, length and notion rewards and their mean, exactly as docs/method.md §1.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field


# ---------------------------------------------------------------------------------------------------
# Meta predictions


@dataclass
class MetaPrediction:
    pass_rate: int | None  # predicted number of correct solutions out of G
    solution_length: int | None  # predicted tokens of a correct solution
    notions: list[str] = field(default_factory=list)


_NOTION_KEYS = ("math_notion", "math_notions", "notions", "notion")
# Bounds that keep parsing and scoring linear in the text whatever a model (or a caller) writes: the
# meta object must lie within the last META_TAIL_CHARS characters of the response (more than a whole
# meta response at the paper's 8,192-token budget, at about 4 characters a token), and a prediction
# keeps at most MAX_NOTIONS notions of at most MAX_NOTION_CHARS characters (a longer string is not a
# notion: it is dropped). Predictions within these bounds score exactly as without them.
META_TAIL_CHARS = 32_768
MAX_NOTIONS, MAX_NOTION_CHARS = 32, 200


def parse_meta(text: str, group_size: int | None = None, max_length: int | None = None) -> MetaPrediction | None:
    """The last JSON-like object in the last META_TAIL_CHARS characters of `text` that has a meta
    key, read leniently; None if there is none. A field that is missing, of the wrong type or out of
    range (0..group_size, 1..max_length when given) comes back as None (notions: as an empty list;
    capped as capped_notions says)."""
    obj = _last_meta_object(text[-META_TAIL_CHARS:])
    if obj is None:
        return None
    pass_rate = _as_int(obj.get("pass_rate"))
    if pass_rate is not None and not (0 <= pass_rate <= (group_size if group_size is not None else pass_rate)):
        pass_rate = None
    length = _as_int(obj.get("solution_length"))
    if length is not None and not (1 <= length <= (max_length if max_length is not None else length)):
        length = None
    raw = next((obj[k] for k in _NOTION_KEYS if k in obj), [])
    if isinstance(raw, str):
        raw = raw.split(",")
    notions = capped_notions([n for n in raw if isinstance(n, str)] if isinstance(raw, list) else [])
    return MetaPrediction(pass_rate, length, notions)


def capped_notions(notions: list[str]) -> list[str]:
    """The first MAX_NOTIONS non-empty notions of at most MAX_NOTION_CHARS characters, stripped."""
    kept = (n.strip() for n in notions)
    return [n for n in kept if n and len(n) <= MAX_NOTION_CHARS][:MAX_NOTIONS]


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        return int(value)
    return None


def _last_meta_object(text: str, max_candidates: int = 200) -> dict | None:
    keys = {"pass_rate", "solution_length", *_NOTION_KEYS}
    at, tried = len(text), 0
    while (at := text.rfind("{", 0, at)) >= 0 and tried < max_candidates:
        tried += 1
        try:
            value, _ = _Reader(text, at).value()
        except ValueError:
            continue
        if isinstance(value, dict):
            value = {str(k).strip().lower(): v for k, v in value.items()}
            if keys & value.keys():
                return value
    return None


class _Reader:
    """Reads one JSON value at text[i:], also accepting single-quoted strings, True/False/None and
    trailing commas. Raises ValueError at the first thing it cannot read."""

    LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}

    def __init__(self, text: str, i: int):
        self.text, self.i = text, i

    def skip(self):
        while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
            self.i += 1

    def peek(self) -> str:
        self.skip()
        if self.i >= len(self.text):
            raise ValueError("end of text")
        return self.text[self.i]

    def value(self, depth: int = 0):
        if depth > 20:
            raise ValueError("nested too deeply")
        c = self.peek()
        if c == "{":
            return self.container("}", depth), self.i
        if c == "[":
            return self.container("]", depth), self.i
        if c in "\"'":
            return self.string(), self.i
        if m := re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?").match(self.text, self.i):
            self.i = m.end()
            if len(m[0]) > 30:  # no meta field is that large: out of range, not malformed
                return math.inf, self.i
            return (float(m[0]) if m[1] or m[2] else int(m[0])), self.i
        for word, literal in self.LITERALS.items():
            if self.text.startswith(word, self.i):
                self.i += len(word)
                return literal, self.i
        raise ValueError(f"unexpected {c!r}")

    def container(self, close: str, depth: int):
        self.i += 1
        items = {} if close == "}" else []
        while self.peek() != close:
            if close == "}":
                if self.peek() not in "\"'":
                    raise ValueError("object key must be a string")
                key = self.string()
                if self.peek() != ":":
                    raise ValueError("expected ':'")
                self.i += 1
                items[key] = self.value(depth + 1)[0]
            else:
                items.append(self.value(depth + 1)[0])
            if self.peek() == ",":
                self.i += 1
            elif self.peek() != close:
                raise ValueError("expected ',' or a closing bracket")
        self.i += 1
        return items

    def string(self) -> str:
        quote, out = self.text[self.i], []
        self.i += 1
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == "\\" and self.i + 1 < len(self.text):
                nxt = self.text[self.i + 1]
                if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.text[self.i + 2:self.i + 6]):
                    out.append(chr(int(self.text[self.i + 2:self.i + 6], 16)))
                    self.i += 6
                    continue
                out.append(self.ESCAPES.get(nxt, "\\" + nxt))
                self.i += 2
                continue
            if c == quote:
                self.i += 1
                # \ud83d\ude00-style surrogate pairs were decoded one half at a time: join them
                return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            if c == "\n":
                raise ValueError("newline inside a string")
            out.append(c)
            self.i += 1
        raise ValueError("unterminated string")

    ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\", "/": "/"}


# ---------------------------------------------------------------------------------------------------
# Meta rewards


@dataclass
class Outcome:
    """What one solution rollout did, as the meta reward needs it."""
    correct: bool
    length: int  # response tokens
    text: str


def normalize_notion(notion: str) -> str:
    """Lower case, single spaces, trimmed punctuation, and the last word made (simply) singular."""
    words = re.sub(r"\s+", " ", notion.lower()).strip(" .,;:!?\"'`()[]{}").split(" ")
    last = words[-1]
    if last.endswith(("series", "species")):
        pass
    elif last.endswith("ies") and len(last) > 4:
        last = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "xes", "zes", "sses")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith(("ss", "us", "is")) and len(last) > 3:
        last = last[:-1]
    return " ".join(words[:-1] + [last])


def _mentions(text: str, notion: str) -> bool:
    """Whether lower-cased `text` mentions `notion` (singular or a simple plural) as whole words. Only
    letters end a word here: "13carry1" mentions carry (the CPU demo's solutions write it so), "scary"
    does not mention "car"."""
    stem = notion[:-1] if notion.endswith("y") else notion  # in every form: a fast substring test first
    return stem in text and _mention_pattern(notion).search(text) is not None


@functools.lru_cache(maxsize=4096)
def _mention_pattern(notion: str) -> re.Pattern:
    """The compiled pattern of one notion (at most MAX_NOTION_CHARS long: a small, bounded regex)."""
    forms = {notion, notion + "s", notion + "es"} | ({notion[:-1] + "ies"} if notion.endswith("y") else set())
    return re.compile(r"(?<![a-z])(?:" + "|".join(re.escape(f) for f in sorted(forms)) + r")(?![a-z])")


def meta_reward(prediction: MetaPrediction | None, outcomes: list, problem: str, group_size: int,
                base: float = 0.01) -> dict[str, float]:
    """The meta reward of one prediction, scored against the G solution rollouts of its prompt.

    - pass_rate: base ** |p_true - pass_rate / G|, p_true = fraction of outcomes that were correct;
    - length: 1 if min <= solution_length <= max over the token lengths of correct outcomes
      (inclusive; 0 when none was correct);
    - notion: over the distinct normalized notions not already in the problem text, the fraction
      mentioned by more correct outcomes than incorrect ones (0 for an empty list);
    - score: the mean of the three. A missing or out-of-range field scores 0 for its part; no
      prediction at all scores 0 everywhere. `outcomes` have `correct`, `length` and `text`.
    """
    if prediction is None or not outcomes:
        return {"score": 0.0, "pass_rate": 0.0, "length": 0.0, "notion": 0.0}
    p_true = sum(o.correct for o in outcomes) / len(outcomes)
    r_pass = 0.0
    if prediction.pass_rate is not None and 0 <= prediction.pass_rate <= group_size:
        r_pass = base ** abs(p_true - prediction.pass_rate / group_size)
    correct_lengths = [o.length for o in outcomes if o.correct]
    r_length = float(prediction.solution_length is not None and bool(correct_lengths)
                     and min(correct_lengths) <= prediction.solution_length <= max(correct_lengths))
    problem_text = problem.lower()
    notions = {normalize_notion(n) for n in capped_notions(prediction.notions)} - {""}
    notions = [n for n in sorted(notions) if not _mentions(problem_text, n)]
    r_notion = 0.0
    if notions:
        texts = [(o.text.lower(), o.correct) for o in outcomes]
        useful = sum(
            sum(1 if ok else -1 for text, ok in texts if _mentions(text, n)) > 0 for n in notions)
        r_notion = useful / len(notions)
    return {"score": (r_pass + r_length + r_notion) / 3, "pass_rate": r_pass, "length": r_length,
            "notion": r_notion}
