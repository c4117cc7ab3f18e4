"""prepare_data.py (the paper's data in one command) and the checks train.py and eval.py make before
they load anything (issue 30). No network: the sources' files are written, in each source's own
format (field names and answer formats as on its dataset card), into a Hugging Face cache laid out as
huggingface_hub lays it out, and the real command reads them from there with HF_HUB_OFFLINE=1."""

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, make_tiny_checkpoint
from data import load_problems
from prepare_data import SOURCES, command_for, gpqa, gsm8k, matching, olympiadbench
from rewards import grade

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "prepare_data.py"  # as train.py and eval.py name it to a user outside the repository
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, bytes], kind: str = "datasets"):
    """`files` of hub repository `repo` in the cache layout huggingface_hub reads: the files under
    snapshots/<commit>/, refs/main naming that commit."""
    folder = cache / f"{kind}--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        path = folder / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()  # non-ASCII characters raw


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def gpqa_csv(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def gpqa_row(i: int) -> dict:
    return {"Question": f"Which particle\nis number {i}?", "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a{i}\u2028", "Incorrect Answer 2": f"wrong b{i}", "Incorrect Answer 3": f"wrong c{i}",
            "Explanation": "because", "Record ID": f"rec{i}"}


def source_files(sizes: dict[str, int] | None = None) -> dict[str, dict[str, bytes]]:
    """Every source's files by repository, `sizes[name]` rows each (default: the size the source is known
    to have), in the source's own format. Problem i's answer is a function of i, so a converted row can be
    checked against its source row."""
    n = {name: s.rows for name, s in SOURCES.items()} | (sizes or {})
    half = n["aime25"] // 2
    return {
        "agentica-org/DeepScaleR-Preview-Dataset": {"deepscaler.json": json.dumps(
            [{"problem": f"Compute {i} + 1.", "solution": f"It is {i + 1}.", "answer": str(i + 1)}
             for i in range(n["deepscaler"])]).encode()},
        "HuggingFaceH4/aime_2024": {"data/train-00000-of-00001.parquet": parquet(
            [{"id": 60 + i, "problem": f"AIME problem {i}", "solution": "...", "answer": f"{i:03d}",
              "url": f"https://aops/{i}", "year": "2024"} for i in range(n["aime24"])])},
        "opencompass/AIME2025": {
            "aime2025-I.jsonl": jsonl([{"question": f"AIME I problem {i}", "answer": str(100 + i)} for i in range(half)]),
            "aime2025-II.jsonl": jsonl([{"question": f"AIME II problem {i}", "answer": str(200 + i)}
                                        for i in range(n["aime25"] - half)])},
        "math-ai/amc23": {"test-00000-of-00001.parquet": parquet(
            [{"id": i, "question": f"AMC problem {i}", "answer": float(i), "url": f"https://aops/2023_AMC_12A/{i}"}
             for i in range(n["amc23"])])},
        "HuggingFaceH4/MATH-500": {"test.jsonl": jsonl(
            [{"problem": f"MATH problem {i}", "solution": f"\\boxed{{\\frac{{{i}}}{{7}}}}", "answer": f"\\frac{{{i}}}{{7}}",
              "subject": "Algebra", "level": 3, "unique_id": f"test/algebra/{i}.json"} for i in range(n["math500"])])},
        "math-ai/minervamath": {"test.jsonl": jsonl([{"question": f"Minerva problem {i}\u2028(a line separator)",
                                                      "answer": f"{i}.5"} for i in range(n["minerva"])])},
        "math-ai/olympiadbench": {"test.jsonl": jsonl(
            [{"id": 1600 + i, "question": f"Olympiad problem {i}", "solution": ["..."], "final_answer": [f"${i}$"],
              "context": None, "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
              "language": "English"} for i in range(n["olympiadbench"])])},
        "openai/gsm8k": {"main/test-00000-of-00001.parquet": parquet(
            [{"question": f"GSM8K problem {i}", "answer": f"{i} * 1000 = <<{i}*1000={i}000>>{i}000\n#### {i},000"}
             for i in range(n["gsm8k"])])},
        "Idavidrein/gpqa": {"gpqa_diamond.csv": gpqa_csv([gpqa_row(i) for i in range(n["gpqa_diamond"])])},
    }


# ---------------------------------------------------------------------------------------------------
# Each source's conversion, on rows in that source's own format


def test_gsm8k_answers_are_the_number_after_the_four_hashes_without_thousands_separators():
    row = {"question": "Janet has 3 ducks...", "answer": "She has 3 * 1000 = <<3*1000=3000>>3000\n#### 3,000"}
    assert gsm8k(row, 0) == {"problem": "Janet has 3 ducks...", "answer": "3000",
                             "solution": "She has 3 * 1000 = <<3*1000=3000>>3000"}
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k({"question": "q", "answer": "no marker"}, 4)


def test_olympiadbench_answer_lists_are_joined_without_their_dollar_delimiters():
    row = {"question": "Find all pairs.", "final_answer": ["$69$,$84$"], "is_multiple_answer": True, "unit": None,
           "answer_type": "Numerical", "solution": ["..."], "context": None}
    assert olympiadbench(row, 0) == {"problem": "Find all pairs.", "answer": "69,84", "is_multiple_answer": True,
                                     "unit": None, "answer_type": "Numerical"}
    two = olympiadbench({"question": "q", "final_answer": ["$f(n)=n$", "$g(n)=1$"]}, 1)
    assert two["answer"] == "f(n)=n, g(n)=1"
    assert olympiadbench({"question": "q", "final_answer": ["\\$5"]}, 2)["answer"] == "\\$5"  # an escaped dollar stays


def test_numeric_answers_stored_as_floats_lose_their_point_zero_and_others_are_kept_as_written():
    amc = SOURCES["amc23"].convert({"id": 0, "question": "Cities A and B...", "answer": 27.0, "url": "u"}, 0)
    assert amc == {"problem": "Cities A and B...", "answer": "27", "url": "u"}
    assert SOURCES["amc23"].convert({"question": "q", "answer": -1.5}, 1)["answer"] == "-1.5"
    aime = SOURCES["aime24"].convert({"id": 60, "problem": "p", "solution": "s", "answer": "025", "url": "u",
                                      "year": "2024"}, 0)
    assert aime == {"problem": "p", "answer": "025", "solution": "s", "url": "u"}  # the grader compares values
    math500 = SOURCES["math500"].convert({"problem": "p", "solution": "s", "answer": "\\frac{14}{3}", "subject": "Algebra",
                                          "level": 3, "unique_id": "test/algebra/1.json"}, 0)
    assert math500["answer"] == "\\frac{14}{3}" and math500["level"] == 3
    assert SOURCES["minerva"].convert({"question": "q", "answer": "4.5e33"}, 0) == {"problem": "q", "answer": "4.5e33"}
    assert SOURCES["aime25"].convert({"question": "q", "answer": 70}, 0) == {"problem": "q", "answer": "70"}


def test_gpqa_options_are_shuffled_per_question_and_the_answer_letter_names_the_correct_one():
    letters = []
    for i in range(40):
        row = gpqa(gpqa_row(i), i)
        options = dict(re.findall(r"^\(([A-D])\) (.*)$", row["problem"], re.MULTILINE))
        assert sorted(options.values()) == sorted([f"right {i}", f"wrong a{i}", f"wrong b{i}", f"wrong c{i}"])  # stripped
        assert options[row["answer"]] == f"right {i}"
        assert grade(f"... so the answer is \\boxed{{{row['answer']}}}", row["answer"])
        assert not grade("\\boxed{" + next(x for x in "ABCD" if x != row["answer"]) + "}", row["answer"])
        letters.append(row["answer"])
    assert set(letters) == set("ABCD")  # answering one letter everywhere scores about a quarter, not all


def test_a_files_entry_takes_its_first_alternative_that_matches():
    names = ["README.md", "data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet", "test.jsonl"]
    assert matching(names, "test.jsonl|data/test-*.parquet") == ["test.jsonl"]
    assert matching(names, "data/test-*.parquet|test.jsonl") == names[1:3]  # every shard, in order
    assert matching(names, "*.csv") == []


def test_command_for_names_the_command_that_writes_a_missing_problem_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # where the README runs everything
    assert command_for("data/deepscaler.jsonl") == "python prepare_data.py deepscaler"
    assert command_for("data/bench/math500.jsonl") == "python prepare_data.py math500"
    assert command_for(tmp_path / "aime24.jsonl") == f"python prepare_data.py aime24 --bench-dir {tmp_path}"
    assert command_for(tmp_path / "my data" / "aime24.jsonl").endswith(f"--bench-dir '{tmp_path / 'my data'}'")
    assert command_for("data/bench/mine.jsonl") is None and command_for("data/deepscaler.parquet") is None
    assert "gated" in command_for("data/bench/gpqa_diamond.jsonl")


# ---------------------------------------------------------------------------------------------------
# The command, run for real against a local Hugging Face cache


def prepare(tmp_path, cache, *names):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *names, "--train-dir", str(tmp_path / "data"),
                           "--bench-dir", str(tmp_path / "data" / "bench")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf")))


def test_every_dataset_is_prepared_from_the_cache_with_its_known_size_and_a_rerun_does_nothing(tmp_path):
    cache = tmp_path / "hub"
    for repo, files in source_files().items():
        put_in_cache(cache, repo, files)
    out = prepare(tmp_path, cache, "all")
    assert out.returncode == 0, out.stderr
    written = {}
    for name, source in SOURCES.items():
        path = tmp_path / "data" / ("" if source.training else "bench") / f"{name}.jsonl"
        problems = load_problems(path)  # what train.py and eval.py read
        assert len(problems) == source.rows and problems[0]["id"] == f"{name}-0" and problems[0]["source"] == name
        written[name] = problems
        assert f"{path}: {source.rows} rows from {source.repo} (commit {COMMIT[:12]})" in out.stdout
    # each converted row against its source row (answers are functions of the row's index)
    assert written["deepscaler"][40314] == {"id": "deepscaler-40314", "problem": "Compute 40314 + 1.",
                                                "answer": "40315", "solution": "It is 40315.", "source": "deepscaler"}
    assert [p["answer"] for p in written["aime24"][:2]] == ["000", "001"]
    assert written["aime25"][14]["answer"] == "114" and written["aime25"][15]["answer"] == "200"  # I, then II
    assert written["amc23"][7]["answer"] == "7" and written["minerva"][3]["answer"] == "3.5"
    assert written["math500"][9]["answer"] == "\\frac{9}{7}" and written["olympiadbench"][5]["answer"] == "5"
    assert written["gsm8k"][12]["answer"] == "12000"
    assert written["minerva"][0]["problem"] == "Minerva problem 0\u2028(a line separator)"
    assert written["gpqa_diamond"][0]["problem"].startswith("Which particle\nis number 0?")
    assert all(grade(f"\\boxed{{{p['answer']}}}", p["answer"]) for p in written["gpqa_diamond"])

    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "data").rglob("*.jsonl"))  # readable by others
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.jsonl")}
    again = prepare(tmp_path, cache, "all")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("left as it is") == len(SOURCES)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.jsonl")} == before


