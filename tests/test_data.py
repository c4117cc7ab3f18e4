"""data.py: the synthetic arithmetic task (its solutions are right, by Python's arithmetic and by the
project's own grader) and the tokenizer (round trips, single-token words, chat template)."""

from pathlib import Path


from data import ARITHMETIC_NOTIONS, ARITHMETIC_WORDS, arithmetic_problems, arithmetic_solution, build_char_tokenizer
from rewards import extract_answer, grade

from conftest import child_env


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
    assert len(ids) == len(text) - text.count("borrow") * 5 - text.count("\\boxed{") * 6 - len('"math_notion"') \
        - len('"pass_rate"') + 2
    assert "<unk>" not in pieces
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "7+5"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\n7+5<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_ids_do_not_depend_on_the_process(tmp_path):
    """Words of equal length once got ids in set order, which Python randomizes per process: the same
    seed then trained different models. Two processes with different hash seeds must agree."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for hash_seed in ("0", "1"):
        code = (f"from data import ARITHMETIC_WORDS, build_char_tokenizer; "
                f"build_char_tokenizer({str(tmp_path / hash_seed)!r}, words=ARITHMETIC_WORDS)")
        subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                       env=child_env(PYTHONHASHSEED=hash_seed))
    vocab = [json.loads((tmp_path / s / "tokenizer.json").read_text())["model"]["vocab"] for s in ("0", "1")]
    assert vocab[0] == vocab[1]


def test_an_uninformative_meta_response_fits_the_demo_budget_and_parses(tmp_path):
    import random

    from config import load_config
    from masa import uninformative_meta_target
    from rewards import parse_meta

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    G, budget = cfg.rollout.group_size, cfg.rollout.max_response_tokens
    tokenizer = build_char_tokenizer(tmp_path / "tok", words=ARITHMETIC_WORDS)
    rng = random.Random(0)
    for _ in range(200):
        text = uninformative_meta_target(rng, G, budget, ARITHMETIC_NOTIONS)
        assert len(tokenizer.encode(text, add_special_tokens=False)) + 1 <= budget  # + end of turn
        assert parse_meta(text, G, budget) is not None


def test_a_system_message_goes_before_the_user_message_in_the_chat_template(tmp_path):
    from data import chat_ids

    tokenizer = build_char_tokenizer(tmp_path / "tok")
    expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n7+5<|im_end|>\n" \
               "<|im_start|>assistant\n"  # ChatML, as masa_rl_dataset.py:312-314 builds the meta prompt
    assert chat_ids(tokenizer, "7+5", "You are a helpful assistant.") == tokenizer.encode(expected)
    assert tokenizer.decode(chat_ids(tokenizer, "7+5")) == "<|im_start|>user\n7+5<|im_end|>\n<|im_start|>assistant\n"


def test_responses_stop_at_the_models_end_of_sequence_and_by_default_at_end_of_turn_too(tmp_path):
    # vLLM, and so the released code (its SamplingParams name no stop tokens: vllm_rollout_spmd.py:191-205),
    # stops at the tokenizer's eos token and generation_config.json's eos_token_id; a base model names
    # <|endoftext|> there and its chat-formatted answers end with <|im_end|>
    import json

    from transformers import AutoTokenizer

    from data import stop_token_ids

    build_char_tokenizer(tmp_path / "tok").save_pretrained(tmp_path / "base")
    base = AutoTokenizer.from_pretrained(tmp_path / "base", eos_token="<|endoftext|>")
    base.save_pretrained(tmp_path / "base")
    end_of_text, end_of_turn, start = base.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
    base = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert base.eos_token_id == end_of_text
    assert stop_token_ids(base, end_of_turn=False) == (end_of_text,)
    assert stop_token_ids(base) == tuple(sorted((end_of_text, end_of_turn)))
    # an eos id named only by generation_config.json stops a response too (a list of them, here)
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, start]}))
    base = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert stop_token_ids(base, end_of_turn=False) == tuple(sorted((end_of_text, start)))
    assert stop_token_ids(base) == tuple(sorted((end_of_text, end_of_turn, start)))


def test_long_multiplication_is_right_line_by_line_and_by_the_grader():
    import re

    from data import MULTIPLICATION_WORDS, multiplication_problems, multiplication_solution

    assert multiplication_solution(987, 65).splitlines() == [
        "7*5+0=35carry3", "8*5+3=43carry4", "9*5+4=49carry4", "partial4935",
        "7*6+0=42carry4", "8*6+4=52carry5", "9*6+5=59carry5", "partial59220",
        "5+0+0=5carry0", "3+2+0=5carry0", "9+2+0=11carry1", "4+9+1=14carry1", "0+5+1=6carry0", r"\boxed{64155}"]
    rows = multiplication_problems(300, seed=5)
    assert {r["difficulty"] for r in rows[:6]} == {"1x1", "2x1", "3x1", "1x2", "2x2", "3x2"}
    for r in rows:
        a, b = map(int, r["problem"].split("*"))
        assert r["difficulty"] == f"{len(str(a))}x{len(str(b))}" and int(r["answer"]) == a * b
        assert grade(r["solution"], r["answer"]) and not grade(r["solution"], str(a * b + 1))
        for x, y, c, t, k in re.findall(r"^(\d)\*(\d)\+(\d)=(\d+)carry(\d)$", r["solution"], re.M):
            assert int(x) * int(y) + int(c) == int(t) and int(k) == int(t) // 10
        assert ("partial" in r["solution"]) == (b >= 10)
    assert multiplication_problems(50, seed=5) == rows[:50]
    assert "partial" in MULTIPLICATION_WORDS and "carry" in MULTIPLICATION_WORDS


def test_long_multiplication_solutions_are_several_times_longer_than_a_meta_response(tmp_path):
    # the point of the long task (configs/tiny_multiply.yaml): what gating and cutoff save is large
    # next to what the meta path costs
    import random
    import statistics

    from config import load_config
    from data import MULTIPLICATION_NOTIONS, MULTIPLICATION_WORDS, multiplication_problems
    from masa import uninformative_meta_target

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_multiply.yaml")
    tokenizer = build_char_tokenizer(tmp_path / "tok", words=MULTIPLICATION_WORDS)
    length = lambda text: len(tokenizer.encode(text, add_special_tokens=False)) + 1  # noqa: E731 (the end token)
    rng = random.Random(0)
    meta = [length(uninformative_meta_target(rng, cfg.rollout.group_size, cfg.rollout.max_response_tokens,
                                             MULTIPLICATION_NOTIONS)) for _ in range(200)]
    rows = multiplication_problems(600, seed=0, digits=tuple(cfg.data.arithmetic_digits),
                                   multiplier_digits=tuple(cfg.data.multiplier_digits))
    solutions = {d: [length(r["solution"]) for r in rows if r["difficulty"] == d] for d in ("1x1", "3x2")}
    assert statistics.median(meta) <= 35
    assert statistics.median(solutions["3x2"]) >= 4 * statistics.median(meta)
    assert max(solutions["3x2"]) < cfg.rollout.max_response_tokens  # the budget leaves room to run long
    assert statistics.median(solutions["1x1"]) < statistics.median(meta)  # and lengths spread widely
