"""Rewards: grading final answers, parsing meta predictions, and the three meta rewards (docs/method.md §1).

The reward is the only signal RL has, so each step here is chosen to be hard to fool:

- `extract_answer`: the content of the last \\boxed{} (or \\fbox{}) after the last </think>. No box,
  no answer: there is no "last number in the text" fallback, which would pay truncated rollouts.
- `grade` / `grade_batch`: equivalence in order of cost. (1) the normalized strings are equal;
  (2) both sides are plain numbers (integers, decimals, fractions, scientific notation): compare
  them exactly as rationals, and that verdict is final; (3) otherwise math-verify decides
  symbolically (gold parsed first: it is asymmetric), and a "yes" on two numeric constants must
  survive a 50-digit evaluation of their difference, which rejects math-verify's tolerance-based
  false positives such as 1/2^99 = 1/2^98.
- Step (3) runs in worker processes (grader_pool.py), each item under a hard timeout: a worker
  that is still busy when its time is up is killed and replaced, so an exponent tower or a
  pathological expression costs one timeout, never the run. Timeouts and errors score 0 and are
  counted.
- Model text is never evaluated: only math-verify's LaTeX parser (a grammar, not `eval`) reads it;
  its plain-expression extractor, which calls sympy's `parse_expr` and thereby `eval`, is not used.
- `parse_meta`: a small lenient JSON reader (no `eval` either) that accepts what models write:
  pretty-printed or compact, single quotes, Python literals, trailing commas, code fences, prose
  around it. The last object that carries a meta key wins.
- `meta_reward`: pass-rate, length and notion rewards and their mean, exactly as docs/method.md §1.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

from grader_pool import GraderPool, default_pool

MAX_ANSWER_CHARS = 1000  # a longer boxed answer is not graded (it is wrong, or an attack)


# ---------------------------------------------------------------------------------------------------
# Answer extraction


def extract_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} (balanced braces) after the last </think>;
    `\\boxed 5` (no braces) gives "5". None when there is no complete box."""
    text = text.rpartition("</think>")[2]
    best, best_at = None, -1
    for command in ("\\boxed", "\\fbox"):
        at, tries = len(text), 0
        while (at := text.rfind(command, 0, at)) > best_at and tries < 20:  # last complete box
            content, tries = _box_content(text, at + len(command)), tries + 1
            if content is not None:
                best, best_at = content, at
                break
    return best


def _box_content(text: str, i: int) -> str | None:
    j = i
    while j < len(text) and text[j] in " \t\n":
        j += 1
    if j == len(text) or (text[j] != "{" and j == i):
        return None  # "\boxedfoo" is another command; "\boxed" at the very end is cut off
    if text[j] != "{":  # "\boxed 5"
        match = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER_CHARS])
        return match.group(0) if match else None
    depth, backslashes = 0, 0
    for k in range(j, min(len(text), j + MAX_ANSWER_CHARS + 2)):  # longer answers are not graded anyway
        c = text[k]
        if c in "{}" and backslashes % 2 == 0:  # \{ is a literal brace; \\} is a line break, then }
            depth += 1 if c == "{" else -1
            if depth == 0:
                return text[j + 1:k]
        backslashes = backslashes + 1 if c == "\\" else 0
    return None  # unbalanced (the rollout was cut off inside the box) or too long


# ---------------------------------------------------------------------------------------------------
# Cheap equivalence: normalized strings and exact numbers


_DROP = re.compile(r"\\\$|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;: ]|\\displaystyle|~|\$|"
                   r"\^\{\\circ\}|\^\\circ|\\degree|°")
# A trailing unit: \text{ cm}, \mbox{ inches}^2 after a number (\mathrm{i} was made `i` before this).
_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .^0-9/]*\}(\^\{?\d\}?)?$")
_ASSIGNMENT = re.compile(r"[a-zA-Z]=([^=<>]+)")


