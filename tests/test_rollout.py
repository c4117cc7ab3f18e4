"""rollout.py: greedy output against transformers, log-probs against a teacher-forced forward,
sampling frequencies against the model's probabilities, and the exact stopping rules."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from model import PRESETS, Qwen3
from rollout import SamplingParams, _DecodeGraphs, generate, sample

PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 31], [70], [4, 4, 90, 12]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint)."""
    from conftest import TINY_HF_CONFIGS, make_hf_model

    hf = make_hf_model(0, **TINY_HF_CONFIGS["tied-gqa4-bias"])
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf, Qwen3.from_pretrained(path).eval()


def hf_greedy(hf, prompt, n_tokens):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_logprobs(model, prompt, tokens, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()  # [len(tokens), V]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("slots", [2, 5, 64])
def test_greedy_matches_transformers_and_does_not_depend_on_the_pool_size(pair, slots):
    hf, model = pair
    out = generate(model, PROMPTS, SamplingParams(n=3, temperature=0, max_new_tokens=24), slots=slots)
    for prompt, rollouts in zip(PROMPTS, out):
        expected = hf_greedy(hf, prompt, 24)
        assert [r.token_ids for r in rollouts] == [expected] * 3
        assert all(r.finish_reason == "length" for r in rollouts)


def test_refill_with_a_sync_interval_gives_the_same_greedy_output(pair):
    _, model = pair
    params = SamplingParams(n=2, temperature=0, max_new_tokens=16, stop_token_ids=(3,))
    reference = generate(model, PROMPTS, params, slots=64)
    refilled = generate(model, PROMPTS, params, slots=3, sync_every=5)
    for ours, ref in zip(sum(refilled, []), sum(reference, [])):
        assert (ours.token_ids, ours.finish_reason) == (ref.token_ids, ref.finish_reason)
        assert torch.allclose(torch.tensor(ours.logprobs), torch.tensor(ref.logprobs), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_teacher_forced_forward(pair, temperature):
    _, model = pair
    out = generate(model, PROMPTS, SamplingParams(n=2, temperature=temperature, max_new_tokens=20), seed=0, slots=3)
    for prompt, rollouts in zip(PROMPTS, out):
        for r in rollouts:
            expected = teacher_forced_logprobs(model, prompt, r.token_ids, temperature)
            assert (torch.tensor(r.logprobs) - expected).abs().max() <= 1e-4


def test_logprobs_with_top_k_are_renormalized_over_the_kept_tokens(pair):
    _, model = pair
    (r,), = generate(model, [PROMPTS[1]], SamplingParams(temperature=0.9, top_k=5, max_new_tokens=12), seed=1)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1] + r.token_ids]))[0, len(PROMPTS[1]) - 1:-1] / 0.9
    kept = logits.topk(5, dim=-1)
    renormalized = torch.log_softmax(kept.values, -1)
    for i, t in enumerate(r.token_ids):
        assert t in kept.indices[i].tolist()
        assert abs(r.logprobs[i] - renormalized[i][kept.indices[i].tolist().index(t)].item()) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Sampling frequencies

