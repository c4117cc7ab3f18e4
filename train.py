"""The trainer: GRPO, MASA and MASA-efficient (DESIGN.md §1) on one process or many.

    python train.py CONFIG [section.key=value ...]                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py CONFIG [section.key=value ...] # one node; NCCL on CUDA, gloo on CPU

One step, in the order the code runs it:
1. Every rank takes its contiguous share of the step's B prompts (a group never spans ranks).
2. Rollouts on each rank's full, unsharded copy of the weights (`actor`, refreshed after every
   optimizer step): the meta path (M per prompt) and the solution path (G per prompt); with
   MASA-efficient the meta path runs first, and its predictions gate prompts, set cutoff budgets and
   supply notion hints for the solution path.
3. Grading (rewards.py), meta rewards against each prompt's own solution rollouts, advantages per
   group (masa.py).
4. The update on the FSDP2-sharded policy: micro-batches sorted by length, log-probs through the
   fused kernel inside the model's forward, masa.policy_loss divided by the global token count (all-
   reduced), gradient-norm clip, AdamW with linear warmup. A non-finite loss or gradient skips the
   step and leaves the weights untouched.
5. Behaviour cloning on expert meta trajectories, the audit, logging, validation, checkpoints.

Checkpoints (checkpoint.dir/step_NNNNNN): `model/` in Hugging Face format (loadable by transformers
and vLLM as is, tokenizer included), `state/` a sharded torch.distributed.checkpoint of the policy
and optimizer, `rank<r>.pt` the scheduler, step and every RNG of each rank, and the resolved
config. Each is written to a temporary directory and renamed; `latest` names the newest complete
one. Rollouts are seeded by (seed, step, rank), so a resumed run repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

import masa
from config import Config, load_config, to_dict
from data import (ARITHMETIC_NOTIONS, ARITHMETIC_WORDS, arithmetic_problems, build_char_tokenizer, chat_ids,
                  load_problems, stop_token_ids)
from model import PRESETS, Qwen3, Qwen3Config, _read_config
from rewards import GraderPool, Outcome, grade_batch, meta_reward, parse_meta
from rollout import SamplingParams, generate

# ---------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Env:
    """Join torchrun's process group, or make a one-process group (FSDP2 runs the same either way)."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        # Ranks wait for each other at the first collective after rollouts, whose length varies a lot
        # (gating, 8k-token responses, the audit): NCCL's default 10-minute timeout would abort the job.
        timeout = timedelta(hours=2)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Env(dist.get_rank(), dist.get_world_size(), device)


def initial_model(cfg: Config, env: Env) -> str:
    """The checkpoint training starts from: model.path, or for model.init: random a new model of
    model.preset's shape with a character tokenizer, written once to checkpoint.dir/initial (the CPU
    demo), so that every later step loads it exactly as it would load a pretrained checkpoint."""
    if cfg.model.init == "pretrained":
        return cfg.model.path
    from dataclasses import replace

    path = Path(cfg.checkpoint.dir) / "initial"
    if env.main and not (path / "config.json").is_file():
        tokenizer = build_char_tokenizer(path, words=ARITHMETIC_WORDS)
        torch.manual_seed(cfg.train.seed)
        Qwen3(replace(PRESETS[cfg.model.preset], vocab_size=len(tokenizer))).save_pretrained(path)
    dist.barrier()
    return str(path)


def training_problems(cfg: Config) -> list[dict]:
    if cfg.data.source == "arithmetic":
        return arithmetic_problems(cfg.data.arithmetic_count, cfg.train.seed, tuple(cfg.data.arithmetic_digits))
    return load_problems(cfg.data.train_path, cfg.data.problem_key, cfg.data.answer_key)


