"""The trainer: GRPO, MASA and MASA-efficient (docs/method.md §1) on one process or many.

    python train.py CONFIG [section.key=value ...]                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py CONFIG [section.key=value ...] # one node; NCCL on CUDA, gloo on CPU
    python train.py CONFIG --plan [--gpus 8] [--gpu-memory 80]          # the memory plan (plan.py)

Each step of the run loop (`train`):
 1. data.step_problems    this rank's contiguous share of the step's B prompts (a group never spans ranks)
 2. masa_step.collect     the step itself, in one file: prompts, rollouts of both paths on `actor` (the
                          full unsharded copy of the weights), steering, grading, rewards, advantages,
                          expert targets, the audit and the step's metrics
 3. update                the FSDP2-sharded policy: micro-batches sorted by length, log-probs through
                          the fused kernel inside the model's forward, masa.policy_loss over the global
                          token count, gradient-norm clip, AdamW with linear warmup; a non-finite loss
                          or gradient skips the step and leaves the weights untouched
 4. behaviour_cloning, refresh_actor, then the step's record in metrics.jsonl, validation
    (masa_step.validate), checkpoints
A run from a random model (the CPU demo) starts with warm_start.py's supervised warm start.
Training rollouts are seeded by (seed, step, purpose) and each sequence's noise by a stream derived
from its global prompt index (masa_step.py), so a resumed run repeats exactly what the uninterrupted
run would have done; in float32 also on any number of ranks (the audit's and validation's draws are
per rank; bf16 logits round with the batch: rollout.py). Checkpoints are written atomically
(checkpoints.py).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import masa
import masa_kernels
from config import Config, ConfigError, load_config
from data import DataError, load_problems, step_problems, training_problems
from hf_checkpoint import resolve, unavailable
from masa import Episode
from masa_step import Expert, collect, prompts_fit, validate
from model import Qwen3
from parallel import Env, all_reduce, build_policy, refresh_actor, same_count, setup_distributed, weight_norm
from plan import GIB, check_sizes, memory_plan, print_plan
from prepare_data import missing_file
from rewards import GraderPool, grade_batch
from rollout import generate
from training_report import plot_training, progress_bar, run_summary
from warm_start import initial_model, warm_start

# ---------------------------------------------------------------------------------------------------
# The update


def micro_batches(episodes: list[Episode], max_tokens: int) -> list[list[Episode]]:
    """Sort by length, then pack so that (rows x longest row) stays within max_tokens."""
    batches, current = [], []
    for e in sorted(episodes, key=lambda e: len(e.prompt_ids) + len(e.response_ids)):
        length = len(e.prompt_ids) + len(e.response_ids)
        if current and (len(current) + 1) * length > max_tokens:
            batches.append(current)
            current = []
        current.append(e)
    return batches + ([current] if current else [])


def tensors(batch: list[Episode], device):
    """ids [b, T] right-padded, targets [b, T] (the next token), response mask [b, T], advantages [b].
    An empty batch (a rank with less work, which must still run the forward so that FSDP's collectives
    match) gives one padding row whose mask is all zero."""
    if not batch:
        ids, targets, mask, adv = tensors([Episode(0, "solution", [0], [0])], device)
        return ids, targets, mask.zero_(), adv
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T)
    for i, e in enumerate(batch):
        tokens = e.prompt_ids + e.response_ids
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, len(e.prompt_ids) - 1:len(tokens) - 1] = 1  # positions whose next token is a response token
    targets = torch.cat([ids[:, 1:], torch.zeros(len(batch), 1, dtype=torch.long)], dim=1)
    adv = torch.tensor([e.advantage for e in batch])
    return ids.to(device), targets.to(device), mask.to(device), adv.to(device)


def update(cfg: Config, env: Env, policy: Qwen3, optimizer, scheduler, episodes: list[Episode],
           reference: Qwen3 | None = None) -> dict:
    """Stage 10: one optimizer step per mini-batch per PPO epoch (1 x 1 in the paper) over the
    episodes in the loss, then one step of the learning-rate schedule; an episode's mini-batch is
    picked by its prompt's global index, the same on any number of ranks. `reference` is the frozen initial policy, needed only for a KL term."""
    temperature = cfg.rollout.temperature or 1.0
    sequences = [e for e in episodes if e.in_loss]
    # masa.sampler_gap over the first forward, before any update: the old pass, or the one optimizer step
    gap = torch.zeros(4, dtype=torch.float64, device=env.device)
    old = None
    if cfg.train.ppo_epochs > 1 or cfg.train.mini_batches > 1:  # the ratio needs log-probs before any update
        old = {}
        with torch.no_grad():
            for batch in same_count(micro_batches(sequences, cfg.train.micro_batch_tokens), env):
                ids, targets, mask, _ = tensors(batch, env.device)
                logprobs, _ = policy(ids, targets=targets, temperature=temperature)
                masa.sampler_gap(batch, logprobs, mask, gap)
                for s, row in zip(batch, logprobs):
                    old[id(s)] = row[:len(s.prompt_ids) + len(s.response_ids)]
    steps = []
    for _ in range(cfg.train.ppo_epochs):
        parts = [[s for s in sequences if s.prompt_index % cfg.train.mini_batches == i]
                 for i in range(cfg.train.mini_batches)]
        for part in parts:
            steps.append(_optimizer_step(cfg, env, policy, optimizer, part, old, temperature, reference,
                                         gap if old is None else None))  # old is None: one step
    with warnings.catch_warnings():  # a skipped step (non-finite loss) still counts as a batch of the schedule:
        # PyTorch's warning that the schedule moved before any optimizer step is then expected, not a misuse
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()  # once per batch: its optimizer steps share one rate (optim.warmup_steps counts batches)
    # one record per batch: token sums over the optimizer steps, token-weighted means, mean grad norm
    seen = sum(s["trained_tokens"] for s in steps)
    out = {"loss": sum(s["loss"] for s in steps), "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
           "skipped_steps": sum(s["skipped"] for s in steps), "lr": steps[0]["lr"], "trained_tokens": seen}
    for key in ("clip_fraction", "ratio_mean", "entropy", "kl"):  # null in metrics.jsonl when nothing was trained
        out[key] = sum(s[key] * s["trained_tokens"] for s in steps if s["trained_tokens"]) / seen if seen else float("nan")
    for key in ("time_logprobs_backward", "time_optimizer"):
        out[key] = sum(s[key] for s in steps)
    (distance, kl, tokens), (largest,) = all_reduce(gap[:3].tolist(), env), all_reduce([gap[3].item()], env, dist.ReduceOp.MAX)
    nan = float("nan")  # no response token was forwarded
    out.update(logprob_gap_mean=distance / tokens if tokens else nan, logprob_gap_max=largest if tokens else nan,
               mismatch_kl=kl / tokens if tokens else nan)
    return out


