"""data.py: the synthetic arithmetic task (its solutions are right, by Python's arithmetic and by the
project's own grader) and the tokenizer (round trips, single-token words, chat template)."""

import pytest

from data import ARITHMETIC_WORDS, arithmetic_problems, arithmetic_solution, build_char_tokenizer
from rewards import extract_answer, grade


def test_worked_examples_from_the_design():
    assert arithmetic_solution(14, 98, "+").splitlines() == ["4+8+0=12carry1", "1+9+1=11carry1", r"\boxed{112}"]
    assert arithmetic_solution(100, 1, "-").splitlines() == ["0-1-0=9borrow1", "0-0-1=9borrow1", "1-0-1=0borrow0",
                                                            r"\boxed{99}"]


def test_problems_are_correct_and_spread_over_difficulties():
    rows = arithmetic_problems(400, seed=3)
    assert [r["difficulty"] for r in rows[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    for r in rows:
        a, op, b = (r["problem"].partition("+") if "+" in r["problem"] else r["problem"].partition("-"))
        a, b = int(a), int(b)
        assert len(str(a)) == len(str(b)) == r["difficulty"]
        assert int(r["answer"]) == (a + b if op == "+" else a - b) >= 0
        assert extract_answer(r["solution"]) == r["answer"]
        assert grade(r["solution"], r["answer"])
        lines = r["solution"].splitlines()[:-1]
        assert len(lines) == max(len(str(a)), len(str(b)))
        assert all(("carry" in line) == (op == "+") and ("borrow" in line) == (op == "-") for line in lines)
    assert arithmetic_problems(50, seed=3) == rows[:50]  # deterministic


def test_tokenizer_keeps_words_whole_and_round_trips(tmp_path):
    tokenizer = build_char_tokenizer(tmp_path / "tok", words=ARITHMETIC_WORDS)
    text = arithmetic_solution(507, 98, "-") + "\n\n" + '{"math_notion": ["borrow"], "pass_rate": 3}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces.count("borrow") == text.count("borrow") and "\\boxed{" in pieces
    assert len(ids) == len(text) - text.count("borrow") * 5 - text.count("\\boxed{") * 6
    assert "<unk>" not in pieces
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "7+5"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\n7+5<|im_end|>\n<|im_start|>assistant\n"
