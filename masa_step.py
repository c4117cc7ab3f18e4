"""One MASA step, top to bottom: from a batch of problems to the records the update trains on.

    data = collect(cfg, step, env, tokenizer, problems, sampler, grader)
    data.episodes   # every rollout of both paths, with its reward and advantage (masa.Episode)
    data.experts    # expert meta trajectories for behaviour cloning (MASA-efficient)
    data.metrics    # what metrics.jsonl records of the rollouts

The stages, in the order `collect` runs them (docs/method.md §1):
 1. make_prompts     one masa.Prompt per problem: both paths' prompts in the chat template (solution_prompt_ids,
                     meta_prompt_ids)
 2. sample_rollouts  M meta and G solution rollouts per prompt in one sampler call; with MASA-efficient
                     once steering starts (masa.steers), the meta path first, then masa.steer (gating,
                     cutoff budgets, notion hints), then the solution path
 3. grade            each solution's last boxed answer against the gold answer
 4. masa.score_solutions, masa.score_meta   rewards of both paths
 5. masa.assign_advantages                   (r - mean) / (std + eps) per group of one prompt and path
 6. masa.expert_targets                      behaviour cloning's targets, tokenized here
 7. audit            every efficient.audit_every steps: what gating and cutoff skipped, run outside the loss
 8. step_metrics     the step's metrics, from the records
`validate` runs the solution path alone on held-out problems, through the same sampler and grader.

Why a module of its own: masa.py holds the method's pieces as plain functions over records, each
checked alone; here they are put together in the order a step runs them, so that a reader follows a
whole step in one file. The sampler and the grader are parameters: train.py passes rollout.generate
on the actor and rewards.grade_batch on its worker pool, tests/test_step.py scripted stand-ins, so the
step runs without a model. The update (micro-batches, the loss, the optimizer) is train.py's.

Seeds: every draw has its own (run seed, step, index, purpose) seed (seed_for); the rollouts' noise
then depends only on each sequence's stream, derived from its global prompt index, so a resumed run
samples the same training rollouts, and in float32 so does another number of ranks (in bf16 the
logits themselves round with the batch: rollout.py's docstring).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import torch.distributed as dist

import masa
from config import Config
from data import chat_ids, stop_token_ids
from masa import Episode, Prompt
from meta_prediction import parse_meta
from parallel import Env, Tally, all_reduce
from rewards import Grades
from rollout import SamplingParams

# sampler(prompt ids, params, budgets=, seed=, counts=, streams=, first_samples=) -> rollouts per prompt:
# rollout.generate with the model bound (train.py), or a scripted stand-in (tests/test_step.py)
Sampler = Callable[..., list]
Grader = Callable[[list[str], list[str]], Grades]  # (responses, gold answers) -> Grades: rewards.grade_batch


class Purpose(IntEnum):
    """What a seed is for; the values are part of every run's seeds, so they never change."""
    JOINT = 0  # both paths in one sampler call, or the meta path first when steering
    SOLUTION = 1  # the solution path sampled after steering (or alone, for GRPO)
    HINTS = 2  # which meta prediction a prompt's hint comes from
    AUDIT_GATED = 3
    AUDIT_CUT = 4
    VALIDATION = 5
    WARM_START = 6


def seed_for(cfg: Config, step: int, index: int, purpose: Purpose) -> int:
    """An independent seed per (run seed, step, index, purpose), where index is a rank (per-rank draws:
    warm start, audit, validation), a global prompt index (hints) or 0 (rollouts, whose sequences the
    sampler's streams tell apart): no two draws share a stream."""
    return int(np.random.SeedSequence([cfg.train.seed, step, index, int(purpose)]).generate_state(1)[0])


@dataclass
class Request:
    """One prompt's rollouts in a sampler call: `count` samples of `ids`, numbered from `first` in the
    prompt's stream (per-rollout hints ask for one sample at a time, rollout j as sample j)."""
    prompt: Prompt
    path: str  # "solution" | "meta"
    ids: list[int]  # the prompt's token ids on this path
    count: int
    first: int = 0


