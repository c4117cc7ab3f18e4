"""Starting a run without a pretrained model (the CPU demo): the random model, and the supervised
warm start that teaches it the task's format before RL.

    path = initial_model(cfg, rank)   # model.path, or a random model written to checkpoint.dir/initial
    warm_start(cfg, env, policy, tokenizer, problems, supervised_step)   # warm_start.steps supervised steps

A module of its own because none of it is the method: the paper starts RL from a pretrained model,
and a tiny random one has to learn to write a solution and a meta prediction first. train.py calls
both before its first RL step and passes in its own supervised step (the one behaviour cloning
uses), so the loop stays the RL loop and data.py stays free of the algorithm's prompts.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from config import Config
from data import TASK_NOTIONS, TASK_WORDS, DataError, build_char_tokenizer
from masa import uninformative_meta_target
from masa_step import Purpose, meta_prompt_ids, seed_for, solution_prompt_ids
from model import PRESETS, Qwen3
from parallel import Env
from training_report import progress_bar


def initial_model(cfg: Config, rank: int) -> str:
    """The checkpoint training starts from: model.path, or for model.init: random a new model of
    model.preset's shape with a character tokenizer, written once to checkpoint.dir/initial (the CPU
    demo), so that every later step loads it exactly as it would load a pretrained checkpoint.
    Collective: every rank calls it."""
    if cfg.model.init == "pretrained":
        return cfg.model.path
    path = Path(cfg.checkpoint.dir) / "initial"
    if rank == 0 and not (path / "config.json").is_file():
        tokenizer = build_char_tokenizer(path, words=TASK_WORDS.get(cfg.data.source, TASK_WORDS["arithmetic"]))
        torch.manual_seed(cfg.train.seed)
        Qwen3(replace(PRESETS[cfg.model.preset], vocab_size=len(tokenizer))).save_pretrained(path)
    dist.barrier()
    return str(path)


def warm_start(cfg: Config, env: Env, policy: Qwen3, tokenizer, problems: list[dict], supervised_step) -> float:
    """warm_start.steps supervised steps on Examples, with a linear warmup of the rate, through an
    AdamW of their own so that RL starts with fresh optimizer state. `supervised_step(cfg, env, policy,
    optimizer, pairs, lr) -> loss` is train.supervised_step. Returns the last loss."""
    w = cfg.warm_start
    examples = Examples(cfg, tokenizer, problems)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=w.lr, weight_decay=0.0)
    loss, bar = float("nan"), progress_bar(w.steps, "warm start", 0, enabled=env.main and cfg.log.progress_bar)
    for step in range(w.steps):
        rng = random.Random(seed_for(cfg, step, env.rank, Purpose.WARM_START))
        lr = w.lr * min(1.0, (step + 1) / max(1, w.warmup_steps))
        loss = supervised_step(cfg, env, policy, optimizer, examples.batch(rng, w.batch_size // env.world), lr)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return loss


class Examples:
    """The warm start's examples: a problem's reference solution (its "solution" field) after the
    solution prompt, or, for a warm_start.meta_fraction of them, a meta-path response whose values
    carry no information (masa.uninformative_meta_target) after the meta prompt, so the warm start
    teaches the meta format and nothing else."""

    def __init__(self, cfg: Config, tokenizer, problems: list[dict]):
        if any("solution" not in p for p in problems):
            raise DataError("warm_start.steps > 0 needs a 'solution' field on every training problem")
        self.cfg, self.tokenizer, self.problems = cfg, tokenizer, problems
        self.encoded = {}  # problem index -> (solution prompt, solution target, meta prompt): the chat template is slow

    def batch(self, rng, size: int) -> list[tuple[list[int], list[int]]]:
        """`size` (prompt ids, target ids) pairs drawn with rng (a random.Random)."""
        return [self.example(rng.randrange(len(self.problems)), rng) for _ in range(size)]

    def example(self, i: int, rng) -> tuple[list[int], list[int]]:
        tokenizer, cfg, eos = self.tokenizer, self.cfg, self.tokenizer.eos_token_id
        if i not in self.encoded:
            p = self.problems[i]
            self.encoded[i] = (solution_prompt_ids(tokenizer, cfg, p["problem"]),
                               tokenizer.encode(p["solution"], add_special_tokens=False) + [eos],
                               meta_prompt_ids(tokenizer, cfg, p["problem"]))
        solution_prompt, solution, meta = self.encoded[i]
        if rng.random() < cfg.warm_start.meta_fraction:
            target = uninformative_meta_target(rng, cfg.rollout.group_size, cfg.rollout.max_response_tokens,
                                               TASK_NOTIONS.get(cfg.data.source, TASK_NOTIONS["arithmetic"]))
            return meta, tokenizer.encode(target, add_special_tokens=False) + [eos]
        return solution_prompt, solution