def build_policy(cfg: Config, env: Env, path: str | None = None) -> Qwen3:
    """The trained model: float32 master weights sharded with FSDP2 per block and at the root; on
    CUDA with bfloat16 the forward and backward run in bf16 and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = Qwen3.from_pretrained(path or cfg.model.path, dtype=torch.float32, device=env.device)
    policy.activation_checkpointing = cfg.model.activation_checkpointing
    low = getattr(torch, cfg.model.dtype)
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low != torch.float32 else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in policy.layers:
        fully_shard(block, **kwargs)
    fully_shard(policy, **kwargs)
    # The loss is already divided by global counts (masa.LossScale): gradients must be summed over
    # ranks, not averaged as FSDP does by default.
    for module in [*policy.layers, policy]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM, which gloo supports too
    return policy


@torch.no_grad()
def refresh_actor(actor: Qwen3, policy: Qwen3):
    """Copy the sharded policy's weights into the full rollout copy, one tensor at a time."""
    actor_params = dict(actor.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        actor_params[name].copy_(full)


# ---------------------------------------------------------------------------------------------------
# One step's data


@dataclass
class Sequence:
    """One rollout in the loss: prompt + response token ids, its advantage, and the global index of
    its prompt in the step (which picks its mini-batch the same way on any number of ranks)."""
    prompt: list[int]
    response: list[int]
    advantage: float
    group: int = 0


@dataclass
class StepData:
    sequences: list[Sequence] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    experts: list[tuple] = field(default_factory=list)  # (step, global prompt index, prompt ids, BC target ids)


def step_problems(problems: list[dict], cfg: Config, step: int, env: Env) -> list[dict]:
    """This rank's share of step `step`'s prompts: epochs are seeded permutations of the data."""
    B, n = cfg.train.batch_size, len(problems)
    share = B // env.world
    out = []
    for i in range(step * B + env.rank * share, step * B + (env.rank + 1) * share):
        epoch, index = divmod(i, n)
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(n) if cfg.data.shuffle else range(n)
        out.append(problems[order[index]])
    return out


MAX_HINT_NOTIONS, MAX_NOTION_CHARS = 8, 80  # a hint is model-written text: keep it short


def solution_prompt_ids(tokenizer, cfg: Config, problem: str, hint: list[str] | None = None) -> list[int]:
    """The solution prompt's token ids, with the hint only if the prompt still fits max_prompt_tokens."""
    ids = chat_ids(tokenizer, masa.solution_prompt(problem, cfg.prompt.solution, hint, cfg.prompt.hint))
    if hint and len(ids) > cfg.rollout.max_prompt_tokens:
        return solution_prompt_ids(tokenizer, cfg, problem)
    return ids


def fits(tokenizer, cfg: Config, problem: str) -> bool:
    """Whether a problem's prompts (the meta prompt too, when the meta path runs) fit max_prompt_tokens."""
    limit = cfg.rollout.max_prompt_tokens
    if len(solution_prompt_ids(tokenizer, cfg, problem)) > limit:
        return False
    if cfg.algorithm == "grpo":
        return True
    meta = masa.meta_prompt(problem, cfg.prompt.meta, cfg.rollout.group_size, cfg.rollout.max_response_tokens)
    return len(chat_ids(tokenizer, meta)) <= limit


def seed_for(cfg: Config, step: int, rank: int, purpose: int) -> int:
    """An independent seed per (run seed, step, rank, purpose): no two sampling calls share a stream."""
    return int(np.random.SeedSequence([cfg.train.seed, step, rank, purpose]).generate_state(1)[0])


SEED_JOINT, SEED_SOLUTION, SEED_HINTS, SEED_AUDIT_GATED, SEED_AUDIT_CUT, SEED_VALIDATION, SEED_WARM_START = range(7)


def collect(cfg: Config, step: int, env: Env, actor: Qwen3, tokenizer, pool: GraderPool,
            problems: list[dict]) -> StepData:
    """Steps 2-3: rollouts for this rank's prompts, rewards, advantages, experts."""
    G, M = cfg.rollout.group_size, cfg.rollout.meta_group_size
    max_new = cfg.rollout.max_response_tokens
    meta_path = cfg.algorithm in ("masa", "masa_efficient")
    efficient = cfg.efficient if cfg.algorithm == "masa_efficient" else None
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=max_new, stop_token_ids=stop_token_ids(tokenizer))
    seed = seed_for(cfg, step, env.rank, SEED_JOINT)
    generator = torch.Generator().manual_seed(seed_for(cfg, step, env.rank, SEED_HINTS))
    P = len(problems)
    first = step * cfg.train.batch_size + env.rank * P  # global index of this rank's first prompt
    meta_ids = [chat_ids(tokenizer, masa.meta_prompt(p["problem"], cfg.prompt.meta, G, max_new)) for p in problems]
    data, m = StepData(), {}
    started = time.perf_counter()

    # From gate_start_step on, MASA-efficient runs the meta rollouts first and lets their predictions
    # steer the solution path (gating, cutoff budgets, hints); before, and for MASA, one joint call.
    steering = efficient is not None and step >= efficient.gate_start_step
    meta_rollouts = None
    if steering:
        meta_rollouts = generate(actor, meta_ids, params, seed=seed, counts=[M] * P, slots=cfg.rollout.slots or None)
    predictions = [[parse_meta(tokenizer.decode(r.token_ids, skip_special_tokens=True), G, max_new) for r in rs]
                   for rs in meta_rollouts] if meta_rollouts else None
    gated, budgets, hints = [False] * P, [None] * P, [None] * P
    if steering:
        if efficient.gating:
            gated = masa.gate([masa.predicted_pass_rates(ps, G) for ps in predictions], efficient.gate_std,
                              efficient.gate_eps)
        if efficient.cutoff:
            budgets = masa.cutoff_budgets([[p.solution_length if p else None for p in ps] for ps in predictions],
                                          efficient.cutoff_factor, max_new)
        if efficient.hints:
            hints = [masa.hint_notions(ps, generator)[:MAX_HINT_NOTIONS] for ps in predictions]
            hints = [[n[:MAX_NOTION_CHARS] for n in h] for h in hints]
    solution_ids = [solution_prompt_ids(tokenizer, cfg, p["problem"], h) for p, h in zip(problems, hints)]
    counts = [0 if g else G for g in gated]
    if meta_path and meta_rollouts is None:
        out = generate(actor, meta_ids + solution_ids, params, seed=seed, counts=[M] * P + counts,
                       slots=cfg.rollout.slots or None)
        meta_rollouts, solution_rollouts = out[:P], out[P:]
        predictions = [[parse_meta(tokenizer.decode(r.token_ids, skip_special_tokens=True), G, max_new) for r in rs]
                       for rs in meta_rollouts]
    else:
        solution_rollouts = generate(actor, solution_ids, params, budgets=budgets,
                                     seed=seed_for(cfg, step, env.rank, SEED_SOLUTION), counts=counts,
                                     slots=cfg.rollout.slots or None)

    generated = time.perf_counter()

    # Grade solutions: a rollout stopped at its cutoff budget earns 0 whatever it wrote.
    texts = [[tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rs] for rs in solution_rollouts]
    flat = [(t, p["answer"]) for ts, p in zip(texts, problems) for t in ts]
    grades = grade_batch([t for t, _ in flat], [a for _, a in flat], pool) if flat else None
    correct, k = [], 0
    for rs in solution_rollouts:
        correct.append([bool(grades.correct[k + j]) and r.finish_reason != "cutoff" for j, r in enumerate(rs)])
        k += len(rs)
    m["time_rollout"], m["time_grading"] = (generated - started, 1), (time.perf_counter() - generated, 1)
    if steering and step % efficient.audit_every == 0:  # a measurement, not training: timed apart
        audit_started = time.perf_counter()
        m.update(audit(cfg, actor, tokenizer, pool, params, (seed_for(cfg, step, env.rank, SEED_AUDIT_GATED),
                       seed_for(cfg, step, env.rank, SEED_AUDIT_CUT)), problems, solution_ids, gated, solution_rollouts))
        m["time_audit"] = (time.perf_counter() - audit_started, 1)

    rewards = torch.tensor([float(c) for cs in correct for c in cs])
    advantages = masa.group_advantages(rewards, G).tolist() if len(rewards) else []
    k = 0
    for i, (prompt, rs) in enumerate(zip(solution_ids, solution_rollouts)):
        for r in rs:
            data.sequences.append(Sequence(prompt, r.token_ids, advantages[k], first + i))
            k += 1
    # Rates are (numerator, denominator) pairs, counts plain numbers: both are summed over ranks.
    m["reward"] = (rewards.sum().item(), len(rewards))
    m["accuracy"] = (sum(grades.correct) if grades else 0, len(rewards))  # cut-off rollouts graded as written
    m["solution_tokens"] = sum(len(r.token_ids) for rs in solution_rollouts for r in rs)
    m["solution_rollouts"] = len(rewards)
    m["cutoff_fraction"] = (sum(r.finish_reason == "cutoff" for rs in solution_rollouts for r in rs), len(rewards))
    m["gated_fraction"] = (sum(gated), P)
    m["grader_timeouts"] = grades.timeouts if grades else 0

    if meta_path:
        scores, parts, errors = [], {"pass_rate": [], "length": [], "notion": []}, []
        meta_seqs = []
        for i, (problem, rs, preds) in enumerate(zip(problems, meta_rollouts, predictions)):
            if gated[i]:
                continue  # no solution rollouts, so nothing to score these predictions against
            outcomes = [Outcome(c, len(r.token_ids), t) for c, r, t in zip(correct[i], solution_rollouts[i], texts[i])]
            results = [meta_reward(p, outcomes, problem["problem"], G, cfg.meta.pass_rate_base) for p in preds]
            p_true = sum(correct[i]) / G
            for p, res in zip(preds, results):
                for key in parts:
                    parts[key].append(res[key])
                if p is not None and p.pass_rate is not None:
                    errors.append(abs(p.pass_rate / G - p_true))
            scores.extend(res["score"] for res in results)
            meta_seqs.extend((meta_ids[i], r.token_ids, first + i) for r in rs)
            if efficient is not None and efficient.behaviour_cloning:
                best = masa.select_expert([res["score"] if p is not None else -1.0 for p, res in zip(preds, results)],
                                          efficient.bc_threshold)  # an unparseable response is no expert
                if best is not None and any(correct[i]):  # with no correct rollout the length is unknown
                    response = tokenizer.decode(rs[best].token_ids, skip_special_tokens=True)
                    lengths = [o.length for o in outcomes if o.correct]
                    target = masa.expert_target(response, preds[best], lengths, sum(correct[i]))
                    ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
                    data.experts.append((step, first + i, meta_ids[i], ids))
        meta_adv = masa.group_advantages(torch.tensor(scores), M).tolist() if scores else []
        data.sequences.extend(Sequence(p, r, a, g) for (p, r, g), a in zip(meta_seqs, meta_adv))
        m["meta_reward"] = (sum(scores), len(scores))
        for key, values in parts.items():
            m[f"meta_{key}"] = (sum(values), len(values))
        m["pass_rate_mae"] = (sum(errors), len(errors))
        m["meta_parse_failures"] = (sum(p is None for ps in predictions for p in ps), P * M)
        m["meta_tokens"] = sum(len(r.token_ids) for rs in meta_rollouts for r in rs)
    data.metrics = m
    return data


