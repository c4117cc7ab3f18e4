"""The batched sampler that produces GRPO rollouts from model.py's Qwen3 (DESIGN.md §2).

    rollouts = generate(model, prompts, SamplingParams(n=16, max_new_tokens=8192), budgets=..., seed=0)
    rollouts[i][j].token_ids, .logprobs, .finish_reason   # sample j of prompt i

How it works, in the order a sequence lives through it:
- A fixed pool of `slots` KV-cache rows (model.KVCache) holds the sequences being decoded. Work is
  the list of (prompt, sample) pairs; whenever slots are free, the next pairs take them.
- A prompt is prefilled once: its tokens except the last go through the model into one slot, and
  every other slot that takes a sample of the same prompt copies that prefix (from any slot still
  holding it) instead of recomputing it. The prompt's last token is fed by the first decode step,
  so admission needs no logits and every slot goes through the same code.
- Each decode step runs all slots at once, [slots, 1] tokens, attending only to the first `kv_len`
  cache positions (rounded up to a multiple of 256 on a GPU, so a compiled step sees few shapes). Sampling
  (temperature, top-k, top-p in float32; Gumbel-max via exponential noise, no host sync), the stop
  check, the per-sequence budget and the recording of tokens and log-probs all stay on the device.
- Every `sync_every` steps the host reads which slots finished, collects their rollouts and refills
  the slots. A finished slot idles until then; a long rollout never holds the others back.

Log-probs are those of the distribution each token was drawn from: log softmax(logits / T) with
top-k / top-p applied and renormalized (with the defaults, top_k=-1 and top_p=1, simply
log softmax(logits / T)). Greedy decoding (temperature 0) reports log softmax(logits) of the chosen
token. Finish reasons: "stop" (a stop token was sampled; it is included in token_ids), "length"
(max_new_tokens reached), "cutoff" (the sequence's own budget, smaller than max_new_tokens).

Reproducibility: one torch.Generator seeded with `seed` drives all sampling, so the same seed, slots
and machine give the same tokens. Greedy output does not depend on `slots`.

Not here: tokenization (token ids in, token ids out), paged KV blocks, speculative decoding.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from model import KVCache, Qwen3



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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """logits [B, V] -> (tokens [B] int64, log-probs [B] float32) under the filtered distribution."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    z = logits / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, -math.inf)
    if params.top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, -1)
        # drop a token once the ones before it already cover top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, -math.inf))
    logp = torch.log_softmax(z, -1)  # [B, V], renormalized over what survived the filters
    # Gumbel-max in its exponential form: argmax p / E with E ~ Exp(1) draws from p, with no host sync.
    noise = torch.empty_like(logp).exponential_(1, generator=generator)
    tokens = (logp - noise.log()).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# The engine


