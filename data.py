"""Datasets: problem sets from JSONL or parquet, and a character-level tokenizer for tiny models.

    problems = load_problems("data/deepscaler.jsonl")            # [{"problem": ..., "answer": ...}, ...]
    problems = load_problems("bench.parquet", problem_key="question", answer_key="solution_value")

A row missing a field is an error that names the file, the row number and the field. Every row is
returned as a dict with "problem" and "answer" (strings) plus whatever else the row held.

`build_char_tokenizer` writes a tokenizer whose tokens are single characters, with Qwen's special
tokens and chat template, saved so that transformers.AutoTokenizer loads it exactly like a real
model's tokenizer: tests and the CPU demo run the same tokenization code as a Qwen3 run.

`chat_ids` and `stop_token_ids` are the two places where token ids meet text for the model: the
trainer and the evaluation build prompts and stop conditions the same way.

Not here yet: the synthetic CPU task (a later issue).
"""

from __future__ import annotations

import json
import string
from pathlib import Path


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
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, row {number}: not valid JSON ({e})") from e
    problems = []
    for number, row in enumerate(rows, 1):
        for key in (problem_key, answer_key):
            if not isinstance(row, dict) or row.get(key) is None:
                raise ValueError(f"{path}, row {number}: missing field {key!r}; rows need {problem_key!r} and "
                                 f"{answer_key!r} (set data.problem_key / data.answer_key for other names)")
        problems.append({**row, "problem": str(row[problem_key]), "answer": str(row[answer_key])})
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer(path: str | Path, characters: str | None = None):
    """Save a character-level tokenizer (Qwen's special tokens, ChatML template, <|im_end|> as end of
    turn) to `path` and return it as loaded back by AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    characters = characters or "".join(c for c in string.printable if c not in "\x0b\x0c\r")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(set(characters)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user message wrapped in the tokenizer's chat template, ready for the answer."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """End of text and end of turn: a response stops at either (Qwen3 base models end with the first,
    chat-formatted answers with the second)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return tuple(sorted(i for i in ids if i is not None))
