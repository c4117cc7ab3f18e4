"""eval.py and data.py: pass@k against brute force, the metrics against a recount by hand, the whole
command on a tiny random model, and the loaders on the shared data and on malformed files."""

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env, make_tiny_checkpoint
from data import load_problems
from model import Qwen3
from eval import main, markdown, pass_at_k, spearman, summarize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------------
# pass@k and Spearman


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        pass_at_k(3, 1, 4)


def test_spearman_with_ties_matches_pearson_on_average_ranks():
    x, y = [1, 2, 2, 3, 10], [0.1, 0.3, 0.2, 0.9, 0.8]
    rx, ry = [1, 2.5, 2.5, 4, 5], [1, 3, 2, 5, 4]  # ranks by hand (ties share 2.5)
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman(x, y) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------------------------------------------
# Metrics from graded records


def record(correct, lengths, extracted, meta=None):
    return {"id": 0, "answer": "1", "responses": [
        {"text": "", "extracted": e, "correct": c, "length": n, "finish_reason": "stop"}
        for c, n, e in zip(correct, lengths, extracted)], **({"meta": meta} if meta is not None else {})}


def meta_entry(pass_rate, length, notion_score):
    return {"text": "", "pass_rate": pass_rate, "solution_length": length,
            "notions": None if pass_rate is None and length is None else [],
            "reward": {"notion": notion_score}}