def test_a_source_of_the_wrong_size_or_missing_from_an_offline_cache_writes_nothing_and_says_why(tmp_path):
    cache = tmp_path / "hub"
    files = source_files({"aime24": 29})
    put_in_cache(cache, "HuggingFaceH4/aime_2024", files["HuggingFaceH4/aime_2024"])
    put_in_cache(cache, "math-ai/minervamath", files["math-ai/minervamath"])
    out = prepare(tmp_path, cache, "aime24", "amc23", "minerva")
    assert out.returncode == 1
    assert "error: aime24: HuggingFaceH4/aime_2024 gave 29 rows" in out.stderr and "not the 30" in out.stderr
    assert "error: amc23: math-ai/amc23 is not in the Hugging Face cache" in out.stderr
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in out.stderr and "Traceback" not in out.stderr
    assert "2 of 3 datasets not prepared: aime24, amc23" in out.stderr
    bench = tmp_path / "data" / "bench"
    assert sorted(p.name for p in bench.iterdir()) == ["minerva.jsonl"]  # the others: nothing, not even a temporary file


def test_a_partial_or_damaged_cache_is_named_and_the_other_datasets_still_run(tmp_path):
    cache = tmp_path / "hub"
    files = source_files()
    put_in_cache(cache, "opencompass/AIME2025", {"aime2025-I.jsonl": files["opencompass/AIME2025"]["aime2025-I.jsonl"]})
    put_in_cache(cache, "math-ai/minervamath", {"test.jsonl": b'{"question": "half a row'})
    put_in_cache(cache, "HuggingFaceH4/MATH-500", files["HuggingFaceH4/MATH-500"])
    out = prepare(tmp_path, cache, "aime25", "minerva", "math500", "--any-size")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error: aime25: no file of opencompass/AIME2025 (commit 0123456789ab) matches 'aime2025-II.jsonl'" in out.stderr
    assert "error: minerva: test.jsonl of math-ai/minervamath (commit 0123456789ab) cannot be read (JSONDecodeError" in out.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "bench").iterdir()) == ["math500.jsonl"]  # not half of aime25


