"""rewards.py: grading verdicts against a hand-written table, real MATH solutions and hostile input
(the meta path's parser and rewards: test_meta_prediction.py)."""

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from rewards import GraderPool, extract_answer, grade, grade_batch, normalize

from conftest import child_env

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def pool():
    p = GraderPool(workers=2, timeout=5.0)
    yield p
    p.close()


# ---------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("text,expected", [
    (r"so the answer is $\boxed{42}$.", "42"),
    (r"\boxed{1} at first, but then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"nested \boxed{x^{2^{3}}} done", r"x^{2^{3}}"),
    (r"\fbox{7}", "7"),
    (r"\fbox{1} then \boxed{2}", "2"), (r"\boxed{1} then \fbox{2}", "2"),  # the last box, whichever command
    (r"\boxed 5 is it", "5"),
    (r"\boxed {5}", "5"), ("\\boxed\n{7}", "7"),
    (r"\boxed{\begin{matrix} a \\ b \end{matrix}}", r"\begin{matrix} a \\ b \end{matrix}"),
    (r"\boxed{a \\}", r"a \\"),  # \\ is a line break: the brace after it closes the box
    (r"<think>maybe \boxed{3}</think> The answer is \boxed{4}", "4"),
    (r"<think>the answer is \boxed{3}</think> so I conclude 3", None),  # only the text after </think>
    (r"\boxed{12", None),  # cut off inside the box
    (r"\boxed{5} and then \boxed{6", "5"),  # the last *complete* box
    ("The answer is 12.", None),  # no box, no answer: no last-number fallback
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------------------
# Equivalence: (gold, predicted, verdict)

EQUIVALENCE = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True), ("0.5", r"\frac{1}{2}", True), (r"\frac{3}{4}", "0.75", True),
    (r"\frac{1}{3}", "0.333", False), (r"\frac{1}{3}", "0.3333333", False), ("2.50", r"\frac{5}{2}", True),
    (r"\frac{7}{2}", "3.5", True), (r"-\frac{1}{4}", "-0.25", True), (r"\frac{-1}{4}", r"-\frac14", True),
    (r"\frac{12}{5}", r"\frac125", False), ("10", "10.0", True), ("6", "6.0000001", False),
    # \dfrac, \tfrac
    (r"\dfrac{2}{3}", r"\frac{2}{3}", True), (r"\tfrac{2}{3}", r"\dfrac{2}{3}", True),
    (r"\frac{2}{3}", r"\frac{3}{2}", False),
    # \left( \right)
    (r"\left(1, 2\right)", "(1,2)", True), (r"\left[0, 1\right)", "[0,1)", True),
    # intervals: open and closed ends matter
    ("(1,2)", "[1,2]", False), ("[1,2]", "[1, 2]", True), (r"(-\infty, 3]", r"(-\infty, 3)", False),
    (r"(-\infty,0)\cup(1,\infty)", r"(-\infty, 0) \cup (1, \infty)", True), ("[2,5)", "(2,5]", False),
    # several answers, in any order
    ("1, 2", "2, 1", True), ("-3, 5", "5, -3", True), ("1, 2", "1, 3", False), ("1, 2, 3", "1, 2", False),
    (r"\{1, 2\}", r"\{2, 1\}", True),
    # sets of tuples ("all pairs (x, y)"), listed in another order (shapes from math-verify's own tests)
    ("(1,2,3,4),(4,3,2,1),(1,1,1,1),(2,2,2,2),(0,1,0,1)",
     "(0,1,0,1),(2,2,2,2),(1,1,1,1),(4,3,2,1),(1,2,3,4),(1,1,1,1)", True),  # with a duplicate
    ("(0,0,0),(1,1,1),(2,2,2),(3,3,3),(4,4,4),(5,5,5),(6,6,6),(7,7,7)",
     "(7;7;7),(6;6;6),(5;5;5),(4;4;4),(3;3;3),(2;2;2),(1;1;1),(0;0;0)", True),  # semicolons
    (r"(7,11),\ (11,7)", "(11,7)or(7,11)", True), ("(5,2),(7,2)", "p=5,q=2;p=7,q=2", True),
    ("(1,2),(3,4),(5,6),(7,8)", "(7,8),(5,6),(3,4),(1,2)", True),
    ("(1,2),(3,4),(5,6),(7,8)", "(7,8),(5,6),(3,4),(1,3)", False),
    ("(1,2),(3,4)", "(3,4),(1,2.0000001)", False), (r"(\sqrt{2},1),(1,2)", r"(1,2),(\frac{2}{\sqrt{2}},1)", True),
    # units and degrees
    (r"5\text{ cm}", "5", True), ("12", r"12\text{ inches}", True), (r"5\text{ cm}^2", "5", True),
    (r"30^\circ", "30", True), (r"30^{\circ}", r"30^\circ", True), ("30", r"60^\circ", False),
    # percent
    (r"25\%", "25", True), (r"25\%", "0.25", True), (r"25\%", "25%", True), (r"25\%", "2.5", False),
    # thousands separators and money
    ("1{,}000", "1000", True), ("1,000,000", "1000000", True), ("10{,}080", "10080", True),
    ("1,000", "1000.5", False), (r"\$1.50", "1.5", True),
    # signs
    ("-5", "-5", True), ("-5", "5", False), ("+7", "7", True), (r"-\frac{1}{2}", r"\frac{-1}{2}", True),
    (r"-\frac{1}{2}", r"\frac{1}{2}", False),
    # pi and roots
    (r"2\pi", r"2 \pi", True), (r"\pi", "3.14159", False), (r"\frac{\pi}{2}", r"\frac{1}{2}\pi", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt{2}", r"\sqrt{3}", False), (r"3\sqrt{2}", r"\sqrt{18}", True), (r"\sqrt2", r"\sqrt{2}", True),
    # multiple-choice letters
    (r"\text{(C)}", "C", True), (r"\text{(C)}", "(C)", True), (r"\text{(C)}", r"\text{(D)}", False),
    (r"\textbf{(B)}", "B", True),
    # scientific notation
    (r"1.2\times10^{3}", "1200", True), (r"3\times 10^{-2}", "0.03", True),
    (r"6.02 \times 10^{23}", r"6.02\times10^{23}", True), (r"1.2\times10^{3}", "120", False), ("1.5e3", "1500", True),
    # expressions, equations, words, matrices
    ("x^2+2x+1", "(x+1)^2", True), ("x^2+2x+1", "(x-1)^2", False), ("x=5", "5", True),
    (r"\frac{x+1}{2}", r"\frac{1}{2}x + \frac{1}{2}", True), (r"\text{Monday}", "Monday", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    # math-verify's known false positives: tolerance-based numeric equality, and an equation's right side
    (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}", False), (r"\frac{1}{2004!}", r"\frac{1}{2006!}", False),
    (r"1-\frac{1}{e}", r"1+\frac{1}{e}", False), ("0", "2x - y + 2z - 18 = 0", False),
    (r"(\frac{1}{2^{60}}, 1)", r"(\frac{1}{2^{61}}, 1)", False), (r"\{\frac{1}{2^{60}}, 1\}", r"\{1, \frac{1}{2^{61}}\}", False),
    # rewrites that would change the value must not happen
    (r"x = -\frac{1}{12}", r"y = -\frac{1}{12}", False), ("x=3", "x = 3", True), ("81, 256", "81256", False),
    ("6, 120", "6120", False), ("2", r"2\mathrm{i}", False), ("3", r"3\text{i}", False),
    (r"\rightarrow", r"\leftarrow", False),
]


@pytest.fixture(scope="module")
def verdicts(pool):
    grades = grade_batch([rf"The answer is $\boxed{{{pred}}}$." for _, pred, _ in EQUIVALENCE],
                         [gold for gold, _, _ in EQUIVALENCE], pool)
    assert grades.timeouts == 0 and grades.errors == 0
    return dict(zip([(g, p) for g, p, _ in EQUIVALENCE], grades.correct))


def test_the_table_is_large_enough():
    assert len(EQUIVALENCE) >= 60 and len({(g, p) for g, p, _ in EQUIVALENCE}) == len(EQUIVALENCE)


@pytest.mark.parametrize("gold,pred,expected", EQUIVALENCE)
def test_equivalence(verdicts, gold, pred, expected):
    assert verdicts[(gold, pred)] is expected


def test_a_number_100_times_off_is_wrong_without_a_percent_sign(pool):
    # the percent rule equates 25% with 0.25, and nothing else: without a % on one side, 100x off is wrong
    for response, gold in ((r"\boxed{500}", "5"), (r"\boxed{25}", "0.25"), (r"\boxed{0.05}", "5"),
                           (r"\boxed{5}", "500")):
        assert not grade(response, gold, pool), (response, gold)
    assert grade(r"\boxed{25\%}", "0.25", pool) and grade(r"\boxed{0.25}", r"25\%", pool)


def test_no_box_scores_zero_even_with_the_right_number(pool):
    assert grade("The answer is 42", "42", pool) is False


def test_blank_or_punctuation_only_answers_are_never_correct(pool):
    # math_train.jsonl holds rows whose gold answer is "": an empty box must not earn the reward there
    for response in (r"\boxed{}", r"\boxed{.}", r"\boxed{ }", r"\boxed{\text{}}", r"\boxed{0}", r"\boxed{-}"):
        assert not grade(response, "", pool), response
        assert not grade(response, "  ", pool), response
    for response, gold in ((r"\boxed{}", "5"), (r"\boxed{.}", "."), (r"\boxed{,}", ","), (r"\boxed{-}", "-")):
        assert not grade(response, gold, pool), (response, gold)
    # symbols are content: these were graded right before the rule and still are
    for response, gold in ((r"\boxed{\infty}", r"\infty"), (r"\boxed{B}", r"\text{(B)}"), ("\\boxed{\u221e}", "\u221e"),
                           ("\\boxed{\u2205}", "\u2205"), (r"\boxed{\{\}}", r"\{\}"), ("\\boxed{90\u00b0}", "90")):
        assert grade(response, gold, pool), (response, gold)


def test_loading_skips_rows_with_a_blank_answer_and_names_them(capsys):
    from data import load_problems

    file = SHARED_DATA / "train" / "math_train.jsonl"
    if not file.is_file():
        pytest.skip(f"{file} not present")
    rows = [json.loads(line) for line in file.open()]
    blank = [r["id"] for r in rows if not r["answer"].strip()]
    assert blank == ["math-5341", "math-5343"]  # the real file's two
    problems = load_problems(file)
    assert len(problems) == len(rows) - 2 and all(p["answer"].strip() for p in problems)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 2 row(s)" in err and "math-5341, math-5343" in err


def test_grading_works_from_a_thread(pool):
    # math-verify's signal-based timeouts fail outside the main thread; ours must not depend on them.
    result = []
    thread = threading.Thread(target=lambda: result.append(grade(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", pool)))
    thread.start()
    thread.join(60)
    assert result == [True]


def test_normalize_keeps_the_value():
    assert normalize(r"\left( \dfrac{1}{2}, 3 \right)")[0] == r"(\frac{1}{2},3)"
    assert normalize(r"50\%") == ("50", True)


# ---------------------------------------------------------------------------------------------------
# Real data: the MATH training solutions


@pytest.fixture(scope="module")
def math_train():
    file = SHARED_DATA / "train" / "math_train.jsonl"
    if not file.is_file():
        pytest.skip(f"{file} not present")
    return [json.loads(line) for line in file.open()]


def test_math_solutions_are_accepted_against_their_own_answers(math_train, pool):
    grades = grade_batch([r["solution"] for r in math_train], [r["answer"] for r in math_train], pool)
    rate = sum(grades.correct) / len(math_train)
    print(f"\nMATH train: {sum(grades.correct)}/{len(math_train)} solutions accepted against their own "
          f"answer ({rate:.2%}); timeouts {grades.timeouts}, errors {grades.errors}")
    # every row that has an answer (a check killed at its timeout on a loaded machine aside); none of the
    # rows whose answer is blank, whatever their solution boxes
    rejected = [r["id"] for r, ok in zip(math_train, grades.correct) if r["answer"].strip() and not ok]
    assert len(rejected) <= grades.timeouts, rejected
    assert not any(ok for r, ok in zip(math_train, grades.correct) if not r["answer"].strip())


def test_math_solutions_are_rejected_against_other_answers(math_train, pool):
    # Each solution against the answer of a random other problem whose answer differs (as text, and
    # as a number where both are numbers: "48" and "48.0" are the same answer).
    def same(a, b):
        try:
            return float(a) == float(b)
        except ValueError:
            return a.replace(" ", "") == b.replace(" ", "")

    rng = random.Random(0)
    others = []
    for row in math_train:
        other = rng.choice(math_train)
        while same(other["answer"], row["answer"]):
            other = rng.choice(math_train)
        others.append(other["answer"])
    grades = grade_batch([r["solution"] for r in math_train], others, pool)
    rate = sum(grades.correct) / len(math_train)
    print(f"\nMATH train: {sum(grades.correct)}/{len(math_train)} solutions accepted against another "
          f"problem's answer ({rate:.3%}); timeouts {grades.timeouts}, errors {grades.errors}")
    assert rate <= 0.002


# ---------------------------------------------------------------------------------------------------
# Hostile input


def test_hostile_responses_score_zero_quickly_and_execute_nothing(tmp_path):
    marker = tmp_path / "pwned"
    pool = GraderPool(workers=2, timeout=2.0)
    try:
        hostile = [
            "x" * 100_000 + r"\boxed{" + "9" * 50,  # long, unbalanced
            r"\boxed{" * 5000,  # many unclosed boxes
            r"\boxed{{{{{{{{}" + "}" * 3,
            bytes(range(256)).decode("latin-1") * 300 + r"\boxed{\x00\xff}",
            r"\boxed{9^{9^{9^{9}}}}",  # sympy would try to compute it
            rf"\boxed{{__import__('os').system('touch {marker}')}}",
            rf"\boxed{{\text{{__import__('pathlib').Path('{marker}').touch()}}}}",
            rf"\boxed{{eval(\"open('{marker}','w')\")}}",
            r"\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
            r"\boxed{\frac{1}{0}}",
        ]
        start = time.monotonic()
        grades = grade_batch(hostile, ["3"] * len(hostile), pool)
        elapsed = time.monotonic() - start
        assert grades.correct == [False] * len(hostile)
        assert not marker.exists()
        # two workers, each item at most one 2 s timeout (plus a worker restart after a kill)
        assert elapsed < 60
        assert grade(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", pool)  # the pool still works
    finally:
        pool.close()


def test_a_timeout_kills_and_replaces_the_worker():
    pool = GraderPool(workers=1, timeout=1.0)
    try:
        grades = grade_batch([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\sqrt{8}}"], ["3", r"2\sqrt{2}"], pool)
        assert grades.correct == [False, True]
        assert grades.timeouts == 1 and pool.timeouts == 1
    finally:
        pool.close()


def test_a_worker_that_dies_while_idle_is_replaced():
    with GraderPool(workers=1, timeout=5.0) as pool:
        assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", pool)
        pool._workers[0].process.kill()  # as the kernel's OOM killer might
        pool._workers[0].process.wait()
        assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", pool)
        assert not grade(r"\boxed{\sqrt{8}}", r"3\sqrt{2}", pool)


def test_an_interrupted_run_leaves_no_stale_verdict_behind():
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    with GraderPool(workers=2, timeout=5.0) as pool:
        grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", pool)  # workers up
        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            with pytest.raises(KeyboardInterrupt):  # a slow item and a true one are in flight
                grade_batch([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\sqrt{8}}"], ["3", r"2\sqrt{2}"], pool)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        grades = grade_batch([r"\boxed{\sqrt{7}}", r"\boxed{\sqrt{5}}"], [r"2\sqrt{2}", r"2\sqrt{2}"], pool)
        assert grades.correct == [False, False]


def test_workers_that_cannot_start_raise_with_their_error(tmp_path, monkeypatch):
    (tmp_path / "math_verify.py").write_text("raise ImportError('broken math_verify install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with GraderPool(workers=1) as pool:
        with pytest.raises(RuntimeError, match="(?s)failed to start.*broken math_verify install"):
            grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", pool)


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a dead worker whose new parent has not reaped it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_die_with_a_parent_killed_mid_grade():
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    parent = f"""
import sys, threading, time
sys.path.insert(0, {root!r})
from grader_pool import GraderPool
from rewards import grade_batch
pool = GraderPool(workers=2, timeout=600)
def report():  # once both workers hold an item that takes minutes, say who they are
    while len(pool._workers) < 2 or not all(w.job for w in pool._workers):
        time.sleep(0.05)
    print(" ".join(str(w.process.pid) for w in pool._workers), flush=True)
threading.Thread(target=report, daemon=True).start()
grade_batch([r"\\boxed{{9^{{9^{{9^{{9}}}}}}}}", r"\\boxed{{(10^{{100}})!}}"], ["3", "4"], pool)
"""
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        time.sleep(0.5)  # well inside the symbolic checks
        assert all(_running(pid) for pid in workers)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if _running(pid)]
    for pid in alive:  # do not leave them burning the CPU of the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"grading workers {alive} outlived their killed parent"


def test_a_dropped_pool_takes_its_workers_with_it():
    import gc

    pool = GraderPool(workers=2)
    grade_batch([r"\boxed{\sqrt{8}}", r"\boxed{\sqrt{2}}"], [r"2\sqrt{2}", r"\sqrt{2}"], pool)
    processes = [w.process for w in pool._workers]
    del pool
    gc.collect()
    for p in processes:
        assert p.wait(timeout=10) is not None


def test_without_math_verify_symbolic_items_grade_wrong_with_a_warning(monkeypatch, capsys):
    import grader_pool

    monkeypatch.setattr(grader_pool, "_SYMBOLIC", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    grades = grade_batch([r"\boxed{\sqrt{2}/2}", r"\boxed{0.5}"], [r"\frac{\sqrt{2}}{2}", "1/2"], GraderPool())
    assert grades.correct == [False, True]  # the second is settled by exact rationals, no symbolic check
    assert grades.errors == 1
    assert "math-verify is not installed" in capsys.readouterr().err