class Expert(NamedTuple):
    """An expert meta trajectory waiting for behaviour cloning (train.behaviour_cloning)."""
    step: int
    prompt_index: int  # with step: the order experts are cloned in, the same on any number of ranks
    prompt_ids: list[int]
    target_ids: list[int]  # masa.expert_target's text, tokenized, then end of sequence


@dataclass
class StepData:
    """What `collect` hands to the update and the log."""
    episodes: list[Episode]  # solution episodes, then meta episodes, each grouped by prompt
    metrics: Tally  # this rank's step metrics (summed over ranks by train.py)
    seconds: dict[str, float] = field(default_factory=dict)  # time_rollout, time_grading, time_audit
    experts: list[Expert] = field(default_factory=list)

    def record(self, env: Env, step: int, update_metrics: dict) -> dict:
        """The step's line in metrics.jsonl (collective): the rollout metrics over all ranks (the
        audit's among them), the update's, and each time the slowest rank's."""
        record = {"step": step + 1, **self.metrics.reduce(env), **update_metrics}
        names = sorted(self.seconds)
        record.update(zip(names, all_reduce([self.seconds[n] for n in names], env, dist.ReduceOp.MAX)))
        return record


# ---------------------------------------------------------------------------------------------------
# The step


def collect(cfg: Config, step: int, env: Env, tokenizer, problems: list[dict], sampler: Sampler,
            grader: Grader) -> StepData:
    """Stages 1-8 of the module docstring for this rank's problems (its contiguous share of the step's)."""
    G, M = cfg.rollout.group_size, cfg.rollout.meta_group_size
    started = time.perf_counter()
    prompts = make_prompts(cfg, tokenizer, problems, first=step * cfg.train.batch_size + env.rank * len(problems))
    solutions, meta = sample_rollouts(cfg, step, tokenizer, prompts, sampler)
    sampled = time.perf_counter()
    grades = grade(solutions, prompts, grader)
    seconds = {"time_rollout": sampled - started, "time_grading": time.perf_counter() - sampled}
    masa.score_solutions(solutions, cfg.efficient.cutoff_in_loss)
    masa.score_meta(prompts, solutions, meta, G, cfg.meta.pass_rate_base)
    masa.assign_advantages(solutions, meta, G, M, env.device)
    experts = []
    if cfg.algorithm == "masa_efficient" and cfg.efficient.behaviour_cloning:
        for prompt, target in masa.expert_targets(prompts, solutions, meta, cfg.efficient.bc_threshold,
                                                  cfg.efficient.bc_select):
            ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
            experts.append(Expert(step, prompt.index, prompt.meta_ids, ids))
    audited = {}
    if steering(cfg, step) and step % cfg.efficient.audit_every == 0:  # a measurement, not training: timed apart
        audit_started = time.perf_counter()
        seeds = (seed_for(cfg, step, env.rank, Purpose.AUDIT_GATED), seed_for(cfg, step, env.rank, Purpose.AUDIT_CUT))
        audited = audit(cfg, tokenizer, prompts, solutions, sampler, grader, seeds)
        seconds["time_audit"] = time.perf_counter() - audit_started
    return StepData(solutions + meta, step_metrics(cfg, prompts, solutions, meta, grades, audited), seconds, experts)


def make_prompts(cfg: Config, tokenizer, problems: list[dict], first: int) -> list[Prompt]:
    """One masa.Prompt per problem, numbered from `first` (its global index in the step)."""
    return [Prompt(first + i, p["problem"], p["answer"], meta_ids=meta_prompt_ids(tokenizer, cfg, p["problem"]),
                   solution_ids=[solution_prompt_ids(tokenizer, cfg, p["problem"])]) for i, p in enumerate(problems)]


