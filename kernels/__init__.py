"""Fused kernels for the trainer's hot spots, each with a plain-PyTorch twin (reference.py).

    token_logprobs(logits, targets, temperature=1.0) -> (logprobs, entropy)
    linear_token_logprobs(hidden, weight, targets, temperature=1.0) -> (logprobs, entropy)
    group_advantages(rewards, group_size, eps=1e-6) -> advantages
    paged_decode_attention(q, k_pool, v_pool, block_table, seq_lens, max_len) -> out
    sample_tokens(logits, temperature, seed, streams, samples, positions, top_k=-1, top_p=1.0) -> (tokens, logprobs)

`MASA_KERNELS` picks the implementation, read at every call: `triton`, `torch`, or `auto` (the
default: Triton for CUDA tensors, PyTorch otherwise). With TRITON_INTERPRET=1 set before the first
import of triton, the Triton path runs on a CPU (float32 only: the interpreter gets bf16 wrong).
"""

import os

import torch

from kernels import reference

_CHOICES = ("auto", "triton", "torch")


def backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, as MASA_KERNELS asks."""
    choice = os.environ.get("MASA_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"MASA_KERNELS={choice!r}; use one of {', '.join(_CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("MASA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "first imported (or use MASA_KERNELS=torch)")
    return choice


def _triton(module: str):
    try:
        return __import__(f"kernels.{module}", fromlist=[module])
    except ImportError as e:
        raise ImportError(f"MASA_KERNELS asks for Triton, which cannot be imported ({e}); install triton "
                          f"or set MASA_KERNELS=torch") from e


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(target) and the entropy of softmax(logits / temperature), float32, shaped like targets."""
    impl = _triton("logprobs") if backend(logits.device) == "triton" else reference
    return impl.token_logprobs(logits, targets, temperature)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0):
    """As token_logprobs, for logits = hidden @ weight.T, without materializing all of them at once."""
    impl = _triton("logprobs") if backend(hidden.device) == "triton" else reference
    return impl.linear_token_logprobs(hidden, weight, targets, temperature)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` (sample std; see reference.py)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    impl = _triton("advantage") if backend(rewards.device) == "triton" else reference
    return impl.group_advantages(rewards, group_size, eps)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Decode attention of one query token per sequence over its live positions in a paged KV pool
    (kernels/paged_attention.py): q [B, H, D], pools [blocks, BS, Hkv, D] -> [B, H, D]."""
    impl = _triton("paged_attention") if backend(q.device) == "triton" else reference
    return impl.paged_decode_attention(q, k_pool, v_pool, block_table, seq_lens, max_len)


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int, streams: torch.Tensor, samples: torch.Tensor,
                  positions: torch.Tensor, top_k: int = -1, top_p: float = 1.0):
    """One token per row of logits [B, V] from per-sequence counter-based noise (kernels/sampling.py):
    the draw depends only on (seed, stream, sample, position), never on the batch. The Triton kernel
    has no top-k / top-p; with either, the PyTorch twin samples from the same uniforms."""
    triton_ok = backend(logits.device) == "triton" and top_k == -1 and top_p >= 1
    impl = _triton("sampling") if triton_ok else reference
    return impl.sample_tokens(logits, temperature, seed, streams, samples, positions, top_k, top_p)
