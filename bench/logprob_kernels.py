"""Speed and memory of the log-prob kernels against eager PyTorch, torch.compile and Liger-Kernel.

    python bench/logprob_kernels.py            # on CUDA: N=16384 tokens, H=4096, V=151936, bf16
    python bench/logprob_kernels.py --cpu      # tiny shapes on a CPU (Triton interpreted): checks the script runs

Each implementation computes log p(target) and the entropy for N tokens and backpropagates a loss
that uses both (forward + backward), timed as the median of `--iters` runs after warm-up (CUDA
events on a GPU). Peak memory is what the call allocates beyond its inputs. Two problems:

- logits: given [N, V] logits. The floor is the bytes that must move (read logits in forward, read
  them again and write their gradient in backward: 3 N V x element size) divided by the device's
  measured copy bandwidth; the kernel's "of floor" column is floor time / measured time.
- linear: given hidden [N, H] and the lm_head weight [V, H]. Eager is matmul + the eager logits
  path; ours is masa_kernels.linear_token_logprobs; Liger's fused linear cross-entropy (if installed) is
  an outside reference (it computes no entropy, so it does less work).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_bandwidth  # noqa: E402


def eager_logprobs(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def eager_linear(hidden, weight, targets):
    return eager_logprobs(hidden @ weight.T, targets)


def measure(fn, inputs, iters, device):
    """Median seconds of forward+backward and peak extra bytes (CUDA only)."""
    def step():
        for x in inputs:
            x.grad = None
        lp, ent = fn()
        (lp.sum() + 0.01 * ent.sum()).backward()

    for _ in range(2):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = None
    return statistics.median(times), peak


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv=None) -> dict:
    """Prints the table; returns {"floor_ms", "logits_of_floor", "linear_memory_ratio", "linear_time_ratio"}
    (ours against eager; None where not measured)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with --cpu (tiny shapes, Triton interpreted)")
    big = device.type == "cuda"
    N = args.tokens or (16384 if big else 32)
    H = args.hidden or (4096 if big else 32)
    V = args.vocab or (151936 if big else 2049)
    iters = args.iters or (20 if big else 2)
    dtype = torch.bfloat16 if big else torch.float32  # the interpreter mishandles bf16 arithmetic
    from masa_kernels import logprobs

    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(N, H, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    with torch.no_grad():
        logits = (hidden @ weight.T).requires_grad_()

    name = torch.cuda.get_device_name() if big else "CPU (Triton interpreter; not a performance claim)"
    print(f"device: {name}; N={N} tokens, H={H}, V={V}, {str(dtype).removeprefix('torch.')}, median of {iters}")
    bandwidth = copy_bandwidth(device)
    floor = 3 * N * V * logits.element_size() / bandwidth
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s -> logits forward+backward floor {floor * 1e3:.2f} ms\n")

    rows = [("logits", "eager", lambda: eager_logprobs(logits, targets), [logits])]
    if not args.no_compile:
        compiled = torch.compile(eager_logprobs)
        rows.append(("logits", "torch.compile", lambda: compiled(logits, targets), [logits]))
    rows.append(("logits", "ours (Triton)", lambda: logprobs.token_logprobs(logits, targets), [logits]))
    rows.append(("linear", "eager", lambda: eager_linear(hidden, weight, targets), [hidden, weight]))
    rows.append(("linear", "ours (chunked + Triton)",
                 lambda: logprobs.linear_token_logprobs(hidden, weight, targets), [hidden, weight]))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger():
            loss = liger_loss(weight, hidden, targets)
            loss = loss[0] if isinstance(loss, tuple) else loss  # versions differ
            return -loss, torch.zeros_like(loss)
        rows.append(("linear", "Liger FLCE (no entropy)", liger, [hidden, weight]))
    except ImportError:
        print("Liger-Kernel is not installed: its row is skipped")

    results = {}
    print("| problem | implementation | fwd+bwd ms | peak extra memory | vs eager time | vs eager memory | of floor |")
    print("|---|---|---|---|---|---|---|")
    for problem, label, fn, inputs in rows:
        try:
            seconds, peak = measure(fn, inputs, iters, device)
        except Exception as e:  # an outside library's API may have moved; report, don't hide the rest
            print(f"| {problem} | {label} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |")
            continue
        results[(problem, label)] = (seconds, peak)
        eager_s, eager_peak = results[(problem, "eager")]
        mem_ratio = "n/a" if peak is None or not eager_peak else f"{peak / eager_peak:.3f}x"
        of_floor = f"{floor / seconds:.0%}" if problem == "logits" else ""
        print(f"| {problem} | {label} | {seconds * 1e3:.2f} | {fmt_mem(peak)} | {seconds / eager_s:.2f}x | "
              f"{mem_ratio} | {of_floor} |")
    ours, linear, eager = (results.get(k) for k in [("logits", "ours (Triton)"), ("linear", "ours (chunked + Triton)"),
                                                    ("linear", "eager")])
    return {"floor_ms": floor * 1e3, "logits_of_floor": floor / ours[0] if ours else None,
            "linear_memory_ratio": linear[1] / eager[1] if linear and eager and linear[1] is not None else None,
            "linear_time_ratio": linear[0] / eager[0] if linear and eager else None}


if __name__ == "__main__":
    main()