def solution_prompt_ids(tokenizer, cfg: Config, problem: str, hint: str = "") -> list[int]:
    """The solution prompt's token ids, with the hint text (masa.hint_text) only
    if the prompt still fits rollout.max_prompt_tokens."""
    ids = chat_ids(tokenizer, masa.solution_prompt(problem, cfg.prompt.solution, hint))
    if hint and len(ids) > cfg.rollout.max_prompt_tokens:
        return solution_prompt_ids(tokenizer, cfg, problem)
    return ids


def meta_prompt_ids(tokenizer, cfg: Config, problem: str) -> list[int]:
    """The meta prompt's token ids: it states the real G and the real response budget."""
    meta = masa.meta_prompt(problem, cfg.prompt.meta, cfg.rollout.group_size, cfg.rollout.max_response_tokens)
    return chat_ids(tokenizer, meta, cfg.prompt.meta_system)


def prompts_fit(tokenizer, cfg: Config, problem: str) -> bool:
    """Whether a problem's prompts (the meta prompt too, when the meta path runs) fit max_prompt_tokens.
    A problem longer in characters than max_prompt_tokens of the vocabulary's longest tokens cannot
    fit and is not tokenized at all (a 50 MB row would take minutes and gigabytes on every rank)."""
    limit = cfg.rollout.max_prompt_tokens
    if len(problem) > limit * longest_token(tokenizer) or len(solution_prompt_ids(tokenizer, cfg, problem)) > limit:
        return False
    return cfg.algorithm == "grpo" or len(meta_prompt_ids(tokenizer, cfg, problem)) <= limit


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token: text of more characters than n of them is more
    than n tokens (a token decodes to at most its own length in characters)."""
    return max(map(len, tokenizer.get_vocab()))


def steering(cfg: Config, step: int) -> bool:
    """Whether the meta path runs first this step, for masa.steer to act on its predictions."""
    return cfg.algorithm == "masa_efficient" and masa.steers(cfg.efficient, step)


def sample_rollouts(cfg: Config, step: int, tokenizer, prompts: list[Prompt],
                    sampler: Sampler) -> tuple[list[Episode], list[Episode]]:
    """(solution episodes, meta episodes) of this step, each grouped by prompt. Once steering starts,
    the meta path is sampled first and masa.steer sets each prompt's gate, budget and hints from its
    predictions; otherwise both paths share one sampler call (GRPO: the solution path alone)."""
    G, M = cfg.rollout.group_size, cfg.rollout.meta_group_size
    seed = partial(seed_for, cfg, step, 0)  # the same on every rank: the streams tell sequences apart
    run = partial(sample, cfg, tokenizer, sampler=sampler)
    meta_requests = [Request(p, "meta", p.meta_ids, M) for p in prompts]
    if steering(cfg, step):
        meta = run(meta_requests, seed(Purpose.JOINT))
        hint_seeds = [seed_for(cfg, step, p.index, Purpose.HINTS) for p in prompts]  # per prompt: rank-free
        masa.steer(prompts, meta, cfg.efficient, step, G, cfg.rollout.max_response_tokens, hint_seeds, cfg.prompt)
        for p in (p for p in prompts if p.hints):
            p.solution_ids = [solution_prompt_ids(tokenizer, cfg, p.problem, hint) for hint in p.hints]
        requests = solution_requests(prompts, G)
        for r in requests:
            r.count = 0 if r.prompt.gated else r.count  # a gated prompt gets no solution rollouts
        return run(requests, seed(Purpose.SOLUTION)), meta
    if cfg.algorithm == "grpo":
        return run(solution_requests(prompts, G), seed(Purpose.SOLUTION)), []
    both = run(meta_requests + solution_requests(prompts, G), seed(Purpose.JOINT))
    return [e for e in both if e.path == "solution"], [e for e in both if e.path == "meta"]


def solution_requests(prompts: list[Prompt], G: int) -> list[Request]:
    """The solution path's requests: G samples of a prompt, or one request per rollout when its
    rollouts have prompts of their own (per-rollout hints), rollout j as sample j of the prompt's
    stream: the same noise either way."""
    out = []
    for p in prompts:
        if len(p.solution_ids) == 1:
            out.append(Request(p, "solution", p.solution_ids[0], G))
        else:
            out += [Request(p, "solution", ids, 1, j) for j, ids in enumerate(p.solution_ids)]
    return out


def sampling_params(cfg: Config, tokenizer) -> SamplingParams:
    return SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                          max_new_tokens=cfg.rollout.max_response_tokens,
                          stop_token_ids=stop_token_ids(tokenizer, cfg.rollout.stop_at_end_of_turn))


def sample(cfg: Config, tokenizer, requests: list[Request], seed: int, sampler: Sampler) -> list[Episode]:
    """One sampler call: the requests' episodes in request order, each response decoded once and, on
    the meta path, parsed once. Solution rollouts get their prompt's cutoff budget."""
    budgets = [r.prompt.budget if r.path == "solution" else None for r in requests]
    # A sequence's sampling noise is keyed by (seed, stream, sample, position): streams are global
    # prompt indices (x2, + 1 on the solution path), so no rank or batch composition changes a token.
    streams = [2 * r.prompt.index + (r.path == "solution") for r in requests]
    rollouts = sampler([r.ids for r in requests], sampling_params(cfg, tokenizer), budgets=budgets, seed=seed,
                       counts=[r.count for r in requests], streams=streams, first_samples=[r.first for r in requests])
    episodes = []
    for request, group in zip(requests, rollouts):
        for rollout in group:
            text = tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
            prediction = parse_meta(text, cfg.rollout.group_size, cfg.rollout.max_response_tokens) \
                if request.path == "meta" else None
            episodes.append(Episode(request.prompt.index, request.path, request.ids, rollout.token_ids, text,
                                    rollout.finish_reason, rollout.logprobs, prediction=prediction))
    return episodes


