"""The batched sampler that produces GRPO rollouts from model.py's Qwen3 (docs/method.md §2).

    rollouts = generate(model, prompts, SamplingParams(n=16, max_new_tokens=8192), budgets=..., seed=0)
    rollouts[i][j].token_ids, .logprobs, .finish_reason   # sample j of prompt i

A paged engine (the shape of vLLM's and nano-vllm's, in one file): the pieces, in the order a
sequence meets them.
- The KV pool (model.PagedKVCache): keys and values in blocks of BLOCK_SIZE = 16 positions, shared
  by all sequences; each sequence has a block table. BlockPool keeps the free list and reference
  counts. Block 0 is never handed out: free lanes write their keys there. On CUDA the pool takes
  KV_MEMORY_FRACTION of the free memory (or `kv_tokens` positions); plan.py sizes it the same way.
- Admission (`_Engine.schedule`): the work is the list of (prompt, sample) pairs. A prompt's tokens
  but the last are prefilled once (dense SDPA writing blocks); its full blocks enter every sample's
  table (reference counts), its partly filled last block is copied per sample (copy on write).
  Samples are admitted while free blocks allow, keeping headroom for running sequences to grow.
- Growth and preemption: before each sync every running sequence gets blocks for the positions it
  will write until the next one; if the pool runs out, the newest sequence is preempted (blocks
  freed, re-queued first with what it generated) and later recomputed from prompt + tokens. A pool
  too small for one sequence at its full budget is refused with the memory it needs.
- The decode step (`_Engine.step`): one token for every lane up to the last occupied one, [rows, 1]
  through the paged forward; attention reads each sequence's own live positions
  (masa_kernels.paged_decode_attention). Sampling, the stop check, the per-sequence budget and the
  recording of tokens and log-probs stay on the device. On CUDA the step runs as CUDA graphs, one per
  batch-size bucket (_DecodeGraphs; graphs=False turns them off).
- The host sync (every `sync_every` steps: 1 on a CPU, 16 on a GPU): harvest finished sequences,
  schedule, and compact the lanes (move sequences down into freed lanes, so no step computes a hole).
EngineStats counts what the engine did in hardware-independent units (bench/sampler.py).

Sampling noise is per sequence: the token at position t of sample j of a prompt with stream s is
drawn by inverse CDF from one uniform that is a pure function of (seed, s, j, t) (Philox;
masa_kernels.sample_tokens). So the noise does not depend on the lanes, the pool size, preemption,
batch composition or, for train.py's training rollouts (streams from global prompt indices: 2i on
the meta path, 2i + 1 on the solution path), the number of ranks; nor do the tokens, as long as the
logits do not. In float32 and float64 they do not (tests/test_rollout.py); in bfloat16 a preempted
sequence's recomputed keys round differently from the decoded ones, and on a GPU the attention
kernel's split count follows the batch: bench/sampler_invariance.py measures what changes (README).

Log-probs are those of the distribution each token was drawn from: log softmax(logits / T) with
top-k / top-p applied and renormalized (with the defaults, top_k=-1 and top_p=1, simply
log softmax(logits / T)). Greedy decoding reports log softmax(logits) of the chosen token. Finish
reasons (FinishReason): "stop" (a stop token was sampled; it is included in token_ids), "length"
(max_new_tokens reached), "cutoff" (the sequence's own budget, smaller than max_new_tokens).

Not here: tokenization (token ids in, token ids out), chunked prefill, prefix caching across calls,
speculative decoding.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

import masa_kernels
from model import PagedKVCache, Qwen3



class FinishReason(str, Enum):
    """Why a rollout ended. A str, so it compares equal to (and serializes as) its value."""
    STOP = "stop"  # a stop token was sampled (it is included in token_ids)
    LENGTH = "length"  # max_new_tokens reached
    CUTOFF = "cutoff"  # the sequence's own budget (early cutoff), smaller than max_new_tokens

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        """Its number in the sampler's on-device finish tensor (0: still running)."""
        return list(FinishReason).index(self) + 1


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be at least 1 (got {self.n}, {self.max_new_tokens})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k == -1 or >= 1; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")