def normalize(answer: str) -> tuple[str, bool]:
    """A canonical string for an answer and whether it carried a percent sign. Only rewrites that
    never change the value: spacing, \\left/\\right, \\dfrac, degree marks, a trailing unit, thousands
    separators, a choice letter in \\text{(C)}."""
    s = _DROP.sub("", _CONSTANT.sub(r"\1", answer.strip()))
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace(r"\textbf", r"\text")
    percent = "%" in s
    s = s.replace(r"\%", "").replace("%", "").replace("{,}", ",").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000,000 (but not "81, 256": two answers)
        s = s.replace(",", "")
    s = _UNIT.sub("", s)
    s = re.sub(r"^\\(?:text|mathrm|mbox)\{(.*)\}$", r"\1", s.strip())  # the whole answer is text
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^\(?([A-Ea-e])\)$", r"\1", s)
    return s, percent


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")
_FRAC = re.compile(r"([-+]?)\\frac(?:\{([-+]?\d+)\}|(\d))(?:\{([-+]?\d+)\}|(\d))")  # \frac{12}{5}, \frac12
_SCI = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))(?:\\times|\\cdot|\*)10\^\{?([-+]?\d{1,3})\}?|"
                  r"([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d{1,3})")


def as_rational(s: str) -> Fraction | None:
    """The exact value of a normalized answer that is a plain number, else None."""
    if len(s) > 100:
        return None
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    if m := _FRAC.fullmatch(s):
        sign, num, den = m[1], m[2] or m[3], m[4] or m[5]
        return None if int(den) == 0 else (-1 if sign == "-" else 1) * Fraction(int(num), int(den))
    if m := re.fullmatch(r"([-+]?\d+)/([-+]?\d+)", s):
        return None if int(m[2]) == 0 else Fraction(int(m[1]), int(m[2]))
    if m := _SCI.fullmatch(s):
        mantissa, exponent = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        return Fraction(mantissa) * Fraction(10) ** int(exponent)
    return None


def quick_verdict(pred: str, gold: str) -> bool | None:
    """True/False when cheap checks decide, None when a symbolic check is needed. An answer without
    content on either side (has_content) is False."""
    (p, p_pct), (g, g_pct) = normalize(pred), normalize(gold)
    if not (_says_something(p) and _says_something(g)):
        return False
    # "x = 5" answers "5", but "y = 3" does not answer "x = 3": drop a one-letter assignment only
    # when the other side has none.
    if "=" in p and "=" not in g and (m := _ASSIGNMENT.fullmatch(p)):
        p = m[1]
    if "=" in g and "=" not in p and (m := _ASSIGNMENT.fullmatch(g)):
        g = m[1]
    if p == g:
        return True
    p_val, g_val = as_rational(p), as_rational(g)
    if p_val is None or g_val is None:
        return None
    if p_val == g_val:
        return True
    # "50\%" and "0.5" name the same value; without a percent sign on one side, numbers must agree exactly.
    return (p_pct != g_pct) and (p_val == g_val / 100 if g_pct else p_val / 100 == g_val)


# ---------------------------------------------------------------------------------------------------
# Symbolic equivalence (runs inside a worker process)


def symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict, with numeric "yes" answers cross-checked at 50 digits. Call it in a
    worker: it has no timeout of its own."""
    import sympy
    from math_verify import LatexExtractionConfig, parse, verify

    latex = [LatexExtractionConfig()]  # the LaTeX grammar only: the plain-expression parser evaluates text
    gold_parsed = parse(f"${gold}$", extraction_config=latex, parsing_timeout=None, raise_on_error=True)
    pred_parsed = parse(f"${pred}$", extraction_config=latex, parsing_timeout=None, raise_on_error=True)
    if not gold_parsed or not pred_parsed:
        return False
    if not verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True):
        return False
    g, p = gold_parsed[0], pred_parsed[0]
    if isinstance(p, sympy.Eq) and not isinstance(g, sympy.Eq) and not isinstance(p.lhs, sympy.Symbol):
        return False  # math-verify would compare "2x - y = 0" by its right side alone, as if "x = 0"
    return not _values_differ(g, p)


def _value_order(item):
    """A sort key for a set's members: a real number's value, a tuple's keys in turn (so the pairs of
    "all pairs (x, y)" answers sort alike however they were listed). TypeError for anything else."""
    import sympy

    if isinstance(item, sympy.Tuple):
        return tuple(_value_order(a) for a in item.args)
    value = sympy.N(item, 30) if isinstance(item, sympy.Expr) else None
    if value is None or not (value.is_number and value.is_real):
        raise TypeError(f"no value order for {item!r}")
    return float(value)


def _values_differ(g, p) -> bool:
    """Whether two expressions math-verify called equal have different values at 50 digits: numbers,
    expressions (at a few rational points) and same-shaped tuples, sets, intervals and matrices of
    them. Anything else (equations, text, differently shaped structures) is left to math-verify."""
    import sympy

    if isinstance(g, sympy.MatrixBase) and isinstance(p, sympy.MatrixBase):
        return g.shape == p.shape and any(_values_differ(a, b) for a, b in zip(g, p))
    if isinstance(g, (sympy.Tuple, sympy.FiniteSet, sympy.Interval)) and type(g) is type(p):
        items_g, items_p = list(g.args), list(p.args)
        if len(items_g) != len(items_p):
            return False
        if isinstance(g, sympy.FiniteSet):  # compare sets in value order
            try:
                items_g, items_p = sorted(items_g, key=_value_order), sorted(items_p, key=_value_order)
            except TypeError:  # not all real numbers, or numbers mixed with tuples: no order to compare in
                return False
        return any(_values_differ(a, b) for a, b in zip(items_g, items_p))
    if not (isinstance(g, sympy.Expr) and isinstance(p, sympy.Expr)) or g.free_symbols != p.free_symbols:
        return False
    # Equal values agree at 50 digits; inputs written as decimals only carry ~15.
    tolerance = 1e-12 if g.has(sympy.Float) or p.has(sympy.Float) else 1e-40
    symbols = sorted(g.free_symbols, key=str)
    points = [{s: sympy.Rational(k + 2, 7 + i) for i, s in enumerate(symbols)} for k in range(3 if symbols else 1)]
    for point in points:
        a, b = sympy.N(g.subs(point), 50), sympy.N(p.subs(point), 50)
        if not (a.is_number and b.is_number and a.is_finite and b.is_finite):
            continue  # e.g. a pole at this point: nothing to compare
        scale = max(abs(a), abs(b))
        if scale != 0 and abs(a - b) > tolerance * scale:
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# Grading


@dataclass
class Grades:
    correct: list[bool]  # one per response
    extracted: list[str | None]  # the boxed answer, None when there was none
    timeouts: int = 0  # symbolic checks killed at the timeout (scored 0)
    errors: int = 0  # symbolic checks that raised (scored 0)


def grade_batch(responses: list[str], answers: list[str], pool: GraderPool | None = None) -> Grades:
    """Grade every response against its gold answer; symbolic checks run in parallel in `pool`."""
    assert len(responses) == len(answers)
    extracted = [extract_answer(r) for r in responses]
    correct = [False] * len(responses)
    symbolic = []
    for i, (pred, gold) in enumerate(zip(extracted, answers)):
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            continue
        verdict = quick_verdict(pred, gold)
        if verdict is None:
            symbolic.append(i)
        else:
            correct[i] = verdict
    grades = Grades(correct, extracted)
    if symbolic:
        pool = pool or default_pool()
        before = (pool.timeouts, pool.errors)
        for i, verdict in zip(symbolic, pool.run([(_clean(extracted[i]), _clean(answers[i])) for i in symbolic])):
            correct[i] = bool(verdict)
        grades.timeouts, grades.errors = pool.timeouts - before[0], pool.errors - before[1]
    return grades


_CONSTANT = re.compile(r"\\(?:mathrm|text|operatorname)\{\s*([ie])\s*\}")  # \mathrm{i}: the number i


_PUNCTUATION = set(".,;:!?-'\"`") | {"\u2013", "\u2014"}  # what a blank answer may still hold


def has_content(answer: str) -> bool:
    """Whether an answer says anything once normalized: not empty and not only sentence punctuation
    (. , ; : ! ? dashes quotes). \\boxed{}, \\boxed{.} or \\boxed{\\text{}} are never correct, and a gold
    answer without content grades nothing as correct: otherwise an empty box would earn the reward.
    Symbols are content: \\infty, \u221e, \\{\\}, \u2205."""
    return _says_something(normalize(answer)[0])


def _says_something(normalized: str) -> bool:
    return any(c not in _PUNCTUATION for c in normalized)


def _clean(answer: str) -> str:
    r"""What the symbolic check reads: no $ signs, and \mathrm{i} / \mathrm{e} as the constants
    (math-verify would otherwise drop them as units)."""
    return _CONSTANT.sub(r"\1", answer.replace("$", "")).strip()


def grade(response: str, answer: str, pool: GraderPool | None = None) -> bool:
    """Whether the final boxed answer of `response` is mathematically equivalent to `answer`."""
    return grade_batch([response], [answer], pool).correct[0]


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