def grade(solutions: list[Episode], prompts: list[Prompt], grader: Grader) -> Grades:
    """Set each solution episode's `correct` (its final boxed answer against its prompt's gold answer,
    as written: the cutoff rule is masa.score_solutions'). Returns the grades (timeouts, errors)."""
    if not solutions:
        return Grades([], [])
    answers = {p.index: p.answer for p in prompts}
    grades = grader([e.text for e in solutions], [answers[e.prompt_index] for e in solutions])
    for e, correct in zip(solutions, grades.correct):
        e.correct = bool(correct)
    return grades


def audit(cfg: Config, tokenizer, prompts: list[Prompt], solutions: list[Episode], sampler: Sampler,
          grader: Grader, seeds: tuple[int, int]) -> dict[str, int]:
    """Gating and cutoff are predictions: run what they skipped (outside the loss) and count how often
    they were right. Gated prompts get their G solution rollouts after all (were they really all-right
    or all-wrong?); cut rollouts are continued to max_response_tokens (would they have ended wrong?).
    Counts, summed over ranks before train.py turns them into gating and cutoff precision."""
    G, max_new = cfg.rollout.group_size, cfg.rollout.max_response_tokens
    params = sampling_params(cfg, tokenizer)
    gated = [p for p in prompts if p.gated]
    zero_variance = 0
    if gated:
        requests = solution_requests(gated, G)
        rollouts = sampler([r.ids for r in requests], params, seed=seeds[0], counts=[r.count for r in requests])
        texts = {p.index: [] for p in gated}
        for request, group in zip(requests, rollouts):
            texts[request.prompt.index] += [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in group]
        for p in gated:
            zero_variance += len(set(grader(texts[p.index], [p.answer] * G).correct)) == 1
    cut = [e for e in solutions if e.finish_reason == "cutoff"]
    wrong = 0
    if cut:
        rest = [max_new - len(e.response_ids) for e in cut]
        continued = sampler([e.prompt_ids + e.response_ids for e in cut], params, budgets=rest, seed=seeds[1],
                            counts=[1] * len(cut))
        texts = [tokenizer.decode(e.response_ids + c[0].token_ids, skip_special_tokens=True)
                 for e, c in zip(cut, continued)]
        answers = {p.index: p.answer for p in prompts}
        wrong = sum(not c for c in grader(texts, [answers[e.prompt_index] for e in cut]).correct)
    return {"audit_gated": len(gated), "audit_gated_zero_variance": zero_variance, "audit_cut": len(cut),
            "audit_cut_wrong": wrong}