@dataclass
class Rollout:
    token_ids: list[int]  # generated tokens only (not the prompt); a stop token is included
    logprobs: list[float] = field(repr=False)  # one per token, float32 values (see module docstring)
    finish_reason: FinishReason = FinishReason.LENGTH


# ---------------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, streams: torch.Tensor, samples: torch.Tensor,
           positions: torch.Tensor):
    """logits [B, V] -> (tokens [B] int64, log-probs [B] float32) under the filtered distribution. The
    noise of row b is a function of (seed, streams[b], samples[b], positions[b]) alone
    (masa_kernels.sample_tokens); temperature 0 is greedy."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return masa_kernels.sample_tokens(logits, params.temperature, seed, streams, samples, positions, params.top_k,
                                 params.top_p)


# ---------------------------------------------------------------------------------------------------
# The KV pool's bookkeeping

BLOCK_SIZE = 16  # positions per KV block (masa_kernels/paged_attention.py says why 16)
TRASH = 0  # block 0 is never handed out: lanes without a sequence write their keys there
KV_MEMORY_FRACTION = 0.6  # of the free GPU memory, taken by the KV pool when its size is not given


class BlockPool:
    """Which blocks of a PagedKVCache are free, and how many tables hold each taken one (a prompt's
    full blocks are held by every sample of it). Host-side; nothing here touches the tensors."""

    def __init__(self, blocks: int):
        self.free = list(range(blocks - 1, TRASH, -1))  # popped from the end: low ids first
        self.refs = [0] * blocks

    def available(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free)
        taken = [self.free.pop() for _ in range(n)]
        for b in taken:
            self.refs[b] = 1
        return taken

    def share(self, blocks: list[int]):
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Keys and values of one position: every layer, every key-value head."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (torch.finfo(dtype).bits // 8)


def kv_tokens_that_fit(config, dtype: torch.dtype, free_bytes: float) -> int:
    """The default pool: KV_MEMORY_FRACTION of `free_bytes`, in positions (whole blocks; plan.py uses
    the same rule)."""
    blocks = max(0, int(KV_MEMORY_FRACTION * free_bytes) // (BLOCK_SIZE * kv_bytes_per_position(config, dtype)))
    return blocks * BLOCK_SIZE


@dataclass(eq=False)  # compared by identity: list.index finds a sequence's lane
class _Sequence:
    """One sample: its prompt, its block table, and (after a preemption) what it had generated."""
    prompt: int
    sample: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions written to the pool; an upper bound between host syncs
    tokens: list[int] = field(default_factory=list)  # generated before a preemption
    logprobs: list[float] = field(default_factory=list)
    admitted: int = 0  # admission order (preemption takes the newest first)
    deadline: int = 0  # the decode step by which it must be done


# ---------------------------------------------------------------------------------------------------
# The engine


@torch.no_grad()
def generate(model: Qwen3, prompts: list[list[int]], params: SamplingParams,
             budgets: list[int | None] | None = None, seed: int | None = None, *,
             counts: list[int] | None = None, streams: list[int] | None = None,
             first_samples: list[int] | None = None, slots: int | None = None,
             kv_tokens: int | None = None, sync_every: int | None = None, graphs: bool | None = None,
             progress: bool = False, stats: dict | None = None) -> list[list[Rollout]]:
    """Sample `params.n` continuations of every prompt (lists of token ids).

    counts: optional samples per prompt, overriding params.n (the trainer samples G solutions and
        M meta predictions in one call).
    budgets: optional per-prompt token budgets (early cutoff); a sample that reaches its prompt's
        budget before max_new_tokens and before a stop token ends with finish_reason "cutoff".
    streams: optional per-prompt stream ids for the sampling noise (default: the prompt's index);
        the trainer derives them from global prompt indices, so that tokens do not depend on the ranks.
    first_samples: optional per-prompt number of its first sample (default 0): sample j of prompt i
        draws the noise of sample first_samples[i] + j of its stream (per-rollout hints give each
        rollout a prompt of its own and keep the noise it would have had as sample j of one prompt).
    slots: lanes, the most sequences decoded at once (default 256, never more than the samples).
    kv_tokens: positions the KV pool holds (default: KV_MEMORY_FRACTION of the free GPU memory; on a
        CPU, enough for every lane at the full budget).
    sync_every: decode steps between host syncs (default 1 on a CPU, where reading is free, 16 on a GPU).
    graphs: decode through CUDA graphs (_DecodeGraphs). None (the default): on CUDA, off on a CPU.
        True on a CPU runs the graphs' fixed shapes eagerly, the graph path less the capture (tests).
    stats: optional dict that receives the engine's counters (EngineStats' fields), for bench/sampler.py.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    budgets = budgets or [None] * len(prompts)
    if len(budgets) != len(prompts) or any(b is not None and b < 1 for b in budgets):
        raise ValueError("budgets must give one positive budget (or None) per prompt")
    counts = counts or [params.n] * len(prompts)
    if len(counts) != len(prompts) or any(c < 0 for c in counts):
        raise ValueError("counts must give one sample count (>= 0) per prompt")
    streams = list(range(len(prompts))) if streams is None else list(streams)
    if len(streams) != len(prompts):
        raise ValueError("streams must give one stream id per prompt")
    first_samples = [0] * len(prompts) if first_samples is None else list(first_samples)
    if len(first_samples) != len(prompts) or any(f < 0 for f in first_samples):
        raise ValueError("first_samples must give one sample number (>= 0) per prompt")
    if not any(counts):
        return [[] for _ in prompts]
    engine = _Engine(model, prompts, params, budgets, counts, streams, first_samples,
                     random.getrandbits(62) if seed is None else seed, slots, kv_tokens, sync_every, graphs, progress)
    results = engine.run()
    if stats is not None:
        stats.update(vars(engine.counters))
    return results


