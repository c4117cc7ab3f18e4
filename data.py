"""Datasets: problem sets from JSONL or parquet, and a character-level tokenizer for tiny models.

    problems = load_problems("data/deepscaler.jsonl")            # [{"problem": ..., "answer": ...}, ...]
    problems = load_problems("bench.parquet", problem_key="question", answer_key="solution_value")

A row missing a field is an error that names the file, the row number and the field. Every row is
returned as a dict with "problem" and "answer" (strings) plus whatever else the row held.
`step_problems` picks the problems of one training step for one rank (seeded epochs).

`build_char_tokenizer` writes a tokenizer whose tokens are single characters, with Qwen's special
tokens and chat template, saved so that transformers.AutoTokenizer loads it exactly like a real
model's tokenizer: tests and the CPU demo run the same tokenization code as a Qwen3 run.

`chat_ids` and `stop_token_ids` are the two places where token ids meet text for the model: the
trainer and the evaluation build prompts and stop conditions the same way (the trainer's two
prompts: masa_step.solution_prompt_ids and meta_prompt_ids).

The synthetic task of the CPU demo lives here too: column addition and subtraction whose reference
solutions name their notions ("carry", "borrow"), with difficulty set by the number of digits.
"""

from __future__ import annotations

import functools
import json
import string
import sys
from pathlib import Path

import numpy as np

from rewards import has_content


class DataError(ValueError):
    """A problem file (or the problems a config asks for) the user must fix; the message says what and how."""


def load_problems(path: str | Path, problem_key: str = "problem", answer_key: str = "answer") -> list[dict]:
    """Rows of a JSONL or parquet file, each with string fields "problem" and "answer"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {str(path)!r} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency, only for parquet files

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}, row {number}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1}); problem files must be UTF-8 JSON lines") from None
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, row {number}: not valid JSON ({e})") from e
    problems, blank = [], []
    for number, row in enumerate(rows, 1):
        for key in (problem_key, answer_key):
            if not isinstance(row, dict) or row.get(key) is None:
                raise DataError(f"{path}, row {number}: missing field {key!r}; rows need {problem_key!r} and "
                                 f"{answer_key!r} (set data.problem_key / data.answer_key for other names)")
        if not has_content(str(row[answer_key])):  # nothing any response could be graded right against
            blank.append(str(row.get("id", f"row {number}")))
            continue
        problems.append({**row, "problem": str(row[problem_key]), "answer": str(row[answer_key])})
    if blank:
        print(f"warning: {path}: skipped {len(blank)} row(s) whose {answer_key!r} is blank (or only punctuation), "
              f"so no answer could be graded right: {', '.join(blank[:5])}{', ...' if len(blank) > 5 else ''}", file=sys.stderr)
    if not problems:
        raise DataError(f"{path} holds no problems" + (" with an answer" if blank else ""))
    return problems


def training_problems(cfg, fits, verbose: bool = True) -> list[dict]:
    """The problems a run trains on (cfg: config.Config): generated with the run's seed for
    data.source: arithmetic (the CPU demo) or multiplication, else read from data.train_path; those whose prompts do not
    fit rollout.max_prompt_tokens (`fits(problem text)` is False: masa_step.prompts_fit) are dropped,
    with a note."""
    if cfg.data.source != "file":
        problems = synthetic_problems(cfg.data, cfg.data.arithmetic_count, cfg.train.seed)
    else:
        problems = load_problems(cfg.data.train_path, cfg.data.problem_key, cfg.data.answer_key)
    kept = [p for p in problems if fits(p["problem"])]
    if not kept:
        raise DataError(f"no problem in {cfg.data.train_path} fits rollout.max_prompt_tokens="
                         f"{cfg.rollout.max_prompt_tokens} (meta prompt included); raise the limit")
    if verbose and len(kept) < len(problems):
        print(f"dropped {len(problems) - len(kept)} of {len(problems)} problems whose prompts exceed "
              f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
    return kept


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer(path: str | Path, characters: str | None = None, words: list[str] = ()):
    """Save a character-level tokenizer (Qwen's special tokens, ChatML template, <|im_end|> as end of
    turn) to `path` and return it as loaded back by AutoTokenizer. `words` become single tokens
    (e.g. "carry", "\\boxed{"), matched before single characters."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    characters = characters or "".join(c for c in string.printable if c not in "\x0b\x0c\r")
    words = sorted(set(words), key=lambda w: (-len(w), w))  # longest first, so "carry" wins over "c"; ids
    # must not depend on set order (hash-randomized per process)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words + sorted(set(characters) - set(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join([re.escape(w) for w in words] + [r"[\s\S]"])  # any character, newlines included
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# The synthetic task of the CPU demo (docs/method.md §5)

