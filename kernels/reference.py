"""Plain-PyTorch twins of the Triton kernels: the definitions the kernels are tested against, and
the implementation used wherever Triton is not (CPUs, by default).

- `token_logprobs(logits [..., V], targets [...], temperature)` -> (log p(target), entropy), both
  float32, of softmax(logits / temperature), differentiable by autograd.
- `linear_token_logprobs(hidden [N, H], weight [V, H], targets [N], temperature)`: the same from
  hidden states; materializes the full [N, V] logits (the Triton path does not).
- `group_advantages(rewards [n * G], group_size, eps)`: (r - mean_g) / (std_g + eps) per group of G,
  with the *sample* standard deviation (divisor G - 1), as GRPO's reference code (verl) uses; a group
  whose rewards are all equal (zero variance, including G = 1) gets advantage 0.
- `paged_decode_attention(q [B, H, D], k_pool [blocks, Hkv, BS, D], v_pool, block_table [B, max_blocks],
  seq_lens [B], max_len)`: one query token per sequence attending to its first seq_lens[b] positions,
  stored block by block where block_table says (see paged_attention.py); gathers the blocks.
"""

import torch


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
    B, H, D = q.shape
    _, Hkv, BS, _ = k_pool.shape
    blocks = block_table[:, :-(-max(max_len, 1) // BS)].long()  # [B, nb]: enough for the longest sequence
    k = k_pool[blocks].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)  # [B, Hkv, nb * BS, D]
    v = v_pool[blocks].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)
    dtype = torch.promote_types(q.dtype, torch.float32)
    folded = q.reshape(B, Hkv, H // Hkv, D).to(dtype)  # query head h = kv * rep + r
    scores = folded @ k.to(dtype).transpose(-1, -2) * D ** -0.5  # [B, Hkv, rep, nb * BS]
    live = torch.arange(k.shape[2], device=q.device) < seq_lens[:, None].long()  # [B, nb * BS]
    scores = scores.masked_fill(~live[:, None, None], -torch.inf)
    out = torch.softmax(scores, dim=-1) @ v.to(dtype)  # [B, Hkv, rep, D]
    return out.reshape(B, H, D).to(q.dtype)