# chi-square critical values at significance 0.001 for 1..7 degrees of freedom (standard tables)
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def filtered_probs(logits, temperature, top_k, top_p):
    """The distribution a sampler should draw from, computed independently in float64."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k > 0 and rank >= top_k) or mass >= top_p:
            break
        keep[i] = True
        mass += p[i].item()
    return torch.where(keep, p, 0) / p[keep].sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.0, 3, 1.0), (1.2, -1, 0.75)])
def test_sampled_frequencies_match_the_model_probabilities(temperature, top_k, top_p):
    torch.manual_seed(0)
    model = Qwen3(replace(PRESETS["tiny"], vocab_size=8, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # next-token probabilities from ~0.03 to ~0.22
    prompt = [1, 2, 3]
    with torch.no_grad():
        probs = filtered_probs(model(torch.tensor([prompt]))[0, -1], temperature, top_k, top_p)
    draws = 4000
    out = generate(model, [prompt], SamplingParams(n=draws, temperature=temperature, top_k=top_k, top_p=top_p,
                                                   max_new_tokens=1), seed=123)
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in out[0]]), minlength=8).double()
    kept = probs > 0
    assert (counts[~kept] == 0).all(), "a filtered-out token was sampled"
    expected = probs[kept] * draws
    assert expected.min() >= 5, "the test needs every kept token to be reasonably likely"
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_CRITICAL[int(kept.sum()) - 1]


def test_sample_keeps_at_least_the_most_likely_token_under_a_tiny_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    zero = torch.zeros(1, dtype=torch.long)
    tokens, logprobs = sample(logits, SamplingParams(top_p=1e-6), 0, zero, zero, zero)
    assert tokens.tolist() == [1] and logprobs.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------------
# Stopping rules


def test_stop_tokens_budgets_and_max_new_tokens_are_exact(pair):
    hf, model = pair
    greedy = [hf_greedy(hf, p, 30) for p in PROMPTS]
    stop = greedy[0][6]  # the 7th greedy token of prompt 0 becomes a stop token
    params = SamplingParams(n=2, temperature=0, max_new_tokens=30, stop_token_ids=(stop,))
    budgets = [None, 4, 30, 11]
    out = generate(model, PROMPTS, params, budgets=budgets, slots=3)
    for p, rollouts in enumerate(out):
        first_stop = greedy[p].index(stop) if stop in greedy[p] else None
        limit = budgets[p] or 30
        if first_stop is not None and first_stop < limit:
            expected, reason = greedy[p][:first_stop + 1], "stop"  # the stop token is kept
        else:
            expected, reason = greedy[p][:limit], "cutoff" if limit < 30 else "length"
        for r in rollouts:
            assert (r.token_ids, r.finish_reason) == (expected, reason)
            assert len(r.logprobs) == len(r.token_ids)
    assert out[0][0].finish_reason == "stop" and out[1][0].finish_reason == "cutoff"


def test_any_of_several_stop_tokens_stops_a_sequence(pair):
    # Qwen3 runs stop on two ids (<|endoftext|>, <|im_end|>): here only the second one ever occurs.
    hf, model = pair
    greedy = [hf_greedy(hf, p, 30) for p in PROMPTS]
    stop = greedy[0][6]
    absent = next(t for t in range(97) if all(t not in g for g in greedy))
    out = generate(model, PROMPTS[:1], SamplingParams(n=1, temperature=0, max_new_tokens=30,
                                                      stop_token_ids=(absent, stop)))
    first_stop = greedy[0].index(stop)
    assert (out[0][0].token_ids, out[0][0].finish_reason) == (greedy[0][:first_stop + 1], "stop")


def test_one_token_and_single_token_prompts(pair):
    hf, model = pair
    out = generate(model, [[70], [5, 17, 3]], SamplingParams(n=2, temperature=0, max_new_tokens=1))
    assert [r.token_ids for r in out[0]] == [hf_greedy(hf, [70], 1)] * 2
    assert all(r.finish_reason == "length" for rs in out for r in rs)


# ---------------------------------------------------------------------------------------------------
# Reproducibility, progress, errors


def test_the_same_seed_gives_the_same_tokens(pair):
    _, model = pair
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16)
    first = generate(model, PROMPTS, params, seed=7, slots=6)
    assert generate(model, PROMPTS, params, seed=7, slots=6) == first
    assert generate(model, PROMPTS, params, seed=8, slots=6) != first


def test_progress_bar_counts_sequences(pair, capsys):
    _, model = pair
    generate(model, PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=4), progress=True)
    assert "8/8" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[1], []]), "at least one token"),
    (dict(budgets=[3]), "one positive budget"),
    (dict(budgets=[0, None]), "one positive budget"),
])
def test_bad_requests_are_refused(pair, kwargs, message):
    _, model = pair
    args = dict(prompts=[[1, 2], [3]], budgets=None) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args["prompts"], SamplingParams(), budgets=args["budgets"])


def test_bad_sampling_params_are_refused():
    for kwargs in (dict(n=0), dict(top_p=0.0), dict(top_k=0), dict(temperature=-1.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_log_of_a_probability_is_never_positive(pair):
    _, model = pair
    out = generate(model, PROMPTS, SamplingParams(n=2, top_p=0.9, max_new_tokens=8), seed=3)
    assert all(lp <= 1e-6 and math.isfinite(lp) for rs in out for r in rs for lp in r.logprobs)


def test_per_prompt_sample_counts(pair):
    hf, model = pair
    out = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=6), counts=[3, 0, 1, 2], slots=4)
    assert [len(rs) for rs in out] == [3, 0, 1, 2]
    assert [r.token_ids for r in out[3]] == [hf_greedy(hf, PROMPTS[3], 6)] * 2
    assert generate(model, PROMPTS[:1], SamplingParams(), counts=[0]) == [[]]


def test_no_decode_step_is_wasted_once_every_sequence_must_be_done(pair):
    _, model = pair
    stats = {}
    generate(model, PROMPTS, SamplingParams(n=2, max_new_tokens=2), sync_every=16, stats=stats)
    assert stats["decode_steps"] == 2


def test_engine_counters_count_steps_sequences_and_positions(pair):
    """rollout.EngineStats, which bench/sampler.py turns into decode bounds, against a hand count: one
    3-token prompt, 2 samples, 4 tokens each (no stop token). The prompt's first 2 tokens are
    prefilled; decode step t (t = 0..3) of a sample writes position 2 + t and reads positions 0..2 + t.
    In 2 lanes both samples decode together; in 1 lane, one after the other (the second queued for 4 steps)."""
    _, model = pair
    read = 2 * (3 + 4 + 5 + 6)
    for lanes, steps in [(2, 4), (1, 8)]:
        stats = {}
        out = generate(model, [[4, 8, 15]], SamplingParams(n=2, max_new_tokens=4), seed=0, slots=lanes, stats=stats)
        assert all(len(r.token_ids) == 4 for r in out[0])
        queued = 4 if lanes == 1 else 0
        assert stats == {"decode_steps": steps, "rows_decoded": 8, "live_sequences": 8, "peak_live_sequences": lanes,
                         "kv_positions_read": read, "kv_positions_live": read, "generated_tokens": 8,
                         "preemptions": 0, "recomputed_tokens": 0, "queued_steps": queued,
                         "queued_live_sequences": queued}


# ---------------------------------------------------------------------------------------------------
# The paged pool: independence of lanes, pool size and preemption


@pytest.fixture(scope="module")
def float64_model():
    """A tiny random model in float64, so that a different batch composition cannot move a logit far
    enough to change a sampled token: what is left to differ is the sampler's own logic."""
    torch.manual_seed(3)
    return Qwen3(replace(PRESETS["tiny"], vocab_size=64), dtype=torch.float64).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_tokens_do_not_depend_on_lanes_pool_size_or_preemption(float64_model, dtype):
    # float32 too (on this CPU); bfloat16 logits do move with the batch: bench/sampler_invariance.py
    # measures by how much, and the README says what holds there
    model = copy.deepcopy(float64_model).to(dtype)  # .to moves a module in place
    prompts = [[1, 2, 3] * 7, [5, 9], list(range(10, 27)), [7]]  # 21 tokens (a shared full block), 2, 17, 1
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=40, stop_token_ids=(0, 1, 2))  # lengths vary
    runs = {}
    for name, kwargs in {"1 lane": dict(slots=1), "3 lanes": dict(slots=3), "64 lanes": dict(slots=64),
                         "small pool": dict(slots=12, kv_tokens=7 * 16),
                         # CUDA graphs' fixed shapes (batch-size buckets, full-width kv_len), run eagerly
                         "graph shapes": dict(slots=5, graphs=True, sync_every=16),
                         "graph shapes, small pool": dict(slots=12, kv_tokens=7 * 16, graphs=True, sync_every=4),
                         }.items():
        stats = {}
        out = generate(model, prompts, params, seed=11, stats=stats, **kwargs)
        runs[name] = ([[r.token_ids for r in rs] for rs in out], [[r.logprobs for r in rs] for rs in out], stats)
    reference = runs["64 lanes"]
    for name, (tokens, logprobs, _) in runs.items():
        assert tokens == reference[0], name
        assert max(abs(a - b) for x, y in zip(logprobs, reference[1]) for u, v in zip(x, y)
                   for a, b in zip(u, v)) <= (1e-6 if dtype == torch.float64 else 1e-4), name
    assert runs["small pool"][2]["preemptions"] > 0  # the pool really ran out
    assert runs["graph shapes, small pool"][2]["preemptions"] > 0
    assert len({len(t) for ts in reference[0] for t in ts}) > 3  # sequences finish at different steps...
    for name in ("3 lanes", "small pool"):  # ...and the lanes they free are filled from above (compact)
        assert runs[name][2]["rows_decoded"] == runs[name][2]["live_sequences"], name
    assert runs["64 lanes"][2]["preemptions"] == 0
    assert runs["1 lane"][2]["peak_live_sequences"] == 1


