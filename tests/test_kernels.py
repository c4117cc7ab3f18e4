"""masa_kernels/: the Triton kernels (run by the interpreter on a CPU) against the PyTorch twins, autograd
and float64; the twins against exact formulas."""

import numpy as np
import pytest
import torch

import masa
import masa_kernels
from masa_kernels import reference

from conftest import child_env

logprobs = pytest.importorskip("masa_kernels.logprobs", reason="triton is not installed")
advantage = pytest.importorskip("masa_kernels.advantage", reason="triton is not installed")


def random_case(N, V, seed, extreme=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 4
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1  # the first and last vocabulary entries
    if extreme:
        logits[0, 0] = 1e4  # one dominant logit, as target
        logits[1] = -1e4
        logits[1, V // 2] = 1e4
        logits[-1, :V // 3] = 1e4  # many tied maxima, target elsewhere
    return logits, targets


def float64_reference(logits, targets, temperature):
    return reference.token_logprobs(logits.double(), targets, temperature)  # .float() inside keeps double


def close(actual, expected, rtol=1e-5):
    """Relative error <= rtol, measured against the larger of |expected| and a floor of 1e-6."""
    err = (actual.double() - expected.double()).abs()
    return bool((err <= rtol * expected.double().abs().clamp_min(1e-6)).all())


# ---------------------------------------------------------------------------------------------------
# token_logprobs


CASES = [(4, 300, 1.0), (6, 1000, 0.7), (3, 2500, 1.3), (2, 1024, 1.0), (5, 2049, 0.5)]


@pytest.mark.parametrize("N,V,temperature", CASES)
@pytest.mark.parametrize("extreme", [False, True])
def test_forward_matches_reference_and_float64(N, V, temperature, extreme):
    logits, targets = random_case(N, V, seed=V, extreme=extreme)
    lp, ent = logprobs.token_logprobs(logits, targets, temperature)
    ref_lp, ref_ent = reference.token_logprobs(logits, targets, temperature)
    exact_lp, exact_ent = float64_reference(logits, targets, temperature)
    assert lp.dtype == ent.dtype == torch.float32
    assert close(lp, exact_lp) and close(ent, exact_ent.clamp_min(0), rtol=1e-4 if extreme else 1e-5)
    assert close(lp, ref_lp)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize("N,V,temperature", CASES)
@pytest.mark.parametrize("which", ["both", "logprob only", "entropy only"])
def test_backward_matches_autograd_through_the_reference(N, V, temperature, which):
    logits, targets = random_case(N, V, seed=N + V, extreme=True)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    grads = []
    for fn, dtype in ((logprobs.token_logprobs, torch.float32), (reference.token_logprobs, torch.float32),
                      (reference.token_logprobs, torch.float64)):
        x = logits.to(dtype).clone().requires_grad_()
        lp, ent = fn(x, targets, temperature)
        loss = {"both": (lp * w_lp).sum() + (ent * w_ent).sum(), "logprob only": (lp * w_lp).sum(),
                "entropy only": (ent * w_ent).sum()}[which]
        loss.backward()
        grads.append(x.grad.double())
    ours, ref32, exact = grads
    assert torch.isfinite(ours).all()
    # relative to the largest gradient entry; float32 itself leaves ~1e-7 absolute noise where the
    # gradient vanishes (a row with one dominant logit has entropy ~0 and a gradient of ~1e-10)
    tolerance = 1e-5 * exact.abs().max() + 1e-7
    assert (ours - exact).abs().max() <= tolerance
    assert (ours - ref32).abs().max() <= tolerance


def test_batched_shapes_and_half_precision_inputs():
    logits, targets = random_case(12, 777, seed=3)
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype).reshape(3, 4, 777)
        lp, ent = logprobs.token_logprobs(low, targets.reshape(3, 4))
        assert lp.shape == (3, 4) and lp.dtype == torch.float32
        # the kernel reads low-precision logits and computes in float32: compare on the same values
        ref_lp, ref_ent = reference.token_logprobs(low.float(), targets.reshape(3, 4))
        assert close(lp, ref_lp) and close(ent, ref_ent)


def test_non_contiguous_logits():
    logits, targets = random_case(6, 500, seed=4)
    strided = torch.cat([logits, logits], dim=1)[:, :500]  # row stride 1000
    assert close(logprobs.token_logprobs(strided, targets)[0], reference.token_logprobs(logits, targets)[0])


def test_reference_passes_gradcheck_in_float64():
    logits, targets = random_case(3, 11, seed=5)
    x = logits.double().requires_grad_()
    weights = torch.randn(2, 3, dtype=torch.float64)

    def f(z):
        lp, ent = reference.token_logprobs(z, targets, 0.8)
        return (lp * weights[0]).sum() + (ent * weights[1]).sum()

    assert torch.autograd.gradcheck(f, (x,))


def test_reference_entropy_and_logprob_match_their_definitions():
    logits, targets = random_case(2, 7, seed=6)
    p = torch.softmax(logits.double() / 0.9, -1)
    lp, ent = reference.token_logprobs(logits, targets, 0.9)
    assert torch.allclose(lp.double(), p.gather(1, targets[:, None]).squeeze(1).log(), atol=1e-6)
    assert torch.allclose(ent.double(), -(p * p.log()).sum(-1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# linear_token_logprobs


@pytest.mark.parametrize("N,H,V,chunk", [(13, 16, 777, 4), (8, 32, 1500, 8), (5, 8, 2049, 100)])
def test_linear_version_matches_autograd_through_a_plain_matmul(N, H, V, chunk):
    g = torch.Generator().manual_seed(N)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    results = []
    for fn in (lambda h, w: logprobs.linear_token_logprobs(h, w, targets, 0.9, chunk=chunk),
               lambda h, w: reference.token_logprobs(h @ w.T, targets, 0.9)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = fn(h, w)
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        results.append((lp, ent, h.grad, w.grad))
    (lp, ent, gh, gw), (rlp, rent, rgh, rgw) = results
    assert close(lp, rlp) and close(ent, rent)
    assert (gh - rgh).abs().max() <= 1e-5 * rgh.abs().max()
    assert (gw - rgw).abs().max() <= 1e-5 * rgw.abs().max()


def test_linear_version_is_deterministic():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (9,), generator=g)
    runs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = logprobs.linear_token_logprobs(h, w, targets, chunk=2)
        (lp.sum() + ent.sum()).backward()
        runs.append((lp, h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------------
# group_advantages


def formula(rewards, G, eps=1e-6):
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, G)
    out = np.zeros_like(r)
    for i, row in enumerate(r):
        if row.max() > row.min():
            out[i] = (row - row.mean()) / (row.std(ddof=1) + eps)
    return out.reshape(-1)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_group_advantages_match_the_formula(impl):
    fn = advantage.group_advantages if impl == "triton" else reference.group_advantages
    rewards = [1, 0, 1, 1,  0, 0, 0, 0,  1, 1, 1, 1,  0.5, 0.2, 0.3, 0.9,  1 / 3, 1 / 3, 1 / 3, 1 / 3]
    out = fn(torch.tensor(rewards), 4)
    assert np.allclose(out.numpy(), formula(rewards, 4), rtol=1e-5, atol=1e-6)
    assert (out[4:12] == 0).all() and (out[16:] == 0).all()  # zero-variance groups
    g = torch.Generator().manual_seed(0)
    many = torch.rand(16 * 37, generator=g)
    assert np.allclose(fn(many, 16).numpy(), formula(many.numpy(), 16), rtol=1e-5, atol=1e-6)
    assert (fn(torch.tensor([0.3, 0.7]), 1) == 0).all()  # a group of one has no variance
    # eps matters when the spread is of its order: mean 1e-6, std 2e-6, so (r - mean) / (std + eps) is
    # [-1/3, -1/3, -1/3, 1]; without eps it would be [-1/2, -1/2, -1/2, 3/2].
    tiny = fn(torch.tensor([0.0, 0.0, 0.0, 4e-6]), 4)
    assert np.allclose(tiny.numpy(), [-1 / 3, -1 / 3, -1 / 3, 1.0], rtol=1e-3)


def test_dispatch_follows_masa_kernels(monkeypatch):
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])
    monkeypatch.setenv("MASA_KERNELS", "auto")
    assert masa_kernels.backend(torch.device("cpu")) == "torch"
    assert masa_kernels.backend(torch.device("cuda")) == "triton"
    for choice in ("torch", "triton"):
        monkeypatch.setenv("MASA_KERNELS", choice)
        assert masa_kernels.backend(x.device) == choice
        assert np.allclose(masa_kernels.group_advantages(x, 2).numpy(), formula(x.numpy(), 2), atol=1e-6)
        lp, _ = masa_kernels.token_logprobs(torch.zeros(1, 4), torch.tensor([2]))
        assert abs(lp.item() - np.log(0.25)) < 1e-6
    monkeypatch.setenv("MASA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MASA_KERNELS='cuda'"):
        masa_kernels.token_logprobs(torch.zeros(1, 4), torch.tensor([2]))


def test_cpu_tensors_never_need_a_gpu_whatever_masa_kernels_says(monkeypatch):
    """What bench/gpu_check.py gives train.py on a GPU machine: MASA_KERNELS=triton, no interpreter.
    CUDA tensors go to Triton; the CPU-side pieces (e.g. the group advantages of CPU rewards) to the twin."""
    monkeypatch.setenv("MASA_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert masa_kernels.backend(torch.device("cuda")) == "triton"
    assert masa_kernels.backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(masa_kernels, "usage", type(masa_kernels.usage)())
    x = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert np.allclose(masa.group_advantages(x, 4).numpy(), formula(x.numpy(), 4), atol=1e-6)
    assert masa_kernels.usage_report() == "group_advantages: torch x 1"
    monkeypatch.setenv("MASA_KERNELS", "torch")
    assert masa_kernels.backend(torch.device("cuda")) == "torch"


def test_uneven_groups_are_refused():
    with pytest.raises(ValueError, match="groups of 4"):
        masa_kernels.group_advantages(torch.zeros(10), 4)


def test_benchmark_script_runs_on_the_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "logprob_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--cpu", "--tokens", "8", "--vocab", "300", "--hidden", "16",
                          "--iters", "1", "--no-compile"], capture_output=True, text=True, timeout=600,
                         env=child_env())
    assert out.returncode == 0, out.stderr
    assert "| logits | ours (Triton) |" in out.stdout and "| linear | ours (chunked + Triton) |" in out.stdout


def test_out_of_range_targets_are_refused():
    logits = torch.randn(2, 50)
    for bad in (50, -1, -100):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            logprobs.token_logprobs(logits, torch.tensor([0, bad]))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        logprobs.linear_token_logprobs(torch.randn(2, 4), torch.randn(50, 4), torch.tensor([3, 50]))


def test_minus_infinity_logits_give_finite_results_and_gradients():
    logits = torch.randn(3, 300)
    logits[0, 7] = -float("inf")  # a banned token
    targets = torch.tensor([1, 2, 3])
    results = []
    for fn in (logprobs.token_logprobs, reference.token_logprobs):
        x = logits.clone().requires_grad_()
        lp, ent = fn(x, targets)
        (lp.sum() + ent.sum()).backward()
        results.append((lp, ent, x.grad))
    for ours, ref in zip(*results):
        assert torch.isfinite(ours).all() and torch.allclose(ours, ref, atol=1e-5)


def test_outputs_can_be_modified_in_place_and_double_backward_is_refused():
    x = torch.randn(2, 40, requires_grad=True)
    lp, ent = logprobs.token_logprobs(x, torch.tensor([1, 2]))
    lp.masked_fill_(torch.tensor([True, False]), 0.0)  # separate tensors, as the reference returns
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum() + ent.sum(), x, create_graph=True)


# ---------------------------------------------------------------------------------------------------
# paged decode attention

paged = pytest.importorskip("masa_kernels.paged_attention", reason="triton is not installed")


def paged_case(lengths, heads, kv_heads, head_dim, seed=0, shared_first_block=False):
    """Each sequence's keys and values as contiguous float64 tensors, the same scattered into a pool of
    16-position blocks in shuffled order (positions past a sequence's end hold large garbage), and the
    block table. With shared_first_block, sequences 0 and 1 share their first block (a shared prompt)."""
    g = torch.Generator().manual_seed(seed)
    BS = paged.BLOCK_SIZE
    keys = [torch.randn(kv_heads, n, head_dim, generator=g, dtype=torch.float64) for n in lengths]
    values = [torch.randn(kv_heads, n, head_dim, generator=g, dtype=torch.float64) for n in lengths]
    if shared_first_block:
        keys[1][:, :BS], values[1][:, :BS] = keys[0][:, :BS], values[0][:, :BS]
    need = [-(-n // BS) for n in lengths]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()
    k_pool = 100 * torch.randn(len(order), BS, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_pool = 100 * torch.randn(len(order), BS, kv_heads, head_dim, generator=g, dtype=torch.float64)
    table = torch.full((len(lengths), max(need) + 2), len(order) - 1, dtype=torch.int32)  # unused entries
    for b, n in enumerate(lengths):
        for i in range(need[b]):
            block = order.pop()
            if shared_first_block and b == 1 and i == 0:
                block = int(table[0, 0])
            table[b, i] = block
            live = min(BS, n - i * BS)
            k_pool[block, :live] = keys[b][:, i * BS:i * BS + live].transpose(0, 1)
            v_pool[block, :live] = values[b][:, i * BS:i * BS + live].transpose(0, 1)
    q = torch.randn(len(lengths), heads, head_dim, generator=g, dtype=torch.float64)
    return q, k_pool, v_pool, table, keys, values


def dense_attention(q, keys, values):
    """softmax(q k^T / sqrt(D)) v per sequence, from its contiguous keys and values, float64."""
    out = []
    for b, (k, v) in enumerate(zip(keys, values)):
        kv_heads, _, D = k.shape
        folded = q[b].reshape(kv_heads, -1, D)  # query head h uses key-value head h // rep
        out.append((torch.softmax(folded @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v).reshape(-1, D))
    return torch.stack(out)


@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim,splits", [
    ([1, 15, 16, 17, 33, 100], 4, 2, 16, None),  # block boundaries, GQA 2
    ([1, 15, 16, 17, 33, 300], 8, 2, 24, 3),  # head_dim not a power of two, GQA 4, three splits
    ([5, 200], 6, 2, 8, 5),  # GQA 3 (padded query heads), more splits than one sequence has blocks
    ([64, 129], 4, 4, 32, 2),  # no GQA
])
def test_paged_decode_attention_matches_the_twin_and_dense_float64(lengths, heads, kv_heads, head_dim, splits):
    q, k_pool, v_pool, table, keys, values = paged_case(lengths, heads, kv_heads, head_dim)
    expected = dense_attention(q, keys, values)
    lens = torch.tensor(lengths, dtype=torch.int32)
    args = (q.float(), k_pool.float(), v_pool.float(), table, lens, max(lengths))
    twin = reference.paged_decode_attention(*args)
    ours = paged.paged_decode_attention(*args, splits=splits)
    assert (twin.double() - expected).abs().max() <= 1e-5
    assert (ours.double() - expected).abs().max() <= 1e-5


def test_paged_decode_attention_reads_a_shared_prompt_block_for_both_sequences(monkeypatch):
    q, k_pool, v_pool, table, keys, values = paged_case([40, 23], 4, 2, 16, seed=1, shared_first_block=True)
    assert table[0, 0] == table[1, 0]
    monkeypatch.setenv("MASA_KERNELS", "triton")
    ours = masa_kernels.paged_decode_attention(q.float(), k_pool.float(), v_pool.float(), table,
                                          torch.tensor([40, 23], dtype=torch.int32), 40)
    assert (ours.double() - dense_attention(q, keys, values)).abs().max() <= 1e-5


def test_split_count_fills_the_gpu_without_tiny_splits():
    assert paged.split_count(batch=1, kv_heads=8, max_len=8192, multiprocessors=132) == 32  # 33 wanted, 32 fit
    assert paged.split_count(batch=64, kv_heads=8, max_len=8192, multiprocessors=132) == 1  # 512 programs already
    assert paged.split_count(batch=1, kv_heads=8, max_len=300, multiprocessors=132) == 2  # >= 256 positions each


def test_every_triton_kernel_compiles_for_sm90a_and_sm80_without_spills():
    """The interpreter accepts code that the real compiler rejects: compile each kernel ahead of time
    (masa_kernels/aot.py, no GPU needed) and read registers and spills from ptxas."""
    import subprocess
    import sys
    from pathlib import Path

    env = child_env(TRITON_INTERPRET=None, TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-m", "masa_kernels.aot"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "sm_" in line]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(rows) == 2 * 15 and all(row.rstrip().endswith("| ok |") for row in rows)



# ---------------------------------------------------------------------------------------------------
# sampling from per-sequence counter-based streams

sampling = pytest.importorskip("masa_kernels.sampling", reason="triton is not installed")


def test_philox_matches_the_known_answers_of_random123():
    """Philox4x32-10 test vectors from Random123's kat_vectors (counter, key) -> output."""
    M = 0xFFFFFFFF
    for counter, key, expected in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        words = reference.philox(key[0] | key[1] << 32, *(torch.tensor([c]) for c in counter))
        assert [int(w) for w in words] == list(expected)


def stream_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 10 ** 6, (n,), generator=g), torch.randint(0, 16, (n,), generator=g),
            torch.randint(0, 8192, (n,), generator=g))


@pytest.mark.parametrize("seed", [0, 2 ** 32 - 5])
def test_the_sampling_kernel_draws_what_its_twin_draws(seed):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2500, generator=g) * 3
    logits[0, 5] = -torch.inf  # a banned token
    streams, samples, positions = stream_rows(6)
    ours = sampling.sample_tokens(logits, 0.7, seed, streams, samples, positions)
    twin = reference.sample_tokens(logits, 0.7, seed, streams, samples, positions)
    assert torch.equal(ours[0], twin[0])
    assert torch.allclose(ours[1], twin[1], atol=1e-5)
    assert torch.allclose(twin[1], torch.log_softmax(logits / 0.7, -1).gather(-1, twin[0][:, None])[:, 0], atol=1e-5)


def test_a_rows_draw_does_not_depend_on_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 300, generator=g)
    streams, samples, positions = stream_rows(8, seed=3)
    whole = reference.sample_tokens(logits, 1.0, 9, streams, samples, positions)[0]
    order = torch.tensor([5, 2, 7])  # a subset, reordered
    part = reference.sample_tokens(logits[order], 1.0, 9, streams[order], samples[order], positions[order])[0]
    assert torch.equal(part, whole[order])
    kernel_part = sampling.sample_tokens(logits[order], 1.0, 9, streams[order], samples[order], positions[order])[0]
    assert torch.equal(kernel_part, whole[order])
    other_seed = reference.sample_tokens(logits, 1.0, 10, streams, samples, positions)[0]
    assert not torch.equal(other_seed, whole)


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (3, 1.0), (-1, 0.8)])
def test_sampled_frequencies_match_the_filtered_distribution(top_k, top_p):
    """4000 draws of one row (positions 0..3999 of one stream) against the probabilities of
    softmax(z / T) restricted to the top-k / top-p set: a chi-square test at p = 0.001."""
    z = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    n = 4000
    tokens, _ = reference.sample_tokens(z.expand(n, -1), 0.8, 5, torch.zeros(n, dtype=torch.long),
                                        torch.zeros(n, dtype=torch.long), torch.arange(n), top_k, top_p)
    p = torch.softmax(z / 0.8, -1)
    keep = torch.ones(6, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1:
        keep = (p.cumsum(0) - p) < top_p
    p = torch.where(keep, p, 0) / p[keep].sum()
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[~keep].sum() == 0
    expected = n * p[keep].double()
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    assert chi2 < {6: 20.5, 3: 13.8, 2: 10.8, 1: 0.0}[int(keep.sum())]  # chi-square 0.999 quantiles, df = kept - 1
