"""Benchmark evaluation: pass@k with its standard error, and how well the model predicts its own
pass rate and solution length (the paper's meta-awareness measurements, its Figure 1).

    python eval.py --model runs/qwen3_8b_masa/step_000314/model --benchmarks aime24,aime25,amc23 \\
        --n 32 --temperature 0.6 --top-p 1.0 --max-new-tokens 16384 [--meta] [--out results/]
    torchrun --nproc_per_node 8 eval.py --samples 32 ...   # ranks split the problems; results gathered
                                                          # (torchrun takes --n for its own --nnodes)
    results = evaluate("runs/qwen3_8b_masa/step_000314/model", ["aime24"], n=32, meta=True, out="results")
                                                          # the same from Python: the options as keywords

A benchmark is a name looked up as <data-dir>/<name>.jsonl (default data/bench, where
`python prepare_data.py` writes the paper's benchmarks; this project's own machines fall back to
../shared/data/bench) or a path to a JSONL/parquet file with "problem" and "answer" fields.
For every benchmark it prints and writes (to --out): pass@1 (the mean over the n samples), pass@k
by the unbiased estimator, the standard error of pass@1 across problems, the mean response length
and the fraction of responses with no \\boxed{} answer; `samples/<benchmark>.json` holds every
response with its extracted answer and grade. Each benchmark's files are written as soon as it is
done, and a rerun into the same --out with the same settings skips the benchmarks already there
(--redo runs them again); names, files, --out and the settings are all checked before the model
loads. With --meta it also draws --meta-n predictions per problem from the meta prompt (stating the
group size n and the response budget) and reports the calibration of the predicted pass rate (mean
absolute error and Spearman correlation against the empirical one), the fraction of predicted
lengths inside [min, max] of the correct responses' lengths, the notion score (meta_prediction.meta_reward's
notion part), the parse-failure rate, and scatter plots (PNG, when matplotlib is installed). Each
problem samples its own stream (its index in the benchmark), so results depend on --seed, not on
the number of ranks.

Prompts use the templates of the run that trained the model: --config, else the config.yaml that
train.py saves beside every checkpoint's model/ directory, else the paper's (config.py's defaults).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import masa
from config import PromptConfig, load_config
from data import chat_ids, load_problems, stop_token_ids
from hf_checkpoint import unavailable
from meta_prediction import Outcome, meta_reward, parse_meta
from model import Qwen3
from parallel import setup_distributed
from prepare_data import BENCH_DIR, missing_file, write_atomically
from rewards import GraderPool, grade_batch
from rollout import SamplingParams, generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), as a product so that large n cannot overflow."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); nan when either side is constant."""
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # average the ranks of ties
            r[values == v] = r[values == v].mean()
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# ---------------------------------------------------------------------------------------------------
# One benchmark


def sample_problems(model, tokenizer, problems: list[dict], *, n: int, temperature: float, top_p: float,
                    max_new_tokens: int, meta: bool = False, meta_n: int = 16, meta_max_new_tokens: int = 2048,
                    pool: GraderPool | None = None, seed: int = 0, template: PromptConfig | None = None,
                    slots: int | None = None, streams: list[int] | None = None, graphs: bool | None = None,
                    progress: bool = False) -> list[dict]:
    """`n` responses per problem (and with `meta`, `meta_n` predictions from the meta prompt, which
    states n and max_new_tokens), graded in `pool`: one record per problem. `template`: the prompt
    templates (config.py's PromptConfig; default: the paper's); `slots`: the sampler's lanes;
    `streams`: each problem's sampling stream (rollout.generate), e.g. its index in the whole
    benchmark, so that results do not depend on how problems are split across ranks; `graphs`:
    rollout.generate's (None: CUDA graphs on CUDA)."""
    template = template or PromptConfig()
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop_token_ids=stop_token_ids(tokenizer))
    prompts = [chat_ids(tokenizer, masa.solution_prompt(p["problem"], template.solution)) for p in problems]
    rollouts = generate(model, prompts, params, seed=seed, streams=streams, slots=slots, graphs=graphs,
                        progress=progress) if prompts else []
    texts = [[tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rs] for rs in rollouts]
    grades = grade_batch([t for ts in texts for t in ts], [p["answer"] for p in problems for _ in range(n)],
                         pool) if prompts else None
    records = []
    for i, (problem, rs, ts) in enumerate(zip(problems, rollouts, texts)):
        part = slice(i * n, (i + 1) * n)
        records.append({"id": problem.get("id", i), "answer": problem["answer"], "responses": [
            {"text": t, "extracted": x, "correct": c, "length": len(r.token_ids), "finish_reason": r.finish_reason}
            for t, r, x, c in zip(ts, rs, grades.extracted[part], grades.correct[part])]})
    if meta and prompts:
        meta_params = SamplingParams(n=meta_n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=meta_max_new_tokens, stop_token_ids=params.stop_token_ids)
        meta_prompts = [chat_ids(tokenizer, masa.meta_prompt(p["problem"], template.meta, n, max_new_tokens),
                                 template.meta_system) for p in problems]
        meta_rollouts = generate(model, meta_prompts, meta_params, seed=seed + 1, streams=streams, slots=slots,
                                 graphs=graphs, progress=progress)
        for problem, record, rs in zip(problems, records, meta_rollouts):
            outcomes = [Outcome(r["correct"], r["length"], r["text"]) for r in record["responses"]]
            record["meta"] = []
            for r in rs:
                text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
                prediction = parse_meta(text, n, max_new_tokens)
                record["meta"].append({
                    "text": text, "pass_rate": prediction.pass_rate if prediction else None,
                    "solution_length": prediction.solution_length if prediction else None,
                    "notions": prediction.notions if prediction else None,
                    "reward": meta_reward(prediction, outcomes, problem["problem"], n)})
    return records