def step_metrics(cfg: Config, prompts: list[Prompt], solutions: list[Episode], meta: list[Episode],
                 grades: Grades, audited: dict[str, int]) -> Tally:
    """What metrics.jsonl records of a step's rollouts (README, Training), and the audit's counts."""
    G = cfg.rollout.group_size
    m = Tally()
    for name, count in audited.items():
        m.total(name, count)
    if audited:  # the fraction of gated prompts / cut rollouts the audit confirmed
        m.fraction("gating_precision", audited["audit_gated_zero_variance"], audited["audit_gated"])
        m.fraction("cutoff_precision", audited["audit_cut_wrong"], audited["audit_cut"])
    m.mean("reward", [e.reward for e in solutions])
    m.mean("accuracy", [e.correct for e in solutions])  # cut-off rollouts graded as written
    m.total("solution_tokens", sum(len(e.response_ids) for e in solutions))
    m.total("solution_rollouts", len(solutions))
    m.mean("cutoff_fraction", [e.finish_reason == "cutoff" for e in solutions])
    m.mean("gated_fraction", [p.gated for p in prompts])
    m.total("grader_timeouts", grades.timeouts)  # symbolic checks killed at the timeout (scored 0)
    m.total("grader_errors", grades.errors)  # symbolic checks that raised (scored 0)
    if cfg.algorithm == "grpo":
        return m
    scored = [e for e in meta if e.in_loss]
    m.mean("meta_reward", [e.reward for e in scored])
    for part in ("pass_rate", "length", "notion"):
        m.mean(f"meta_{part}", [e.meta_parts[part] for e in scored])
    p_true = {p.index: sum(e.reward for e in solutions if e.prompt_index == p.index) / G for p in prompts}
    m.mean("pass_rate_mae", [abs(e.prediction.pass_rate / G - p_true[e.prompt_index]) for e in scored
                             if e.prediction is not None and e.prediction.pass_rate is not None])
    m.mean("meta_parse_failures", [e.prediction is None for e in meta])
    m.total("meta_tokens", sum(len(e.response_ids) for e in meta))
    return m


# ---------------------------------------------------------------------------------------------------
# Validation: the solution path alone, on held-out problems


def validate(cfg: Config, env: Env, tokenizer, problems: list[dict], sampler: Sampler, grader: Grader) -> float:
    """Accuracy of the solution path on held-out problems: `validation.samples` responses per problem at
    validation.temperature (0: greedy) and top_p. Ranks split the problems; each problem samples its
    own stream (its index), so the number of ranks changes no draw (rollout.py: and in float32 no token)."""
    mine, n = problems[env.rank::env.world], cfg.validation.samples
    params = SamplingParams(n=n, temperature=cfg.validation.temperature, top_p=cfg.validation.top_p,
                            max_new_tokens=cfg.rollout.max_response_tokens,
                            stop_token_ids=stop_token_ids(tokenizer, cfg.rollout.stop_at_end_of_turn))
    prompts = [solution_prompt_ids(tokenizer, cfg, p["problem"]) for p in mine]
    rollouts = sampler(prompts, params, seed=seed_for(cfg, 0, 0, Purpose.VALIDATION),
                       streams=list(range(env.rank, len(problems), env.world))) if prompts else []
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for rs in rollouts for r in rs]
    graded = grader(texts, [p["answer"] for p in mine for _ in range(n)]).correct if texts else []
    right, total = all_reduce([sum(graded), len(graded)], env)
    return right / total if total else float("nan")
