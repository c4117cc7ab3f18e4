"""Every claim only a GPU can check, in one run that ends with one table (bench/gpu_check.sh calls this).

    bench/gpu_check.sh                 # one CUDA GPU (estimated 6 minutes, not yet timed), nothing downloaded
    bench/gpu_check.sh --cpu           # the same code paths at toy sizes (tests/test_gpu_check.py runs it)

In order:
1. ceilings: the device's copy bandwidth and matmul rate (bf16 on a GPU), measured once;
2. kernel accuracy: masa_kernels.token_logprobs and masa_kernels.linear_token_logprobs (Triton) in fp32 and
   bf16 (bf16 on a GPU only: the CPU interpreter gets bf16 arithmetic wrong) against float64
   references on the same inputs at V = 151936 (2049 on a CPU): log-probs, entropy, gradients; and
   masa_kernels.paged_decode_attention against its float64 twin at Qwen3-8B's attention shape, with its
   time against the live keys and values it reads;
3. bench/logprob_kernels.py and bench/sampler.py at the sizes their issues name (toy sizes on a CPU);
4. a few MASA training steps (train.py, one process) on Qwen3-1.7B shapes with random weights and a
   character tokenizer (real vocabulary size; responses run to their budget, as a random model's do),
   with the paper's sequence lengths scaled down to fit the time: the step time split from
   metrics.jsonl and the peak memory against `train.py --plan`'s prediction for the same run. A
   random model's rewards are all 0, so every advantage is 0 and the update would skip every
   response: a small entropy bonus keeps them all in the loss, the update's worst case.
   train.py gets the kernel environment of a GPU run (MASA_KERNELS=triton, no TRITON_INTERPRET)
   also on a CPU, where every tensor then takes the twins; on a GPU every kernel must run on Triton.
5. the CUDA-only branches that no row above reaches: checkpoint RNG state with the CUDA generators,
   the device-side check of log-prob targets (in a process of its own), eval.py end to end, and the
   memory the decode step's CUDA graphs take against the estimate the KV pool leaves free for them.

Every branch of the code that runs only on CUDA, and the row that runs it ("CPU:" says what of it a
CPU test runs):
| branch | where | row | CPU |
|---|---|---|---|
| Triton kernels, compiled (not interpreted) | masa_kernels/*.py | 2, 3, 4 ("kernels that ran on Triton") | interpreter (tests, --cpu); masa_kernels/aot.py compiles every kernel for sm_90a / sm_80 |
| `torch.mm(..., out_dtype=float32)` of the chunked log-probs | masa_kernels/logprobs.py `_mm_float` | 2 (linear kernel bf16), 4 | the float32 `@` branch |
| `torch._assert_async` target check | masa_kernels/logprobs.py `_check_targets` | 5 (out-of-range target) | the host check and its IndexError |
| block sizes BLOCK_V for CUDA | masa_kernels/logprobs.py, sampling.py | 2, 3, 4 | AOT compile at those sizes |
| split count from the multiprocessor count | masa_kernels/paged_attention.py | 2 (paged decode attention) | split_count unit test |
| bf16 parameters, FSDP2 MixedPrecisionPolicy | parallel.build_policy | 4 | tests/test_train.py (bf16 policy on fp32 masters) |
| NCCL process group, 2-hour timeout, cuda:LOCAL_RANK | parallel.setup_distributed | 4 (one rank) | gloo, 1 and 2 processes |
| KV pool sized from `torch.cuda.mem_get_info`, less the graphs' estimate | rollout.py `_Engine.pool_blocks` | 3 (sampler), 4, 5 (graphs' memory) | kv_tokens_that_fit and decode_graph_bytes in tests/test_plan.py |
| CUDA-graph decode, sync every 16 steps | rollout.py `_DecodeGraphs` | 3 ("CUDA graphs vs eager"), 4, 5 (eval.py, graphs' memory) | the graphs' fixed shapes run eagerly; replay counting (tests/test_rollout.py) |
| peak memory in metrics.jsonl | train.py | 4 (peak vs plan) | none (CUDA allocator only) |
| CUDA RNG state in checkpoints | checkpoints.rng_state | 5 | the CPU generators |
| eval.py: NCCL, cuda device, bf16 weights | eval.py main | 5 | float32, one process and two (tests/test_eval.py) |

Performance goals are the issues' (kernels: >= 80% of the bandwidth floor, <= 1/8 of eager memory at
<= 1.15x its time; sampler: >= 3x transformers, >= 60% of the decode floor); on a CPU they are
reported, not judged. The accuracy bars: log-probs within 1e-3 (bf16) / 1e-4 (fp32) of float64,
gradients within 1% (bf16) / 1e-5 (fp32) of the largest reference gradient. Exit status 1 if any
judged check fails. The full log goes to --log.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Tee(io.TextIOBase):
    """Everything printed goes to the terminal and to the log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (Triton interpreted)")
    parser.add_argument("--log", type=Path, default=ROOT / "bench" / "gpu_check.log")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--response-tokens", type=int, default=None, help="training rollout budget")
    args = parser.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MASA_KERNELS"] = "triton"
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run bench/gpu_check.sh --cpu for the toy-size run")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("w") as log, contextlib.redirect_stdout(Tee(sys.__stdout__, log)):
        rows = run(args, torch)
        print(f"\n{'check':<52} {'value':>16} {'goal':>14}  result")
        for check, value, goal, ok in rows:
            verdict = "-" if ok is None else ("pass" if ok else "FAIL")
            print(f"{check:<52} {value:>16} {goal:>14}  {verdict}")
        failed = [r[0] for r in rows if r[3] is False]
        print(f"\n{len(failed)} of {sum(r[3] is not None for r in rows)} judged checks failed" +
              (f": {', '.join(failed)}" if failed else "") + f"; full log: {args.log}")
    sys.exit(1 if failed else 0)