def test_decode_graphs_run_the_smallest_batch_size_that_covers_the_lanes():
    calls = []
    graphs = _DecodeGraphs(lambda rows, kv_len: calls.append((rows, kv_len)), lanes=40, kv_len=96, capture=False)
    assert [graphs.run(r) for r in (1, 3, 4, 5, 33, 40)] == [1, 4, 4, 8, 40, 40]
    assert calls == [(1, 96), (4, 96), (4, 96), (8, 96), (40, 96), (40, 96)]  # kv_len: always the table's width


def test_a_sequence_samples_its_own_stream(float64_model):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12)
    alone = generate(float64_model, [[4, 5, 6]], params, seed=2, streams=[7])
    together = generate(float64_model, [[9, 9], [4, 5, 6]], params, seed=2, streams=[3, 7])
    assert [r.token_ids for r in together[1]] == [r.token_ids for r in alone[0]]
    other = generate(float64_model, [[4, 5, 6]], params, seed=2, streams=[8])
    assert [r.token_ids for r in other[0]] != [r.token_ids for r in alone[0]]


def test_the_noise_of_a_token_is_keyed_by_its_index_in_the_response(float64_model, monkeypatch):
    # The key is (seed, stream, sample, t) with t = 0 for the first response token, whatever the prompt's
    # length: a resumed or preempted sequence, or the same response after a longer prompt, draws alike.
    import rollout

    keys = []

    def recording(logits, params, seed, streams, samples, positions):
        keys.append((seed, streams.tolist(), samples.tolist(), positions.tolist()))
        return real(logits, params, seed, streams, samples, positions)

    real = rollout.sample
    monkeypatch.setattr(rollout, "sample", recording)
    generate(float64_model, [[4, 5, 6, 7, 8]], SamplingParams(n=2, temperature=1.0, max_new_tokens=5), seed=3,
             streams=[7])
    assert keys[:5] == [(3, [7, 7], [0, 1], [t, t]) for t in range(5)]


