"""Plain-PyTorch twins of the Triton kernels: the definitions the kernels are tested against, and
the implementation used wherever Triton is not (CPUs, by default).

- `token_logprobs(logits [..., V], targets [...], temperature)` -> (log p(target), entropy), both
  float32, of softmax(logits / temperature), differentiable by autograd.
- `linear_token_logprobs(hidden [N, H], weight [V, H], targets [N], temperature)`: the same from
  hidden states; materializes the full [N, V] logits (the Triton path does not).
- `group_advantages(rewards [n * G], group_size, eps)`: (r - mean_g) / (std_g + eps) per group of G,
  with the *sample* standard deviation (divisor G - 1), as GRPO's reference code (verl) uses; a group
  whose rewards are all equal (zero variance, including G = 1) gets advantage 0.
- `paged_decode_attention(q [B, H, D], k_pool [blocks, BS, Hkv, D], v_pool, block_table [B, max_blocks],
  seq_lens [B], max_len)`: one query token per sequence attending to its first seq_lens[b] positions,
  stored block by block where block_table says (see paged_attention.py); gathers the blocks.
- `philox(seed, c0, c1, c2, c3)`: Philox4x32-10 on uint32 counters held in int64 tensors, the
  generator Triton's tl.philox implements (checked against Random123's known answers).
- `sample_tokens(logits [B, V], temperature, seed, streams [B], samples [B], positions [B], top_k,
  top_p)`: one token per row by inverse CDF from one counter-based uniform per row (see sampling.py).
"""

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # float32, or float64 if given
    logp = torch.log_softmax(z, dim=-1)  # [..., V]
    picked = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [...]
    # a -inf logit (p = 0) adds 0 to the entropy, not 0 * -inf, in value and in gradient
    entropy = -(logp.exp() * torch.where(logp > -torch.inf, logp, 0)).sum(-1)  # [...]
    return picked, entropy


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return token_logprobs(hidden.to(dtype) @ weight.to(dtype).T, targets, temperature)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    r = rewards.float().reshape(-1, group_size)  # [groups, G]
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    varies = r.amax(dim=1, keepdim=True) > r.amin(dim=1, keepdim=True)
    return torch.where(varies, centered / (std + eps), torch.zeros_like(r)).reshape(rewards.shape)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    B, _, D = q.shape
    _, BS, Hkv, _ = k_pool.shape
    blocks = block_table[:, :-(-max(max_len, 1) // BS)].long()  # [B, nb]: enough for the longest sequence
    dtype = torch.promote_types(q.dtype, torch.float32)
    # one copy of the blocks (index_select: several times faster than advanced indexing on a CPU), then views
    k = k_pool.flatten(1).index_select(0, blocks.flatten()).view(B, -1, Hkv, D).transpose(1, 2).to(dtype)
    v = v_pool.flatten(1).index_select(0, blocks.flatten()).view(B, -1, Hkv, D).transpose(1, 2).to(dtype)
    live = torch.arange(k.shape[2], device=q.device) < seq_lens[:, None].long()  # [B, nb * BS]
    out = F.scaled_dot_product_attention(q[:, :, None].to(dtype), k, v, attn_mask=live[:, None, None],
                                         enable_gqa=True)  # [B, H, 1, D]
    return out[:, :, 0].to(q.dtype)


_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant and uint32 values in int64, computed in
    16-bit halves so that no intermediate leaves int64 (signed overflow is not wraparound in C++)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    middle = a_hi * b_lo + a_lo * b_hi  # < 2^33
    low = a_lo * b_lo + ((middle & 0xFFFF) << 16)  # < 2^34
    return (a_hi * b_hi + (middle >> 16) + (low >> 32)) & _M32, low & _M32


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, rounds: int = 10):
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def sampling_uniform(seed: int, streams: torch.Tensor, samples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] float32 in (0, 1): Philox(seed; counter (position, sample, stream, 0)), first word's top 24 bits."""
    word = lambda t: t.to(torch.int64) & _M32  # noqa: E731
    x, _, _, _ = philox(seed, word(positions), word(samples), word(streams), torch.zeros_like(word(streams)))
    return ((x >> 8).to(torch.float32) + 0.5) / 16777216.0


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int, streams: torch.Tensor, samples: torch.Tensor,
                  positions: torch.Tensor, top_k: int = -1, top_p: float = 1.0):
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, -torch.inf)
    if top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # the most likely token always stays
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, -torch.inf))
    # inverse CDF: the first token whose cumulative (unnormalized) mass exceeds u x the total
    weights = torch.exp(z - z.amax(-1, keepdim=True))  # [B, V], 0 where filtered out
    cdf = weights.cumsum(-1)
    target = sampling_uniform(seed, streams, samples, positions)[:, None] * cdf[:, -1:]
    last = z.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(-1)  # rounding can put target at the total
    tokens = torch.minimum(torch.searchsorted(cdf, target, right=True)[:, 0], last)
    logp = torch.log_softmax(z, -1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