def run(args, torch) -> list[tuple]:
    from bench.common import copy_bandwidth, sync

    gpu = not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name() if gpu else "CPU (toy sizes; performance is reported, not judged)"
    print(f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    rows = []

    # 1. ceilings ---------------------------------------------------------------------------------
    bandwidth = copy_bandwidth(device)
    n = 8192 if gpu else 256
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(12):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    flops = 2 * n ** 3 / statistics.median(times)
    print(f"\n== ceilings: copy bandwidth {bandwidth / 1e9:,.0f} GB/s, {str(dtype)[6:]} matmul {flops / 1e12:,.1f} TFLOP/s")
    rows.append(("copy bandwidth (GB/s)", f"{bandwidth / 1e9:,.0f}", "", None))
    rows.append((f"{str(dtype)[6:]} matmul {n}^3 (TFLOP/s)", f"{flops / 1e12:,.1f}", "", None))

    # 2. kernel accuracy against float64 -----------------------------------------------------------
    print("\n== kernel accuracy against float64 references (same inputs)")
    for dt in ([torch.float32, torch.bfloat16] if gpu else [torch.float32]):
        rows += kernel_accuracy(torch, device, dt, tokens=1024 if gpu else 32, vocab=151936 if gpu else 2049,
                                hidden=2048 if gpu else 64)
        rows += paged_attention_check(torch, device, dt, bandwidth, gpu)

    # 3. the kernel and sampler benchmarks ---------------------------------------------------------
    from bench import logprob_kernels as kernel_bench
    from bench import sampler as sampler_bench

    print("\n== bench/logprob_kernels.py" + (" --cpu --no-compile" if args.cpu else ""))
    k = kernel_bench.main(["--cpu", "--no-compile"] if args.cpu else [])
    judged = (lambda ok: ok) if gpu else (lambda ok: None)
    rows.append(("logits kernel fwd+bwd, of bandwidth floor", _pct(k["logits_of_floor"]), ">= 80%",
                 judged(k["logits_of_floor"] is not None and k["logits_of_floor"] >= 0.8)))
    rows.append(("linear kernel peak memory vs eager", _x(k["linear_memory_ratio"]), "<= 0.125x",
                 judged(k["linear_memory_ratio"] is not None and k["linear_memory_ratio"] <= 0.125)))
    rows.append(("linear kernel time vs eager", _x(k["linear_time_ratio"]), "<= 1.15x",
                 judged(k["linear_time_ratio"] is not None and k["linear_time_ratio"] <= 1.15)))
    # interpreted Triton runs every program in Python: on a CPU, 2 prompts x 2 samples keep it to seconds
    sampler_args = ["--cpu", "--repeats", "1", "--max-new-tokens", "16", "--prompts", "2", "--n", "2"] if args.cpu else ["--repeats", "1"]
    print("\n== bench/sampler.py " + " ".join(sampler_args))
    s = sampler_bench.main(sampler_args)
    rows.append(("sampler vs transformers generate", _x(s["speedup"]), ">= 3x" if gpu else ">= 2x",
                 judged(s["speedup"] >= 3)))
    rows.append(("sampler, of decode floor", _pct(s["of_floor"]), ">= 60%", judged(s["of_floor"] >= 0.6)))
    rows.append(("sampler greedy output identical to transformers", _pct(s["identical"]), "", None))
    rows.append(("sampler CUDA graphs vs eager (tokens/s)" if gpu else "sampler graph shapes vs eager (tokens/s)",
                 _x(s["graphs_vs_eager"]), "", None))

    # 4. training steps on real shapes --------------------------------------------------------------
    rows += training_steps(args, torch, gpu)

    # 5. the CUDA-only branches no other row reaches (the inventory in the module docstring) --------
    print("\n== CUDA-only paths")
    rows += cuda_paths(torch, gpu)
    return rows


def cuda_paths(torch, gpu: bool) -> list[tuple]:
    """Checkpoint RNG state, the device-side target check, eval.py end to end; on a CPU the same
    calls on CPU tensors (where the first two take their CPU branches)."""
    import checkpoints
    from data import ARITHMETIC_WORDS, build_char_tokenizer
    from model import PRESETS, Qwen3

    device = "cuda" if gpu else "cpu"
    rows = []
    state = checkpoints.rng_state()
    first = torch.rand(4, device=device)
    checkpoints.set_rng_state(state)
    again = torch.rand(4, device=device)
    saved = "cuda" if gpu else "cpu"
    print(f"RNG state ({saved} generator included: {state['cuda'] is not None}) restores the same draws: "
          f"{torch.equal(first, again)}")
    rows.append((f"checkpoint RNG state restores {saved} draws", str(torch.equal(first, again)), "True",
                 torch.equal(first, again) and (state["cuda"] is not None) == gpu))

    # a process of its own: a device-side assert leaves the CUDA context unusable
    code = (f"import torch, masa_kernels\nmasa_kernels.token_logprobs(torch.zeros(2, 8, device={device!r}), "
            f"torch.tensor([1, 9], device={device!r}))\n" + ("torch.cuda.synchronize()\n" if gpu else ""))
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    # on CUDA the message may not survive the assert: the assert itself is the check
    caught = bad.returncode != 0 and ("[0, 8)" in bad.stderr or (gpu and "device-side assert" in bad.stderr))
    print(f"an out-of-range log-prob target on {device}: exit {bad.returncode}, "
          f"{'message found' if caught else 'message missing: ' + bad.stderr[-500:]}")
    rows.append(("out-of-range log-prob target stops the run", "stopped" if caught else "not stopped", "stopped",
                 caught))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        tokenizer = build_char_tokenizer(ckpt, words=ARITHMETIC_WORDS)
        torch.manual_seed(0)
        Qwen3(replace(PRESETS["tiny"], vocab_size=len(tokenizer))).save_pretrained(ckpt)
        problems = Path(tmp) / "four.jsonl"
        problems.write_text("".join(json.dumps({"problem": f"What is {a}+{a}?", "answer": str(2 * a)}) + "\n"
                                    for a in range(4)))
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(ckpt), "--benchmarks",
                                 str(problems), "--n", "2", "--max-new-tokens", "16", "--meta", "--meta-n", "2",
                                 "--meta-max-new-tokens", "16", "--out", str(Path(tmp) / "out"), "--no-progress"],
                                capture_output=True, text=True, cwd=ROOT, timeout=600,
                                # on a CPU the twins: the interpreted kernels add a minute and no coverage
                                env=os.environ if gpu else {k: v for k, v in os.environ.items() if k != "MASA_KERNELS"})
        ok = result.returncode == 0 and (Path(tmp) / "out" / "results.json").is_file()
        print(f"eval.py on {device} ({'bfloat16, CUDA graphs' if gpu else 'float32'}): exit {result.returncode} "
              f"in {time.perf_counter() - started:.0f} s" + ("" if ok else "\n" + result.stderr[-2000:]))
    rows.append(("eval.py end to end" + (" (bf16, CUDA graphs)" if gpu else ""), "ok" if ok else "failed", "ok",
                 ok))
    rows.append(decode_graph_memory(torch, gpu))
    return rows


