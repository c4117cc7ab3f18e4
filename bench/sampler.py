"""Rollout throughput: rollout.generate against transformers' generate on the same model and prompts,
and the engine's hardware-independent counters on a long-tailed RL workload.

    python bench/sampler.py            # CUDA: Qwen3-1.7B shapes, random bf16 weights, 64 prompts x 16, 2048 tokens
    python bench/sampler.py --cpu      # a small random model on the CPU, 8 prompts x 16, 64 tokens
    python bench/sampler.py --long-tail [--baseline REV] [--json FILE]

Both sides decode greedily (so their outputs can be compared token for token) for exactly
max_new_tokens tokens (no stop token), and tokens/s counts generated tokens over wall time,
prefill included: the median of --repeats runs, the two sides alternating. transformers gets the prompts repeated n times as one batch (on CUDA with its
static cache); on a GPU it runs only `--hf-prompts` of the prompts, since its batch must hold every
sequence at once. The decode floor is what memory bandwidth allows: each decode step must read the
weights and every live sequence's keys/values, so floor tokens/s = lanes x bandwidth / (weight bytes
+ lanes x mean live length x KV bytes per token).

--long-tail: GRPO's shape at 1/32 of the paper's lengths, on the CPU. 32 prompts x G = 16 samples
(512 sequences: what one of 8 GPUs samples per step with B = 128 and G = M = 16), 16-token prompts,
a 256-token budget, temperature 1; the first 28 of the 2048 vocabulary ids stop a sequence, so a
random model stops with probability about 1.4% per token: lengths are geometric, median about 1/5
of the budget, with a tail to it (the run prints the distribution it got). The KV memory is fixed
at --kv-positions (default 22 x 272: the 22 slots `train.py configs/qwen3_8b.yaml --plan` gives
at an earlier scale). It runs twice: with a GPU run's settings (sync every 16 steps, the CUDA graphs'
batch buckets, their fixed shapes run eagerly here), the reported case, and with a CPU run's (sync
every step, eager). The engine's counters (rollout.EngineStats) give, per generated token, the
decode steps (each reads the weights once), the positions recomputed after preemptions, and the KV
positions attention spans, which this script also records at the attention call itself (so an
engine whose count is wrong is caught). From them a time bound on a stated bandwidth (H100 3.35
TB/s, H200 4.8 TB/s) and compute (989 TFLOP/s bf16, for the recompute prefills), for this model
and for Qwen3-8B with every length scaled by 32 (32x the steps and recomputed positions, 32^2 x the
KV positions). A bound from counters, not a GPU measurement. --baseline REV runs the same workload
with GPU settings on the model, kernels and engine of git revision REV (from a temporary worktree)
in the same run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_bandwidth, sync  # noqa: E402

if os.environ.get("MASA_ENGINE_ROOT"):  # --baseline: another revision's model, kernels and engine
    sys.path.insert(0, os.environ["MASA_ENGINE_ROOT"])
from model import PRESETS, Qwen3  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

SMALL = replace(PRESETS["tiny"], vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32)


def main(argv=None) -> dict:
    """Prints the table; returns {"speedup", "of_floor", "identical", "tokens_per_s"} for ours."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--slots", type=int, help="rollout.generate's lanes (default: 256, or all on a CPU)")
    parser.add_argument("--hf-prompts", type=int, help="prompts transformers runs (default: all on a CPU, 4 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    parser.add_argument("--long-tail", action="store_true", help="the long-tailed workload's counters (CPU)")
    parser.add_argument("--kv-positions", type=int, default=22 * (16 + 256), help="--long-tail's KV memory")
    parser.add_argument("--baseline", help="--long-tail: also run git revision REV's engine, for comparison")
    parser.add_argument("--json", type=Path, help="--long-tail: write the results here")
    args = parser.parse_args(argv)
    if args.long_tail:
        return long_tail_report(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    big = device.type == "cuda"
    config = PRESETS["1.7B"] if big else SMALL
    dtype = torch.bfloat16 if big else torch.float32
    P = args.prompts or (64 if big else 8)
    L = args.prompt_tokens or (256 if big else 16)
    new = args.max_new_tokens or (2048 if big else 64)
    slots = args.slots or (256 if big else P * args.n)
    hf_prompts = args.hf_prompts or (4 if big else P)
    torch.manual_seed(0)
    if not big:
        torch.set_num_threads(2)

    model = Qwen3(config, dtype=dtype, device=device).eval()
    prompts = torch.randint(0, config.vocab_size, (P, L)).tolist()
    params = SamplingParams(n=args.n, temperature=0, max_new_tokens=new)
    name = torch.cuda.get_device_name() if big else "CPU"
    print(f"device: {name}; model {'Qwen3-1.7B shapes' if big else 'small'} ({config.num_parameters() / 1e6:.1f}M "
          f"parameters, {str(dtype).removeprefix('torch.')}); {P} prompts x {args.n} samples, {L} prompt tokens, "
          f"{new} new tokens, greedy")

    from transformers import Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        # cast after loading: transformers < 4.56 calls the dtype argument torch_dtype, 5.x dtype
        hf = Qwen3ForCausalLM.from_pretrained(tmp).to(device=device, dtype=dtype).eval()
    batch = torch.tensor([p for p in prompts[:hf_prompts] for _ in range(args.n)], device=device)
    extra = dict(cache_implementation="static") if big else {}
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **extra)

    # graphs=True: CUDA graphs on CUDA; on a CPU, the graphs' fixed shapes run eagerly (the path they take)
    def run_ours():
        return generate(model, prompts, params, slots=slots, graphs=True)

    def run_eager():
        return generate(model, prompts, params, slots=slots, graphs=False)

    def run_hf():
        with torch.no_grad():
            return hf.generate(batch, **kwargs)[:, L:].tolist()

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    generate(model, prompts[:1], replace(params, n=2, max_new_tokens=4), slots=2)  # warm-up
    with torch.no_grad():
        hf.generate(batch[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    ours_times, eager_times, hf_times = [], [], []
    for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
        seconds, ours = timed(run_ours)
        ours_times.append(seconds)
        seconds, eager = timed(run_eager)
        eager_times.append(seconds)
        seconds, hf_out = timed(run_hf)
        hf_times.append(seconds)
    ours_seconds, hf_seconds = statistics.median(ours_times), statistics.median(hf_times)
    eager_seconds = statistics.median(eager_times)
    assert [[r.token_ids for r in rs] for rs in eager] == [[r.token_ids for r in rs] for rs in ours], \
        "graphs and eager decoding disagree"
    ours_rate = P * args.n * new / ours_seconds
    hf_rate = len(batch) * new / hf_seconds
    same = sum(r.token_ids == h for p in range(hf_prompts) for r, h in
               zip(ours[p], hf_out[p * args.n:(p + 1) * args.n])) / len(batch)

    bandwidth = copy_bandwidth(device)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * torch.tensor(
        [], dtype=dtype).element_size()
    live = min(slots, P * args.n)
    floor = live * bandwidth / (weight_bytes + live * (L + new / 2) * kv_per_token)
    print("| implementation | sequences | seconds | tokens/s | vs transformers | of decode floor |")
    print("|---|---|---|---|---|---|")
    print(f"| transformers generate{' (static cache)' if big else ''} | {len(batch)} | {hf_seconds:.2f} | "
          f"{hf_rate:,.0f} | 1.00x | {hf_rate / floor:.0%} |")
    print(f"| rollout.generate ({live} lanes{', CUDA graphs' if big else ''}) | {P * args.n} | {ours_seconds:.2f} | "
          f"{ours_rate:,.0f} | {ours_rate / hf_rate:.2f}x | {ours_rate / floor:.0%} |")
    eager_rate = P * args.n * new / eager_seconds
    print(f"| rollout.generate ({live} lanes, eager) | {P * args.n} | {eager_seconds:.2f} | "
          f"{eager_rate:,.0f} | {eager_rate / hf_rate:.2f}x | {eager_rate / floor:.0%} |")
    print(f"identical greedy outputs on the sequences both ran: {same:.1%}; "
          f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s, decode floor {floor:,.0f} tokens/s")
    return {"speedup": ours_rate / hf_rate, "of_floor": ours_rate / floor, "identical": same, "tokens_per_s": ours_rate,
            "graphs_vs_eager": ours_rate / eager_rate}


BANDWIDTHS = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, HBM3 / HBM3e
FLOPS = 989e12  # dense bf16 tensor-core peak of both (H100 and H200 SXM): prefill of a preempted sequence
SCALE = 32  # the paper's 8192-token budget over this workload's 256


SETTINGS = {  # generate's keywords: what a GPU run does (sync every 16 steps, graph batch buckets; on a
    # CPU the buckets' fixed shapes run eagerly), and a CPU run's defaults
    "GPU settings": dict(sync_every=16, graphs=True),
    "CPU settings": dict(sync_every=1, graphs=False),
}


def long_tail(kv_positions: int, settings: str = "GPU settings") -> dict:
    """Run the long-tailed workload once with SETTINGS[settings]; return the engine's counters, the KV
    positions attention was actually given (recorded at masa_kernels.paged_decode_attention, the
    first layer's calls, whatever the engine counts), the length distribution and the CPU wall time."""
    import masa_kernels

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Qwen3(SMALL).eval()
    prompts = torch.randint(0, SMALL.vocab_size, (32, 16)).tolist()
    budget = 256
    params = SamplingParams(n=16, temperature=1.0, max_new_tokens=budget, stop_token_ids=tuple(range(28)))
    generate(model, prompts[:1], replace(params, n=2, max_new_tokens=8), seed=1, slots=2)  # warm-up
    attended, calls, real = [0], [0], masa_kernels.paged_decode_attention

    def recording(q, k_pool, v_pool, table, seq_lens, *args, **kwargs):
        if calls[0] % SMALL.num_hidden_layers == 0:
            attended[0] += int(seq_lens.sum())
        calls[0] += 1
        return real(q, k_pool, v_pool, table, seq_lens, *args, **kwargs)

    stats = {}
    masa_kernels.paged_decode_attention = recording
    try:
        t0 = time.perf_counter()
        out = generate(model, prompts, params, seed=0, stats=stats, kv_tokens=kv_positions, **SETTINGS[settings])
        seconds = time.perf_counter() - t0
    finally:
        masa_kernels.paged_decode_attention = real
    lengths = sorted(len(r.token_ids) for rs in out for r in rs)
    return {"stats": stats, "seconds": seconds, "attended": attended[0], "settings": settings,
            "weight_bytes": sum(p.numel() * 4 for p in model.parameters()),
            "kv_bytes_per_position": 2 * SMALL.num_hidden_layers * SMALL.num_key_value_heads * SMALL.head_dim * 4,
            "lengths": {"median": statistics.median(lengths), "p90": lengths[int(0.9 * len(lengths))],
                        "mean": statistics.fmean(lengths), "at_budget": sum(n == budget for n in lengths) / len(lengths)}}


def derived(run: dict) -> dict:
    """Per-token counters and decode-time bounds from one long_tail run."""
    s = run["stats"]
    tokens = s["generated_tokens"]
    qwen8b = PRESETS["8B"]
    weight_8b = qwen8b.num_parameters() * 2  # bf16
    kv_8b = 2 * qwen8b.num_hidden_layers * qwen8b.num_key_value_heads * qwen8b.head_dim * 2
    out = {"mean_concurrency": s["live_sequences"] / s["decode_steps"], "peak_concurrency": s["peak_live_sequences"],
           "kv_read_per_token": s["kv_positions_read"] / tokens, "kv_live_per_token": s["kv_positions_live"] / tokens,
           "weight_bytes_per_token": s["decode_steps"] * run["weight_bytes"] / tokens,
           "cpu_tokens_per_s": tokens / run["seconds"], "rows_per_step": s["rows_decoded"] / s["decode_steps"] if "rows_decoded" in s else s["rows"],
           # while samples waited (the pool was the limit); engines before this counter: None
           "queued_concurrency": s["queued_live_sequences"] / s["queued_steps"] if s.get("queued_steps") else None,
           "preemptions": s.get("preemptions")}
    # what attention was given (recorded), or the engine's own count where a run did not record it
    read = run.get("attended") or s["kv_positions_read"]
    out["attended_per_token"] = read / tokens
    recomputed = s.get("recomputed_tokens", 0)  # engines before this counter: not counted (bound without it)
    out["recomputed_share"] = recomputed / tokens if "recomputed_tokens" in s else None
    for gpu, bandwidth in BANDWIDTHS.items():
        # decode reads the weights once a step and every position attention is given; a preempted
        # sequence's recompute is a prefill, at best compute-bound at 2 x parameters flops a token
        small = s["decode_steps"] * run["weight_bytes"] + read * run["kv_bytes_per_position"]
        small_flops = 2 * run["weight_bytes"] / 4 * recomputed
        out[f"bound_small_{gpu}"] = tokens / (small / bandwidth + small_flops / FLOPS)
        big = SCALE * s["decode_steps"] * weight_8b + SCALE ** 2 * read * kv_8b
        big_flops = 2 * qwen8b.num_parameters() * SCALE * recomputed
        out[f"bound_8b_{gpu}"] = SCALE * tokens / (big / bandwidth + big_flops / FLOPS)
    return out


def long_tail_report(args) -> dict:
    if os.environ.get("MASA_ENGINE_ROOT"):  # one run for --baseline, written to --json
        run = long_tail(args.kv_positions, "GPU settings")
        args.json.write_text(json.dumps({"this tree": run}))
        return run
    runs = {f"this tree, {name}": long_tail(args.kv_positions, name) for name in SETTINGS}
    if args.baseline:
        runs[f"{args.baseline}, GPU settings"] = baseline_run(args.baseline, args.kv_positions)
    print(f"long-tailed workload: 32 prompts x 16 samples, 16-token prompts, budget 256, KV memory "
          f"{args.kv_positions} positions, small random model (CPU). GPU settings: sync every 16 steps, "
          f"graph batch buckets (run eagerly here); CPU settings: sync every step, eager")
    rows = [("lengths: median / p90 / mean / at budget", lambda r, d: f"{r['lengths']['median']:.0f} / "
             f"{r['lengths']['p90']} / {r['lengths']['mean']:.1f} / {r['lengths']['at_budget']:.1%}"),
            ("decode steps", lambda r, d: f"{r['stats']['decode_steps']:,}"),
            ("sequences decoded together: mean / peak", lambda r, d: f"{d['mean_concurrency']:.1f} / "
             f"{d['peak_concurrency']}"),
            ("  mean while samples wait for the pool", lambda r, d: "not counted" if d["queued_concurrency"] is None
             else f"{d['queued_concurrency']:.1f}"),
            ("  rows computed per step (lanes up to the last occupied one)", lambda r, d: f"{d['rows_per_step']:.1f}"),
            ("preemptions", lambda r, d: "none (no such thing)" if d["preemptions"] is None else f"{d['preemptions']}"),
            ("  positions recomputed after preemption, per generated token", lambda r, d: "not counted" if d["recomputed_share"] is None else f"{d['recomputed_share']:.1%}"),
            ("KV positions attention was given, per generated token", lambda r, d: f"{d['attended_per_token']:.1f}"),
            ("KV positions read per generated token (the engine's count)", lambda r, d: f"{d['kv_read_per_token']:.1f}"),
            ("  live positions per generated token", lambda r, d: f"{d['kv_live_per_token']:.1f}"),
            ("  read / live", lambda r, d: f"{d['kv_read_per_token'] / d['kv_live_per_token']:.2f}x"),
            ("weight bytes per generated token", lambda r, d: f"{d['weight_bytes_per_token'] / 1e6:.2f} MB"),
            ("CPU tokens/s (measured)", lambda r, d: f"{d['cpu_tokens_per_s']:,.0f}")]
    for gpu in BANDWIDTHS:
        rows.append((f"decode bound, this model, {gpu} (tokens/s)", lambda r, d, g=gpu: f"{d[f'bound_small_{g}']:,.0f}"))
        rows.append((f"decode bound, Qwen3-8B x32 lengths, {gpu}", lambda r, d, g=gpu: f"{d[f'bound_8b_{g}']:,.0f}"))
    results = {name: {**run, "derived": derived(run)} for name, run in runs.items()}
    print("| counter | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r, r["derived"]) for r in results.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def baseline_run(revision: str, kv_positions: int) -> dict:
    """long_tail (this script's, GPU settings) with git revision `revision`'s model, kernels and engine,
    from a temporary worktree (an engine that takes sync_every and graphs: b77ba93 or later)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), revision], check=True,
                       capture_output=True)
        try:
            out = Path(tmp) / "baseline.json"
            subprocess.run([sys.executable, __file__, "--long-tail", "--kv-positions", str(kv_positions), "--json",
                            str(out)], check=True, cwd=tree, capture_output=True,
                           env={**os.environ, "MASA_ENGINE_ROOT": str(tree)})
            return json.loads(out.read_text())["this tree"]
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)


if __name__ == "__main__":
    main()