def summarize(records: list[dict], n: int, ks: list[int], meta: bool) -> dict:
    """Benchmark metrics from graded records (nothing here looks at the model)."""
    counts = [sum(r["correct"] for r in rec["responses"]) for rec in records]
    rates = [c / n for c in counts]
    responses = [r for rec in records for r in rec["responses"]]
    out = {"problems": len(records), "n": n, "pass@1": float(np.mean(rates)),
           "pass@1_stderr": float(np.std(rates, ddof=1) / math.sqrt(len(rates))) if len(rates) > 1 else float("nan")}
    for k in ks:
        if k != 1:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in counts]))
    out["mean_length"] = float(np.mean([r["length"] for r in responses]))
    out["no_box"] = float(np.mean([r["extracted"] is None for r in responses]))
    if meta:
        predicted, empirical, inside, notions, failures, total = [], [], [], [], 0, 0
        for rec, rate in zip(records, rates):
            valid = [m["pass_rate"] / n for m in rec["meta"] if m["pass_rate"] is not None]
            if valid:
                predicted.append(float(np.mean(valid)))
                empirical.append(rate)
            correct_lengths = [r["length"] for r in rec["responses"] if r["correct"]]
            for m in rec["meta"]:
                total += 1
                failures += m["notions"] is None
                if m["notions"] is not None:
                    notions.append(m["reward"]["notion"])
                if m["solution_length"] is not None and correct_lengths:
                    inside.append(min(correct_lengths) <= m["solution_length"] <= max(correct_lengths))
        out["meta_pass_rate_mae"] = float(np.mean(np.abs(np.subtract(predicted, empirical)))) if predicted \
            else float("nan")
        out["meta_pass_rate_spearman"] = spearman(predicted, empirical)
        out["meta_length_inside"] = float(np.mean(inside)) if inside else float("nan")
        out["meta_notion_score"] = float(np.mean(notions)) if notions else float("nan")
        out["meta_parse_failures"] = failures / total if total else float("nan")
    return out


