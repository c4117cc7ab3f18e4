"""The run directory: checkpoints written atomically, exact resume, the metrics log kept in step
with them, and the random starting model of a model.init: random run (the CPU demo).

A module of its own so that train.py reads as the method: this is the machinery that makes a run
survive a crash or a kill, and nothing in it depends on GRPO or MASA.

Layout of checkpoint.dir:
    initial/                  with model.init: random, the random starting model and its tokenizer
    step_NNNNNN/model/        Hugging Face checkpoint of the policy (loadable by transformers and vLLM),
                              tokenizer included
    step_NNNNNN/state/        torch.distributed.checkpoint of the sharded policy and optimizer
    step_NNNNNN/rank<r>.pt    per rank: the step, the LR scheduler, every RNG, and the trainer's extra
                              state (behaviour-cloning buffer, data position)
    step_NNNNNN/config.yaml   the resolved config
    latest                    the name of the newest complete checkpoint
    metrics.jsonl             one line per step (train.py)
The step's metrics go to metrics.jsonl through MetricsLog. Each checkpoint is written to
`.step_NNNNNN.tmp` and renamed when every rank has finished, and `latest` is replaced atomically
after that: a crash at any point leaves the previous checkpoint as `latest`, complete.

Every function here is collective (call it on every rank) unless it says otherwise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from config import Config, to_dict
from data import ARITHMETIC_WORDS, build_char_tokenizer
from model import PRESETS, Qwen3


def initial_model(cfg: Config, rank: int) -> str:
    """The checkpoint training starts from: model.path, or for model.init: random a new model of
    model.preset's shape with a character tokenizer, written once to checkpoint.dir/initial (the CPU
    demo), so that every later step loads it exactly as it would load a pretrained checkpoint."""
    if cfg.model.init == "pretrained":
        return cfg.model.path
    path = Path(cfg.checkpoint.dir) / "initial"
    if rank == 0 and not (path / "config.json").is_file():
        tokenizer = build_char_tokenizer(path, words=ARITHMETIC_WORDS)
        torch.manual_seed(cfg.train.seed)
        Qwen3(replace(PRESETS[cfg.model.preset], vocab_size=len(tokenizer))).save_pretrained(path)
    dist.barrier()
    return str(path)


def rng_state() -> dict:
    """Every random number generator this process draws from (local; not collective)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(cfg: Config, rank: int, step: int, policy, optimizer, scheduler, actor, tokenizer, extra: dict):
    """Write checkpoint.dir/step_NNNNNN atomically (temporary directory, then rename), point `latest`
    at it, and keep the newest checkpoint.keep. `actor` is the full (unsharded) copy of the policy
    that rank 0 saves in Hugging Face format; `extra` is this rank's trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(cfg.checkpoint.dir)
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "state"))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tmp / f"rank{rank}.pt")
    if rank == 0:
        actor.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest = root / "latest.tmp"
        latest.write_text(final.name + "\n")
        os.replace(latest, root / "latest")
        for old in sorted(root.glob("step_*"))[:-cfg.checkpoint.keep]:
            shutil.rmtree(old)
    dist.barrier()


def load(cfg: Config, rank: int, policy, optimizer, scheduler) -> tuple[int, dict] | None:
    """Restore the newest complete checkpoint into the policy, optimizer, scheduler and this process's
    RNGs, if there is one: returns (its step, this rank's extra state), else None."""
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
    extra = torch.load(directory / f"rank{rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra.pop("scheduler"))
    set_rng_state(extra.pop("rng"))
    return extra.pop("step"), extra


def truncate_metrics(file: Path, step: int):
    """Keep the lines of steps up to `step` (those after it came from a run killed before its next
    checkpoint; a line cut short by the kill is dropped), rewriting the file atomically. Rank 0 only."""
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


class MetricsLog:
    """metrics.jsonl in checkpoint.dir, one JSON line per step, and with log.wandb the same records in
    Weights & Biases. Rank 0 only. Opening it after a resume first drops the lines of steps after the
    resumed checkpoint (truncate_metrics): the resumed run writes them again."""

    def __init__(self, cfg: Config, start: int):
        self.file = Path(cfg.checkpoint.dir) / "metrics.jsonl"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.file, start)
        self.wandb = None
        if cfg.log.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.log.wandb_project, config=to_dict(cfg), resume="allow")
            except ImportError:
                print("log.wandb is set but wandb is not installed (pip install wandb); logging to metrics.jsonl only")

    def write(self, record: dict):
        with self.file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()