def audit(cfg: Config, actor, tokenizer, pool, params, seeds, problems, solution_ids, gated, solution_rollouts) -> dict:
    """Gating and cutoff are predictions: run what they skipped (outside the loss) and measure them.
    Gated prompts get their G solution rollouts after all (were they really all-right or all-wrong?);
    cut rollouts are continued to max_response_tokens (would they have ended wrong?)."""
    G, max_new = cfg.rollout.group_size, cfg.rollout.max_response_tokens
    out = {"audit_gated": sum(gated), "audit_cut": 0}
    skipped = [i for i, g in enumerate(gated) if g]
    zero_variance = []
    if skipped:
        rollouts = generate(actor, [solution_ids[i] for i in skipped], params, seed=seeds[0], counts=[G] * len(skipped))
        for i, rs in zip(skipped, rollouts):
            texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rs]
            verdicts = grade_batch(texts, [problems[i]["answer"]] * len(texts), pool).correct
            zero_variance.append(len(set(verdicts)) == 1)
    cut = [(i, r) for i, rs in enumerate(solution_rollouts) for r in rs if r.finish_reason == "cutoff"]
    continued_correct = []
    if cut:
        prompts = [solution_ids[i] + r.token_ids for i, r in cut]
        rest = [max_new - len(r.token_ids) for _, r in cut]
        continuations = generate(actor, prompts, params, budgets=rest, seed=seeds[1], counts=[1] * len(cut))
        texts = [tokenizer.decode(r.token_ids + c[0].token_ids, skip_special_tokens=True)
                 for (_, r), c in zip(cut, continuations)]
        continued_correct = grade_batch(texts, [problems[i]["answer"] for i, _ in cut], pool).correct
        out["audit_cut"] = len(cut)
    # Counts, summed over ranks before the precisions (masa.gating_precision, masa.cutoff_precision)
    # are taken in train().
    out["audit_gated_zero_variance"] = sum(zero_variance)
    out["audit_cut_wrong"] = sum(not c for c in continued_correct)
    return out