def _optimizer_step(cfg, env, policy, optimizer, sequences, old, temperature, reference, gap) -> dict:
    tokens, count = all_reduce([sum(len(s.response_ids) for s in sequences), len(sequences)], env)
    scale = masa.LossScale(tokens=max(tokens, 1), sequences=max(int(count), 1),
                           max_response_tokens=cfg.rollout.max_response_tokens)
    # Responses with advantage 0 add nothing to the loss or its gradient (no KL or entropy term):
    # they count in the normalizer above but need no forward pass.
    needed = [s for s in sequences if s.advantage != 0 or cfg.loss.kl_coef or cfg.loss.entropy_coef]
    names = ("tokens", "clipped_tokens", "ratio_sum", "entropy_sum", "kl_sum")
    sums = torch.zeros(1 + len(names), dtype=torch.float64, device=env.device)  # the loss, then `names`
    started = time.perf_counter()
    for batch in same_count(micro_batches(needed, cfg.train.micro_batch_tokens), env):
        ids, targets, mask, adv = tensors(batch, env.device)
        logprobs, entropy = policy(ids, targets=targets, temperature=temperature)
        if gap is not None:
            masa.sampler_gap(batch, logprobs, mask, gap)
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
                                   entropy=entropy, entropy_coef=cfg.loss.entropy_coef, dual_clip=cfg.loss.dual_clip)
        loss.backward()
        sums += torch.stack([loss.detach(), *(m[k] for k in names)]).double()
    backward_done = time.perf_counter()
    loss, seen, clipped, ratio, entropy, kl = all_reduce(sums.tolist(), env)  # the step's one read of them
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    grad_norm, skipped = apply_gradients(cfg, policy, optimizer, loss)
    mean = (lambda total: total / seen) if seen else (lambda total: float("nan"))  # nothing trained: unmeasured
    return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped, "lr": lr, "clip_fraction": mean(clipped),
            "ratio_mean": mean(ratio), "entropy": mean(entropy), "kl": mean(kl), "trained_tokens": seen,
            "time_logprobs_backward": backward_done - started, "time_optimizer": time.perf_counter() - backward_done}


