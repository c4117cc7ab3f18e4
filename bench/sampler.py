"""Rollout throughput: rollout.generate against transformers' generate on the same model and prompts.

    python bench/sampler.py            # CUDA: Qwen3-1.7B shapes, random bf16 weights, 64 prompts x 16, 2048 tokens
    python bench/sampler.py --cpu      # a small random model on the CPU, 8 prompts x 16, 64 tokens

Both sides decode greedily (so their outputs can be compared token for token) for exactly
max_new_tokens tokens (no stop token), and tokens/s counts generated tokens over wall time,
prefill included: the median of --repeats runs, the two sides alternating. transformers gets the prompts repeated n times as one batch (on CUDA with its
static cache); on a GPU it runs only `--hf-prompts` of the prompts, since its batch must hold every
sequence at once. The decode floor is what memory bandwidth allows: each decode step must read the
weights and every live sequence's keys/values, so floor tokens/s = slots x bandwidth / (weight bytes
+ slots x mean live length x KV bytes per token).
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_bandwidth, sync  # noqa: E402
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
    parser.add_argument("--slots", type=int, help="rollout.generate's KV pool (default: 256, or all on a CPU)")
    parser.add_argument("--hf-prompts", type=int, help="prompts transformers runs (default: all on a CPU, 4 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    args = parser.parse_args(argv)
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
    step = None
    if args.compile:
        import rollout

        step = torch.compile(rollout.decode, dynamic=False)
    name = torch.cuda.get_device_name() if big else "CPU"
    print(f"device: {name}; model {'Qwen3-1.7B shapes' if big else 'small'} ({config.num_parameters() / 1e6:.1f}M "
          f"parameters, {str(dtype).removeprefix('torch.')}); {P} prompts x {args.n} samples, {L} prompt tokens, "
          f"{new} new tokens, greedy")

    from transformers import Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = Qwen3ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    batch = torch.tensor([p for p in prompts[:hf_prompts] for _ in range(args.n)], device=device)
    extra = dict(cache_implementation="static") if big else {}
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **extra)

    def run_ours():
        return generate(model, prompts, params, slots=slots, decode_step=step)

    def run_hf():
        with torch.no_grad():
            return hf.generate(batch, **kwargs)[:, L:].tolist()

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    generate(model, prompts[:1], replace(params, n=2, max_new_tokens=4), slots=2, decode_step=step)  # warm-up
    with torch.no_grad():
        hf.generate(batch[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    ours_times, hf_times = [], []
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        seconds, ours = timed(run_ours)
        ours_times.append(seconds)
        seconds, hf_out = timed(run_hf)
        hf_times.append(seconds)
    ours_seconds, hf_seconds = statistics.median(ours_times), statistics.median(hf_times)
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
    print(f"| rollout.generate ({live} slots{', compiled' if step else ''}) | {P * args.n} | {ours_seconds:.2f} | "
          f"{ours_rate:,.0f} | {ours_rate / hf_rate:.2f}x | {ours_rate / floor:.0%} |")
    print(f"identical greedy outputs on the sequences both ran: {same:.1%}; "
          f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s, decode floor {floor:,.0f} tokens/s")
    return {"speedup": ours_rate / hf_rate, "of_floor": ours_rate / floor, "identical": same, "tokens_per_s": ours_rate}


if __name__ == "__main__":
    main()