@torch.no_grad()
def generate(model: Qwen3, prompts: list[list[int]], params: SamplingParams,
             budgets: list[int | None] | None = None, seed: int | None = None, *,
             counts: list[int] | None = None, slots: int | None = None, sync_every: int | None = None,
             progress: bool = False, decode_step=None, stats: dict | None = None) -> list[list[Rollout]]:
    """Sample `params.n` continuations of every prompt (lists of token ids).

    counts: optional samples per prompt, overriding params.n (the trainer samples G solutions and
        M meta predictions in one call).

    budgets: optional per-prompt token budgets (early cutoff); a sample that reaches its prompt's
        budget before max_new_tokens and before a stop token ends with finish_reason "cutoff".
    slots: sequences decoded concurrently (KV-cache rows). The cache holds slots x (longest prompt +
        max_new_tokens) positions; by default as many as fit in 60% of the free GPU memory (256 on a
        CPU), and never more than there are samples.
    sync_every: decode steps between host reads of which slots finished (default 1 on a CPU, where
        reading is free, 16 on a GPU).
    decode_step: optional replacement for `decode`, e.g. torch.compile(rollout.decode).
    stats: optional dict that receives the engine's hardware-independent counters (EngineStats'
        fields), for bench/sampler.py.
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
    device = model.embed_tokens.weight.device
    work = deque((p, j) for p in range(len(prompts)) for j in range(counts[p]))
    if not work:
        return [[] for _ in prompts]
    max_new = params.max_new_tokens
    max_len = max(len(p) for p, c in zip(prompts, counts) if c) + max_new
    dtype = model.embed_tokens.weight.dtype
    S = min(len(work), slots or _default_slots(model.config, max_len, dtype, device))
    cache = KVCache(model.config, S, max_len, dtype, device)
    sync_every = sync_every or (16 if device.type == "cuda" else 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    step = decode_step or decode
    # Attend to the first kv_len positions, rounded up: coarsely on a GPU (a compiled step recompiles
    # per shape), finely on a CPU (attention over unused positions is paid in full there).
    bucket = 256 if device.type == "cuda" or decode_step is not None else 16

    # Per-slot state on the device. `pos` is where the next input token goes in the cache.
    token = torch.zeros(S, dtype=torch.long, device=device)  # next input token
    pos = torch.zeros(S, dtype=torch.long, device=device)
    count = torch.zeros(S, dtype=torch.long, device=device)  # tokens generated so far
    budget = torch.ones(S, dtype=torch.long, device=device)
    active = torch.zeros(S, dtype=torch.bool, device=device)
    finish = torch.zeros(S, dtype=torch.long, device=device)  # FinishReason.code, 0 while running
    out_tokens = torch.zeros(S, max_new, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(S, max_new, dtype=torch.float32, device=device)
    stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
    rows = torch.arange(S, device=device)

    # Host-side view: what each slot holds and an upper bound on its length (for kv_len).
    owner: list[tuple[int, int] | None] = [None] * S  # (prompt, sample) or None when free
    host_len = [0] * S
    results: list[list[Rollout | None]] = [[None] * c for c in counts]
    bar = _progress_bar(len(work), progress)
    generated = [0]  # tokens in finished rollouts, for the progress bar

    def admit(free: list[int]):
        """Fill free slots with pending samples: copy or prefill their prompt's prefix."""
        taken = [(s, work.popleft()) for s in free[:len(work)]]
        holders = {}  # prompt -> a slot that already holds its prefix
        for s, o in enumerate(owner):
            if o is not None and s not in free:
                holders.setdefault(o[0], s)
        to_prefill = {}
        for s, (p, _) in taken:
            if p not in holders and p not in to_prefill:
                to_prefill[p] = s
        _prefill(model, cache, {s: prompts[p][:-1] for p, s in to_prefill.items()})
        holders.update(to_prefill)
        # copy the prompt prefix (positions 0 .. len - 2) into every other slot that takes a sample of it
        for s, (p, _) in taken:
            if holders[p] != s:
                cache.copy_prefix(holders[p], s, len(prompts[p]) - 1)
        idx = torch.tensor([s for s, _ in taken], device=device)
        lengths = [len(prompts[p]) for _, (p, _) in taken]
        token[idx] = torch.tensor([prompts[p][-1] for _, (p, _) in taken], device=device)
        pos[idx] = torch.tensor(lengths, device=device) - 1
        count[idx] = 0
        budget[idx] = torch.tensor([min(budgets[p] or max_new, max_new) for _, (p, _) in taken], device=device)
        active[idx] = True
        finish[idx] = 0
        for (s, (p, j)), n in zip(taken, lengths):
            owner[s], host_len[s] = (p, j), n
            deadline[s] = steps + min(budgets[p] or max_new, max_new)  # the step by which it must be done

    def harvest() -> list[int]:
        """Collect finished slots' rollouts; return the slots now free."""
        done = [s for s, f in enumerate(finish.tolist()) if f and owner[s] is not None]
        if done:
            idx = torch.tensor(done, device=device)
            counts = count[idx].tolist()
            reasons = finish[idx].tolist()
            toks, lps = out_tokens[idx].tolist(), out_logprobs[idx].tolist()
            for s, c, r, t, lp in zip(done, counts, reasons, toks, lps):
                p, j = owner[s]
                results[p][j] = Rollout(t[:c], lp[:c], list(FinishReason)[r - 1])
                owner[s] = None
            generated[0] += sum(counts)
            bar.set_postfix(tokens=generated[0], refresh=False)
            bar.update(len(done))
        return [s for s in range(S) if owner[s] is None]

    steps = 0  # decode steps so far
    deadline = [0] * S
    admit(list(range(S)))
    steps_since_sync = 0
    counters = EngineStats(rows=S)
    while any(o is not None for o in owner):
        kv_len = min(cache.max_len, _round_up(max(host_len[s] for s in range(S) if owner[s] is not None), bucket))
        counters.count_step([host_len[s] for s in range(S) if owner[s] is not None], S * kv_len)
        logits = step(model, cache, token, pos, kv_len)  # [S, V]
        new_token, new_logprob = sample(logits, params, generator)
        column = count.clamp(max=max_new - 1)
        out_tokens[rows, column] = torch.where(active, new_token, out_tokens[rows, column])
        out_logprobs[rows, column] = torch.where(active, new_logprob, out_logprobs[rows, column])
        count += active
        stopped = torch.isin(new_token, stop_ids) & active
        exhausted = (count >= budget) & active & ~stopped
        finish.masked_fill_(stopped, FinishReason.STOP.code)
        finish.masked_fill_(exhausted & (budget >= max_new), FinishReason.LENGTH.code)
        finish.masked_fill_(exhausted & (budget < max_new), FinishReason.CUTOFF.code)
        active &= ~(stopped | exhausted)
        token.copy_(new_token)
        pos.add_(1).clamp_(max=cache.max_len - 1)  # idle slots keep writing into their own row
        for s in range(S):
            if owner[s] is not None:
                host_len[s] = min(host_len[s] + 1, cache.max_len)
        steps_since_sync += 1
        steps += 1
        must_be_done = all(o is None or steps >= deadline[s] for s, o in enumerate(owner))
        if steps_since_sync >= sync_every or (must_be_done and not work):
            steps_since_sync = 0
            free = harvest()
            if free and work:
                admit(free)
    bar.close()
    if stats is not None:
        counters.generated_tokens = generated[0]
        stats.update(vars(counters))
    return results


