"""Triton kernels for per-token log-probabilities and entropies without [tokens, vocab] float32 copies.

For every row of logits z = logits / T (a response token) the trainer needs log p(target) and the
entropy of softmax(z). The forward kernel streams the vocabulary in blocks with an online max `m`,
sum `s = sum exp(z - m)` and `c = sum exp(z - m) (z - m)`, all float32, so that

    log p(y) = (z_y - m) - log s,        H = log s - c / s.

Keeping every term relative to the running max keeps them O(log V) even for logits of 1e4, where
`log Z - E[z]` would cancel catastrophically. The running max starts at z_y (finite), not at -inf,
so no -inf - -inf occurs; masked tail lanes and -inf logits contribute exactly 0 (never 0 * -inf).

Backward: with p_j = exp(z_j - m - log s), for upstream gradients g (of log p) and h (of H),

    d/dlogits_j = (g (1[j = y] - p_j) + h p_j (c / s - (z_j - m))) / T,

written by a second streaming kernel; it needs only m and log s per row (saved by the forward) and
the entropy output. `linear_token_logprobs` computes the logits from hidden states a chunk of tokens
at a time (cuBLAS matmul in float32 output) and runs the same kernels on each chunk, so only one
[chunk, V] block exists at any time. Its backward *recomputes* the chunk's logits rather than
storing them: storing would bring back the [N, V] memory the function exists to avoid, and the
extra matmul costs about a third of the chunk's matmul work. The backward kernel overwrites the
recomputed logits with their gradient in place. Gradients for the lm_head weight are summed over
chunks in a fixed order with matmuls (no atomics), so results are deterministic.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # vocabulary lanes per iteration on a GPU
INTERPRET_BLOCK_V = 1024  # the interpreter pays per op, not per lane: fewer, wider blocks are faster
CHUNK_BYTES = 1 << 30  # float32 logits per chunk in linear_token_logprobs (1 GiB: 1724 tokens at V=151936)


@triton.jit
def _forward_kernel(logits_ptr, targets_ptr, logprob_ptr, entropy_ptr, max_ptr, logsum_ptr,
                    stride, V, inv_temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride  # 64-bit: rows x V exceeds 2^31
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_target = tl.load(base + target).to(tl.float32) * inv_temperature
    m = z_target  # running max; starting from a real logit keeps every term finite
    s = tl.zeros([], dtype=tl.float32)  # sum exp(z - m)
    c = tl.zeros([], dtype=tl.float32)  # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, m), axis=0))
        shift = m - m_new  # <= 0
        scale = tl.exp(shift)
        d = tl.where(mask, z - m_new, 0.0)
        e = tl.where(mask, tl.exp(d), 0.0)
        # re-base the old sums on the new max: (z - m) = (z - m_new) - shift
        c = scale * (c + s * shift) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)  # a -inf logit: 0, not 0 * -inf
        s = scale * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    tl.store(logprob_ptr + row, (z_target - m) - log_s)
    tl.store(entropy_ptr + row, log_s - c / s)
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)


@triton.jit
def _backward_kernel(logits_ptr, grad_ptr, targets_ptr, entropy_ptr, max_ptr, logsum_ptr,
                     grad_logprob_ptr, grad_entropy_ptr, stride, grad_stride, V, inv_temperature,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    out = grad_ptr + row * grad_stride  # may alias `base`: each lane is read before it is written
    target = tl.load(targets_ptr + row).to(tl.int64)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    mean_shift = log_s - tl.load(entropy_ptr + row)  # c / s = E[z] - m
    g = tl.load(grad_logprob_ptr + row)
    h = tl.load(grad_entropy_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        d = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - m
        p = tl.exp(d - log_s)
        grad = g * (tl.where(cols == target, 1.0, 0.0) - p) + tl.where(p > 0, h * p * (mean_shift - d), 0.0)
        tl.store(out + cols, (grad * inv_temperature).to(out.dtype.element_ty), mask=mask)


def _block(device: torch.device) -> int:
    return BLOCK_V if device.type == "cuda" else INTERPRET_BLOCK_V


def _row_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """logits [N, V] (unit stride in V), targets [N] -> logprob, entropy, max, log-sum, each [N] float32."""
    N, V = logits.shape
    out = torch.empty(4, N, dtype=torch.float32, device=logits.device)
    if N:
        _forward_kernel[(N,)](logits, targets, out[0], out[1], out[2], out[3], logits.stride(0), V,
                              1.0 / temperature, BLOCK=_block(logits.device), num_warps=8)
    return out


def _row_grads(logits, targets, stats, grad_logprob, grad_entropy, temperature, out):
    """Writes d(loss)/d(logits) for [N, V] logits into `out` (which may be `logits` itself)."""
    N, V = logits.shape
    if N:
        _backward_kernel[(N,)](logits, out, targets, stats[1], stats[2], stats[3], grad_logprob, grad_entropy,
                               logits.stride(0), out.stride(0), V, 1.0 / temperature,
                               BLOCK=_block(logits.device), num_warps=8)
    return out


def _check_targets(targets: torch.Tensor, V: int):
    """Out-of-range targets would read outside the row (a crash, or silent garbage)."""
    if targets.numel() == 0:
        return
    valid = (targets >= 0) & (targets < V)
    if targets.is_cuda:
        torch._assert_async(valid.all(), f"token_logprobs: a target is outside [0, {V})")  # no host sync
    elif not bool(valid.all()):
        bad = targets[~valid][0].item()
        raise IndexError(f"token_logprobs: target {bad} is outside the vocabulary [0, {V}) (ignore indices "
                         f"such as -100 must be replaced and masked out before this call)")


def _refuse_double_backward():
    # backward(create_graph=True) runs with grad mode on; these kernels have no second derivative,
    # and silently returning one without its dependence on the input would be wrong.
    if torch.is_grad_enabled():
        raise RuntimeError("the fused log-prob kernels support one backward pass, not double backward "
                           "(use MASA_KERNELS=torch for higher derivatives)")


def _upstream(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.reshape(-1).float().contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        _check_targets(targets, logits.shape[1])
        stats = _row_stats(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, stats)
        ctx.temperature = temperature
        return stats[0].clone(), stats[1].clone()  # separate tensors: callers may modify them in place

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        _refuse_double_backward()
        logits, targets, stats = ctx.saved_tensors
        grad = _row_grads(logits, targets, stats, _upstream(grad_logprob, stats[0]),
                          _upstream(grad_entropy, stats[0]), ctx.temperature, torch.empty_like(logits))
        return grad, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """logits [..., V] (bf16, fp16 or fp32), targets [...] -> (log p(target), entropy), float32 [...]."""
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    logprob, entropy = _TokenLogprobs.apply(flat, targets.reshape(-1).contiguous(), float(temperature))
    return logprob.reshape(shape), entropy.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# From hidden states: the lm_head matmul chunked over tokens


def _mm_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: low-precision inputs accumulate and are stored in float32 on a
    GPU (rounding 150k logits to bf16 would cost ~0.1 of log-probability), upcast on a CPU."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _chunk_size(V: int) -> int:
    return max(1, CHUNK_BYTES // (4 * V))


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        _check_targets(targets, weight.shape[0])
        N = hidden.shape[0]
        stats = torch.empty(4, N, dtype=torch.float32, device=hidden.device)
        for i in range(0, N, chunk):
            logits = _mm_float(hidden[i:i + chunk], weight.T)  # [chunk, V] float32
            stats[:, i:i + chunk] = _row_stats(logits, targets[i:i + chunk], temperature)
        ctx.save_for_backward(hidden, weight, targets, stats)
        ctx.temperature, ctx.chunk = temperature, chunk
        return stats[0].clone(), stats[1].clone()

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        _refuse_double_backward()
        hidden, weight, targets, stats = ctx.saved_tensors
        g, h = _upstream(grad_logprob, stats[0]), _upstream(grad_entropy, stats[0])
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            logits = _mm_float(hidden[rows], weight.T)  # recomputed, [chunk, V] float32
            grad_logits = _row_grads(logits, targets[rows], stats[:, rows], g[rows], h[rows], ctx.temperature,
                                     out=logits).to(hidden.dtype)  # in place
            grad_hidden[rows] = _mm_float(grad_logits, weight).to(hidden.dtype)
            grad_weight += _mm_float(grad_logits.T, hidden[rows])
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, chunk: int | None = None):
    """hidden [..., H], lm_head weight [V, H], targets [...] -> (log p(target), entropy), float32 [...],
    without ever holding more than `chunk` tokens' logits (default: 1 GiB of float32 logits)."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    chunk = chunk or _chunk_size(weight.shape[0])
    logprob, entropy = _LinearTokenLogprobs.apply(flat, weight, targets.reshape(-1).contiguous(),
                                                  float(temperature), chunk)
    return logprob.reshape(shape), entropy.reshape(shape)
