"""Triton kernel for sampling one token per sequence from per-sequence counter-based random streams.

    tokens, logprobs = sample_tokens(logits [B, V], temperature, seed, streams [B], samples [B], positions [B])

The row with (stream s, sample j, position p) draws one uniform u that is a pure function of
(seed, p, j, s): Philox4x32 with 10 rounds (Salmon et al., SC'11; the generator behind torch's and
Triton's random numbers), key = the 64-bit seed, counter = (p, j, s, 0), first output word, whose top
24 bits give u = (x + 0.5) / 2^24 in (0, 1). So a sequence draws the same tokens whatever else is in
the batch, in which row, how many sequences the KV pool holds, whether it was preempted and
recomputed, and on how many ranks the prompts were split (the trainer passes global prompt indices
as streams).

Inverse CDF: the token is the first v whose cumulative mass sum_{i <= v} exp(z_i - m) exceeds
u x sum_i exp(z_i - m), with z = logits / T. One program per row reads the row twice: the first
pass takes the max m and the sum (online, which also gives log softmax at the chosen token); the
second finds the crossing, block by block with a running carry. One uniform per row, not one per
vocabulary entry: on a CPU the PyTorch twin's Philox costs [B] work per step instead of [B, V].
No top-k / top-p here (the paper samples with neither); the twin (reference.sample_tokens) applies
them to the same uniform when asked.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 2048  # vocabulary lanes per iteration on a GPU
INTERPRET_BLOCK_V = 1024


@triton.jit
def _sample_kernel(logits_ptr, streams_ptr, samples_ptr, positions_ptr, token_ptr, logprob_ptr,
                   stride, V, inv_temperature, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    stream = tl.load(streams_ptr + row).to(tl.uint32)
    sample = tl.load(samples_ptr + row).to(tl.uint32)
    position = tl.load(positions_ptr + row).to(tl.uint32)
    x, _, _, _ = tl.philox(seed, position, sample, stream, tl.zeros_like(stream))
    u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    # pass 1: the row's max m, sum exp(z - m), and its last token of nonzero probability
    m = tl.full([], -float("inf"), dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    last = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)  # exp(-inf) = 0 for masked lanes
        last = tl.maximum(last, tl.max(tl.where(z > -float("inf"), cols, 0), axis=0))
        m = m_new
    # pass 2: the first token whose cumulative mass exceeds u x s
    target = u * s
    carry = tl.zeros([], dtype=tl.float32)
    token = tl.full([], V, dtype=tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temperature
        e = tl.exp(z - m)
        crossed = (tl.cumsum(e, axis=0) + carry > target) & (cols < V)
        token = tl.minimum(token, tl.min(tl.where(crossed, cols, V), axis=0))
        carry += tl.sum(e, axis=0)
    token = tl.minimum(token, last)  # rounding can leave u x s at the total
    z_token = tl.load(base + token).to(tl.float32) * inv_temperature
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, z_token - m - tl.log(s))


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