ARITHMETIC_NOTIONS = ["carry", "borrow"]
# Single tokens of the demo's tokenizer: solutions stay short and notions stay visible, and a meta
# response (`<meta></meta>` and its JSON object) takes about 32 tokens, well inside the response budget.
FORMAT_WORDS = ["\\boxed{", "<meta>", "</meta>", '"math_notion"', '"pass_rate"', '"solution_length"']
ARITHMETIC_WORDS = [*ARITHMETIC_NOTIONS, *FORMAT_WORDS]


def arithmetic_solution(a: int, b: int, op: str) -> str:
    """Column arithmetic, right to left, one line per column: `4+8+1=13carry1` (digits, the carry in,
    their sum, the carry out) or `0-1-1=8borrow1` (digits, the borrow in, the result digit, the borrow
    out), then the boxed answer. Leading zeros of the shorter number are written."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    lines, flow = [], 0
    for x, y in zip(map(int, da), map(int, db)):
        if op == "+":
            total = x + y + flow
            lines.append(f"{x}+{y}+{flow}={total}carry{total // 10}")
            flow = total // 10
        else:
            diff = x - y - flow
            lines.append(f"{x}-{y}-{flow}={diff % 10}borrow{int(diff < 0)}")
            flow = int(diff < 0)
    answer = a + b if op == "+" else a - b
    return "\n".join(lines) + f"\n\\boxed{{{answer}}}"


def arithmetic_problems(count: int, seed: int, digits: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict]:
    """`count` problems "a+b" or "a-b" (a >= b), difficulty d = the number of digits of both operands,
    spread evenly over `digits`; rows like load_problems returns, with "solution" and "difficulty"."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        d = digits[i % len(digits)]
        low = 0 if d == 1 else 10 ** (d - 1)
        a, b = rng.randint(low, 10 ** d - 1), rng.randint(low, 10 ** d - 1)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        rows.append({"id": f"arith-{seed}-{i}", "problem": f"{a}{op}{b}", "answer": str(a + b if op == "+" else a - b),
                     "solution": arithmetic_solution(a, b, op), "difficulty": d})
    return rows


# The long task (bench/efficiency.py): column multiplication, whose written-out solutions are several
# times longer than a meta response and whose difficulty (the digit counts) is visible in the problem,
# so that predictive gating and early cutoff have something to save, as at the paper's scale.
MULTIPLICATION_NOTIONS = ["carry", "partial"]
MULTIPLICATION_WORDS = [*MULTIPLICATION_NOTIONS, *FORMAT_WORDS]


def multiplication_solution(a: int, b: int) -> str:
    """Long multiplication, one line per digit product, right to left: `7*4+2=30carry3` (a digit of a,
    the digit of b, the carry in, their total, the carry out). A multiplier of several digits writes
    each shifted partial product (`partial860`) and then adds them column by column as
    arithmetic_solution does (two partials; more are added into a running sum). Then the boxed answer."""
    lines, total = [], 0
    for j, y in enumerate(map(int, str(b)[::-1])):
        carry, digits = 0, ""
        for x in map(int, str(a)[::-1]):
            t = x * y + carry
            lines.append(f"{x}*{y}+{carry}={t}carry{t // 10}")
            carry, digits = t // 10, str(t % 10) + digits
        partial = int(str(carry) + digits) * 10 ** j
        if len(str(b)) > 1:
            lines.append(f"partial{partial}")
            if j:
                lines += arithmetic_solution(total, partial, "+").splitlines()[:-1]
        total += partial
    assert total == a * b
    return "\n".join(lines) + f"\n\\boxed{{{a * b}}}"