def validate(cfg: Config, env: Env, actor, tokenizer, pool, problems: list[dict]) -> float:
    """Accuracy of the solution path on held-out problems: `validation.samples` responses per problem
    at validation.temperature (0: greedy) and top_p; problems are split across ranks."""
    mine = problems[env.rank::env.world]
    params = SamplingParams(n=cfg.validation.samples, temperature=cfg.validation.temperature,
                            top_p=cfg.validation.top_p, max_new_tokens=cfg.rollout.max_response_tokens,
                            stop_token_ids=stop_token_ids(tokenizer))
    ids = [chat_ids(tokenizer, masa.solution_prompt(p["problem"], cfg.prompt.solution)) for p in mine]
    seed = seed_for(cfg, 0, env.rank, SEED_VALIDATION)
    rollouts = generate(actor, ids, params, seed=seed, slots=cfg.rollout.slots or None) if ids else []
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for rs in rollouts for r in rs]
    answers = [p["answer"] for p in mine for _ in range(cfg.validation.samples)]
    correct = sum(grade_batch(texts, answers, pool).correct) if texts else 0
    right, total = all_reduce([correct, len(texts)], env)
    return right / total if total else float("nan")


# ---------------------------------------------------------------------------------------------------
# The update


def micro_batches(sequences: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """Sort by length, then pack so that (rows x longest row) stays within max_tokens."""
    batches, current = [], []
    for s in sorted(sequences, key=lambda s: len(s.prompt) + len(s.response)):
        length = len(s.prompt) + len(s.response)
        if current and (len(current) + 1) * length > max_tokens:
            batches.append(current)
            current = []
        current.append(s)
    return batches + ([current] if current else [])


def tensors(batch: list[Sequence], device):
    """ids [b, T] right-padded, targets [b, T] (the next token), response mask [b, T], advantages [b]."""
    T = max(len(s.prompt) + len(s.response) for s in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T)
    for i, s in enumerate(batch):
        tokens = s.prompt + s.response
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, len(s.prompt) - 1:len(tokens) - 1] = 1  # positions whose next token is a response token
    targets = torch.cat([ids[:, 1:], torch.zeros(len(batch), 1, dtype=torch.long)], dim=1)
    adv = torch.tensor([s.advantage for s in batch])
    return ids.to(device), targets.to(device), mask.to(device), adv.to(device)


def all_reduce(values: list[float], env: Env, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def update(cfg: Config, env: Env, policy: Qwen3, optimizer, scheduler, data: StepData,
           reference: Qwen3 | None = None) -> dict:
    """Step 4: one optimizer step per mini-batch per PPO epoch (1 x 1 in the paper). `reference` is
    the frozen initial policy, needed only for a KL term (loss.kl_coef > 0)."""
    temperature = cfg.rollout.temperature or 1.0
    sequences = data.sequences
    old = None
    if cfg.train.ppo_epochs > 1 or cfg.train.mini_batches > 1:  # the ratio needs log-probs before any update
        old = {}
        with torch.no_grad():
            for batch in _same_count(micro_batches(sequences, cfg.train.micro_batch_tokens), env):
                ids, targets, _, _ = tensors(batch or [_DUMMY], env.device)
                logprobs, _ = policy(ids, targets=targets, temperature=temperature)
                for s, row in zip(batch, logprobs):
                    old[id(s)] = row[:len(s.prompt) + len(s.response)]
    steps = []
    for _ in range(cfg.train.ppo_epochs):
        parts = [[s for s in sequences if s.group % cfg.train.mini_batches == i] for i in range(cfg.train.mini_batches)]
        for part in parts:
            steps.append(_optimizer_step(cfg, env, policy, optimizer, scheduler, part, old, temperature, reference))
    # one record per batch: token sums over the optimizer steps, token-weighted means, mean grad norm
    seen = sum(s["trained_tokens"] for s in steps)
    out = {"loss": sum(s["loss"] for s in steps), "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
           "skipped_steps": sum(s["skipped"] for s in steps), "lr": steps[0]["lr"], "trained_tokens": seen}
    for key in ("clip_fraction", "ratio_mean", "entropy", "kl"):
        out[key] = sum(s[key] * s["trained_tokens"] for s in steps) / max(seen, 1)
    for key in ("time_logprobs_backward", "time_optimizer"):
        out[key] = sum(s[key] for s in steps)
    return out


_DUMMY = Sequence([0], [0], 0.0)  # a rank with less work runs this (masked out) so collectives match


def _same_count(batches: list, env: Env) -> list:
    """FSDP's collectives need every rank to run as many forwards as the busiest one."""
    most = int(all_reduce([len(batches)], env, dist.ReduceOp.MAX)[0])
    return batches + [[] for _ in range(most - len(batches))]


def _optimizer_step(cfg, env, policy, optimizer, scheduler, sequences, old, temperature, reference) -> dict:
    tokens, count = all_reduce([sum(len(s.response) for s in sequences), len(sequences)], env)
    scale = masa.LossScale(tokens=max(tokens, 1), sequences=max(int(count), 1),
                           max_response_tokens=cfg.rollout.max_response_tokens)
    # Responses with advantage 0 add nothing to the loss or its gradient (no KL or entropy term):
    # they count in the normalizer above but need no forward pass.
    needed = [s for s in sequences if s.advantage != 0 or cfg.loss.kl_coef or cfg.loss.entropy_coef]
    sums = {"loss": 0.0, "tokens": 0.0, "clipped_tokens": 0.0, "ratio_sum": 0.0, "entropy_sum": 0.0, "kl_sum": 0.0}
    started = time.perf_counter()
    for batch in _same_count(micro_batches(needed, cfg.train.micro_batch_tokens), env):
        ids, targets, mask, adv = tensors(batch or [_DUMMY], env.device)
        if not batch:
            mask.zero_()
        logprobs, entropy = policy(ids, targets=targets, temperature=temperature)
        old_logprobs = logprobs.detach()
        if old is not None and batch:
            old_logprobs = torch.nn.utils.rnn.pad_sequence([old[id(s)] for s in batch], batch_first=True)
            old_logprobs = torch.nn.functional.pad(old_logprobs, (0, logprobs.shape[1] - old_logprobs.shape[1]))
        ref_logprobs = None
        if cfg.loss.kl_coef:
            with torch.no_grad():
                ref_logprobs, _ = reference(ids, targets=targets, temperature=temperature)
        loss, m = masa.policy_loss(logprobs, old_logprobs, adv, mask, scale, cfg.loss.clip_low, cfg.loss.clip_high,
                                   cfg.loss.aggregation, ref_logprobs=ref_logprobs, kl_coef=cfg.loss.kl_coef,
                                   entropy=entropy, entropy_coef=cfg.loss.entropy_coef)
        loss.backward()
        sums["loss"] += loss.item()
        for key in ("tokens", "clipped_tokens", "ratio_sum", "entropy_sum", "kl_sum"):
            sums[key] += m[key]
    backward_done = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss, seen, clipped, ratio, entropy, kl = all_reduce([sums[k] for k in sums], env)
    skipped = not (np.isfinite(loss) and np.isfinite(grad_norm))
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    if not skipped:  # otherwise the weights stay as they were
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped, "lr": lr,
            "clip_fraction": clipped / max(seen, 1), "ratio_mean": ratio / max(seen, 1),
            "entropy": entropy / max(seen, 1), "kl": kl / max(seen, 1), "trained_tokens": seen,
            "time_logprobs_backward": backward_done - started, "time_optimizer": time.perf_counter() - backward_done}