class _Engine:
    """The state of one generate call: the KV pool and its bookkeeping, the lanes (batch rows: each
    holds a sequence or is free), the work queue, and the per-lane tensors the decode loop updates on
    the device. `run` is the loop; admit / grow / preempt / harvest are the host's work at each sync."""

    def __init__(self, model, prompts, params, budgets, counts, streams, first_samples, seed, lanes, kv_tokens, sync_every, graphs,
                 progress):
        self.model, self.prompts, self.params, self.seed = model, prompts, params, seed
        self.max_new = params.max_new_tokens
        self.budgets = [min(b or self.max_new, self.max_new) for b in budgets]
        device = self.device = model.embed_tokens.weight.device
        config, dtype = model.config, model.embed_tokens.weight.dtype
        self.work = deque((p, j, None) for p in range(len(prompts)) for j in range(counts[p]))
        # A prompt's tokens but the last, prefilled once into blocks its samples share; the prefix holds
        # them until its last sample is admitted (then they live on in the samples' tables).
        self.prefixes: dict[int, list[int] | None] = {p: None for p in range(len(prompts)) if counts[p]}
        self.pending = {p: counts[p] for p in self.prefixes}  # samples not yet admitted
        S = self.lanes = min(len(self.work), lanes or 256)
        self.sync_every = sync_every or (16 if device.type == "cuda" else 1)
        longest = max(len(prompts[p]) - 1 + self.budgets[p] for p in self.prefixes)  # positions of one sequence
        self.max_blocks = -(-longest // BLOCK_SIZE) + 1
        if kv_tokens is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                kv_tokens = kv_tokens_that_fit(config, dtype, free)
            else:
                kv_tokens = S * self.max_blocks * BLOCK_SIZE + sum(len(prompts[p]) for p in self.prefixes)
        blocks = kv_tokens // BLOCK_SIZE + 1  # + the trash block
        need = self.max_blocks  # one sequence at its full budget, with its prompt's partial block alongside
        if blocks - 1 < need:
            per_block = BLOCK_SIZE * kv_bytes_per_position(config, dtype)
            raise ValueError(f"the KV pool holds {blocks - 1} blocks of {BLOCK_SIZE} positions "
                             f"({(blocks - 1) * per_block / 2 ** 20:,.1f} MiB); the longest sequence (prompt + "
                             f"budget, {longest} positions) needs {need} ({need * per_block / 2 ** 20:,.1f} MiB): "
                             f"give more GPU memory or kv_tokens, or shorten the budget")
        self.pool = PagedKVCache(config, blocks, BLOCK_SIZE, dtype, device)
        self.blocks = BlockPool(blocks)
        self.sequences: list[_Sequence | None] = [None] * S
        self.results: list[list[Rollout | None]] = [[None] * c for c in counts]
        self.streams, self.first_samples = streams, first_samples
        self.admissions = 0
        self.steps = 0
        self.counters = EngineStats()
        self.kv_read, self.kv_live = torch.zeros((), dtype=torch.long, device=device), torch.zeros(
            (), dtype=torch.long, device=device)  # EngineStats' position counts, kept on the device
        self.bar = _progress_bar(len(self.work), progress)
        # per-lane state on the device; `pos` is where the next input token goes
        zeros = lambda dtype=torch.long: torch.zeros(S, dtype=dtype, device=device)  # noqa: E731
        self.token, self.pos, self.count, self.budget = zeros(), zeros(), zeros(), zeros()
        self.stream, self.sample_id = zeros(), zeros()
        self.active, self.finish = zeros(torch.bool), zeros()
        self.table = torch.zeros(S, self.max_blocks, dtype=torch.int32, device=device)  # TRASH where unused
        self.out_tokens = torch.zeros(S, self.max_new, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(S, self.max_new, dtype=torch.float32, device=device)
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        on_gpu = device.type == "cuda"
        self.graphs = (_DecodeGraphs(self.step, S, self.max_blocks * BLOCK_SIZE, capture=on_gpu)
                       if (on_gpu if graphs is None else graphs) else None)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> list[list[Rollout]]:
        self.schedule()
        since_sync = 0
        while any(s is not None for s in self.sequences):
            self.decode_step()
            since_sync += 1
            must_be_done = all(s is None or self.steps >= s.deadline for s in self.sequences)
            if since_sync >= self.sync_every or (must_be_done and not self.work):
                since_sync = 0
                self.harvest()
                self.schedule()
                self.compact()
        self.bar.close()
        self.counters.kv_positions_read, self.counters.kv_positions_live = int(self.kv_read), int(self.kv_live)
        return self.results

    def decode_step(self):
        """One token for every lane up to the last occupied one: [rows, 1] through the paged forward."""
        R = max(i for i, s in enumerate(self.sequences) if s is not None) + 1
        lengths = [s.length for s in self.sequences[:R] if s is not None]
        if self.graphs is not None:
            rows = self.graphs.run(R)
        else:
            rows = R
            self.step(R, max(lengths) + 1)
        self.counters.count_step(rows, lengths, queued=bool(self.work))
        for s in self.sequences[:R]:
            if s is not None:
                s.length += 1
        self.steps += 1

    def step(self, R: int, kv_len: int):
        """The device's half of a decode step for lanes [:R] (kv_len bounds their lengths + 1): forward,
        sample, record, stop checks. No host sync and, for fixed (R, kv_len), fixed shapes and
        addresses: what a CUDA graph can capture."""
        hidden = self.model(self.token[:R, None], cache=self.pool, start=self.pos[:R], block_table=self.table[:R],
                            kv_len=kv_len, return_hidden=True)  # [R, 1, H]
        logits = self.model.logits(hidden[:, 0]).float()
        new_token, new_logprob = sample(logits, self.params, self.seed, self.stream[:R], self.sample_id[:R],
                                        self.count[:R])
        active, count, budget = self.active[:R], self.count[:R], self.budget[:R]
        running = active.clone()  # lanes whose input this step was a real token of a running sequence
        lengths = self.pos[:R] + 1  # what attention read this step (a lane without a sequence: 1 position)
        self.kv_read += lengths.sum()
        self.kv_live += (lengths * running).sum()
        rows = torch.arange(R, device=self.device)
        column = count.clamp(max=self.max_new - 1)
        self.out_tokens[rows, column] = torch.where(active, new_token, self.out_tokens[rows, column])
        self.out_logprobs[rows, column] = torch.where(active, new_logprob, self.out_logprobs[rows, column])
        count += active
        # a comparison with every stop id, not torch.isin: from about 10 ids isin sorts, which syncs
        # with the host on CUDA and so cannot be captured in a graph
        stopped = (new_token[:, None] == self.stop_ids).any(-1) & active
        exhausted = (count >= budget) & active & ~stopped
        self.finish[:R].masked_fill_(stopped, FinishReason.STOP.code)
        self.finish[:R].masked_fill_(exhausted & (budget >= self.max_new), FinishReason.LENGTH.code)
        self.finish[:R].masked_fill_(exhausted & (budget < self.max_new), FinishReason.CUTOFF.code)
        active &= ~(stopped | exhausted)
        self.token[:R] = new_token
        # Only running lanes move on. A sequence that has finished keeps decoding until the next sync
        # at the position after its last token (its own block, or the trash block where its table has
        # none), and a lane without a sequence at position 0 of the trash block: neither reads more.
        self.pos[:R] += running

    # -- the host's work at a sync -------------------------------------------------------------------

    def harvest(self):
        """Collect the finished lanes' rollouts and free their lanes and blocks."""
        finished = [i for i, f in enumerate(self.finish.tolist()) if f and self.sequences[i] is not None]
        if not finished:
            return
        idx = torch.tensor(finished, device=self.device)
        counts, reasons = self.count[idx].tolist(), self.finish[idx].tolist()
        tokens, logprobs = self.out_tokens[idx].tolist(), self.out_logprobs[idx].tolist()
        for lane, c, r, t, lp in zip(finished, counts, reasons, tokens, logprobs):
            s = self.sequences[lane]
            self.results[s.prompt][s.sample] = Rollout(t[:c], lp[:c], list(FinishReason)[r - 1])
            self.free_lane(lane)
        self.counters.generated_tokens += sum(counts)
        self.bar.set_postfix(tokens=self.counters.generated_tokens, refresh=False)
        self.bar.update(len(finished))

    def compact(self):
        """Move the sequences of the highest lanes into the free lanes below them: a decode step
        computes every lane up to the last occupied one, so holes left by finished sequences would
        be computed for nothing."""
        free = [i for i, s in enumerate(self.sequences) if s is None]
        taken = [i for i, s in enumerate(self.sequences) if s is not None]
        moves = []
        while free and taken and free[0] < taken[-1]:
            moves.append((taken.pop(), free.pop(0)))
        if not moves:
            return
        source = torch.tensor([m[0] for m in moves], device=self.device)
        target = torch.tensor([m[1] for m in moves], device=self.device)
        for lane_state in (self.token, self.pos, self.count, self.budget, self.stream, self.sample_id, self.active,
                           self.finish, self.table, self.out_tokens, self.out_logprobs):
            lane_state[target] = lane_state[source]
        for old, new in moves:
            self.sequences[new], self.sequences[old] = self.sequences[old], None
        self.table[source], self.pos[source], self.active[source] = TRASH, 0, False

    def schedule(self):
        """Give every running sequence blocks for the next sync_every positions, preempting the newest
        when the pool runs out; then admit pending samples while blocks remain (headroom for running
        sequences to grow stays free: a quarter of a block each, and at least one sync's growth; a
        tighter reserve admits more and preempts more, a looser one wastes the pool)."""
        running = sorted((s for s in self.sequences if s is not None), key=lambda s: s.admitted)
        while running and self.growth(running) > self.blocks.available():
            self.preempt(running.pop())
        for s in running:
            self.grow(s)
        while self.work and None in self.sequences:
            p, j, resumed = self.work[0]
            running = sum(s is not None for s in self.sequences)
            headroom = -(-running * max(self.sync_every, 4) // BLOCK_SIZE)
            if self.admission_need(p, resumed) + headroom > self.blocks.available():
                if running:
                    break
                # Nothing runs, yet the next sample does not fit: prefixes waiting for their other
                # samples hold the pool. Let them go (they are prefilled again when needed), its own
                # prompt's too when the sample is a preempted one, which is recomputed without it.
                for q, blocks in self.prefixes.items():
                    if blocks is not None and (q != p or resumed is not None):
                        self.blocks.release(blocks)
                        self.prefixes[q] = None
                assert self.admission_need(p, resumed) <= self.blocks.available()  # __init__ checked one fits
            self.work.popleft()
            self.admit(p, j, resumed)

    def target_blocks(self, s: _Sequence) -> int:
        """Blocks s needs to write its next sync_every positions (never past its budget)."""
        last = len(self.prompts[s.prompt]) - 1 + self.budgets[s.prompt]  # positions it can ever write
        return -(-min(s.length + self.sync_every, last) // BLOCK_SIZE)

    def growth(self, running: list[_Sequence]) -> int:
        return sum(max(0, self.target_blocks(s) - len(s.blocks)) for s in running)

    def grow(self, s: _Sequence):
        new = self.blocks.take(max(0, self.target_blocks(s) - len(s.blocks)))
        if new:
            lane = self.sequences.index(s)
            self.table[lane, len(s.blocks):len(s.blocks) + len(new)] = torch.tensor(new, dtype=torch.int32)
            s.blocks += new

    def admission_need(self, p: int, resumed: _Sequence | None) -> int:
        """Blocks admitting a sample of prompt p takes now: its prefix (if not yet in the pool) or, when
        resuming a preempted sample, its whole recomputed sequence; plus the next sync's growth."""
        prefix = len(self.prompts[p]) - 1
        if resumed is not None:
            return -(-min(prefix + len(resumed.tokens) + self.sync_every, prefix + self.budgets[p]) // BLOCK_SIZE)
        ahead = -(-min(prefix + self.sync_every, prefix + self.budgets[p]) // BLOCK_SIZE)
        shared = prefix // BLOCK_SIZE  # full prefix blocks, shared
        own = ahead - shared  # the copied partial block and the growth
        return own + (0 if self.prefixes[p] is not None else -(-prefix // BLOCK_SIZE))

    def admit(self, p: int, j: int, resumed: _Sequence | None):
        lane = self.sequences.index(None)
        prompt = self.prompts[p]
        prefix = len(prompt) - 1
        if resumed is not None:  # recompute: prompt and generated tokens but the last, into its own blocks
            s = resumed
            *history, next_token = prompt + s.tokens
            s.blocks = self.blocks.take(-(-len(history) // BLOCK_SIZE))
            self.prefill(history, s.blocks)
            s.length = len(history)
            self.out_tokens[lane, :len(s.tokens)] = torch.tensor(s.tokens, device=self.device)
            self.out_logprobs[lane, :len(s.tokens)] = torch.tensor(s.logprobs, device=self.device)
        else:
            s = _Sequence(p, j)
            if self.prefixes[p] is None:
                self.prefixes[p] = self.blocks.take(-(-prefix // BLOCK_SIZE))
                self.prefill(prompt[:-1], self.prefixes[p])
            shared = self.prefixes[p][:prefix // BLOCK_SIZE]
            self.blocks.share(shared)
            s.blocks = list(shared)
            if prefix % BLOCK_SIZE:  # the partly filled last block: a copy of its own (copy on write)
                (copy,) = self.blocks.take(1)
                source = self.prefixes[p][-1]
                self.pool.k[:, copy], self.pool.v[:, copy] = self.pool.k[:, source], self.pool.v[:, source]
                s.blocks.append(copy)
            self.pending[p] -= 1
            if self.pending[p] == 0:
                self.blocks.release(self.prefixes[p])
                self.prefixes[p] = None
            s.length, next_token = prefix, prompt[-1]
        self.admissions += 1
        s.admitted = self.admissions
        s.deadline = self.steps + self.budgets[p] - len(s.tokens)
        self.sequences[lane] = s
        self.table[lane] = TRASH
        self.table[lane, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        self.grow(s)
        self.token[lane], self.pos[lane], self.count[lane] = next_token, s.length, len(s.tokens)
        self.budget[lane], self.active[lane], self.finish[lane] = self.budgets[p], True, 0
        self.stream[lane], self.sample_id[lane] = self.streams[p], self.first_samples[p] + s.sample

    def preempt(self, s: _Sequence):
        """Free a running sequence's blocks and queue it first again, keeping what it generated; it is
        recomputed from its tokens when readmitted, and samples on exactly as it would have."""
        lane = self.sequences.index(s)
        c = int(self.count[lane])
        s.tokens = self.out_tokens[lane, :c].tolist()
        s.logprobs = self.out_logprobs[lane, :c].tolist()
        self.free_lane(lane)
        self.work.appendleft((s.prompt, s.sample, s))
        self.counters.preemptions += 1

    def free_lane(self, lane: int):
        self.blocks.release(self.sequences[lane].blocks)
        self.sequences[lane] = None
        self.table[lane] = TRASH
        self.pos[lane] = 0
        self.active[lane] = False

    def prefill(self, tokens: list[int], blocks: list[int]):
        """Write the keys and values of `tokens` (positions 0..) into `blocks`: one dense forward."""
        if tokens:
            table = torch.tensor([blocks], dtype=torch.int32, device=self.device)
            self.model(torch.tensor([tokens], device=self.device), cache=self.pool, start=0, block_table=table,
                       kv_len=len(tokens), return_hidden=True)


GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # and the lane count


class _DecodeGraphs:
    """The decode step as CUDA graphs, one per batch size: a step over R lanes runs the smallest size
    >= R among GRAPH_BATCH_SIZES (and the lane count); the lanes past R are free, write to the trash
    block and are discarded. A size is captured the first time a step needs it, right after an eager
    run of that same step (which compiles its kernels and is itself a real step, so nothing is wasted
    or recomputed); later steps replay the graph: one launch instead of a few hundred kernel launches,
    which at small batches cost more than the kernels themselves. Attention is given kv_len = the block
    table's width, so a size's shapes never change; the kernel still reads only live positions
    (masa_kernels/paged_attention.py masks by seq_lens, not kv_len). The graphs hold the engine's tensors'
    addresses, so they live and die with one generate call; all sizes share one memory pool.
    capture=False (a CPU, in tests) runs the same fixed shapes eagerly: the graph path, less the capture."""

    def __init__(self, step, lanes: int, kv_len: int, capture: bool):
        self.step, self.kv_len, self.capture = step, kv_len, capture
        self.sizes = sorted({size for size in GRAPH_BATCH_SIZES if size < lanes} | {lanes})
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory = torch.cuda.graph_pool_handle() if capture else None

    def run(self, R: int) -> int:
        """One decode step over at least R lanes; returns how many it ran."""
        size = next(size for size in self.sizes if size >= R)
        if size in self.graphs:
            self.graphs[size].replay()
            return size
        self.step(size, self.kv_len)
        if self.capture:
            graph = self.graphs[size] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.memory):  # recorded, not run
                self.step(size, self.kv_len)
        return size


@dataclass
class EngineStats:
    """What one generate call did, in units that do not depend on the hardware (bench/sampler.py turns
    them into a decode-time bound on a stated memory bandwidth): each decode step reads the weights
    once and, per sequence, the keys and values of its live positions (the paged kernel reads no others)."""
    decode_steps: int = 0
    rows_decoded: int = 0  # summed over steps: lanes each step computed (occupied or not)
    live_sequences: int = 0  # summed over steps: sequences decoded together
    peak_live_sequences: int = 0
    kv_positions_read: int = 0  # summed over steps and lanes: positions the attention read (counted on the device)
    kv_positions_live: int = 0  # the same, over the lanes of running sequences only
    generated_tokens: int = 0
    preemptions: int = 0
    queued_steps: int = 0  # steps while samples waited for the pool (not yet admitted, or preempted)
    queued_live_sequences: int = 0  # summed over those steps: what the pool held while it was the limit

    def count_step(self, rows: int, live_lengths: list[int], queued: bool):
        self.decode_steps += 1
        self.queued_steps += queued
        self.queued_live_sequences += len(live_lengths) if queued else 0
        self.rows_decoded += rows
        self.live_sequences += len(live_lengths)
        self.peak_live_sequences = max(self.peak_live_sequences, len(live_lengths))


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="rollouts", unit="seq")