@dataclass
class EngineStats:
    """What one generate call did, in units that do not depend on the hardware (bench/sampler.py turns
    them into a decode-time bound on a stated memory bandwidth): each decode step reads the weights
    once and, per sequence row it computes, the keys and values its attention spans."""
    rows: int  # sequence rows each decode step computes (the pool's slots, busy or idle)
    decode_steps: int = 0
    live_sequences: int = 0  # summed over steps: sequences holding a slot (decoded together)
    peak_live_sequences: int = 0
    kv_positions_read: int = 0  # summed over steps and rows: positions the attention spans
    kv_positions_live: int = 0  # summed over steps: the live sequences' own lengths
    generated_tokens: int = 0

    def count_step(self, live_lengths: list[int], positions_read: int):
        self.decode_steps += 1
        self.live_sequences += len(live_lengths)
        self.peak_live_sequences = max(self.peak_live_sequences, len(live_lengths))
        self.kv_positions_read += positions_read
        self.kv_positions_live += sum(live_lengths)


def decode(model: Qwen3, cache: KVCache, token: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """One decode step for every slot: token [S] at cache position pos [S] -> next-token logits [S, V]."""
    hidden = model(token[:, None], cache=cache, start=pos, kv_len=kv_len, return_hidden=True)  # [S, 1, H]
    return model.logits(hidden[:, 0]).float()


def _prefill(model: Qwen3, cache: KVCache, prefixes: dict[int, list[int]], max_tokens: int = 32768):
    """Write each prefix's keys/values into its slot (slot -> tokens): batched forwards of similar
    lengths, each within max_tokens padded tokens."""
    items = sorted(((s, t) for s, t in prefixes.items() if t), key=lambda item: len(item[1]))
    while items:
        T = len(items[0][1])
        batch = []
        while items and (len(batch) + 1) * max(T, len(items[0][1])) <= max(max_tokens, len(items[0][1])):
            batch.append(items.pop(0))
            T = max(T, len(batch[-1][1]))
        ids = torch.tensor([t + [0] * (T - len(t)) for _, t in batch], device=cache.k.device)  # right-padded
        model(ids, cache=cache, start=0, rows=[s for s, _ in batch], kv_len=T, return_hidden=True)


KV_MEMORY_FRACTION = 0.6  # of the free GPU memory, taken by the KV pool when `slots` is not given


def kv_bytes_per_slot(config, max_len: int, dtype: torch.dtype) -> int:
    """Keys and values of one slot: every layer, every key-value head, max_len positions."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * max_len * (
        torch.finfo(dtype).bits // 8)


def slots_that_fit(config, max_len: int, dtype: torch.dtype, free_bytes: float) -> int:
    """The default pool size: slots of kv_bytes_per_slot in KV_MEMORY_FRACTION of `free_bytes` (the
    memory plan in plan.py uses the same rule)."""
    return max(0, int(KV_MEMORY_FRACTION * free_bytes) // kv_bytes_per_slot(config, max_len, dtype))


def _default_slots(config, max_len: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return 256
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch, unused
    return max(1, slots_that_fit(config, max_len, dtype, free))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


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