def test_summary_against_a_hand_recount():
    records = [
        record([True, False, False, True], [10, 20, 30, 40], ["1", "2", None, "1"],
               [meta_entry(2, 25, 0.5), meta_entry(4, 50, 1.0)]),
        record([False] * 4, [5, 5, 5, 5], [None] * 4, [meta_entry(0, 10, 0.0), meta_entry(None, None, 0.0)]),
        record([True] * 4, [8, 9, 10, 11], ["1"] * 4, [meta_entry(4, 9, 1.0), meta_entry(3, 100, 0.0)]),
    ]
    m = summarize(records, n=4, ks=[1, 2], meta=True)
    rates = [0.5, 0.0, 1.0]
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@1_stderr"] == pytest.approx(np.std(rates, ddof=1) / math.sqrt(3))
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6, 0, 1
    assert m["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert m["mean_length"] == pytest.approx(np.mean([10, 20, 30, 40, 5, 5, 5, 5, 8, 9, 10, 11]))
    assert m["no_box"] == pytest.approx(5 / 12)
    # predicted pass rates per problem: mean(2/4, 4/4) = 0.75, 0/4 = 0, mean(4/4, 3/4) = 0.875
    assert m["meta_pass_rate_mae"] == pytest.approx((0.25 + 0 + 0.125) / 3)
    assert m["meta_pass_rate_spearman"] == pytest.approx(spearman([0.75, 0, 0.875], rates))
    # lengths inside [min, max] of correct lengths: 25 in [10, 40] yes, 50 no; problem 2 has no correct
    # responses; 9 in [8, 11] yes, 100 no
    assert m["meta_length_inside"] == pytest.approx(2 / 4)
    assert m["meta_notion_score"] == pytest.approx(np.mean([0.5, 1.0, 0.0, 1.0, 0.0]))
    assert m["meta_parse_failures"] == pytest.approx(1 / 6)
    table = markdown({"toy": m}, ks=[1, 2], meta=True)
    assert "| toy | 3 | 4 | 50.00 |" in table and f"{100 * m['pass@2']:.2f}" in table


# ---------------------------------------------------------------------------------------------------
# The command, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(root / "model")
    with open(root / "five.jsonl", "w") as f:
        for a in range(5):
            f.write(json.dumps({"id": f"p{a}", "problem": f"What is {a}+1?", "answer": str(a + 1)}) + "\n")
    return root


def test_eval_end_to_end_writes_consistent_results(tiny, tmp_path, capsys):
    args = ["--model", str(tiny / "model"), "--benchmarks", str(tiny / "five.jsonl"), "--n", "3", "--k", "2",
            "--temperature", "1.0", "--max-new-tokens", "12", "--meta", "--meta-n", "2", "--meta-max-new-tokens", "12",
            "--out", str(tmp_path / "out"), "--no-progress"]
    main(args)
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    (name, metrics), = results.items()
    assert name == "five"
    records = json.loads((tmp_path / "out" / "samples" / "five.json").read_text())
    assert [r["id"] for r in records] == [f"p{a}" for a in range(5)]
    assert all(len(r["responses"]) == 3 and len(r["meta"]) == 2 for r in records)
    # recount from the per-sample grades
    rates = [sum(x["correct"] for x in r["responses"]) / 3 for r in records]
    assert metrics["pass@1"] == pytest.approx(np.mean(rates))
    assert metrics["mean_length"] == pytest.approx(np.mean([x["length"] for r in records for x in r["responses"]]))
    assert metrics["no_box"] == pytest.approx(np.mean([x["extracted"] is None for r in records for x in r["responses"]]))
    # the markdown table shows the same numbers
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.strip() in printed
    assert f"| {name} | 5 | 3 | {100 * metrics['pass@1']:.2f} |" in table
    # deterministic for a seed
    main(args[:-3] + ["--out", str(tmp_path / "again"), "--no-progress"])
    assert (tmp_path / "again" / "samples" / "five.json").read_text() == \
        (tmp_path / "out" / "samples" / "five.json").read_text()


def eval_args(tiny, out, benchmarks="five.jsonl"):
    return ["--model", str(tiny / "model"), "--benchmarks", benchmarks, "--data-dir", str(tiny), "--n", "2",
            "--temperature", "1.0", "--max-new-tokens", "6", "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("change,message", [
    ({"--benchmarks": "five,nosuchbench"}, r"benchmark nosuchbench: .*nosuchbench.jsonl does not exist(.|\n)*benchmarks in .*: five"),
    ({"--out": "FILE"}, r"--out .* is a file"),
    ({"--model": "no/such/checkpoint"}, r"--model: 'no/such/checkpoint' is neither a checkpoint directory nor a Hugging Face hub id"),
    ({"--k": "0"}, r"--k values must be at least 1"),
    ({"--n": "0"}, r"--n must be at least 1"),
    ({"--top-p": "0"}, r"--top-p in \(0, 1\]"),
    ({"--temperature": "-1"}, r"--temperature must be at least 0"),
])
def test_bad_arguments_stop_eval_before_any_sampling(tiny, tmp_path, monkeypatch, capsys, change, message):
    import eval as evaluation

    monkeypatch.setattr(evaluation, "sample_problems", lambda *a, **k: pytest.fail("sampled before the check"))
    monkeypatch.setattr(evaluation.Qwen3, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    (tmp_path / "FILE").write_text("not a directory")
    args = eval_args(tiny, tmp_path / "out", "five")
    for option, value in change.items():
        value = str(tmp_path / value) if value == "FILE" else value
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(message, capsys.readouterr().err)


def test_the_meta_prompt_carries_the_training_configs_system_message(tiny, monkeypatch):
    # prompt.meta_system (the released code's "You are a helpful assistant.") reaches eval's meta prompts
    from transformers import AutoTokenizer

    import eval as evaluation
    from config import PromptConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = Qwen3.from_pretrained(tiny / "model")
    sent, real = [], evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda m, prompts, params, **kw: (
        sent.append([tokenizer.decode(p) for p in prompts]) or real(m, prompts, params, **kw)))
    evaluation.sample_problems(model, tokenizer, [{"problem": "What is 1+1?", "answer": "2"}], n=1, temperature=1.0,
                               top_p=1.0, max_new_tokens=4, meta=True, meta_n=1, meta_max_new_tokens=4,
                               template=PromptConfig(meta_system="You are a helpful assistant."))
    solution, meta = sent
    assert solution[0].startswith("<|im_start|>user\nWhat is 1+1?")
    assert meta[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_evaluate_is_the_command_as_a_function_with_keywords(tiny, tmp_path):
    import torch.distributed as dist

    from eval import evaluate

    main(eval_args(tiny, tmp_path / "cli", "five"))
    had_a_group = dist.is_initialized()  # another test's one-process group is used and left as it was
    results = evaluate(str(tiny / "model"), ["five"], data_dir=tiny, n=2, temperature=1.0, max_new_tokens=6,
                       out=tmp_path / "lib", progress=False)
    assert results == json.loads((tmp_path / "cli" / "results.json").read_text())["results"]  # the same samples
    assert (tmp_path / "lib" / "samples" / "five.json").read_text() == (tmp_path / "cli" / "samples" / "five.json").read_text()
    assert dist.is_initialized() == had_a_group  # a group it made itself is gone again
    with pytest.raises(ValueError, match="pass@3 needs --n >= 3"):
        evaluate(str(tiny / "model"), ["five"], data_dir=tiny, n=2, k=[3], out=tmp_path / "bad")


def test_a_benchmark_in_a_subfolder_is_named_by_its_file(tiny, tmp_path):
    (tiny / "sub").mkdir(exist_ok=True)
    shutil.copy(tiny / "five.jsonl", tiny / "sub" / "five.jsonl")
    main(eval_args(tiny, tmp_path / "out", "sub/five"))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"].keys() == {"five"}
    assert (tmp_path / "out" / "samples" / "five.json").is_file()


def test_finished_benchmarks_are_written_at_once_and_skipped_by_a_rerun(tiny, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    (tiny / "six.jsonl").write_text((tiny / "five.jsonl").read_text() + json.dumps(
        {"id": "p5", "problem": "What is 5+1?", "answer": "6"}) + "\n")
    reference = tmp_path / "reference"
    main(eval_args(tiny, reference, "five,six"))
    real = evaluation.sample_problems
    calls = []

    def fails_on_six(model, tokenizer, problems, *args, **kwargs):
        calls.append(len(problems))
        if len(problems) == 6:
            raise RuntimeError("out of memory on the second benchmark")
        return real(model, tokenizer, problems, *args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_problems", fails_on_six)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="second benchmark"):
        main(eval_args(tiny, out, "five,six"))
    assert json.loads((out / "results.json").read_text())["results"].keys() == {"five"}  # kept
    assert (out / "samples" / "five.json").read_text() == (reference / "samples" / "five.json").read_text()
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(evaluation, "sample_problems", lambda m, t, problems, *a, **k: calls.append(len(problems))
                        or real(m, t, problems, *a, **k))
    main(eval_args(tiny, out, "five,six"))
    assert calls == [6]  # five was not sampled again
    assert "five: complete in" in capsys.readouterr().out
    for name in ("five", "six"):
        assert (out / "samples" / f"{name}.json").read_text() == (reference / "samples" / f"{name}.json").read_text()
    assert json.loads((out / "results.json").read_text())["results"] == \
        json.loads((reference / "results.json").read_text())["results"]
    # a benchmark file that changed since is run again; the table printed is that of the benchmarks asked for
    (tiny / "six.jsonl").write_text((tiny / "six.jsonl").read_text().replace('"answer": "6"', '"answer": "7"'))
    calls.clear()
    capsys.readouterr()
    main(eval_args(tiny, out, "six"))
    assert calls == [6]
    printed = capsys.readouterr().out
    assert "| six | 6 |" in printed and "| five |" not in printed  # results.md still holds both
    assert "| five | 5 |" in (out / "results.md").read_text()
    # other settings into the same --out: an error, before any sampling, unless --redo
    with pytest.raises(SystemExit):
        main(eval_args(tiny, out, "five") + ["--seed", "1"])
    assert "holds results made with other settings (seed 0 there, 1 now)" in capsys.readouterr().err
    calls.clear()
    main(eval_args(tiny, out, "five") + ["--seed", "1", "--redo"])
    assert calls == [5]


def test_a_rerun_with_any_other_sampling_setting_is_refused(tiny, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    out = tmp_path / "out"
    main(eval_args(tiny, out, "five"))
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny / "model", other_model)  # the same files (copy2 keeps sizes and times): only the path differs
    changes = {"model": ["--model", str(other_model)], "weights": None, "n": ["--n", "3"], "k": ["--k", "1,2"],
               "temperature": ["--temperature", "0.5"], "top_p": ["--top-p", "0.9"],
               "max_new_tokens": ["--max-new-tokens", "5"], "meta": ["--meta"], "meta_n": ["--meta-n", "4"],
               "meta_max_new_tokens": ["--meta-max-new-tokens", "7"],
               "config": ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml")],
               "seed": ["--seed", "1"]}
    assert set(changes) == set(evaluation.SAMPLING_SETTINGS)
    monkeypatch.setattr(evaluation, "sample_problems", lambda *a, **k: pytest.fail("sampled after all"))
    capsys.readouterr()
    for key, flags in changes.items():
        if flags is None:  # the weights: the next test
            continue
        with pytest.raises(SystemExit):
            main(eval_args(tiny, out, "five") + flags)  # argparse keeps the last value of a repeated flag
        err = capsys.readouterr().err
        assert "holds results made with other settings" in err and f"({key} " in err, (key, err)


def test_a_checkpoint_rewritten_at_the_same_path_is_not_served_from_the_cache(tiny, tmp_path, monkeypatch, capsys):
    # train.py writes a new step_NNNNNN at the same path after a checkpoint.resume_from: the path alone
    # named the cached results, so re-evaluating it returned the old weights' results.
    import eval as evaluation

    model = tmp_path / "step_000002" / "model"
    shutil.copytree(tiny / "model", model)
    args = eval_args(tiny, tmp_path / "out", "five") + ["--model", str(model)]
    main(args)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: here the same bytes, but a file written anew
    monkeypatch.setattr(evaluation, "sample_problems", lambda *a, **k: pytest.fail("sampled after all"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    assert "holds results made with other settings (weights " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Loaders


# math_train.jsonl has 7,500 rows, 2 of them with a blank answer (skipped: nothing to grade against)
@pytest.mark.parametrize("name,rows", [("bench/aime24.jsonl", 30), ("bench/aime25.jsonl", 30), ("bench/amc23.jsonl", 40),
                                       ("bench/minerva.jsonl", 272), ("bench/olympiadbench.jsonl", 675),
                                       ("bench/gsm8k.jsonl", 1319), ("train/math_train.jsonl", 7498)])
def test_loads_every_shared_data_file(name, rows):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    problems = load_problems(path)
    assert len(problems) == rows
    assert all(isinstance(p["problem"], str) and p["problem"] and isinstance(p["answer"], str) for p in problems)


def test_malformed_files_are_reported_with_file_row_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2: missing field 'answer'"):
        load_problems(f)
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2: not valid JSON"):
        load_problems(f)
    f.write_text("\n")
    with pytest.raises(ValueError, match="holds no problems"):
        load_problems(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


def test_other_field_names_are_configurable(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "1+1", "solution_value": 2}\n')
    (p,) = load_problems(f, problem_key="question", answer_key="solution_value")
    assert (p["problem"], p["answer"]) == ("1+1", "2")
    with pytest.raises(ValueError, match="missing field 'problem'.*data.problem_key"):
        load_problems(f)


def test_two_processes_split_the_problems_and_gather_the_same_results(tiny, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    common = ["--model", str(tiny / "model"), "--benchmarks", str(tiny / "five.jsonl"), "--samples", "2",
              "--temperature", "0", "--max-new-tokens", "10", "--no-progress"]
    env = child_env()
    for nproc, out in ((1, "one"), (2, "two")):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        f"--nproc_per_node={nproc}"]
        done = subprocess.run(launcher + [str(root / "eval.py"), *common, "--out", str(tmp_path / out)],
                              capture_output=True, text=True, cwd=root, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "samples" / "five.json").read_text())
    two = json.loads((tmp_path / "two" / "samples" / "five.json").read_text())
    assert one == two  # greedy: the split changes nothing, and the order is restored
