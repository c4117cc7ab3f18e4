"""Measurements the bench/ scripts share: the device's copy bandwidth (the memory-bandwidth ceiling
that the kernel and sampler floors are computed from) and a device synchronize."""

import statistics
import time

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, iters: int = 20) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (16 MiB on a CPU), read plus write."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)