def decode_graph_memory(torch, gpu: bool) -> tuple:
    """The memory the decode step's CUDA graphs take (the peak of a graphed generate call less that of
    the same call eager, same pool), against rollout.decode_graph_bytes, the estimate the KV pool's
    sizing keeps free: the estimate must not be below it. Qwen3-0.6B's shape (its 151,936-token
    vocabulary) with random bf16 weights, 64 lanes. A CPU captures no graphs: reported as such."""
    from model import PRESETS, Qwen3
    from rollout import SamplingParams, decode_graph_bytes, generate

    name = "decode graphs' memory vs rollout.decode_graph_bytes"
    if not gpu:
        print("decode graphs' memory: not measured (a CPU captures no CUDA graphs)")
        return (name, "no graphs on a CPU", "<= 1x", None)
    torch.manual_seed(0)
    model = Qwen3(PRESETS["0.6B"], dtype=torch.bfloat16, device="cuda").eval()
    prompts = torch.randint(0, 151936, (8, 64)).tolist()
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=64)
    peaks = {}
    for graphs in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        generate(model, prompts, params, seed=0, slots=64, kv_tokens=64 * 160, graphs=graphs)
        torch.cuda.synchronize()
        peaks[graphs] = torch.cuda.max_memory_allocated() - base
    measured, estimate = peaks[True] - peaks[False], decode_graph_bytes(model.config, 64, torch.bfloat16)
    print(f"decode graphs' memory: {measured / 2 ** 20:,.0f} MiB measured, {estimate / 2 ** 20:,.0f} MiB estimated")
    return (name, f"{measured / 2 ** 20:,.0f} / {estimate / 2 ** 20:,.0f} MiB", "<= 1x", measured <= estimate)


