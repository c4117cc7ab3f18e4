"""Triton kernel for group-normalized advantages (GRPO, docs/method.md §1 step 3).

One program per group: load its G rewards, take the mean and the sample standard deviation
(divisor G - 1, as in reference.py), write (r - mean) / (std + eps), or 0 for a group whose rewards
are all equal. A single fused pass; on the host this is a handful of small PyTorch ops otherwise.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _group_advantages_kernel(rewards_ptr, out_ptr, G, eps, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < G
    r = tl.load(rewards_ptr + group * G + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(r, axis=0) / G
    centered = tl.where(mask, r - mean, 0.0)
    std = tl.sqrt(tl.sum(centered * centered, axis=0) / tl.maximum(G - 1, 1))
    varies = tl.max(tl.where(mask, r, -float("inf")), axis=0) > tl.min(tl.where(mask, r, float("inf")), axis=0)
    advantage = tl.where(varies, centered / (std + eps), 0.0)
    tl.store(out_ptr + group * G + offsets, advantage, mask=mask)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    flat = rewards.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    groups = flat.numel() // group_size
    if groups:
        _group_advantages_kernel[(groups,)](flat, out, group_size, eps,
                                            BLOCK=triton.next_power_of_2(group_size))
    return out.reshape(rewards.shape)