def supervised_step(cfg: Config, env: Env, policy: Qwen3, optimizer, pairs: list, lr: float) -> float:
    """One supervised step on (prompt ids, target ids) pairs: the mean NLL of the target tokens over
    all ranks (prompts masked), gradient-norm clipped, taken through `optimizer` at learning rate `lr`
    (the optimizer's own rate is restored afterwards). Non-finite: skipped, weights untouched.
    Returns the loss. Used for behaviour cloning on expert meta trajectories."""
    batch = [Sequence(p, t, 1.0) for p, t in pairs]
    tokens = all_reduce([sum(len(s.response) for s in batch)], env)[0]
    total = 0.0
    for part in _same_count(micro_batches(batch, cfg.train.micro_batch_tokens), env):
        ids, targets, mask, _ = tensors(part or [_DUMMY], env.device)
        if not part:
            mask.zero_()
        logprobs, _ = policy(ids, targets=targets)
        loss = -(logprobs * mask).sum() / max(tokens, 1)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    total = all_reduce([total], env)[0]
    if not (np.isfinite(total) and np.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return total
    rates = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, rate in zip(optimizer.param_groups, rates):
        g["lr"] = rate
    return total


def warm_start(cfg: Config, env: Env, policy: Qwen3, tokenizer, problems: list[dict], bar=None) -> float:
    """The supervised warm start (warm_start.*): each step, warm_start.batch_size examples over all
    ranks, a problem's reference solution or (a meta_fraction of them) an uninformative meta-path
    response, through an AdamW of its own so RL starts with fresh optimizer state. Returns the last loss."""
    w = cfg.warm_start
    if any("solution" not in p for p in problems):
        raise ValueError("warm_start.steps > 0 needs a 'solution' field on every training problem")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=w.lr, weight_decay=0.0)
    G, max_new = cfg.rollout.group_size, cfg.rollout.max_response_tokens
    eos = tokenizer.eos_token_id
    encoded = {}  # problem index -> (solution prompt, solution target, meta prompt): the chat template is slow

    def example(i: int, rng: random.Random) -> tuple[list[int], list[int]]:
        if i not in encoded:
            p = problems[i]
            encoded[i] = (solution_prompt_ids(tokenizer, cfg, p["problem"]),
                          tokenizer.encode(p["solution"], add_special_tokens=False) + [eos],
                          chat_ids(tokenizer, masa.meta_prompt(p["problem"], cfg.prompt.meta, G, max_new)))
        solution_prompt, solution, meta_prompt = encoded[i]
        if rng.random() < w.meta_fraction:
            target = masa.uninformative_meta_target(rng, G, max_new, ARITHMETIC_NOTIONS)
            return meta_prompt, tokenizer.encode(target, add_special_tokens=False) + [eos]
        return solution_prompt, solution

    loss = float("nan")
    for step in range(w.steps):
        rng = random.Random(seed_for(cfg, step, env.rank, SEED_WARM_START))
        pairs = [example(rng.randrange(len(problems)), rng) for _ in range(w.batch_size // env.world)]
        lr = w.lr * min(1.0, (step + 1) / max(1, w.warmup_steps))
        loss = supervised_step(cfg, env, policy, optimizer, pairs, lr)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
    return loss


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(cfg: Config, env: Env, step: int, policy, optimizer, scheduler, actor, tokenizer, extra: dict):
    """Write checkpoint.dir/step_NNNNNN atomically (temporary directory, then rename), point `latest`
    at it, and keep the newest checkpoint.keep."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(cfg.checkpoint.dir)
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "state"))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tmp / f"rank{env.rank}.pt")
    if env.main:
        actor.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    if env.main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest = root / "latest.tmp"
        latest.write_text(final.name + "\n")
        os.replace(latest, root / "latest")
        for old in sorted(root.glob("step_*"))[:-cfg.checkpoint.keep]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(cfg: Config, env: Env, policy, optimizer, scheduler) -> tuple[int, dict] | None:
    """Restore the newest complete checkpoint, if any: returns (its step, this rank's extra state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    pointer = Path(cfg.checkpoint.dir) / "latest"
    if not pointer.is_file():
        return None
    directory = Path(cfg.checkpoint.dir) / pointer.read_text().strip()
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory / "state"))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(directory / f"rank{env.rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra.pop("scheduler"))
    set_rng_state(extra.pop("rng"))
    return extra.pop("step"), extra


# ---------------------------------------------------------------------------------------------------
# The run


def train(cfg: Config):
    from transformers import AutoTokenizer

    env = setup_distributed()
    if cfg.train.batch_size % env.world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {env.world} processes")
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model_path = initial_model(cfg, env)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = training_problems(cfg)
    kept = [p for p in problems if fits(tokenizer, cfg, p["problem"])]
    if not kept:
        raise ValueError(f"no problem in {cfg.data.train_path} fits rollout.max_prompt_tokens="
                         f"{cfg.rollout.max_prompt_tokens} (meta prompt included); raise the limit")
    if env.main and len(kept) < len(problems):
        print(f"dropped {len(problems) - len(kept)} of {len(problems)} problems whose prompts exceed "
              f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
    problems = kept
    policy = build_policy(cfg, env, model_path)
    actor = Qwen3.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype), device=env.device).eval()
    reference = None  # the frozen initial policy, for the KL term only (another bf16 copy of the weights)
    if cfg.loss.kl_coef:
        reference = Qwen3.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype), device=env.device)
        reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    warmup = max(1, cfg.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    start, bc_buffer = 0, []
    resumed = load_checkpoint(cfg, env, policy, optimizer, scheduler)
    if resumed:
        start, extra = resumed
        bc_buffer = extra.get("bc_buffer", [])
        refresh_actor(actor, policy)
    elif cfg.warm_start.steps:  # checkpointed as step 0, so a resumed run never repeats it
        from tqdm import tqdm

        bar = tqdm(total=cfg.warm_start.steps, desc="warm start", unit="step") if env.main and cfg.log.progress_bar \
            else None
        warm_start(cfg, env, policy, tokenizer, problems, bar)
        if bar:
            bar.close()
        refresh_actor(actor, policy)
        if cfg.checkpoint.every:
            save_checkpoint(cfg, env, 0, policy, optimizer, scheduler, actor, tokenizer, {"bc_buffer": [], "data_position": 0})
    metrics_file = Path(cfg.checkpoint.dir) / "metrics.jsonl"
    if env.main:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_file, start)  # lines a killed run wrote after its last checkpoint
    pool = GraderPool()
    val_problems = None
    if cfg.validation.path:
        val_problems = load_problems(cfg.validation.path, cfg.data.problem_key, cfg.data.answer_key)
    wandb_run = None
    if cfg.log.wandb and env.main:
        try:
            import wandb

            wandb_run = wandb.init(project=cfg.log.wandb_project, config=to_dict(cfg), resume="allow")
        except ImportError:
            print("log.wandb is set but wandb is not installed (pip install wandb); logging to metrics.jsonl only")
    bar = None
    if env.main and cfg.log.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.total_steps, initial=start, desc=f"{cfg.algorithm}", unit="step")
    try:
        for step in range(start, cfg.train.total_steps):
            t0 = time.perf_counter()
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            data = collect(cfg, step, env, actor, tokenizer, pool, step_problems(problems, cfg, step, env))
            metrics = update(cfg, env, policy, optimizer, scheduler, data, reference)
            t2 = time.perf_counter()
            bc_buffer.extend(data.experts)
            if cfg.algorithm == "masa_efficient" and cfg.efficient.behaviour_cloning:
                # Exactly bc_batch_size experts per step, the oldest first by (step, global prompt
                # index) over all ranks, so the choice does not depend on the number of ranks.
                keys = [None] * env.world
                dist.all_gather_object(keys, [e[:2] for e in bc_buffer])
                everything = sorted(tuple(k) for ks in keys for k in ks)
                if len(everything) >= cfg.efficient.bc_batch_size:
                    chosen = set(everything[:cfg.efficient.bc_batch_size])
                    mine = [(p, t) for st, g, p, t in bc_buffer if (st, g) in chosen]
                    bc_buffer = [e for e in bc_buffer if tuple(e[:2]) not in chosen]
                    metrics["bc_loss"] = supervised_step(cfg, env, policy, optimizer, mine, cfg.efficient.bc_lr)
            refresh_actor(actor, policy)
            t3 = time.perf_counter()
            record = {"step": step + 1, **_reduce_metrics(data.metrics, env), **metrics, "time_refresh": t3 - t2,
                      "time_step": t3 - t0}  # the whole step: rollouts, grading, update, BC, refresh
            if env.device.type == "cuda":  # this rank's peak; compare with `train.py CONFIG --plan`
                record["memory_peak_gib"] = torch.cuda.max_memory_allocated(env.device) / GIB
            if "audit_gated" in record:  # the fraction of gated prompts / cut rollouts the audit confirmed
                record["gating_precision"] = _ratio(record["audit_gated_zero_variance"], record["audit_gated"])
                record["cutoff_precision"] = _ratio(record["audit_cut_wrong"], record["audit_cut"])
            if val_problems and (step + 1) % cfg.validation.every == 0:
                record["val_accuracy"] = validate(cfg, env, actor, tokenizer, pool, val_problems)
            if wandb_run:
                wandb_run.log(record, step=step + 1)
            if env.main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if bar:
                    bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
                    bar.update(1)
            if cfg.checkpoint.every and ((step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.total_steps):
                save_checkpoint(cfg, env, step + 1, policy, optimizer, scheduler, actor, tokenizer,
                                {"bc_buffer": bc_buffer, "data_position": (step + 1) * cfg.train.batch_size})
    finally:
        pool.close()
        if bar:
            bar.close()
        if wandb_run:
            wandb_run.finish()
    if env.main:
        from eval import plot_training

        print(run_summary(metrics_file))
        png = plot_training(metrics_file, Path(cfg.checkpoint.dir) / "curves.png")
        if png:
            print(f"training curves: {png}")


def run_summary(metrics_file: Path, window: int = 20) -> str:
    """First vs last `window` steps of the run, from metrics.jsonl: what the run changed."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        return "no steps recorded"
    n = max(1, min(window, len(records) // 2))
    parts = []
    for key, label in [("accuracy", "accuracy"), ("pass_rate_mae", "pass-rate MAE"),
                       ("meta_reward", "meta reward"), ("meta_parse_failures", "meta parse failures")]:
        first, last = ([r[key] for r in part if key in r] for part in (records[:n], records[-n:]))
        if first and last:
            parts.append(f"{label} {np.mean(first):.3f} -> {np.mean(last):.3f}")
    span = f"steps {records[0]['step']}-{records[n - 1]['step']} vs {records[-n]['step']}-{records[-1]['step']}"
    return f"{span}: {', '.join(parts)}"


def _ratio(hits: float, total: float) -> float:
    return hits / total if total else float("nan")


def _reduce_metrics(metrics: dict, env: Env) -> dict:
    """Sum every count over ranks; a rate, given as (numerator, denominator), is the ratio of the sums."""
    keys = sorted(metrics)
    flat = [float(x) for k in keys for x in (metrics[k] if isinstance(metrics[k], tuple) else (metrics[k],))]
    totals, out, i = all_reduce(flat, env), {}, 0
    for k in keys:
        if isinstance(metrics[k], tuple):
            out[k], i = _ratio(totals[i], totals[i + 1]), i + 2
        else:
            out[k], i = totals[i], i + 1
    return out


def _truncate_metrics(file: Path, step: int):
    """Keep the lines of steps up to `step` (those after it came from a run killed before its next
    checkpoint; a line cut short by the kill is dropped), rewriting the file atomically."""
    if not file.exists():
        return
    kept = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------------
# The memory plan: what one GPU holds, from the config and the model's shape alone


GIB = 1024 ** 3


def model_shape(cfg: Config) -> tuple[Qwen3Config, str]:
    """The model's Qwen3Config without loading or downloading weights: model.preset for init: random,
    else the local checkpoint's config.json, else the preset named by a hub id such as
    Qwen/Qwen3-8B-Base. Returns the config and where it came from."""
    import re

    if cfg.model.init == "random":
        return PRESETS[cfg.model.preset], f"model.PRESETS[{cfg.model.preset!r}]"
    local = Path(cfg.model.path).expanduser()
    if (local / "config.json").is_file():
        return _read_config(local)[0], str(local / "config.json")
    size = re.search(r"Qwen3-(\d+(?:\.\d+)?B)", cfg.model.path)
    if size and size.group(1) in PRESETS:
        return PRESETS[size.group(1)], f"model.PRESETS[{size.group(1)!r}] (the shape of {cfg.model.path})"
    raise ValueError(f"cannot tell the shape of model.path={cfg.model.path!r} without downloading it: set "
                     f"model.path to a local checkpoint directory (with config.json) or a Qwen3 hub id")


def activation_bytes_per_token(c: Qwen3Config, dtype_bytes: int) -> tuple[int, int]:
    """(one block, the final norm and fused log-prob head): bytes autograd saves per token in a
    training forward on a GPU, read off model.py. Per block: each RMSNorm keeps its fp32 input,
    1/rms and the normalized output; attention keeps q, k, v after q/k-norm and RoPE, its output, its
    log-sum-exp (fp32 per head) and o_proj's contiguous input; SwiGLU keeps gate, silu(gate), up and
    their product. The head keeps the final norm's tensors and the hidden states (the fused kernel
    recomputes logits in backward; targets and two fp32 per token)."""
    s, h, i = dtype_bytes, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def norm(width, rows=1):
        return 4 * width + 4 * rows + s * width

    block = (2 * norm(h) + norm(q, c.num_attention_heads) + norm(kv, c.num_key_value_heads)
             + s * (2 * q + 2 * kv) + 4 * c.num_attention_heads + s * q + 4 * s * i)
    head = norm(h) + s * h + 8 + 8
    return block, head


def memory_plan(cfg: Config, gpus: int, gpu_memory_gib: float) -> dict:
    """Per-GPU bytes of each thing a run of `cfg` on `gpus` GPUs holds, and the two peaks:
    rollouts (master weights, Adam state, the bf16 rollout copy(ies), the KV pool) and the update
    (the same minus the KV pool, plus gradients, gathered parameters in flight and activations).
    Estimates from shapes: bench/gpu_check.sh measures a real step's peak."""
    c, source = model_shape(cfg)
    P = c.num_parameters()
    s = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8  # bytes of the compute / rollout dtype
    h, layers = c.hidden_size, c.num_hidden_layers
    root = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h  # embedding, lm_head, final norm
    block = (P - root) // layers
    copies = 1 + (cfg.loss.kl_coef > 0)  # the rollout copy, and the frozen reference for the KL term
    out = {"model": source, "parameters": P, "gpus": gpus, "gpu_memory": gpu_memory_gib * GIB}
    out["master_weights"] = 4 * P / gpus  # fp32 FSDP shards
    out["adam_state"] = 8 * P / gpus  # exp_avg and exp_avg_sq, fp32
    out["gradients"] = 4 * P / gpus  # fp32 shards; freed by zero_grad(set_to_none=True) before rollouts
    out["rollout_copies"] = copies * s * P
    # FSDP2 gathers the root's parameters for the whole forward/backward and prefetches one block
    # ahead; in backward each gathered block also holds its unsharded fp32 gradients until reduced.
    out["gathered"] = (s + 4) * (root + 2 * block)
    resident = out["master_weights"] + out["adam_state"] + out["rollout_copies"]
    max_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    per_slot = 2 * layers * c.num_key_value_heads * c.head_dim * max_len * s
    free = out["gpu_memory"] - resident
    out["sequences_per_gpu"] = cfg.train.batch_size * (
        cfg.rollout.group_size + (cfg.rollout.meta_group_size if cfg.algorithm != "grpo" else 0)) // gpus
    slots = cfg.rollout.slots or max(0, int(0.6 * free) // per_slot)  # rollout._default_slots' rule
    slots = min(slots, out["sequences_per_gpu"])  # as rollout.generate: never more slots than sequences
    out.update(kv_per_slot=per_slot, slots=slots, kv_pool=slots * per_slot)
    tokens = max(cfg.train.micro_batch_tokens, max_len)  # a longer sequence gets a micro-batch of its own
    per_block, head = activation_bytes_per_token(c, s)
    out["micro_batch_tokens"] = tokens
    out["activations_checkpointed"] = tokens * (layers * s * h + per_block + head)  # block inputs + one block
    out["activations_full"] = tokens * (layers * per_block + head)
    out["activations"] = out["activations_checkpointed" if cfg.model.activation_checkpointing else "activations_full"]
    out["peak_rollout"] = resident + out["kv_pool"]
    out["peak_update"] = resident + out["gradients"] + out["gathered"] + out["activations"]
    out["fits"] = max(out["peak_rollout"], out["peak_update"]) <= 0.9 * out["gpu_memory"] - GIB and slots >= 1
    return out


def print_plan(cfg: Config, plan: dict):
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    ckpt = "on" if cfg.model.activation_checkpointing else "off"
    rows = [
        ("FSDP shards: fp32 master weights (4 B/param / GPUs)", plan["master_weights"]),
        ("FSDP shards: AdamW exp_avg + exp_avg_sq (8 B/param / GPUs)", plan["adam_state"]),
        ("FSDP shards: fp32 gradients (4 B/param / GPUs; update only)", plan["gradients"]),
        (f"full {cfg.model.dtype} rollout copy" + (" + KL reference" if cfg.loss.kl_coef else ""), plan["rollout_copies"]),
        ("gathered params + unsharded grads in flight (root + 2 blocks)", plan["gathered"]),
        (f"KV pool: {plan['slots']} slots x {cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens} tokens "
         f"({plan['kv_per_slot'] / GIB:.2f} GiB each)", plan["kv_pool"]),
        (f"activations, {plan['micro_batch_tokens']}-token micro-batch, checkpointing on", plan["activations_checkpointed"]),
        (f"activations, {plan['micro_batch_tokens']}-token micro-batch, checkpointing off", plan["activations_full"]),
    ]
    print(f"memory plan per GPU: {plan['model']}, {plan['parameters']:,} parameters, {plan['gpus']} GPUs of "
          f"{plan['gpu_memory'] / GIB:.0f} GiB")
    for name, value in rows:
        print(f"  {name:<78} {g(value)}")
    print(f"  {'peak while sampling (shards + rollout copy + KV pool)':<78} {g(plan['peak_rollout'])}")
    print(f"  {f'peak while updating (activation checkpointing {ckpt})':<78} {g(plan['peak_update'])}")
    rounds = -(-plan["sequences_per_gpu"] // max(plan["slots"], 1))
    print(f"  {plan['sequences_per_gpu']} sequences per GPU per step through {plan['slots']} KV slots (refilled as "
          f"sequences finish; {rounds} rounds if every one ran to the full budget)")
    budget = 0.9 * plan["gpu_memory"] / GIB - 1
    verdict = "yes" if plan["fits"] else "NO: lower the peak that exceeds the budget (see the rows above)"
    print(f"fits: {verdict} (budget {budget:.1f} GiB: 90% of the GPU less 1 GiB for the CUDA context and "
          f"allocator slack)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train with GRPO / MASA / MASA-efficient.")
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the plan assumes (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan assumes (default 80)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.plan:
        print_plan(cfg, memory_plan(cfg, args.gpus, args.gpu_memory))
        return
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
