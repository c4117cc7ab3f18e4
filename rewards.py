"""Rewards: grading final answers (docs/method.md §1). The meta path's parser and its three rewards
live in meta_prediction.py; their names are re-exported at the end of this file (the public API).

The solution reward is the only signal GRPO has, so each step here is chosen to be hard to fool:

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from grader_pool import GraderPool, default_pool
# the meta path's names, importable from here as the public API has them (docs/method.md §1)
from meta_prediction import MetaPrediction, Outcome, meta_reward, parse_meta  # noqa: F401

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
