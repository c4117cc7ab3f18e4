"""The paper's data in one command: DeepScaleR-Preview for training and the benchmarks the paper
reports, downloaded from the Hugging Face hub and written as this project's problem files (JSONL rows
with "problem" and "answer").

    python prepare_data.py                  # every dataset that needs no token, into data/ and data/bench/
    python prepare_data.py aime24 math500   # some of them
    python prepare_data.py gpqa_diamond     # gated: accept its terms on the hub, then `hf auth login`
    python prepare_data.py --help           # the datasets, their sources, sizes and licences

`data/deepscaler.jsonl` is the path configs/qwen3_8b*.yaml train on, `data/bench/<name>.jsonl` what
`eval.py --benchmarks <name>` reads. Each file is converted from the source's own fields (a list of
answers, GSM8K's answer after `####`, GPQA's four options), its row count checked against the size
the source is known to have, and written atomically; a file that is already there with that many rows
is left alone, so a rerun does nothing. Downloads go through the Hugging Face cache (huggingface_hub,
HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE as usual). Parquet sources need pyarrow
(`pip install -e '.[parquet]'`).

A module of its own, a command like train.py and eval.py: it is the one place that downloads data,
and what it knows about each source (its repository, files, fields and size) is also what train.py
and eval.py quote when a file is missing (command_for). data.py reads problem files and never
touches the network.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import random
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TRAIN_DIR, BENCH_DIR = Path("data"), Path("data/bench")  # the configs' data.train_path and eval.py's --data-dir

# ---------------------------------------------------------------------------------------------------
# Each source's rows, converted: field names and answer formats as on the dataset cards


def _number(value) -> str:
    """An answer as text; a float that holds an integer (AMC answers stored as 27.0) without its '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _problem_answer(problem_key: str, *keep: str) -> Callable[[dict, int], dict]:
    """The converter of a source whose rows hold the problem under `problem_key` and the answer under
    "answer"; the fields `keep` are carried over where a row has them."""
    def convert(row: dict, index: int) -> dict:
        return {"problem": row[problem_key], "answer": _number(row["answer"]), **{k: row[k] for k in keep if k in row}}
    return convert


def olympiadbench(row: dict, index: int) -> dict:
    """`final_answer` is a list of LaTeX strings with their `$` delimiters ("$69$,$84$"): joined with
    ", " and the unescaped `$` removed. The released evaluation graded against the first element only."""
    answers = [re.sub(r"(?<!\\)\$", "", a).strip() for a in row["final_answer"]]
    return {"problem": row["question"], "answer": ", ".join(answers),
            **{k: row[k] for k in ("answer_type", "is_multiple_answer", "unit") if k in row}}


def gsm8k(row: dict, index: int) -> dict:
    """`answer` is the worked solution ending in "#### N" (N may carry thousands separators)."""
    solution, marker, answer = row["answer"].rpartition("####")
    if not marker:
        raise ValueError(f"GSM8K row {index}: its answer has no '####'")
    return {"problem": row["question"], "answer": answer.strip().replace(",", ""), "solution": solution.strip()}


LETTERS = "ABCD"


def gpqa(row: dict, index: int) -> dict:
    """The question and its four options in an order drawn from the row's index, so the correct letter
    varies from row to row; the answer is that letter. (The released evaluation reseeded one global
    generator with 42 before every question: the same permutation each time, so the correct option sat
    under the same letter in all 198.)"""
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = random.Random(index).sample(range(4), 4)
    listed = "\n".join(f"({LETTERS[i]}) {options[o].strip()}" for i, o in enumerate(order))
    return {"problem": f"{row['Question'].strip()}\n\n{listed}\n\nAnswer with the letter of the correct option.",
            "answer": LETTERS[order.index(0)], "record_id": row.get("Record ID", "")}


# ---------------------------------------------------------------------------------------------------
# The datasets


@dataclass(frozen=True)
class Source:
    name: str  # the file written: <train-dir>/<name>.jsonl for training data, <bench-dir>/<name>.jsonl for a benchmark
    title: str
    repo: str  # the Hugging Face dataset id
    files: tuple[str, ...]  # the files that hold the split, read in this order: each a pattern (`*` spans folders),
    #                         or alternatives "a|b", the first that matches taken (a repository may switch formats)
    rows: int  # the split's known size: the converted file must have exactly this many rows
    convert: Callable[[dict, int], dict]  # (a source row, its index) -> {"problem", "answer", ...}
    licence: str
    training: bool = False
    gated: bool = False  # the hub asks for a token and accepted terms


