"""The batched sampler that produces GRPO rollouts from model.py's Qwen3 (docs/method.md §2).

    rollouts = generate(model, prompts, SamplingParams(n=16, max_new_tokens=8192), budgets=..., seed=0)
    rollouts[i][j].token_ids, .logprobs, .finish_reason   # sample j of prompt i

A paged engine in one file, along the seams of nano-vllm's (block manager, scheduler, model runner),
each piece the one owner of its invariants:
- BlockPool: the KV pool's blocks (model.PagedKVCache: keys and values in blocks of BLOCK_SIZE = 16
  positions, shared by all sequences), its free list and reference counts; every block is free or
  held, a count is its number of holders, and block 0 (TRASH) is never handed out: lanes without a
  sequence write their keys there. On CUDA the pool takes KV_MEMORY_FRACTION of the free memory (or
  `kv_tokens` positions); plan.py sizes it the same way.
- Scheduler (host-side, no model): the work is the list of (prompt, sample) pairs. A prompt's tokens
  but the last are prefilled once; its full blocks enter every sample's table by reference, its
  partly filled last block is copied per sample (copy on write). Samples are admitted while free
  blocks allow, keeping headroom for running sequences to grow; before each sync every running
  sequence gets blocks for the positions it will write until the next one, and if the pool runs out
  the newest is preempted (blocks freed, re-queued first with what it generated) and later
  recomputed from prompt + tokens. It returns what the device must do (Admission).
- Lanes: the decode step's rows and their state on the device (token, position, budget, stream,
  block table, outputs); a lane holds a sequence or is free, and its table row equals its
  sequence's block list. Compaction moves sequences down into freed lanes, so no step computes a hole.
- _Engine, the loop: schedule -> decode steps -> harvest (every `sync_every` steps: 1 on a CPU, 16 on
  a GPU). Its `step` is the device's half of a decode step: one token for every lane up to the last
  occupied one, [rows, 1] through the paged forward, attention over each sequence's own live
  positions (masa_kernels.paged_decode_attention), sampling, the stop check, the per-sequence budget
  and the recording of tokens and log-probs, with no host sync. On CUDA it runs as CUDA graphs, one
  per batch-size bucket (_DecodeGraphs; graphs=False turns them off). A pool too small for one
  sequence at its full budget is refused with the memory it needs.
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
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum

import torch

import masa_kernels
from model import PagedKVCache, Qwen3
from training_report import progress_bar



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
    """Which blocks of a PagedKVCache are free, and how many holders list each taken one: a sequence's
    block table, or a prompt's prefix while samples of it wait (a prompt's full blocks are held by
    every sample of it). Host-side; nothing here touches the tensors. Block TRASH is never handed out."""

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

    def check(self, holders: list[list[int]]):
        """Assert the invariants against every holder's blocks: a block's count is the number of holders
        that list it, every block is either free or held (never both), and the trash block is neither."""
        held = Counter(b for blocks in holders for b in blocks)
        assert TRASH not in held and TRASH not in self.free, "the trash block was handed out"
        assert len(set(self.free)) == len(self.free) and not held.keys() & set(self.free), "a block is free twice or free and held"
        assert [self.refs[b] for b in range(1, len(self.refs))] == [held[b] for b in range(1, len(self.refs))], \
            "a reference count differs from its holders"
        assert len(self.free) + len(held) == len(self.refs) - 1, "a block is neither free nor held"


def blocks_for(positions: int) -> int:
    """Blocks that hold `positions` positions."""
    return -(-positions // BLOCK_SIZE)


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Keys and values of one position: every layer, every key-value head."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (torch.finfo(dtype).bits // 8)


def decode_graph_bytes(config, lanes: int, dtype: torch.dtype) -> int:
    """What the decode step's CUDA graphs are expected to hold, kept free when the KV pool is sized
    (they are captured lazily, after the pool has taken its share). The graphs share one memory pool,
    whose size the largest batch (all lanes) sets: per lane, the logits in `dtype` and in float32 and
    one layer's activations (hidden states, q, k, v and the MLP's three), doubled for what this leaves
    out (the attention kernel's split partials, allocator rounding). An estimate from shapes;
    bench/gpu_check.sh measures the real size on a GPU."""
    s = torch.finfo(dtype).bits // 8
    heads = config.num_attention_heads + 2 * config.num_key_value_heads
    per_lane = config.vocab_size * (s + 4) + s * (
        4 * config.hidden_size + heads * config.head_dim + 3 * config.intermediate_size)
    return 2 * lanes * per_lane


def kv_tokens_that_fit(config, dtype: torch.dtype, free_bytes: float) -> int:
    """The default pool: KV_MEMORY_FRACTION of `free_bytes`, in positions (whole blocks; plan.py uses
    the same rule, with the same decode_graph_bytes taken off `free_bytes` first)."""
    blocks = max(0, int(KV_MEMORY_FRACTION * free_bytes) // (BLOCK_SIZE * kv_bytes_per_position(config, dtype)))
    return blocks * BLOCK_SIZE


# ---------------------------------------------------------------------------------------------------
# The scheduler: which samples run, and the blocks they hold


@dataclass(eq=False)  # compared by identity
class Sequence:
    """One sample: its prompt, its block table, and (after a preemption) what it had generated."""
    prompt: int
    sample: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions written to the pool; an upper bound between host syncs
    tokens: list[int] = field(default_factory=list)  # generated before a preemption
    logprobs: list[float] = field(default_factory=list)
    admitted: int = 0  # admission order (preemption takes the newest first)
    deadline: int = 0  # the decode step by which it must be done


@dataclass
class Admission:
    """What the device must do to start a sequence, as the scheduler decided it: write `prefill`'s
    tokens (from position 0) into its blocks, copy `copy`'s source block into its target, then decode
    from `next_token`."""
    sequence: Sequence
    next_token: int
    prefill: tuple[list[int], list[int]] | None = None  # (tokens, blocks)
    copy: tuple[int, int] | None = None  # (source, target): the prompt's partly filled last block


class Scheduler:
    """The queue of (prompt, sample) work; each prompt's prefix (its tokens but the last, prefilled once
    into blocks its samples share: full blocks by reference, the partly filled last one copied per
    sample); admission while blocks allow, keeping headroom for the running sequences to grow;
    growth; and preemption of the newest sequence when the pool runs out. Host-side and model-free:
    `make_room`, `grow` and `admit` say what the engine must do on the device. Owns the BlockPool."""

    def __init__(self, prompts: list[list[int]], counts: list[int], budgets: list[int], sync_every: int, blocks: int):
        self.prompts, self.budgets, self.sync_every = prompts, budgets, sync_every
        self.pool = BlockPool(blocks)
        self.work = deque((p, j, None) for p in range(len(prompts)) for j in range(counts[p]))
        # A prompt's prefix is held until its last sample is admitted (then it lives on in their tables).
        self.prefixes: dict[int, list[int] | None] = {p: None for p in range(len(prompts)) if counts[p]}
        self.pending = {p: counts[p] for p in self.prefixes}  # samples not yet admitted
        self.admissions = 0

    def holders(self, running: list[Sequence]) -> list[list[int]]:
        """Every block list that holds pool blocks (for BlockPool.check)."""
        return [s.blocks for s in running] + [b for b in self.prefixes.values() if b is not None]

    def target_blocks(self, s: Sequence) -> int:
        """Blocks s needs to write its next sync_every positions (never past its budget)."""
        last = len(self.prompts[s.prompt]) - 1 + self.budgets[s.prompt]  # positions it can ever write
        return blocks_for(min(s.length + self.sync_every, last))

    def make_room(self, running: list[Sequence]) -> list[Sequence]:
        """Preempt the newest of `running` (oldest first; it loses them) until the others' growth to
        the next sync fits: their blocks are released, and the engine reads back what they generated
        and hands them to `requeue`. Returns them, newest first."""
        preempted = []
        while running and sum(max(0, self.target_blocks(s) - len(s.blocks)) for s in running) > self.pool.available():
            s = running.pop()
            self.pool.release(s.blocks)
            s.blocks = []
            preempted.append(s)
        return preempted

    def requeue(self, s: Sequence, tokens: list[int], logprobs: list[float]):
        """A preempted sequence goes first in the queue, with what it generated: it is recomputed from
        its prompt and tokens when readmitted, and samples on exactly as it would have."""
        s.tokens, s.logprobs = tokens, logprobs
        self.work.appendleft((s.prompt, s.sample, s))

    def grow(self, s: Sequence) -> list[int]:
        """Give s the blocks for its next sync_every positions; returns the new ones (appended to s.blocks)."""
        new = self.pool.take(max(0, self.target_blocks(s) - len(s.blocks)))
        s.blocks += new
        return new

    def admission_need(self, p: int, resumed: Sequence | None) -> int:
        """Blocks admitting a sample of prompt p takes now: its prefix (if not yet in the pool) or, when
        resuming a preempted sample, its whole recomputed sequence; plus the next sync's growth."""
        prefix = len(self.prompts[p]) - 1
        if resumed is not None:
            return blocks_for(min(prefix + len(resumed.tokens) + self.sync_every, prefix + self.budgets[p]))
        ahead = blocks_for(min(prefix + self.sync_every, prefix + self.budgets[p]))
        own = ahead - prefix // BLOCK_SIZE  # the copied partial block and the growth (full blocks are shared)
        return own + (0 if self.prefixes[p] is not None else blocks_for(prefix))

    def admit(self, running: int, step: int) -> Admission | None:
        """The next sample to start at decode step `step`, or None when the queue is empty or the pool
        lacks its blocks plus headroom for the `running` sequences to grow (a quarter of a block each,
        and at least one sync's growth: a tighter reserve admits more and preempts more, a looser one
        wastes the pool)."""
        if not self.work:
            return None
        p, j, resumed = self.work[0]
        if self.admission_need(p, resumed) + blocks_for(running * max(self.sync_every, 4)) > self.pool.available():
            if running:
                return None
            # Nothing runs, yet the next sample does not fit: prefixes waiting for their other samples
            # hold the pool. Let them go (they are prefilled again when needed), its own prompt's too
            # when the sample is a preempted one, which is recomputed without it.
            for q, blocks in self.prefixes.items():
                if blocks is not None and (q != p or resumed is not None):
                    self.pool.release(blocks)
                    self.prefixes[q] = None
            assert self.admission_need(p, resumed) <= self.pool.available()  # the engine checked that one fits
        self.work.popleft()
        admission = self._resume(resumed) if resumed is not None else self._start(p, j)
        s = admission.sequence
        self.admissions += 1
        s.admitted, s.deadline = self.admissions, step + self.budgets[p] - len(s.tokens)
        self.grow(s)
        return admission

    def _resume(self, s: Sequence) -> Admission:
        """Recompute a preempted sample: its prompt and tokens but the last, into blocks of its own."""
        *history, next_token = self.prompts[s.prompt] + s.tokens
        s.blocks = self.pool.take(blocks_for(len(history)))
        s.length = len(history)
        return Admission(s, next_token, prefill=(history, s.blocks))

    def _start(self, p: int, j: int) -> Admission:
        """A new sample of prompt p: the prefix's full blocks shared, its partly filled last one copied."""
        prompt = self.prompts[p]
        prefix = len(prompt) - 1
        s, prefill, copy = Sequence(p, j, length=prefix), None, None
        if self.prefixes[p] is None:
            self.prefixes[p] = self.pool.take(blocks_for(prefix))
            prefill = (prompt[:-1], self.prefixes[p]) if prefix else None
        s.blocks = self.prefixes[p][:prefix // BLOCK_SIZE]
        self.pool.share(s.blocks)
        if prefix % BLOCK_SIZE:
            (target,) = self.pool.take(1)
            copy = (self.prefixes[p][-1], target)
            s.blocks.append(target)
        self.pending[p] -= 1
        if self.pending[p] == 0:  # released now; the engine copies the partial block before anything reuses it
            self.pool.release(self.prefixes[p])
            self.prefixes[p] = None
        return Admission(s, prompt[-1], prefill, copy)


# ---------------------------------------------------------------------------------------------------
# The lanes: the decode step's rows, on the device


class Lanes:
    """The rows of the decode step and their state on the device; each holds a sequence or is free.
    `load`, `extend`, `clear` and `compact` keep the tensors and the host's `sequences` in step. A
    free lane's table is TRASH everywhere, its position 0, and it is inactive. `pos` is where a lane's
    next input token goes."""

    def __init__(self, count: int, max_blocks: int, max_new: int, device: torch.device):
        zeros = lambda dtype=torch.long: torch.zeros(count, dtype=dtype, device=device)  # noqa: E731
        self.token, self.pos, self.count, self.budget = zeros(), zeros(), zeros(), zeros()
        self.stream, self.sample_id = zeros(), zeros()
        self.active, self.finish = zeros(torch.bool), zeros()
        self.table = torch.zeros(count, max_blocks, dtype=torch.int32, device=device)
        self.out_tokens = torch.zeros(count, max_new, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(count, max_new, dtype=torch.float32, device=device)
        self.sequences: list[Sequence | None] = [None] * count
        self.device = device

    def running(self) -> list[Sequence]:
        return [s for s in self.sequences if s is not None]

    def top(self) -> int:
        """One past the last occupied lane: a decode step computes lanes [:top]."""
        return max((i + 1 for i, s in enumerate(self.sequences) if s is not None), default=0)

    def lane_of(self, s: Sequence) -> int:
        return next(i for i, t in enumerate(self.sequences) if t is s)

    def load(self, lane: int, s: Sequence, next_token: int, budget: int, stream: int, sample_id: int):
        self.sequences[lane] = s
        self.table[lane] = TRASH
        self.table[lane, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        if s.tokens:  # a resumed sequence's output so far
            self.out_tokens[lane, :len(s.tokens)] = torch.tensor(s.tokens, device=self.device)
            self.out_logprobs[lane, :len(s.tokens)] = torch.tensor(s.logprobs, device=self.device)
        self.token[lane], self.pos[lane], self.count[lane] = next_token, s.length, len(s.tokens)
        self.budget[lane], self.active[lane], self.finish[lane] = budget, True, 0
        self.stream[lane], self.sample_id[lane] = stream, sample_id

    def extend(self, s: Sequence, new: list[int]):
        """Write the blocks just appended to s.blocks into its lane's table."""
        if new:
            lane, end = self.lane_of(s), len(s.blocks)
            self.table[lane, end - len(new):end] = torch.tensor(new, dtype=torch.int32)

    def output(self, lane: int) -> tuple[list[int], list[float]]:
        """What the lane's sequence has generated so far (a host sync)."""
        c = int(self.count[lane])
        return self.out_tokens[lane, :c].tolist(), self.out_logprobs[lane, :c].tolist()

    def clear(self, lane: int):
        self.sequences[lane] = None
        self.table[lane], self.pos[lane], self.active[lane] = TRASH, 0, False

    def finished(self) -> list[tuple[int, Sequence, Rollout]]:
        """(lane, sequence, rollout) of every occupied lane whose sequence has finished (a host sync)."""
        lanes = [i for i, f in enumerate(self.finish.tolist()) if f and self.sequences[i] is not None]
        if not lanes:
            return []
        idx = torch.tensor(lanes, device=self.device)
        counts, reasons = self.count[idx].tolist(), self.finish[idx].tolist()
        tokens, logprobs = self.out_tokens[idx].tolist(), self.out_logprobs[idx].tolist()
        return [(lane, self.sequences[lane], Rollout(t[:c], lp[:c], list(FinishReason)[r - 1]))
                for lane, c, r, t, lp in zip(lanes, counts, reasons, tokens, logprobs)]

    def compact(self):
        """Move the sequences of the highest lanes into the free lanes below them: a decode step
        computes every lane up to the last occupied one, so holes would be computed for nothing."""
        free = [i for i, s in enumerate(self.sequences) if s is None]
        taken = [i for i, s in enumerate(self.sequences) if s is not None]
        moves = []
        while free and taken and free[0] < taken[-1]:
            moves.append((taken.pop(), free.pop(0)))
        if not moves:
            return
        source = torch.tensor([m[0] for m in moves], device=self.device)
        target = torch.tensor([m[1] for m in moves], device=self.device)
        for state in (self.token, self.pos, self.count, self.budget, self.stream, self.sample_id, self.active,
                      self.finish, self.table, self.out_tokens, self.out_logprobs):
            state[target] = state[source]
        for old, new in moves:
            self.sequences[new], self.sequences[old] = self.sequences[old], None
        self.table[source], self.pos[source], self.active[source] = TRASH, 0, False

    def check(self):
        """Assert that the device's tables equal the host's block lists (a host sync; tests)."""
        for lane, s in enumerate(self.sequences):
            row = self.table[lane].tolist()
            blocks = s.blocks if s is not None else []
            assert row[:len(blocks)] == blocks and set(row[len(blocks):]) <= {TRASH}, f"lane {lane}'s table"


# ---------------------------------------------------------------------------------------------------
# The engine: the loop, and the model's half of each step


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
    """One generate call: the KV pool, the Scheduler, the Lanes, and the loop `run` (schedule ->
    decode steps -> harvest, the host's work at each sync). `step` is the device's half of a decode
    step, the part CUDA graphs capture."""

    def __init__(self, model, prompts, params, budgets, counts, streams, first_samples, seed, lanes, kv_tokens,
                 sync_every, graphs, progress):
        self.model, self.prompts, self.params, self.seed = model, prompts, params, seed
        self.streams, self.first_samples = streams, first_samples
        self.max_new = params.max_new_tokens
        self.budgets = [min(b or self.max_new, self.max_new) for b in budgets]
        device = self.device = model.embed_tokens.weight.device
        self.sync_every = sync_every or (16 if device.type == "cuda" else 1)
        used = [p for p in range(len(prompts)) if counts[p]]
        S = min(sum(counts), lanes or 256)
        longest = max(len(prompts[p]) - 1 + self.budgets[p] for p in used)  # positions of one sequence
        self.max_blocks = blocks_for(longest) + 1  # with its prompt's partly filled block alongside
        on_gpu = device.type == "cuda"
        self.graphs = (_DecodeGraphs(self.step, S, self.max_blocks * BLOCK_SIZE, capture=on_gpu)
                       if (on_gpu if graphs is None else graphs) else None)
        blocks = self.pool_blocks(kv_tokens, S, longest, sum(len(prompts[p]) for p in used))
        self.pool = PagedKVCache(model.config, blocks, BLOCK_SIZE, model.embed_tokens.weight.dtype, device)
        self.scheduler = Scheduler(prompts, counts, self.budgets, self.sync_every, blocks)
        self.lanes = Lanes(S, self.max_blocks, self.max_new, device)
        self.results: list[list[Rollout | None]] = [[None] * c for c in counts]
        self.steps = 0
        self.counters = EngineStats()
        # EngineStats' position counts, summed on the device from what attention is given
        self.kv_read, self.kv_live = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
        self.bar = progress_bar(sum(counts), "rollouts", 0, progress, unit="seq")
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)

    def pool_blocks(self, kv_tokens: int | None, lanes: int, longest: int, prompt_tokens: int) -> int:
        """The pool's blocks, the trash block included: kv_tokens positions, else KV_MEMORY_FRACTION of
        the free GPU memory, or on a CPU enough for every lane at the full budget. A pool too small for
        one sequence at its full budget is refused with the memory it needs."""
        config, dtype = self.model.config, self.model.embed_tokens.weight.dtype
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            graphs = decode_graph_bytes(config, lanes, dtype) if self.graphs is not None else 0
            if kv_tokens is None:
                kv_tokens = kv_tokens_that_fit(config, dtype, free - graphs)
            elif kv_tokens * kv_bytes_per_position(config, dtype) + graphs > free:
                raise ValueError(f"a KV pool of {kv_tokens:,} positions ({kv_tokens * kv_bytes_per_position(config, dtype) / 2 ** 30:,.2f} "
                                 f"GiB) and the decode graphs (about {graphs / 2 ** 30:,.2f} GiB) do not fit in the "
                                 f"{free / 2 ** 30:,.2f} GiB free: lower kv_tokens (rollout.kv_tokens), or leave it "
                                 f"unset to take {KV_MEMORY_FRACTION:.0%} of the free memory")
        elif kv_tokens is None:
            kv_tokens = lanes * self.max_blocks * BLOCK_SIZE + prompt_tokens
        blocks, need = kv_tokens // BLOCK_SIZE + 1, self.max_blocks
        if blocks - 1 < need:
            per_block = BLOCK_SIZE * kv_bytes_per_position(config, dtype)
            raise ValueError(f"the KV pool holds {blocks - 1} blocks of {BLOCK_SIZE} positions "
                             f"({(blocks - 1) * per_block / 2 ** 20:,.1f} MiB); the longest sequence (prompt + "
                             f"budget, {longest} positions) needs {need} ({need * per_block / 2 ** 20:,.1f} MiB): "
                             f"give more GPU memory or kv_tokens, or shorten the budget")
        return blocks

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> list[list[Rollout]]:
        self.schedule()
        since_sync = 0
        while self.lanes.top():
            self.decode_step()
            since_sync += 1
            must_be_done = all(s is None or self.steps >= s.deadline for s in self.lanes.sequences)
            if since_sync >= self.sync_every or (must_be_done and not self.scheduler.work):
                since_sync = 0
                self.harvest()
                self.schedule()
                self.lanes.compact()
        self.bar.close()
        self.counters.kv_positions_read, self.counters.kv_positions_live = int(self.kv_read), int(self.kv_live)
        return self.results

    def schedule(self):
        """Blocks for every running sequence's next sync_every positions, preempting the newest when
        the pool runs out; then queued samples start in the free lanes while the Scheduler admits them."""
        running = sorted(self.lanes.running(), key=lambda s: s.admitted)
        for s in self.scheduler.make_room(running):
            lane = self.lanes.lane_of(s)
            self.scheduler.requeue(s, *self.lanes.output(lane))
            self.lanes.clear(lane)
            self.counters.preemptions += 1
        for s in running:
            self.lanes.extend(s, self.scheduler.grow(s))
        while None in self.lanes.sequences:
            admission = self.scheduler.admit(len(self.lanes.running()), self.steps)
            if admission is None:
                break
            self.start(admission)

    def start(self, a: Admission):
        """The device's part of an admission: prefill, the copied block, and the lane's state."""
        if a.prefill is not None:
            self.prefill(*a.prefill)
            if a.sequence.tokens:  # a preempted sequence, recomputed
                self.counters.recomputed_tokens += len(a.prefill[0])
        if a.copy is not None:
            source, target = a.copy
            self.pool.k[:, target], self.pool.v[:, target] = self.pool.k[:, source], self.pool.v[:, source]
        s, p = a.sequence, a.sequence.prompt
        self.lanes.load(self.lanes.sequences.index(None), s, a.next_token, self.budgets[p], self.streams[p],
                        self.first_samples[p] + s.sample)

    def harvest(self):
        """Collect the finished lanes' rollouts and free their lanes and blocks."""
        finished = self.lanes.finished()
        for lane, s, rollout in finished:
            self.results[s.prompt][s.sample] = rollout
            self.scheduler.pool.release(s.blocks)
            self.lanes.clear(lane)
        if finished:
            self.counters.generated_tokens += sum(len(r.token_ids) for _, _, r in finished)
            self.bar.set_postfix(tokens=self.counters.generated_tokens, refresh=False)
            self.bar.update(len(finished))

    # -- the model -----------------------------------------------------------------------------------

    def decode_step(self):
        """One token for every lane up to the last occupied one: [rows, 1] through the paged forward."""
        R = self.lanes.top()
        lengths = [s.length for s in self.lanes.sequences[:R] if s is not None]
        if self.graphs is not None:
            rows = self.graphs.run(R)
        else:
            rows = R
            self.step(R, max(lengths) + 1)
        self.counters.count_step(rows, lengths, queued=bool(self.scheduler.work))
        for s in self.lanes.sequences[:R]:
            if s is not None:
                s.length += 1
        self.steps += 1

    def step(self, R: int, kv_len: int):
        """The device's half of a decode step for lanes [:R] (kv_len bounds their lengths + 1): forward,
        sample, record, stop checks. No host sync and, for fixed (R, kv_len), fixed shapes and
        addresses: what a CUDA graph can capture."""
        L = self.lanes
        hidden = self.model(L.token[:R, None], cache=self.pool, start=L.pos[:R], block_table=L.table[:R],
                            kv_len=kv_len, return_hidden=True)  # [R, 1, H]
        logits = self.model.logits(hidden[:, 0]).float()
        new_token, new_logprob = sample(logits, self.params, self.seed, L.stream[:R], L.sample_id[:R], L.count[:R])
        active, count, budget = L.active[:R], L.count[:R], L.budget[:R]
        running = active.clone()  # lanes whose input this step was a real token of a running sequence
        lengths = L.pos[:R] + 1  # what attention read this step (a lane without a sequence: 1 position)
        self.kv_read += lengths.sum()
        self.kv_live += (lengths * running).sum()
        rows = torch.arange(R, device=self.device)
        column = count.clamp(max=self.max_new - 1)
        L.out_tokens[rows, column] = torch.where(active, new_token, L.out_tokens[rows, column])
        L.out_logprobs[rows, column] = torch.where(active, new_logprob, L.out_logprobs[rows, column])
        count += active
        # a comparison with every stop id, not torch.isin: from about 10 ids isin sorts, which syncs
        # with the host on CUDA and so cannot be captured in a graph
        stopped = (new_token[:, None] == self.stop_ids).any(-1) & active
        exhausted = (count >= budget) & active & ~stopped
        L.finish[:R].masked_fill_(stopped, FinishReason.STOP.code)
        L.finish[:R].masked_fill_(exhausted & (budget >= self.max_new), FinishReason.LENGTH.code)
        L.finish[:R].masked_fill_(exhausted & (budget < self.max_new), FinishReason.CUTOFF.code)
        active &= ~(stopped | exhausted)
        L.token[:R] = new_token
        # Only running lanes move on. A sequence that has finished keeps decoding until the next sync
        # at the position after its last token (its own block, or the trash block where its table has
        # none), and a lane without a sequence at position 0 of the trash block: neither reads more.
        L.pos[:R] += running

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
    addresses, so they live and die with one generate call; all sizes share one memory pool, which
    decode_graph_bytes estimates and the KV pool's sizing leaves free. A replay runs its kernels
    without their Python calls, so masa_kernels.usage counts replays ("decode step", "cuda graph").
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
            masa_kernels.usage["decode step", "cuda graph"] += 1  # its kernels run unseen by _pick's count
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
    recomputed_tokens: int = 0  # positions prefilled again when preempted sequences resumed
    queued_steps: int = 0  # steps while samples waited for the pool (not yet admitted, or preempted)
    queued_live_sequences: int = 0  # summed over those steps: what the pool held while it was the limit

    def count_step(self, rows: int, live_lengths: list[int], queued: bool):
        self.decode_steps += 1
        self.queued_steps += queued
        self.queued_live_sequences += len(live_lengths) if queued else 0
        self.rows_decoded += rows
        self.live_sequences += len(live_lengths)
        self.peak_live_sequences = max(self.peak_live_sequences, len(live_lengths))
