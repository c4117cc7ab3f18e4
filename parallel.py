"""Processes and sharding for the trainer: the process group, FSDP2 wrapping of the policy, the
full rollout copy of its weights, and the two collectives the step needs.

A module of its own so that train.py reads as the method: everything here would be the same for
any RL or supervised trainer on FSDP2, and none of it knows about rollouts or rewards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from config import Config
from model import Qwen3


@dataclass
class Env:
    """This process's place in the job."""
    rank: int
    world: int  # number of processes
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


@torch.no_grad()
def weight_norm(policy: Qwen3, env: Env) -> float:
    """The L2 norm of all the policy's weights (its fp32 shards on every rank; collective)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
    squares = torch.stack(torch._foreach_norm(local)).double().square().sum() if local else 0.0
    return all_reduce([float(squares)], env)[0] ** 0.5


def all_reduce(values: list[float], env: Env, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce a list of numbers over all ranks (in float64, so that counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def same_count(batches: list, env: Env) -> list:
    """FSDP's collectives need every rank to run as many forwards as the busiest one."""
    most = int(all_reduce([len(batches)], env, dist.ReduceOp.MAX)[0])
    return batches + [[] for _ in range(most - len(batches))]


@dataclass
class Tally:
    """A step's metrics on one rank as sums, and counts for the means, so that they add over ranks:
    a mean is the global sum over the global count, never a mean of per-rank means."""
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def mean(self, name: str, values):
        values = [float(v) for v in values]
        self.sums[name], self.counts[name] = sum(values), len(values)

    def total(self, name: str, value: float):
        self.sums[name] = float(value)

    def fraction(self, name: str, hits: float, total: float):
        """hits / total over all ranks (a mean of 0/1 values given as their sum and count)."""
        self.sums[name], self.counts[name] = float(hits), float(total)

    def reduce(self, env: Env) -> dict[str, float]:
        """The global metrics (collective): totals, and means (NaN where nothing was counted)."""
        names, means = sorted(self.sums), sorted(self.counts)
        values = all_reduce([self.sums[n] for n in names] + [self.counts[n] for n in means], env)
        out = dict(zip(names, values))
        for name, count in zip(means, values[len(names):]):
            out[name] = out[name] / count if count else float("nan")
        return out