def test_first_samples_continue_a_prompts_draws(float64_model):
    # per-rollout hints: G requests of one sample each, rollout j as sample j of the prompt's stream
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12)
    together = generate(float64_model, [[4, 5, 6]], params, seed=2, streams=[7])
    apart = generate(float64_model, [[4, 5, 6]] * 4, params, seed=2, streams=[7] * 4, counts=[1] * 4,
                     first_samples=[0, 1, 2, 3])
    assert [rs[0].token_ids for rs in apart] == [r.token_ids for r in together[0]]
    assert len({tuple(r.token_ids) for r in together[0]}) > 1  # the samples do differ
    with pytest.raises(ValueError, match="first_samples must give one sample number"):
        generate(float64_model, [[4, 5, 6]], params, first_samples=[-1])


def test_a_pool_too_small_for_one_sequence_is_refused_with_the_memory_it_needs(pair):
    _, model = pair
    # 19 prefilled positions + a 30-token budget = 49 positions: 4 blocks, and the prompt's partial
    # block alongside the sample's copy of it
    with pytest.raises(ValueError, match=r"the KV pool holds 2 blocks of 16 positions .* 49 positions\) needs 5"):
        generate(model, [[1] * 20], SamplingParams(max_new_tokens=30), kv_tokens=32)


def test_every_pool_the_engine_accepts_runs_to_completion(float64_model, monkeypatch):
    # A 40-token prompt, 4 samples of up to 200 tokens, 2 lanes: 239 positions, 16 blocks for one
    # sequence with its prompt's partial block alongside. A preempted sample is recomputed in blocks of
    # its own while the prompt's prefix is still held for the samples not yet admitted: with 16 or 17
    # blocks that once left no room to readmit it (an assertion in schedule).
    import rollout

    prefilled = []
    real = rollout._Engine.prefill
    monkeypatch.setattr(rollout._Engine, "prefill", lambda self, tokens, blocks: prefilled.append(len(tokens))
                        or real(self, tokens, blocks))
    prompt = [(7 * i) % 60 + 3 for i in range(40)]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=200)
    reference = generate(float64_model, [prompt], params, seed=5, slots=2)
    for blocks in range(16, 21):
        for kwargs in (dict(sync_every=1), dict(sync_every=16, graphs=True)):
            stats, prefilled[:] = {}, []
            out = generate(float64_model, [prompt], params, seed=5, slots=2, kv_tokens=blocks * 16, stats=stats,
                           **kwargs)
            assert [r.token_ids for r in out[0]] == [r.token_ids for r in reference[0]], (blocks, kwargs)
            if blocks == 16:
                assert stats["preemptions"] > 0
            # the prompt's prefix is 39 tokens; a preempted sample's recompute is prompt + tokens - 1 >= 40
            assert stats["recomputed_tokens"] == sum(n for n in prefilled if n >= 40), (blocks, kwargs)


