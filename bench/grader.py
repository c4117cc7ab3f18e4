"""Grader throughput on real data: responses graded per second, one process vs the worker pool.

    python bench/grader.py [--workers N] [--limit N]

Input: the MATH training solutions in ../shared/data/train/math_train.jsonl, each graded against its
own answer (mostly settled by the cheap string/number checks) and against another problem's answer
(mostly settled by the symbolic check, the expensive path). "One process" runs exactly the same
checks in this process, one after another, with no timeout protection; "pool" is `grade_batch`
with a GraderPool of N workers (startup included: it is paid once per run).
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewards import GraderPool, extract_answer, grade_batch, quick_verdict, symbolic_equal  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "math_train.jsonl"


def one_process(responses, answers):
    correct = 0
    for response, answer in zip(responses, answers):
        pred = extract_answer(response)
        if pred is None:
            continue
        verdict = quick_verdict(pred, answer)
        correct += verdict if verdict is not None else symbolic_equal(pred.replace("$", ""), answer.replace("$", ""))
    return correct


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--limit", type=int, default=2000, help="problems per set (the file has 7500)")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared MATH training set")
    rows = [json.loads(line) for line in DATA.open()][: args.limit]
    rng = random.Random(0)
    other = [rng.choice([r for r in rows[:200] if r["answer"] != row["answer"]])["answer"] for row in rows]
    sets = {"own answer": [r["answer"] for r in rows], "other answer": other}
    responses = [r["solution"] for r in rows]
    print(f"{len(rows)} MATH solutions per set; {os.cpu_count()} CPUs; pool of {args.workers} workers")
    print("| set | one process (responses/s) | pool (responses/s) | speed-up | accepted (1 proc / pool) |")
    print("|---|---|---|---|---|")
    one_process(responses[:100], sets["other answer"][:100])  # warm-up: imports, regex and sympy caches
    for name, answers in sets.items():
        start = time.perf_counter()
        accepted_single = one_process(responses, answers)
        single = len(rows) / (time.perf_counter() - start)
        pool = GraderPool(workers=args.workers)
        start = time.perf_counter()
        grades = grade_batch(responses, answers, pool)
        parallel = len(rows) / (time.perf_counter() - start)
        pool.close()
        print(f"| {name} | {single:,.0f} | {parallel:,.0f} | {parallel / single:.2f}x | "
              f"{accepted_single} / {sum(grades.correct)} |")


if __name__ == "__main__":
    main()