def multiplication_problems(count: int, seed: int, digits: tuple[int, ...] = (1, 2, 3),
                            multiplier_digits: tuple[int, ...] = (1, 2)) -> list[dict]:
    """`count` problems "a*b", a of d digits and b of e, spread evenly over every (d, e) of `digits` x
    `multiplier_digits`; difficulty "dxe". Rows like arithmetic_problems'."""
    import random

    rng = random.Random(seed)
    pairs = [(d, e) for e in multiplier_digits for d in digits]
    rows = []
    for i in range(count):
        d, e = pairs[i % len(pairs)]
        a, b = (rng.randint(1 if n == 1 else 10 ** (n - 1), 10 ** n - 1) for n in (d, e))
        rows.append({"id": f"mul-{seed}-{i}", "problem": f"{a}*{b}", "answer": str(a * b),
                     "solution": multiplication_solution(a, b), "difficulty": f"{d}x{e}"})
    return rows


# Per generated task: the words its tokenizer keeps whole, and the notions its solutions name.
TASK_WORDS = {"arithmetic": ARITHMETIC_WORDS, "multiplication": MULTIPLICATION_WORDS}
TASK_NOTIONS = {"arithmetic": ARITHMETIC_NOTIONS, "multiplication": MULTIPLICATION_NOTIONS}


def synthetic_problems(data, count: int, seed: int) -> list[dict]:
    """`count` generated problems of data.source (data: config.DataConfig): arithmetic or multiplication."""
    if data.source == "multiplication":
        return multiplication_problems(count, seed, tuple(data.arithmetic_digits), tuple(data.multiplier_digits))
    return arithmetic_problems(count, seed, tuple(data.arithmetic_digits))


def held_out_problems(data, count: int, seed: int, training: list[dict]) -> list[dict]:
    """`count` problems of data.source drawn with `seed`, none of which is in `training` (compared as
    text). One-digit arithmetic problems rarely survive: there are only 155 of them and a few thousand
    training problems hold all."""
    seen = {p["problem"] for p in training}
    fresh = [p for p in synthetic_problems(data, 4 * count, seed) if p["problem"] not in seen]
    if len(fresh) < count:
        raise DataError(f"only {len(fresh)} of {4 * count} drawn problems are new: lower the count or add digits")
    return fresh[:count]


def step_problems(problems: list[dict], cfg, step: int, rank: int, world: int) -> list[dict]:
    """This rank's contiguous share of step `step`'s B problems (cfg: config.Config; a prompt's group
    never spans ranks): epochs are seeded permutations of the data."""
    B, n = cfg.train.batch_size, len(problems)
    share = B // world
    out = []
    for i in range(step * B + rank * share, step * B + (rank + 1) * share):
        epoch, index = divmod(i, n)
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(n) if cfg.data.shuffle else range(n)
        out.append(problems[order[index]])
    return out


def chat_ids(tokenizer, text: str, system: str = "") -> list[int]:
    """Token ids of one user message (after a system message, if `system` is given) wrapped in the
    tokenizer's chat template, ready for the answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


@functools.lru_cache(maxsize=8)
def stop_token_ids(tokenizer, end_of_turn: bool = True) -> tuple[int, ...]:
    """The ids a response stops at: the model's end of sequence, as vLLM (and so the released code)
    reads it, the tokenizer's eos token and the eos_token_id of the generation_config.json beside the
    tokenizer; with `end_of_turn` also end of text and end of turn, whatever the model names (Qwen3
    base models end with the first, chat-formatted answers with the second)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(tokenizer.name_or_path, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids = {tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])}
    if end_of_turn:
        for token in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.add(i)
    return tuple(sorted(i for i in ids if i is not None))