def paged_attention_check(torch, device, dtype, bandwidth: float, gpu: bool) -> list[tuple]:
    """masa_kernels.paged_decode_attention (Triton) against its float64 twin on a shuffled pool: Qwen3-8B's
    attention shape (32 query / 8 key-value heads of 128) and 64 sequences of up to 8192 positions on
    a GPU, toy sizes on a CPU; on a GPU also its time against the live keys and values it must read."""
    import masa_kernels
    from bench.common import sync
    from masa_kernels import reference
    from masa_kernels.paged_attention import BLOCK_SIZE

    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, Hkv, D, longest = (64, 32, 8, 128, 8192) if gpu else (4, 4, 2, 32, 100)
    lengths = torch.randint(1, longest + 1, (B,), generator=g)
    need = (lengths + BLOCK_SIZE - 1) // BLOCK_SIZE
    blocks = int(need.sum())
    table = torch.zeros(B, int(need.max()), dtype=torch.int32)
    order, used = torch.randperm(blocks, generator=g), 0
    for b, n in enumerate(need.tolist()):
        table[b, :n], used = order[used:used + n].int(), used + n
    k_pool = torch.randn(blocks, BLOCK_SIZE, Hkv, D, generator=g).to(device, dtype)
    v_pool = torch.randn(blocks, BLOCK_SIZE, Hkv, D, generator=g).to(device, dtype)
    q = torch.randn(B, H, D, generator=g).to(device, dtype)
    table, lens = table.to(device), lengths.int().to(device)
    out = masa_kernels.paged_decode_attention(q, k_pool, v_pool, table, lens, longest)
    ref = reference.paged_decode_attention(q.double(), k_pool.double(), v_pool.double(), table, lens, longest)
    err = (out.double() - ref).abs().max().item()
    bar = 1e-2 if dtype == torch.bfloat16 else 1e-5
    tag = str(dtype)[6:]
    print(f"paged decode attention {tag}: {B} sequences of 1..{longest} positions, max |out - float64| {err:.2e}")
    rows = [(f"paged decode attention {tag}: error", f"{err:.1e}", f"<= {bar:.0e}", err <= bar)]
    if gpu:
        times = []
        for i in range(12):
            sync(device)
            t0 = time.perf_counter()
            masa_kernels.paged_decode_attention(q, k_pool, v_pool, table, lens, longest)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        live_bytes = 2 * int(lengths.sum()) * Hkv * D * k_pool.element_size()
        share = live_bytes / statistics.median(times) / bandwidth
        print(f"paged decode attention {tag}: {statistics.median(times) * 1e6:.0f} us for {live_bytes / 1e6:.0f} MB "
              f"of live keys and values, {share:.0%} of copy bandwidth")
        rows.append((f"paged decode attention {tag}: of bandwidth floor", _pct(share), "", None))
    return rows


