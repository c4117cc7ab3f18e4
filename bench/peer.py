"""This project's GRPO step against TRL's GRPOTrainer: the same checkpoint, prompts, group size and
lengths, in one run, the two sides alternating.

    pip install -e '.[peer]'           # TRL, for this script only: not a dependency of the project
    python bench/peer.py [--steps 8] [--rounds 2] [--prompts 8] [--group 8] [--max-new-tokens 64]

The checkpoint is a random Qwen3 of bench/sampler.py's SMALL shape with the CPU demo's character
tokenizer (float32), saved once in Hugging Face format; the prompts are the CPU demo's arithmetic
problems in the solution prompt's chat template; the reward is rewards.grade_batch on both sides.
Each step samples --group completions for each of --prompts prompts (temperature 1, at most
--max-new-tokens tokens, stopping at the end-of-text and end-of-turn tokens), then takes one
optimizer step on all of them: no KL term, no reference model, one PPO epoch, one mini-batch. A
random model earns no reward, so every advantage is 0; TRL still runs the forward and backward on
every completion, and this project does too because of a tiny entropy bonus (loss.entropy_coef
0.001; without one it skips responses whose advantage is 0, which would time nothing).
  this project: `train.py configs/tiny.yaml` with algorithm=grpo and no warm start, timed by its own
    metrics.jsonl (generation: time_rollout + time_grading; update: time_logprobs_backward +
    time_optimizer + time_refresh; step: time_step);
  TRL: GRPOTrainer (per_device_train_batch_size = prompts x group, one generation per step, beta 0,
    no vLLM), timed by a callback around each step and a wrapper around its generation and scoring
    (_generate_and_score_completions), the update being the rest of the step.
Each side runs in a process of its own (so neither inherits the other's threads or allocator), one
at a time, --rounds times each, alternating; a side's number is the median over its steps, the
first step of each run left out (it pays for first calls). On a CPU here; on a GPU the same command
compares bf16 runs (this project with its CUDA graphs, TRL with transformers' generate).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(directory: Path, prompts: int, seed: int = 0) -> Path:
    """The shared checkpoint (model + tokenizer) and the problems, as JSONL, under `directory`."""
    import torch

    from bench.sampler import SMALL
    from data import ARITHMETIC_WORDS, arithmetic_problems, build_char_tokenizer, stop_token_ids
    from model import Qwen3

    model_dir = directory / "model"
    tokenizer = build_char_tokenizer(model_dir, words=ARITHMETIC_WORDS)
    torch.manual_seed(seed)
    Qwen3(replace(SMALL, vocab_size=len(tokenizer))).save_pretrained(model_dir)
    # transformers' generate (TRL's sampler) stops where this project's does: end of text or of turn
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(stop_token_ids(tokenizer)), "pad_token_id": tokenizer.eos_token_id}))
    with open(directory / "problems.jsonl", "w") as f:
        for p in arithmetic_problems(prompts * 64, seed):
            f.write(json.dumps({"problem": p["problem"], "answer": p["answer"]}) + "\n")
    return model_dir


def ours(args, directory: Path, run: int) -> list[dict]:
    """train.py's GRPO steps; the per-step times from its metrics.jsonl."""
    out = directory / f"ours_{run}"
    overrides = [f"model.path={directory / 'model'}", "model.init=pretrained", "model.dtype=float32",
                 "algorithm=grpo", "warm_start.steps=0", "data.source=file", f"data.train_path={directory / 'problems.jsonl'}",
                 "data.shuffle=false", f"train.batch_size={args.prompts}", f"rollout.group_size={args.group}",
                 f"rollout.max_response_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
                 "loss.kl_coef=0", "loss.entropy_coef=0.001", "train.ppo_epochs=1", "train.mini_batches=1",
                 f"train.total_steps={args.steps}", "checkpoint.every=0", f"checkpoint.dir={out}",
                 "log.progress_bar=false", "validation.path="]
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "tiny.yaml"), *overrides],
                   check=True, capture_output=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"generation": r["time_rollout"] + r["time_grading"],
             "update": r["time_logprobs_backward"] + r["time_optimizer"] + r["time_refresh"],
             "step": r["time_step"], "tokens": r["solution_tokens"]} for r in records]


def trl_side(args, directory: Path) -> list[dict]:
    """TRL's GRPO steps, in this process (started by `theirs` below)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import masa
    from config import PromptConfig
    from data import load_problems
    from rewards import GraderPool, grade_batch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PromptConfig().solution
    problems = load_problems(directory / "problems.jsonl")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": masa.solution_prompt(p["problem"], template)}],
                                  "answer": p["answer"]} for p in problems])
    pool = GraderPool()

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in grade_batch(texts, answer, pool).correct]

    times, current = [], {}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            current["generation"] = current.get("generation", 0.0) + time.perf_counter() - started
            current["tokens"] = int(out["completion_mask"].sum())
            return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.clear()
            current["started"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - current.pop("started")
            times.append({"generation": current["generation"], "update": step - current["generation"], "step": step,
                          "tokens": current["tokens"]})

    config = GRPOConfig(
        output_dir=str(directory / "trl"), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, generation_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=0.0, num_iterations=1,
        learning_rate=1e-4, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=False, disable_dropout=True, seed=0, dataloader_num_workers=0)
    trainer = Timed(model=str(directory / "model"), reward_funcs=reward, args=config, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[Clock()])
    try:
        trainer.train()
    finally:
        pool.close()
    return times


def theirs(args, directory: Path, run: int) -> list[dict]:
    out = directory / f"trl_{run}.json"
    subprocess.run([sys.executable, __file__, "--trl-side", str(directory), "--json", str(out),
                    "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
                    "--max-new-tokens", str(args.max_new_tokens)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trl-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_side:
        args.json.write_text(json.dumps(trl_side(args, args.trl_side)))
        return {}
    try:
        import trl
    except ImportError:
        sys.exit("bench/peer.py needs TRL: pip install -e '.[peer]'")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_checkpoint(directory, args.prompts)
        runs = {"this project": [], f"TRL {trl.__version__}": []}
        for run in range(args.rounds):
            for name, side in zip(runs, (ours, theirs)):
                started = time.perf_counter()
                records = side(args, directory, run)
                runs[name] += records[1:]
                print(f"{name}, run {run + 1}: {len(records)} steps in {time.perf_counter() - started:.0f} s "
                      f"(process start and loading included)", flush=True)
    print(f"\n{args.prompts} prompts x {args.group} completions, up to {args.max_new_tokens} tokens, per step; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians over "
          f"{args.rounds} x {args.steps - 1} steps per side")
    print("| | this project (s/step) | TRL (s/step) | TRL / this project |")
    print("|---|---|---|---|")
    ours_records, trl_records = runs.values()
    result = {}
    for key, label in (("step", "whole step"), ("generation", "generation + rewards"), ("update", "update")):
        a, b = median(ours_records, key), median(trl_records, key)
        result[key] = {"ours": a, "trl": b}
        print(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    a, b = median(ours_records, "tokens"), median(trl_records, "tokens")
    print(f"| completion tokens per step (median) | {a:,.0f} | {b:,.0f} | |")
    return result


if __name__ == "__main__":
    main()