def test_help_lists_every_dataset_with_its_source_and_row_count():
    out = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--help"], capture_output=True, text=True,
                         timeout=60, env=child_env())
    assert out.returncode == 0
    for name, source in SOURCES.items():
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(name + " "))
        assert source.repo in line and f"{source.rows:,} rows" in line
    assert "gated" in next(line for line in out.stdout.splitlines() if "gpqa_diamond " in line)


# ---------------------------------------------------------------------------------------------------
# train.py and eval.py name every missing input before they load anything


def offline(tmp_path, **changes):
    return child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"), **changes)


def test_the_papers_run_without_network_or_data_stops_at_once_naming_each_missing_input_and_its_command(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "qwen3_8b.yaml"),
                          "validation.path=data/bench/math500.jsonl"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=offline(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: the run cannot start:\n")
    lines = out.stderr.splitlines()[1:]
    # the command as it runs from where the user is (the data folders are relative to there)
    assert lines[0] == f"  data.train_path: data/deepscaler.jsonl does not exist; `python {SCRIPT} deepscaler` writes it"
    assert lines[1] == f"  validation.path: data/bench/math500.jsonl does not exist; `python {SCRIPT} math500` writes it"
    assert lines[2].startswith("  model.path: Qwen/Qwen3-8B-Base is not in the Hugging Face cache")
    assert "`hf download Qwen/Qwen3-8B-Base`" in lines[2] and len(lines) == 3
    assert not (tmp_path / "runs").exists()  # nothing written: checkpoint.dir is runs/qwen3_8b_masa


def test_a_hub_model_in_the_cache_trains_offline_and_is_not_reported_missing(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "tiny")
    put_in_cache(tmp_path / "hub", "tiny-org/qwen3", {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()},
                 kind="models")
    config = [str(ROOT / "configs" / "test_tiny.yaml"), "model.path=tiny-org/qwen3", f"checkpoint.dir={tmp_path / 'run'}",
              "train.total_steps=1", "log.progress_bar=false"]
    missing = subprocess.run([sys.executable, str(ROOT / "train.py"), *config, "data.train_path=data/deepscaler.jsonl"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path, env=offline(tmp_path))
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[1:] == [
        f"  data.train_path: data/deepscaler.jsonl does not exist; `python {SCRIPT} deepscaler` writes it"]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps({"problem": f"What is {a}+1?", "answer": str(a + 1)}) + "\n"
                                                     for a in range(8)))
    ran = subprocess.run([sys.executable, str(ROOT / "train.py"), *config, f"data.train_path={tmp_path / 'problems.jsonl'}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=offline(tmp_path))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_cached_model_counts_only_with_its_config_every_weight_shard_and_a_tokenizer(tmp_path):
    from hf_checkpoint import cached

    model = make_tiny_checkpoint(tmp_path / "tiny")
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert "tokenizer.json" in files and "model.safetensors" in files
    for name, drop in [("whole", None), ("no-weights", "model.safetensors"), ("no-tokenizer", "tokenizer.json"),
                       ("no-config", "config.json")]:
        put_in_cache(tmp_path / "hub", f"org/{name}", {k: v for k, v in files.items() if k != drop}, kind="models")
    assert cached("org/whole", tmp_path / "hub") == tmp_path / "hub" / "models--org--whole" / "snapshots" / COMMIT
    assert [cached(f"org/{n}", tmp_path / "hub") for n in ("no-weights", "no-tokenizer", "no-config", "absent")] == [None] * 4
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    sharded = {"config.json": b"{}", "tokenizer_config.json": b"{}", "tokenizer.json": b"{}",
               "model.safetensors.index.json": json.dumps(index).encode(), "model-00001-of-00002.safetensors": b""}
    put_in_cache(tmp_path / "hub", "org/one-shard-missing", sharded, kind="models")
    assert cached("org/one-shard-missing", tmp_path / "hub") is None


def test_eval_names_every_missing_benchmark_and_an_uncached_model_with_the_commands_before_loading(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", "Qwen/Qwen3-8B-Base", "--benchmarks",
                          "aime24,math500,mine", "--data-dir", "data/bench"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=offline(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    message = out.stderr[out.stderr.index("error: cannot start:"):].splitlines()
    assert message[1:4] == [
        f"  benchmark aime24: data/bench/aime24.jsonl does not exist; `python {SCRIPT} aime24` writes it",
        f"  benchmark math500: data/bench/math500.jsonl does not exist; `python {SCRIPT} math500` writes it",
        "  benchmark mine: data/bench/mine.jsonl does not exist; give a name under --data-dir or a .jsonl/.parquet path"]
    assert message[4].startswith("  --model: Qwen/Qwen3-8B-Base is not in the Hugging Face cache")


def test_the_paper_configs_and_eval_read_where_the_command_writes(tmp_path, monkeypatch):
    from config import load_config
    from eval import default_data_dir
    from prepare_data import destination

    configs = sorted((ROOT / "configs").glob("qwen3_8b*.yaml"))
    assert len(configs) == 5
    for config in configs:
        assert Path(load_config(config).data.train_path) == destination(SOURCES["deepscaler"]), config.name
    import eval as evaluation

    monkeypatch.setattr(evaluation, "SHARED_BENCH", tmp_path / "shared" / "data" / "bench")
    evaluation.SHARED_BENCH.mkdir(parents=True)  # this project's machines have one; users do not
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == evaluation.SHARED_BENCH  # nothing prepared: the shared copy
    (tmp_path / "data" / "bench").mkdir(parents=True)
    assert default_data_dir().resolve() == destination(SOURCES["aime24"]).parent.resolve()  # prepared: that
    # the README's evaluation of the paper's run names benchmarks the command writes
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reproducing the paper"):]
    names = re.search(r"--benchmarks (\S+)", section).group(1).split(",")
    assert names == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert all(n in SOURCES and not SOURCES[n].training for n in names)