def markdown(results: dict[str, dict], ks: list[int], meta: bool) -> str:
    head = ["benchmark", "problems", "n", "pass@1", "± s.e."] + [f"pass@{k}" for k in ks if k != 1] + [
        "mean length", "no box"]
    if meta:
        head += ["pass-rate MAE", "Spearman", "length inside", "notion", "parse failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        row = [name, str(m["problems"]), str(m["n"]), f"{100 * m['pass@1']:.2f}", f"{100 * m['pass@1_stderr']:.2f}"]
        row += [f"{100 * m[f'pass@{k}']:.2f}" for k in ks if k != 1]
        row += [f"{m['mean_length']:.0f}", f"{100 * m['no_box']:.1f}%"]
        if meta:
            row += [f"{m['meta_pass_rate_mae']:.3f}", f"{m['meta_pass_rate_spearman']:.3f}",
                    f"{100 * m['meta_length_inside']:.1f}%", f"{m['meta_notion_score']:.3f}",
                    f"{100 * m['meta_parse_failures']:.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_calibration(name: str, records: list[dict], n: int, out: Path):
    """Predicted vs empirical pass rate and predicted vs correct length, one PNG per benchmark."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no calibration plots (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for rec in records:
        rate = sum(r["correct"] for r in rec["responses"]) / n
        correct_lengths = [r["length"] for r in rec["responses"] if r["correct"]]
        for m in rec["meta"]:
            if m["pass_rate"] is not None:
                left.scatter(rate, m["pass_rate"] / n, s=8, alpha=0.4, color="tab:blue")
            if m["solution_length"] is not None and correct_lengths:
                right.scatter(np.mean(correct_lengths), m["solution_length"], s=8, alpha=0.4, color="tab:orange")
    left.plot([0, 1], [0, 1], "k--", lw=1)
    left.set(xlabel="empirical pass rate", ylabel="predicted pass rate", title=f"{name}: pass rate")
    right.set(xlabel="mean length of correct responses (tokens)", ylabel="predicted length",
              title=f"{name}: solution length")
    lim = right.get_xlim()[1], right.get_ylim()[1]
    right.plot([0, max(lim)], [0, max(lim)], "k--", lw=1)
    fig.tight_layout()
    fig.savefig(out / f"{name}_calibration.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The command


def benchmark_file(name: str, data_dir: Path) -> Path:
    path = Path(name)
    if path.suffix in (".jsonl", ".parquet"):
        return path
    return data_dir / f"{name}.jsonl"


def benchmark_label(name: str) -> str:
    """A benchmark's key in results.json and its samples file's name: the name (its last part), or a
    path's stem."""
    path = Path(name)
    return path.stem if path.suffix in (".jsonl", ".parquet") else path.name


SHARED_BENCH = Path(__file__).resolve().parent.parent / "shared" / "data" / "bench"  # this project's machines


def default_data_dir() -> Path:
    """data/bench, where prepare_data.py writes; else this project's shared copy beside the repository."""
    return SHARED_BENCH if SHARED_BENCH.is_dir() and not BENCH_DIR.is_dir() else BENCH_DIR


# What a benchmark's results depend on: a rerun into the same --out must match these to reuse them.
# "weights" is the checkpoint's content, not its path: train.py writes a new step_NNNNNN at the same
# path after a checkpoint.resume_from.
SAMPLING_SETTINGS = ("model", "weights", "n", "k", "temperature", "top_p", "max_new_tokens", "meta", "meta_n",
                     "meta_max_new_tokens", "config", "seed")


def checkpoint_fingerprint(model: str | Path) -> str:
    """A cheap key of a checkpoint directory's content: the SHA-256 of every file's name, size and
    modification time (no weight is read); a hub id is its own key."""
    path = Path(model)
    if not path.is_dir():
        return str(model)
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*"))
             if f.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def completed(out: Path, settings: dict, labels: list[str], redo: bool) -> tuple[dict, str | None]:
    """The results `out` already holds for `labels` from a run with the same SAMPLING_SETTINGS and the
    same benchmark files (settings["files"]: each label's SHA-256), each with its samples file: those
    benchmarks are not run again. Returns (results by label, None), or ({}, the error to stop with)
    when `out` holds results made otherwise. redo: reuse nothing."""
    file = out / "results.json"
    if redo or not file.is_file():
        return {}, None
    try:
        saved = json.loads(file.read_text())
        before, results = saved["settings"], saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, f"{file} cannot be read ({e}); remove it, pass another --out, or --redo"
    differ = [k for k in SAMPLING_SETTINGS if before.get(k) != settings.get(k)]
    if differ:
        listed = ", ".join(f"{k} {before.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        return {}, (f"{out} holds results made with other settings ({listed}); pass another --out, or --redo "
                    f"to replace them")
    files = before.get("files", {})
    return {label: results[label] for label in labels if label in results and files.get(label) ==
            settings["files"][label] and (out / "samples" / f"{label}.json").is_file()}, None


def write_results(out: Path, settings: dict, results: dict, ks: list[int], meta: bool) -> str:
    """results.json (the settings and every finished benchmark's metrics, merged with what `out` held
    from an earlier run with the same settings) and results.md, both holding all of them; returns the
    markdown table of `results` alone, in their order."""
    file = out / "results.json"
    merged, files = dict(results), dict(settings["files"])
    if file.is_file():
        try:
            earlier = json.loads(file.read_text())
            if all(earlier["settings"].get(k) == settings.get(k) for k in SAMPLING_SETTINGS):
                merged.update({k: v for k, v in earlier["results"].items() if k not in results})
                files = {**earlier["settings"].get("files", {}), **files}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable: completed() said so unless --redo; replaced
    write_atomically(file, json.dumps({"settings": {**settings, "files": files}, "results": merged}, indent=2))
    write_atomically(out / "results.md", markdown(merged, ks, meta) + "\n")
    return markdown(results, ks, meta)


def agree(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EvalStopped(Exception):
    """Evaluation cannot go on: the message names the problem and the fix (the command prints it without
    a traceback)."""


def evaluate(model: str, benchmarks: list[str] | str, *, data_dir: str | Path | None = None, n: int = 32,
             k: list[int] | str = (1,), temperature: float = 0.6, top_p: float = 1.0, max_new_tokens: int = 16384,
             meta: bool = False, meta_n: int = 16, meta_max_new_tokens: int = 2048,
             config: str | Path | None = None, seed: int = 0, out: str | Path = "eval_results",
             progress: bool = True, cuda_graphs: bool = True, redo: bool = False) -> dict[str, dict]:
    """Evaluate checkpoint (or hub id) `model` on `benchmarks` (names under data_dir, or JSONL/parquet
    paths), as the module docstring says; the keywords are the command's options. On one process, or
    on every rank of a torchrun job (collective; the process group is made if there is none, and
    removed again). Returns the metrics by benchmark, in the order asked for, on rank 0 ({} on the
    others). Raises ValueError naming the bad argument before any model loads, EvalStopped when a
    result cannot be written (what was written before stays)."""
    out, data_dir = Path(out), Path(data_dir) if data_dir else default_data_dir()
    names = [b for b in (benchmarks.split(",") if isinstance(benchmarks, str) else benchmarks) if b]
    for option, value in (("--n", n), ("--meta-n", meta_n), ("--max-new-tokens", max_new_tokens),
                          ("--meta-max-new-tokens", meta_max_new_tokens)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"--temperature must be at least 0 (0 is greedy) and --top-p in (0, 1], got "
                         f"{temperature} and {top_p}")
    try:
        asked = [int(x) for x in k.split(",")] if isinstance(k, str) else [int(x) for x in k]
    except ValueError:
        raise ValueError(f"--k must be comma-separated integers, got {k!r}") from None
    ks = sorted({1, *asked})
    for x in ks:
        if x < 1:
            raise ValueError(f"--k values must be at least 1, got {x}")
        if x > n:
            raise ValueError(f"pass@{x} needs --n >= {x}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names a directory for results.json, results.md and samples/")
    # every missing input in one message, each with what provides it, before anything loads or downloads
    missing = [] if names else ["--benchmarks: none given"]
    missing += [f"benchmark {b}: {why}" for b in names
                if (why := missing_file(benchmark_file(b, data_dir), "give a name under --data-dir or a .jsonl/.parquet path"))]
    if why := unavailable(model):
        missing.append(f"--model: {why}")
    if missing:
        there = sorted(p.stem for p in data_dir.glob("*.jsonl")) if data_dir.is_dir() else []
        raise ValueError("cannot start:\n  " + "\n  ".join(missing) + f"\n(benchmarks in {data_dir}: "
                         f"{', '.join(there) or 'none'}; --data-dir sets the folder)")
    labels = [benchmark_label(b) for b in names]
    if len(set(labels)) < len(labels):
        raise ValueError(f"two benchmarks would share a name in --out: {', '.join(labels)}")
    try:
        problem_sets = {label: load_problems(benchmark_file(b, data_dir)) for b, label in zip(names, labels)}
    except OSError as e:
        raise ValueError(str(e)) from None
    saved = Path(model).parent / "config.yaml"
    config_file = Path(config) if config else (saved if saved.is_file() else None)
    settings = {"model": str(model), "weights": checkpoint_fingerprint(model), "benchmarks": ",".join(names), "data_dir": str(data_dir), "n": n,
                "k": ",".join(str(x) for x in asked), "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "meta": meta, "meta_n": meta_n,
                "meta_max_new_tokens": meta_max_new_tokens, "config": str(config) if config else None, "seed": seed,
                "files": {label: hashlib.sha256(benchmark_file(b, data_dir).read_bytes()).hexdigest()
                          for b, label in zip(names, labels)}}
    template = load_config(config_file).prompt if config_file else PromptConfig()
    with process_group() as env, GraderPool() as pool:
        # Rank 0's reading of `out` decides what is left to run (other nodes may not see it); all stop together.
        done, error = agree(completed(out, settings, labels, redo) if env.main else None)
        if error:
            raise ValueError(error)
        from transformers import AutoTokenizer

        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        policy = Qwen3.from_pretrained(model, dtype=dtype, device=env.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        if config_file and env.main:
            print(f"prompt templates from {config_file}")
        results = dict(done)
        if env.main:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            for label in done:
                print(f"{label}: complete in {out} from an earlier run with these settings; skipped (--redo runs it)")
        for label, problems in problem_sets.items():
            if label in done:
                continue
            records = sample_problems(policy, tokenizer, problems[env.rank::env.world], n=n, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens, meta=meta, meta_n=meta_n,
                                      meta_max_new_tokens=meta_max_new_tokens, pool=pool, seed=seed,
                                      template=template, streams=list(range(env.rank, len(problems), env.world)),
                                      graphs=None if cuda_graphs else False, progress=progress and env.main)
            gathered = [None] * env.world
            dist.all_gather_object(gathered, records)
            records = [gathered[i % env.world][i // env.world] for i in range(len(problems))]
            results[label] = summarize(records, n, ks, meta)
            failed = None
            if env.main:  # written as each benchmark finishes: a later failure loses none of it
                try:
                    write_atomically(out / "samples" / f"{label}.json", json.dumps(records))
                    write_results(out, settings, {label: results[label]}, ks, meta)
                    if meta:
                        plot_calibration(label, records, n, out)
                except Exception as e:  # told to every rank, which would otherwise wait in the next collective
                    failed = f"writing {label}'s results to {out} failed: {type(e).__name__}: {e}"
            if failed := agree(failed):
                raise EvalStopped(failed)
        if env.main:
            results = {label: results[label] for label in labels}  # the order asked for
            print(write_results(out, settings, results, ks, meta))
        dist.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
        return results if env.main else {}


@contextmanager
def process_group():
    """torchrun's process group, or a one-process group (parallel.setup_distributed, with its timeout)
    removed again on the way out; an existing group is used and left as it is."""
    ours = not dist.is_initialized()
    env = setup_distributed()
    try:
        yield env
    finally:
        if ours:
            dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on math benchmarks (pass@k, meta-awareness).")
    parser.add_argument("--model", required=True, help="checkpoint directory (model and tokenizer) or hub id")
    parser.add_argument("--benchmarks", required=True, help="comma-separated names or JSONL/parquet paths")
    parser.add_argument("--data-dir", type=Path, default=None, help="where <name>.jsonl files live")
    # --samples is the same option under a name torchrun's own parser does not mistake for its --nnodes
    parser.add_argument("--n", "--samples", dest="n", type=int, default=32, help="samples per problem")
    parser.add_argument("--k", default="1", help="comma-separated k for pass@k (each <= n)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16384)
    parser.add_argument("--meta", action="store_true", help="also measure meta-prediction calibration")
    parser.add_argument("--meta-n", type=int, default=16, help="meta predictions per problem")
    parser.add_argument("--meta-max-new-tokens", type=int, default=2048)
    parser.add_argument("--config", type=Path, default=None,
                        help="training config whose prompt templates to use (default: the config.yaml saved "
                             "next to --model by train.py, else the paper's templates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("eval_results"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="decode with eager kernels (CUDA graphs are on by default on CUDA)")
    parser.add_argument("--redo", action="store_true",
                        help="run every benchmark, even those --out already holds complete results for")
    args = parser.parse_args(argv)
    try:
        evaluate(**vars(args))
    except ValueError as e:  # a bad option, config or benchmark file (config.ConfigError, data.DataError)
        parser.error(str(e))
    except (EvalStopped, OSError) as e:  # results that cannot be written; files, permissions, disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the group is gone, yet the interpreter's teardown aborts now and
        # then on a CPU ("terminate called without an active exception" from a C++ thread, in about 1
        # of 10 two-process runs on a loaded 2-core machine): end the process without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