SOURCES = {s.name: s for s in [
    Source("deepscaler", "DeepScaleR-Preview (training set)", "agentica-org/DeepScaleR-Preview-Dataset",
           ("deepscaler.json",), 40315, _problem_answer("problem", "solution"), "MIT", training=True),
    Source("aime24", "AIME 2024", "HuggingFaceH4/aime_2024", ("data/train-*.parquet",), 30,
           _problem_answer("problem", "solution", "url"), "none stated"),
    Source("aime25", "AIME 2025 (I and II)", "opencompass/AIME2025", ("aime2025-I.jsonl", "aime2025-II.jsonl"), 30,
           _problem_answer("question"), "MIT"),
    Source("amc23", "AMC 2023", "math-ai/amc23", ("test-*.parquet|test.jsonl",), 40,
           _problem_answer("question", "url"), "see its card"),
    Source("math500", "MATH-500", "HuggingFaceH4/MATH-500", ("test.jsonl",), 500,
           _problem_answer("problem", "solution", "subject", "level", "unique_id"), "none stated (MATH: MIT)"),
    Source("minerva", "Minerva Math", "math-ai/minervamath", ("test.jsonl|test-*.parquet",), 272,
           _problem_answer("question"), "see its card"),
    Source("olympiadbench", "OlympiadBench (open-ended maths, English, competition)", "math-ai/olympiadbench",
           ("test.jsonl|test-*.parquet",), 675, olympiadbench, "see its card (OlympiadBench: Apache-2.0)"),
    Source("gsm8k", "GSM8K test (out of domain)", "openai/gsm8k", ("main/test-*.parquet",), 1319, gsm8k, "MIT"),
    Source("gpqa_diamond", "GPQA-Diamond (out of domain, multiple choice)", "Idavidrein/gpqa", ("gpqa_diamond.csv",),
           198, gpqa, "CC-BY-4.0", gated=True),
]}


def destination(source: Source, train_dir: Path = TRAIN_DIR, bench_dir: Path = BENCH_DIR) -> Path:
    """Where `source`'s problem file goes."""
    return (train_dir if source.training else bench_dir) / f"{source.name}.jsonl"


def command_for(path: str | Path) -> str | None:
    """The command that writes problem file `path`, when it is one of this module's files: what
    train.py and eval.py print for a missing one."""
    path = Path(path)
    source = SOURCES.get(path.stem)
    if source is None or path.suffix != ".jsonl":
        return None
    option, default = ("--train-dir", TRAIN_DIR) if source.training else ("--bench-dir", BENCH_DIR)
    where = "" if path.parent.resolve() == default.resolve() else f" {option} {shlex.quote(str(path.parent))}"
    script = Path(__file__).resolve()  # as the user can run it from where they are (the defaults are relative to it)
    script = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    return f"python {shlex.quote(str(script))} {source.name}{where}" + (
        " (gated: accept its terms on the hub and log in first)" if source.gated else "")


def missing_file(path: str | Path, otherwise: str) -> str | None:
    """None when problem file `path` exists; else that it does not, with the command that writes it, or
    `otherwise` (what the user can do instead) for a file this module does not make."""
    if Path(path).is_file():
        return None
    command = command_for(path)
    return f"{path} does not exist; " + (f"`{command}` writes it" if command else otherwise)


# ---------------------------------------------------------------------------------------------------
# Download, convert, check, write


class PrepareError(Exception):
    """A dataset that could not be prepared; the message says why and what to do."""


def read_rows(path: Path) -> list[dict]:
    """The rows of one downloaded file: a JSON list, JSON lines, parquet or CSV."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrepareError(f"{path.name} is parquet, which needs pyarrow: pip install -e '.[parquet]'") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":  # a quoted field may hold line breaks
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    # JSON lines end at "\n" only: str.splitlines would also split at U+2028 and the like, which JSON
    # strings may hold raw
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def matching(names: list[str], entry: str) -> list[str]:
    """The names (sorted) that `entry`'s first matching alternative matches; [] when none does."""
    for pattern in entry.split("|"):
        if hits := sorted(n for n in names if fnmatch.fnmatch(n, pattern)):
            return hits
    return []