def kernel_accuracy(torch, device, dtype, tokens: int, vocab: int, hidden: int) -> list[tuple]:
    import masa_kernels

    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, device=device, generator=g) * 4).to(dtype).requires_grad_()
    h = (torch.randn(tokens, hidden, device=device, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * hidden ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    tag = str(dtype)[6:]
    bar, grad_bar = (1e-3, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
    rows = []
    for label, ours_fn, inputs, ref_logits in [
        ("logits", lambda: masa_kernels.token_logprobs(logits, targets), [logits], lambda x: x[0]),
        ("linear", lambda: masa_kernels.linear_token_logprobs(h, w, targets), [h, w], lambda x: x[0] @ x[1].T),
    ]:
        logp, entropy = ours_fn()
        grads = torch.autograd.grad((logp.sum() + 0.1 * entropy.sum()), inputs)
        ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
        full = torch.log_softmax(ref_logits(ref_inputs), dim=-1)
        ref_logp = full.gather(-1, targets[:, None]).squeeze(-1)
        ref_entropy = -(full.exp() * full).sum(-1)
        ref_grads = torch.autograd.grad(ref_logp.sum() + 0.1 * ref_entropy.sum(), ref_inputs)
        err_logp = (logp.double() - ref_logp).abs().max().item()
        err_entropy = (entropy.double() - ref_entropy).abs().max().item()
        err_grad = max(((x.double() - r).abs().max() / r.abs().max()).item() for x, r in zip(grads, ref_grads))
        print(f"{label} {tag}: max |log p - ref| {err_logp:.2e}, max |entropy - ref| {err_entropy:.2e}, "
              f"max gradient error / max |gradient| {err_grad:.2e}")
        rows.append((f"{label} kernel {tag}: log-prob error", f"{err_logp:.1e}", f"<= {bar:.0e}", err_logp <= bar))
        rows.append((f"{label} kernel {tag}: entropy error", f"{err_entropy:.1e}", f"<= {10 * bar:.0e}",
                     err_entropy <= 10 * bar))
        rows.append((f"{label} kernel {tag}: relative gradient error", f"{err_grad:.1e}", f"<= {grad_bar:.0e}",
                     err_grad <= grad_bar))
    return rows


def training_steps(args, torch, gpu: bool) -> list[tuple]:
    """A few MASA steps of train.py on Qwen3-1.7B shapes (tiny on a CPU), random weights."""
    from config import load_config
    from data import ARITHMETIC_WORDS, build_char_tokenizer
    from model import PRESETS, Qwen3
    from plan import GIB, memory_plan

    steps = args.train_steps or (3 if gpu else 2)
    response = args.response_tokens or (1024 if gpu else 16)
    preset = "1.7B" if gpu else "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        tokenizer = build_char_tokenizer(ckpt, words=ARITHMETIC_WORDS)
        config = PRESETS[preset] if gpu else replace(PRESETS[preset], vocab_size=len(tokenizer))
        torch.manual_seed(0)
        Qwen3(config, dtype=torch.bfloat16 if gpu else torch.float32).save_pretrained(ckpt)
        overrides = [f"model.path={ckpt}", "model.init=pretrained", f"model.dtype={'bfloat16' if gpu else 'float32'}",
                     "model.activation_checkpointing=true", "warm_start.steps=0", "algorithm=masa",
                     f"rollout.group_size={16 if gpu else 4}", f"rollout.meta_group_size={16 if gpu else 4}",
                     "rollout.max_prompt_tokens=64", f"rollout.max_response_tokens={response}",
                     f"train.batch_size={4 if gpu else 2}", f"train.total_steps={steps}",
                     "train.micro_batch_tokens=16384", "loss.entropy_coef=0.001", "checkpoint.every=0",
                     f"checkpoint.dir={tmp}/run",
                     "log.progress_bar=false"]
        cfg_file = ROOT / "configs" / "tiny.yaml"
        print(f"\n== {steps} MASA steps of train.py on Qwen3-{preset} shapes ({config.num_parameters() / 1e9:.2f}B "
              f"parameters, vocabulary {config.vocab_size}), random weights: {' '.join(overrides[3:-2])}")
        started = time.perf_counter()
        # exactly the kernel environment a GPU run gives train.py: MASA_KERNELS=triton, no interpreter
        # (on a CPU every tensor then takes the twins; tests/test_train.py checks the same)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(cfg_file), *overrides],
                                capture_output=True, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
        print(result.stdout[-3000:] + result.stderr[-3000:])
        if result.returncode:
            return [("training steps", f"exit {result.returncode}", "exit 0", False)]
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"train.py ran {len(records)} steps in {time.perf_counter() - started:.0f} s (model loading included)")
    timed = records[1:] or records  # the first step includes warm-up (allocator, kernels' first launches)
    split = {k: statistics.mean(r[k] for r in timed) for k in
             ("time_step", "time_rollout", "time_grading", "time_logprobs_backward", "time_optimizer", "time_refresh")}
    print("mean over steps 2..: " + ", ".join(f"{k[5:]} {v:.2f} s" for k, v in split.items()))
    report = next((line for line in result.stdout.splitlines() if line.startswith("kernel calls on rank 0: ")), "")
    calls = dict(item.split(": ") for item in report.removeprefix("kernel calls on rank 0: ").split(", ") if ": " in item)
    replays = calls.pop("decode step", None)  # CUDA graph replays of the sampler's step, not a kernel
    if replays:
        print(f"decode step replays: {replays}")
    on_triton = [name for name, impl in calls.items() if impl.startswith("triton")]
    print(f"kernel implementations in the training run: {', '.join(f'{k} {v}' for k, v in calls.items())}")
    rows = [("training run: kernels that ran on Triton", f"{len(on_triton)} of {len(calls)}", "all" if gpu else "",
             bool(calls) and len(on_triton) == len(calls) if gpu else None)]
    rows.append(("train step time (s)", f"{split['time_step']:.2f}", "", None))
    # how on-policy the update is: the sampler's log-probs of its tokens against the trainer's (bf16 on a GPU)
    kl = max((r["mismatch_kl"] for r in records if r.get("mismatch_kl") is not None), default=float("nan"))
    gap = max((r["logprob_gap_max"] for r in records if r.get("logprob_gap_max") is not None), default=float("nan"))
    print(f"sampler vs trainer log-probs: mismatch KL at most {kl:.2e} per token, largest |difference| {gap:.2e}")
    rows.append(("sampler vs trainer log-probs: mismatch KL per token", f"{kl:.1e}", "<= 1e-3" if gpu else "",
                 kl <= 1e-3 if gpu else None))
    rows += [(f"  of which {k[5:].replace('_', ' + ')} (s)", f"{split[k]:.2f}", "", None) for k in list(split)[1:]]
    if gpu:
        cfg = load_config(cfg_file, overrides)
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        plan = memory_plan(cfg, gpus=1, gpu_memory_gib=total)
        predicted = max(plan["peak_rollout"], plan["peak_update"]) / GIB
        measured = max(r["memory_peak_gib"] for r in records)
        print(f"peak memory: measured {measured:.1f} GiB, planned {predicted:.1f} GiB (of {total:.0f} GiB)")
        rows.append(("train step peak memory (GiB), fits the GPU", f"{measured:.1f}", f"<= {total:.0f}", measured <= total))
        rows.append(("train.py --plan peak (GiB), within 25% of measured", f"{predicted:.1f}", f"{measured:.1f}",
                     abs(predicted - measured) <= 0.25 * measured))
    return rows


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


if __name__ == "__main__":
    main()
