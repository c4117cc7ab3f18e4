"""How much a seed's rollouts depend on the engine's configuration, per dtype (issue 26, A5).

    python bench/sampler_invariance.py [--prompts 8] [--n 8] [--max-new-tokens 128]

The sampling noise of a token is a function of (seed, stream, sample, position) alone, so two runs
with the same seed draw the same uniforms whatever the lanes, the pool or the graph shapes. What can
still differ is the logits: a different batch size changes how a matrix product is blocked, a
preempted sequence is recomputed by a dense prefill instead of paged decode steps, and the graph
path decodes padded batches. In float64 and float32 that rounding is too small to move a token here;
in bfloat16 it is not. For each dtype this runs the same 64 sequences (a random model with
bench/sampler.py's SMALL shape, 16-token prompts, temperature 1, the first 28 vocabulary ids stop a
sequence) in one 64-lane run (the reference) and in three other configurations, and prints, per
configuration, how many sequences differ from the reference in any token, and where the first
difference falls (the median over differing sequences of its index in the response). On a CPU; a GPU
adds its own kernels' rounding (the attention kernel's split count depends on the batch and the
number of multiprocessors).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sampler import SMALL  # noqa: E402
from model import Qwen3  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

CONFIGURATIONS = {  # name -> rollout.generate's keywords (the reference: slots=64)
    "7 lanes": dict(slots=7),
    "small pool (preemptions)": dict(slots=64, kv_tokens=40 * 16),
    "graph shapes, sync 16": dict(slots=48, graphs=True, sync_every=16),
}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="float64,float32,bfloat16")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = Qwen3(SMALL, dtype=torch.float64).eval()
    prompts = torch.randint(28, SMALL.vocab_size, (args.prompts, 16), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=tuple(range(28)))
    total = args.prompts * args.n
    results = {}
    print(f"{total} sequences, up to {args.max_new_tokens} tokens; against a {total}-lane run of the same seed")
    print("| dtype | configuration | sequences that differ | median first difference (token) | preemptions |")
    print("|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        model = Qwen3(SMALL, dtype=getattr(torch, name)).eval()
        model.load_state_dict({k: v.to(getattr(torch, name)) for k, v in base.state_dict().items()})
        reference = [r.token_ids for rs in generate(model, prompts, params, seed=7, slots=total) for r in rs]
        for label, kwargs in CONFIGURATIONS.items():
            stats = {}
            tokens = [r.token_ids for rs in generate(model, prompts, params, seed=7, stats=stats, **kwargs) for r in rs]
            firsts = [f for a, b in zip(tokens, reference) if (f := first_difference(a, b)) is not None]
            median = statistics.median(firsts) if firsts else None
            results[name, label] = {"differ": len(firsts), "median_first": median, "preemptions": stats["preemptions"]}
            print(f"| {name} | {label} | {len(firsts)} of {total} | {'-' if median is None else median} | "
                  f"{stats['preemptions']} |")
    return results


if __name__ == "__main__":
    main()