def download(source: Source) -> tuple[list[Path], str]:
    """The source's files in the local Hugging Face cache (downloaded when missing), and the commit they came from."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"https://huggingface.co/datasets/{source.repo}"
    try:
        folder = Path(snapshot_download(source.repo, repo_type="dataset",
                                        allow_patterns=[p for entry in source.files for p in entry.split("|")]))
    except GatedRepoError:
        raise PrepareError(f"{source.repo} is gated: accept its terms at {page}, then log in (`hf auth login`, or "
                           f"set HF_TOKEN) and run this again") from None
    except RepositoryNotFoundError:
        raise PrepareError(f"{source.repo} was not found on the hub" + (
            f" (gated: accept its terms at {page} and log in)" if source.gated else "")) from None
    except LocalEntryNotFoundError:
        raise PrepareError(f"{source.repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot "
                           f"be downloaded: " + ("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" if constants.HF_HUB_OFFLINE else
                                                 "the hub cannot be reached") +
                           "; run this command where there is network (it fills the same cache)") from None
    except Exception as e:  # network, disk: the hub's own message says which
        raise PrepareError(f"downloading {source.repo} failed ({type(e).__name__}: {e})") from None
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = []
    for entry in source.files:
        if not (names := matching(found, entry)):
            raise PrepareError(f"no file of {source.repo} (commit {folder.name[:12]}) matches {entry!r}: the "
                               f"dataset's layout changed (see {page}/tree/main), or the cache holds part of it "
                               f"(run this again with network)")
        files += [folder / name for name in names]
    return files, folder.name


def complete(path: Path, rows: int) -> bool:
    """Whether `path` already holds a prepared file of `rows` rows (a rerun leaves it alone)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip()) == rows


def write_atomically(path: Path, text: str):
    """Write `text` (UTF-8) to `path` through a temporary file beside it and a rename: a killed process
    leaves the old file or the new one, never half of one. The file gets the permissions a plain write
    would (mkstemp's are owner-only). Also eval.py's, for its results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def prepare(source: Source, path: Path, any_size: bool = False) -> str:
    """Download, convert and write one dataset to `path`; returns what it did."""
    if complete(path, source.rows):
        return f"{path}: complete ({source.rows} rows), left as it is"
    files, commit = download(source)
    rows = []
    for file in files:
        try:
            rows += read_rows(file)
        except PrepareError:
            raise
        except Exception as e:  # a damaged or unexpected file: JSON, UTF-8, CSV or parquet errors
            raise PrepareError(f"{file.name} of {source.repo} (commit {commit[:12]}) cannot be read ({type(e).__name__}: "
                               f"{e}); if it is damaged, delete {file} from the Hugging Face cache and run this again") from None
    if len(rows) != source.rows and not any_size:
        raise PrepareError(f"{source.repo} gave {len(rows)} rows ({', '.join(f.name for f in files)}, commit "
                           f"{commit[:12]}), not the {source.rows} it is known to have: the dataset changed on the hub "
                           f"or this is not the split the paper used; nothing written (--any-size writes it anyway)")
    problems = []
    for index, row in enumerate(rows):
        try:
            converted = source.convert(row, index)
        except (KeyError, TypeError, ValueError) as e:
            raise PrepareError(f"{source.repo}, row {index}: not in the format this converter reads "
                               f"({type(e).__name__}: {e}); its fields: {', '.join(row)}") from None
        problems.append({"id": f"{source.name}-{index}", **converted, "source": source.name})
    write_atomically(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems))
    return f"{path}: {len(problems)} rows from {source.repo} (commit {commit[:12]})"


# ---------------------------------------------------------------------------------------------------
# The command


def listing() -> str:
    """The datasets, for --help."""
    lines = ["datasets (name: what, Hugging Face source, rows, licence):"]
    for s in SOURCES.values():
        lines.append(f"  {s.name:<14}{s.title}; {s.repo}, {s.rows:,} rows, {s.licence}"
                     + ("; gated: needs a Hugging Face token and its accepted terms" if s.gated else ""))
    return "\n".join(lines + [
        "", "Without names: every dataset that needs no token; `all` adds the gated ones."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="datasets to prepare (default: all that need no token; `all`: every one)")
    parser.add_argument("--train-dir", type=Path, default=TRAIN_DIR, help=f"where training data goes (default {TRAIN_DIR})")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=f"where benchmarks go (default {BENCH_DIR})")
    parser.add_argument("--any-size", action="store_true", help="write a dataset whose row count differs from the known one")
    args = parser.parse_args(argv)
    names = args.names or [n for n, s in SOURCES.items() if not s.gated]
    if names == ["all"]:
        names = list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        parser.error(f"unknown dataset {', '.join(unknown)}; known: {', '.join(SOURCES)} (or all)")
    failed = []
    for name in names:
        source = SOURCES[name]
        try:
            print(prepare(source, destination(source, args.train_dir, args.bench_dir), args.any_size), flush=True)
        except PrepareError as e:
            print(f"error: {name}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        sys.exit(f"{len(failed)} of {len(names)} datasets not prepared: {', '.join(failed)}")


if __name__ == "__main__":
    main()