def test_padding_lanes_read_one_position_and_the_counter_counts_what_attention_reads(float64_model, monkeypatch):
    # On the graph path a step runs a whole batch-size bucket: the lanes past the occupied ones hold no
    # sequence and must not attend to more than their one trash position, however long the run.
    import masa_kernels

    model = float64_model
    lengths = []

    def recording(q, k_pool, v_pool, table, seq_lens, max_len, *args, **kwargs):
        lengths.append(seq_lens.tolist())
        return real(q, k_pool, v_pool, table, seq_lens, max_len, *args, **kwargs)

    real = masa_kernels.paged_decode_attention
    monkeypatch.setattr(masa_kernels, "paged_decode_attention", recording)
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 31], [4, 4, 50, 12]]  # no 2-token prompt: its 1-token prefill
    for kwargs in (dict(slots=6, graphs=True, sync_every=1), dict(slots=5, graphs=True, sync_every=4),
                   dict(slots=5, graphs=True, sync_every=16), {}):
        lengths.clear()
        stats = {}
        out = generate(model, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=40, stop_token_ids=(3, 7)),
                       seed=1, stats=stats, **kwargs)
        layers = model.config.num_hidden_layers
        per_step = lengths[::layers]  # every layer reads the same positions
        assert stats["kv_positions_read"] == sum(map(sum, per_step)), kwargs
        longest = max(len(p) + 40 for p in prompts)
        assert max(map(max, per_step)) <= longest, kwargs
        occupied = [sum(n > 1 for n in step) for step in per_step]
        assert sum(occupied) <= stats["live_sequences"], kwargs
        assert len({len(r.token_ids) for rs in out for r in rs}) > 1  # sequences end at different steps


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_decode_step_never_syncs_with_the_host_even_with_16_stop_ids(pair, temperature):
    # A CUDA graph cannot capture a host sync. torch.isin takes a sorting path from about 10 test
    # elements, which syncs on CUDA: the step must not use it (nor any op that reads a device value back).
    from torch.utils._python_dispatch import TorchDispatchMode

    import rollout

    syncing = {"isin", "nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive", "item"}
    seen = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    _, model = pair
    stop = tuple(range(40, 56))  # 16 stop ids
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=30, stop_token_ids=stop)
    real_step = rollout._Engine.step

    def watched(self, R, kv_len):
        with Ops():
            return real_step(self, R, kv_len)

    rollout._Engine.step = watched
    try:
        out = generate(model, PROMPTS, params, seed=4, slots=3, graphs=True, sync_every=16)
    finally:
        rollout._Engine.step = real_step
    assert seen and not seen & syncing, sorted(seen & syncing)
    reference = generate(model, PROMPTS, params, seed=4, slots=64)  # eager, one lane per sequence
    assert [[r.token_ids for r in rs] for rs in out] == [[r.token_ids for r in rs] for rs in reference]
    for rs in out:
        for r in rs:  # each stops at its first stop id, or runs to the end
            first = next((i for i, t in enumerate(r.token_ids) if t in stop), None)
            assert (r.finish_reason, len(r.token_ids)) == (("stop", first + 1) if first is not None else ("length", 30))


def test_the_pool_and_the_lanes_keep_their_invariants_through_a_run_with_preemptions(float64_model, monkeypatch):
    import rollout

    real = rollout._Engine.schedule
    checks = []

    def checked(self):
        real(self)
        running = self.lanes.running()
        self.scheduler.pool.check(self.scheduler.holders(running))
        self.lanes.check()
        checks.append(len(running))

    monkeypatch.setattr(rollout._Engine, "schedule", checked)
    prompts = [[1, 2, 3] * 7, [5, 9], list(range(10, 27)), [7]]
    stats = {}
    generate(float64_model, prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=40, stop_token_ids=(0, 1, 2)),
             seed=11, slots=12, kv_tokens=7 * 16, graphs=True, sync_every=4, stats=stats)
    assert stats["preemptions"] > 0 and len(checks) > 10


def test_a_graph_replay_is_counted_in_the_kernel_usage(monkeypatch):
    # A replay launches the step's kernels without running their Python calls, which is where
    # masa_kernels counts them: the replays are counted instead. (A captured size holds a CUDAGraph;
    # on a CPU nothing is captured, so one stands in here.)
    from types import SimpleNamespace

    import masa_kernels

    monkeypatch.setattr(masa_kernels, "usage", type(masa_kernels.usage)())
    eager = []
    graphs = _DecodeGraphs(lambda rows, kv_len: eager.append(rows), lanes=8, kv_len=32, capture=False)
    replayed = []
    graphs.graphs[4] = SimpleNamespace(replay=lambda: replayed.append(4))
    assert [graphs.run(3), graphs.run(4), graphs.run(7)] == [4, 4, 8]
    assert replayed == [4, 4] and eager == [8]
    assert masa_kernels.usage_report() == "decode step: cuda graph x 2"