def supervised_step(cfg: Config, env: Env, policy: Qwen3, optimizer, pairs: list, lr: float) -> float:
    """One supervised step on (prompt ids, target ids) pairs: the mean NLL of the target tokens over
    all ranks (prompts masked), gradient-norm clipped, taken through `optimizer` at learning rate `lr`
    (the optimizer's own rate is restored afterwards). Non-finite: skipped, weights untouched.
    Returns the loss. Used for behaviour cloning on expert meta trajectories and the warm start."""
    batch = [Episode(0, "meta", p, t, advantage=1.0) for p, t in pairs]
    tokens = all_reduce([sum(len(e.response_ids) for e in batch)], env)[0]
    total = 0.0
    for part in same_count(micro_batches(batch, cfg.train.micro_batch_tokens), env):
        ids, targets, mask, _ = tensors(part, env.device)
        logprobs, _ = policy(ids, targets=targets)
        loss = -(logprobs * mask).sum() / max(tokens, 1)
        loss.backward()
        total += loss.item()
    total = all_reduce([total], env)[0]
    rates = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = lr
    apply_gradients(cfg, policy, optimizer, total)
    for g, rate in zip(optimizer.param_groups, rates):
        g["lr"] = rate
    return total


def apply_gradients(cfg: Config, policy: Qwen3, optimizer, loss: float) -> tuple[float, bool]:
    """Clip the global gradient norm to optim.grad_clip and take the optimizer step, unless the loss or
    the norm is not finite (then the weights stay as they were); gradients are cleared either way.
    Returns (gradient norm before clipping, whether the step was skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    skipped = not (np.isfinite(loss) and np.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """What a training run holds from one step to the next."""
    tokenizer: object
    problems: list[dict]  # the training problems whose prompts fit max_prompt_tokens
    policy: Qwen3  # FSDP2-sharded fp32 master weights: what the optimizer updates
    actor: Qwen3  # the full low-precision copy the sampler runs on, refreshed after every update
    reference: Qwen3 | None  # the frozen initial policy, for the KL term only (another copy of the weights)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: int = 0  # the first step to run (after a resume)
    initial_norm: float = 0.0  # the weights' norm when the run (or its resume) started
    bc_buffer: list[Expert] = field(default_factory=list)  # experts not yet cloned


def prepare(cfg: Config, env: Env, resuming: Path | None) -> Run:
    """Load the data, the model (policy, actor, reference) and the optimizer; resume from `resuming`
    (checkpoints.resumable's choice), or run the warm start when it is None."""
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model_path = initial_model(cfg, env.rank)
    # a hub id is downloaded once per node, by its first process; the others then find it in the cache
    downloaded = resolve(model_path) if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None
    dist.barrier()
    model_path = str(downloaded or resolve(model_path))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = training_problems(cfg, partial(prompts_fit, tokenizer, cfg), verbose=env.main)
    low = getattr(torch, cfg.model.dtype)
    policy = build_policy(cfg, env, model_path)
    actor = Qwen3.from_pretrained(model_path, dtype=low, device=env.device).eval()
    reference = None
    if cfg.loss.kl_coef:
        reference = Qwen3.from_pretrained(model_path, dtype=low, device=env.device).eval().requires_grad_(False)
    optimizer, scheduler = optimizer_and_schedule(cfg, policy)
    run = Run(tokenizer, problems, policy, actor, reference, optimizer, scheduler)
    resumed = checkpoints.load(cfg, env.rank, policy, optimizer, scheduler, resuming)
    if resumed:
        run.start, extra = resumed
        run.bc_buffer = [Expert(*e) for e in extra.get("bc_buffer", [])]
        refresh_actor(actor, policy)
    broken = next((name for name, p in actor.named_parameters() if not torch.isfinite(p).all()), None)
    if broken:  # every step would be skipped: stop now
        source = resuming if resumed else model_path
        raise checkpoints.RunStopped(f"the weights loaded from {source} hold NaN or infinite values ({broken}): the "
                         f"checkpoint is unusable; resume from an earlier one with checkpoint.resume_from")
    elif cfg.warm_start.steps:  # checkpointed as step 0, so a resumed run never repeats it
        warm_start(cfg, env, policy, tokenizer, problems, supervised_step)
        refresh_actor(actor, policy)
        save(cfg, env, run, 0)
    run.initial_norm = weight_norm(policy, env)
    return run


def optimizer_and_schedule(cfg: Config, policy: Qwen3):
    """AdamW over the policy's parameters and its learning-rate schedule (warmup_factor), which
    `update` steps once per batch."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, cfg.optim))


def warmup_factor(optim, step: int) -> float:
    """The learning-rate factor of batch `step` (from 0; every optimizer step of a batch uses it):
    linear warmup over optim.warmup_steps batches, (step + 1) / warmup_steps, or step / warmup_steps
    with optim.warmup_from_zero (the released code's: its first batch has lr 0); 1 after the warmup."""
    if optim.warmup_steps == 0:
        return 1.0
    return min(1.0, (step + (0 if optim.warmup_from_zero else 1)) / optim.warmup_steps)


def save(cfg: Config, env: Env, run: Run, step: int):
    if cfg.checkpoint.every:
        checkpoints.save(cfg, env.rank, step, run.policy, run.optimizer, run.scheduler, run.actor, run.tokenizer,
                         {"bc_buffer": [tuple(e) for e in run.bc_buffer]})


def behaviour_cloning(cfg: Config, env: Env, run: Run, experts: list[Expert]) -> dict:
    """Stage 11 (MASA-efficient): buffer this step's experts; once the buffer holds bc_batch_size of
    them over all ranks, one supervised step on exactly that many, the oldest first by (step, prompt
    index), so the choice does not depend on the number of ranks. The step goes through the RL
    optimizer, sharing its AdamW moments: a second AdamW would add 8 bytes per parameter to every GPU
    (8 GiB per GPU for 8B on 8 GPUs), and BC steps are rare and small next to the RL steps."""
    if cfg.algorithm != "masa_efficient" or not cfg.efficient.behaviour_cloning:
        return {}
    run.bc_buffer.extend(experts)
    keys = [None] * env.world
    dist.all_gather_object(keys, [(e.step, e.prompt_index) for e in run.bc_buffer])
    everything = sorted(tuple(k) for ks in keys for k in ks)
    if len(everything) < cfg.efficient.bc_batch_size:
        return {}
    chosen = set(everything[:cfg.efficient.bc_batch_size])
    mine = [(e.prompt_ids, e.target_ids) for e in run.bc_buffer if (e.step, e.prompt_index) in chosen]
    run.bc_buffer = [e for e in run.bc_buffer if (e.step, e.prompt_index) not in chosen]
    return {"bc_loss": supervised_step(cfg, env, run.policy, run.optimizer, mine, cfg.efficient.bc_lr)}


DIVERGED = 100  # the weights' norm this many times its value at the start: the run is diverging


def train(cfg: Config):
    env = setup_distributed()
    if cfg.train.batch_size % env.world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {env.world} processes")
    check_sizes(cfg, env.world, env.device, env.main)
    if env.main:
        checkpoints.lock(cfg)  # before anything is written
    dist.barrier()
    # a damaged run directory, or a resume that changes the experiment, stops the run here, before any loading
    resuming = checkpoints.resumable(cfg, verbose=env.main)
    changes = checkpoints.config_changes(cfg, resuming, verbose=env.main) if resuming else {}
    dist.barrier()  # every rank has chosen before rank 0 sets a later branch aside
    if env.main:
        checkpoints.follow(cfg, resuming)
    val_problems = cfg.validation.path and load_problems(cfg.validation.path, cfg.data.problem_key, cfg.data.answer_key)
    run = prepare(cfg, env, resuming)
    log = checkpoints.MetricsLog(cfg, run.start) if env.main else None
    pool = GraderPool()
    sampler = partial(generate, run.actor, slots=cfg.rollout.slots or None, kv_tokens=cfg.rollout.kv_tokens or None,
                      graphs=None if cfg.rollout.cuda_graphs else False)
    grader = partial(grade_batch, pool=pool)
    bar = progress_bar(cfg.train.total_steps, cfg.algorithm, run.start, enabled=env.main and cfg.log.progress_bar)
    skipped_in_a_row, stops = 0, checkpoints.StopSignals(env.main)
    try:
        for step in range(run.start, cfg.train.total_steps):
            started = time.perf_counter()
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            problems = step_problems(run.problems, cfg, step, env.rank, env.world)
            data = collect(cfg, step, env, run.tokenizer, problems, sampler, grader)
            metrics = update(cfg, env, run.policy, run.optimizer, run.scheduler, data.episodes, run.reference)
            skipped_in_a_row = skipped_in_a_row + 1 if metrics["skipped_steps"] else 0
            updated = time.perf_counter()
            metrics.update(behaviour_cloning(cfg, env, run, data.experts))
            refresh_actor(run.actor, run.policy)
            done = time.perf_counter()
            metrics.update(time_refresh=done - updated, time_step=done - started, weight_norm=weight_norm(run.policy, env))
            record = data.record(env, step, metrics)
            if env.device.type == "cuda":  # this rank's peak; compare with `train.py CONFIG --plan`
                record["memory_peak_gib"] = torch.cuda.max_memory_allocated(env.device) / GIB
            if changes and step == run.start:
                record["config_changes"] = changes  # allowed experiment changes, logged once: the first step after the resume
            if val_problems and (step + 1) % cfg.validation.every == 0:
                record["val_accuracy"] = validate(cfg, env, run.tokenizer, val_problems, sampler, grader)
            if log:
                log.write(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
            bar.update(1)
            if skipped_in_a_row >= cfg.train.max_skipped_steps:  # before a checkpoint of the stuck weights
                checkpoints.stop(cfg, f"{skipped_in_a_row} steps in a row were skipped for a non-finite loss or "
                                      f"gradient (train.max_skipped_steps): the weights have stopped moving")
            if not record["weight_norm"] <= DIVERGED * run.initial_norm:  # NaN too; before a checkpoint of them
                checkpoints.stop(cfg, f"the weights' norm went from {run.initial_norm:.3g} to {record['weight_norm']:.3g}"
                                      f" at step {step + 1} (optim.lr={cfg.optim.lr:g}): the run is diverging")
            signum = int(all_reduce([stops.received], env, dist.ReduceOp.MAX)[0])  # SIGTERM on any rank: all stop
            if cfg.checkpoint.every and ((step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.total_steps
                                         or signum):
                save(cfg, env, run, step + 1)
            if signum:
                stops.stopped(cfg, signum, step + 1)
    finally:
        stops.restore()
        pool.close()
        bar.close()
        if log:
            log.close()
    if env.main:
        print(f"kernel calls on rank 0: {masa_kernels.usage_report()}")
        print(run_summary(log.file))
        png = plot_training(log.file, Path(cfg.checkpoint.dir) / "curves.png")
        if png:
            print(f"training curves: {png}")


def missing_inputs(cfg: Config) -> list[str]:
    """Every input the run reads that is not there, each with the command or setting that provides it:
    found before anything loads or downloads, so that one message names them all."""
    files = [("data.train_path", cfg.data.train_path)] if cfg.data.source == "file" else []
    files += [("validation.path", cfg.validation.path)] if cfg.validation.path else []
    missing = [f"{key}: {why}" for key, path in files
               if (why := missing_file(path, f"set {key} to a problem file (JSONL or parquet with \"problem\" and \"answer\")"))]
    if cfg.model.init == "pretrained" and (why := unavailable(cfg.model.path)):
        missing.append(f"model.path: {why}")
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train with GRPO / MASA / MASA-efficient.")
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the plan assumes (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan assumes (default 80)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            return print_plan(cfg, memory_plan(cfg, args.gpus, args.gpu_memory))
        if missing := missing_inputs(cfg):
            raise DataError("the run cannot start:\n  " + "\n  ".join(missing))
        train(cfg)
        dist.barrier()  # no rank tears the group down while rank 0 still writes its summary
    except (ConfigError, DataError, checkpoints.RunDirectoryError, checkpoints.RunStopped, OSError) as e:
        # the user's to fix (the config, the data, the run directory, files, permissions, disk): one
        # message, from rank 0 only, and no traceback (those stay for bugs)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # All is written and the group is gone, yet the interpreter's teardown aborts now and then in a
        # multi-process CPU run ("terminate called without an active exception", about 1 run in 10): end
        # without it, once the run directory's lock (the one exit handler that matters) is released.
        checkpoints.unlock()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
