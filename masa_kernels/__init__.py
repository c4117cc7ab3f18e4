"""Triton kernels for the hot spots of the trainer (log-probs, advantages) and of the sampler (decode
attention, sampling), each with a plain-PyTorch twin (reference.py). The package is called
masa_kernels, not kernels: transformers 5 imports Hugging Face's `kernels` distribution, which a
top-level `kernels` here would hide (docs/method.md §2).

    token_logprobs(logits, targets, temperature=1.0) -> (logprobs, entropy)
    linear_token_logprobs(hidden, weight, targets, temperature=1.0) -> (logprobs, entropy)
    group_advantages(rewards, group_size, eps=1e-6) -> advantages
    paged_decode_attention(q, k_pool, v_pool, block_table, seq_lens, max_len) -> out
    sample_tokens(logits, temperature, seed, streams, samples, positions, top_k=-1, top_p=1.0) -> (tokens, logprobs)

The implementation is decided at every call from the tensors' device and `MASA_KERNELS` (`auto`, the
default, `triton` or `torch`):
- CUDA tensors: Triton, unless MASA_KERNELS=torch.
- CPU tensors: the PyTorch twin, unless MASA_KERNELS=triton and TRITON_INTERPRET=1 (set before triton
  is first imported), which runs the Triton kernels in the interpreter (float32 only: it gets bf16
  wrong). So a CPU-side computation never fails for want of a GPU, whatever MASA_KERNELS says: a GPU
  run with MASA_KERNELS=triton (bench/gpu_check.py sets it) still computes its CPU-side pieces.
`usage` counts the calls per (kernel, implementation); `usage_report()` formats it (train.py prints
it at the end of a run, and bench/gpu_check.py checks which implementation the training step used).
"""

import os
from collections import Counter

import torch

from masa_kernels import reference

_CHOICES = ("auto", "triton", "torch")
usage: Counter = Counter()  # (kernel, "triton" | "torch") -> calls in this process


def backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device` (the rule in the module docstring)."""
    choice = os.environ.get("MASA_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"MASA_KERNELS={choice!r}; use one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    return "triton" if choice == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def usage_report() -> str:
    """'kernel: implementation x calls, ...' for every kernel called in this process."""
    return ", ".join(f"{name}: {impl} x {n}" for (name, impl), n in sorted(usage.items())) or "none called"


def _pick(name: str, device: torch.device, module: str, triton_ok: bool = True):
    impl = "triton" if backend(device) == "triton" and triton_ok else "torch"
    usage[name, impl] += 1
    return _triton(module) if impl == "triton" else reference


def _triton(module: str):
    try:
        return __import__(f"masa_kernels.{module}", fromlist=[module])
    except ImportError as e:
        raise ImportError(f"MASA_KERNELS asks for Triton, which cannot be imported ({e}); install triton "
                          f"or set MASA_KERNELS=torch") from e


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(target) and the entropy of softmax(logits / temperature), float32, shaped like targets."""
    return _pick("token_logprobs", logits.device, "logprobs").token_logprobs(logits, targets, temperature)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0):
    """As token_logprobs, for logits = hidden @ weight.T, without materializing all of them at once."""
    impl = _pick("linear_token_logprobs", hidden.device, "logprobs")
    return impl.linear_token_logprobs(hidden, weight, targets, temperature)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` (sample std; see reference.py)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return _pick("group_advantages", rewards.device, "advantage").group_advantages(rewards, group_size, eps)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Decode attention of one query token per sequence over its live positions in a paged KV pool
    (masa_kernels/paged_attention.py): q [B, H, D], pools [blocks, BS, Hkv, D] -> [B, H, D]."""
    impl = _pick("paged_decode_attention", q.device, "paged_attention")
    return impl.paged_decode_attention(q, k_pool, v_pool, block_table, seq_lens, max_len)


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int, streams: torch.Tensor, samples: torch.Tensor,
                  positions: torch.Tensor, top_k: int = -1, top_p: float = 1.0):
    """One token per row of logits [B, V] from per-sequence counter-based noise (masa_kernels/sampling.py):
    the draw depends only on (seed, stream, sample, position), never on the batch. The Triton kernel
    has no top-k / top-p; with either, the PyTorch twin samples from the same uniforms."""
    impl = _pick("sample_tokens", logits.device, "sampling", triton_ok=top_k == -1 and top_p >= 1)
    return impl.sample_tokens(logits, temperature, seed, streams, samples, positions, top_k, top_p)
