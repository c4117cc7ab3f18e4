"""Triton kernel for sampling one token per sequence from per-sequence counter-based random streams.

    tokens, logprobs = sample_tokens(logits [B, V], temperature, seed, streams [B], samples [B], positions [B])

The noise for vocabulary entry v of the row with (stream s, sample j, position p) is a pure function
of (seed, v, p, j, s): Philox4x32 with 10 rounds (Salmon et al., SC'11; the generator behind
torch's and Triton's random numbers), key = the 64-bit seed, counter = (v, p, j, s), first output
word, whose top 24 bits give u = (x + 0.5) / 2^24 in (0, 1). So a sequence draws the same tokens
whatever else is in the batch, in which row, how many sequences the KV pool holds, whether it was
preempted and recomputed, and on how many ranks the prompts were split (the trainer passes global
prompt indices as streams).

Gumbel-max in its exponential form: the token is argmax_v (z_v - log E_v) with z = logits / T and
E_v = -log u_v ~ Exp(1), which draws from softmax(z). One program per row streams the vocabulary
once, keeping the running best (value, index) and an online log-sum-exp of z, so it also returns
log softmax(z) at the chosen token. No top-k / top-p here (the paper samples with neither); the
PyTorch twin (reference.sample_tokens) draws from the same uniforms and applies them when asked.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 2048  # vocabulary lanes per iteration on a GPU
INTERPRET_BLOCK_V = 1024


@triton.jit
def _uniforms(seed, vocab, position, sample, stream):
    """u in (0, 1) for each vocabulary index in `vocab` (uint32 counters), float32."""
    x, _, _, _ = tl.philox(seed, vocab, position, sample, stream)
    return ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _sample_kernel(logits_ptr, streams_ptr, samples_ptr, positions_ptr, token_ptr, logprob_ptr,
                   stride, V, inv_temperature, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    stream = tl.load(streams_ptr + row).to(tl.uint32)
    sample = tl.load(samples_ptr + row).to(tl.uint32)
    position = tl.load(positions_ptr + row).to(tl.uint32)
    best = tl.full([], -float("inf"), dtype=tl.float32)  # max of z - log E so far
    best_index = tl.zeros([], dtype=tl.int32)
    best_z = tl.zeros([], dtype=tl.float32)
    m = tl.full([], -float("inf"), dtype=tl.float32)  # online log-sum-exp of z: max and sum exp(z - m)
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature
        u = _uniforms(seed, cols.to(tl.uint32), position, sample, stream)
        score = tl.where(mask, z - tl.log(-tl.log(u)), -float("inf"))
        block_best = tl.max(score, axis=0)
        # the first index attaining the block's best: ties are measure-zero, but be deterministic
        block_index = tl.min(tl.where(score == block_best, cols, V), axis=0)
        block_z = tl.sum(tl.where(cols == block_index, z, 0.0), axis=0)
        take = block_best > best
        best_index = tl.where(take, block_index, best_index)
        best_z = tl.where(take, block_z, best_z)
        best = tl.maximum(best, block_best)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), axis=0)
        m = m_new
    tl.store(token_ptr + row, best_index.to(tl.int64))
    tl.store(logprob_ptr + row, best_z - m - tl.log(s))


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int, streams: torch.Tensor, samples: torch.Tensor,
                  positions: torch.Tensor, top_k: int = -1, top_p: float = 1.0):
    """See the module docstring. logits [B, V]; streams, samples, positions [B] (int); temperature > 0.
    Returns tokens [B] int64 and their log-probabilities [B] float32."""
    if top_k != -1 or top_p < 1:
        raise ValueError("the Triton sampler has no top-k / top-p: use reference.sample_tokens for those")
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        block = BLOCK_V if logits.is_cuda else INTERPRET_BLOCK_V
        _sample_kernel[(B,)](logits, streams, samples, positions, tokens, logprobs, logits.stride(0), V,
                             1.0 / temperature, seed, BLOCK=block, num_warps=8)
    return tokens, logprobs
