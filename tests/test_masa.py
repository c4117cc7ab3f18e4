"""masa.py: the loss against hand computations and autograd's plain policy gradient; gating, cutoff,
hints, experts and the audit on constructed inputs; prompts."""

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from config import Config, ConfigError, load_config
from masa import (Episode, LossScale, Prompt, cutoff_budgets, expert_target, gate, group_advantages,
                  hint_predictions, hint_text, meta_prompt, policy_loss, predicted_pass_rates, select_expert,
                  solution_prompt, steer, uninformative_meta_target)
from meta_prediction import MetaPrediction, parse_meta

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# The loss

# Two responses: the first has 3 tokens, the second 2 (then padding).
MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
ADV = torch.tensor([2.0, -1.0])
NEW = torch.log(torch.tensor([[1.1, 1.5, 0.5], [0.7, 1.0, 9.0]]))  # log-ratios against OLD = 0
OLD = torch.zeros(2, 3)
SCALE = LossScale(tokens=10, sequences=4, max_response_tokens=8)  # counts of a larger global batch

# Per-token PPO-clip terms with clip range [0.8, 1.28], worked by hand:
#   A = 2:  ratio 1.1 -> -2.2;  ratio 1.5 -> max(-3.0, -2.56) = -2.56;  ratio 0.5 -> max(-1.0, -1.6) = -1.0
#   A = -1: ratio 0.7 -> max(0.7, 0.8) = 0.8;  ratio 1.0 -> 1.0;  (padding: not counted)
ROW0, ROW1 = -2.2 - 2.56 - 1.0, 0.8 + 1.0


@pytest.mark.parametrize("aggregation,expected", [
    ("token-mean", (ROW0 + ROW1) / 10),
    ("seq-mean-token-mean", (ROW0 / 3 + ROW1 / 2) / 4),
    ("constant", (ROW0 + ROW1) / (4 * 8)),
])
def test_aggregation_modes_against_hand_computation(aggregation, expected):
    loss, metrics = policy_loss(NEW, OLD, ADV, MASK, SCALE, aggregation=aggregation)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["tokens"] == 5
    assert metrics["clipped_tokens"] == 2  # ratio 1.5 with A > 0 and ratio 0.7 with A < 0
    assert float(metrics["ratio_min"]) == pytest.approx(0.5) and float(metrics["ratio_max"]) == pytest.approx(1.5)


def test_a_micro_batch_without_response_tokens_adds_nothing():
    # the padding row an idle rank runs so that FSDP's collectives match (train.tensors of [])
    loss, metrics = policy_loss(NEW[:1], OLD[:1], ADV[:1], torch.zeros(1, 3), SCALE)
    assert loss.item() == 0 and all(float(metrics[k]) == 0 for k in ("tokens", "clipped_tokens", "ratio_sum"))
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0


def test_dual_clip_caps_only_the_tokens_of_negative_advantage_at_c_times_their_advantage():
    # Ratios 20 and 3 with A = -1: PPO-clip gives max(20, 1.28) = 20 and max(3, 1.28) = 3; dual-clip
    # c = 10 caps the first at 10 (and leaves it no gradient), the second stays. A = 2 with ratio 20:
    # max(-40, -2.56) = -2.56, untouched. Token mean over 3 tokens.
    new = torch.log(torch.tensor([[20.0, 3.0], [20.0, 1.0]])).requires_grad_()
    adv, mask = torch.tensor([-1.0, 2.0]), torch.tensor([[1.0, 1], [1, 0]])
    scale = LossScale(tokens=3, sequences=2, max_response_tokens=2)
    plain, _ = policy_loss(new, torch.zeros(2, 2), adv, mask, scale)
    capped, _ = policy_loss(new, torch.zeros(2, 2), adv, mask, scale, dual_clip=10.0)
    assert plain.item() == pytest.approx((20 + 3 - 2.56) / 3, rel=1e-6)
    assert capped.item() == pytest.approx((10 + 3 - 2.56) / 3, rel=1e-6)
    (grad,) = torch.autograd.grad(capped, new)
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(3 / 3) and grad[1, 0] == 0  # d(A ratio)/d log p = A ratio
    same, _ = policy_loss(NEW, OLD, ADV, MASK, SCALE, dual_clip=10.0)  # no ratio reaches 10: nothing changes
    assert same.item() == pytest.approx(policy_loss(NEW, OLD, ADV, MASK, SCALE)[0].item(), rel=1e-7)


def test_the_dual_clip_cap_scales_with_the_advantage():
    # A = -2, ratio 20: PPO-clip gives max(40, 2.56) = 40; the cap is c |A| = 20, not c = 10.
    new = torch.log(torch.tensor([[20.0]]))
    capped, _ = policy_loss(new, torch.zeros(1, 1), torch.tensor([-2.0]), torch.ones(1, 1),
                            LossScale(tokens=1, sequences=1, max_response_tokens=1), dual_clip=10.0)
    assert capped.item() == pytest.approx(20.0, rel=1e-6)


def test_micro_batch_losses_add_up_to_the_batch_loss():
    whole, _ = policy_loss(NEW, OLD, ADV, MASK, SCALE)
    parts = [policy_loss(NEW[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], SCALE)[0] for i in range(2)]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)


def test_on_policy_ratio_is_one_and_the_gradient_is_the_plain_policy_gradient():
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.6, 0.1]])).requires_grad_()
    loss, metrics = policy_loss(logprobs, logprobs.detach(), ADV, MASK, SCALE)
    loss.backward()
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["clipped_tokens"] == 0
    # REINFORCE: d/d logp of -(1/N) sum_t A_t logp_t
    expected = -ADV[:, None] * MASK / SCALE.tokens
    assert torch.allclose(logprobs.grad, expected)


def test_k3_kl_and_entropy_bonus_terms():
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    entropy = torch.tensor([[1.0, 3.0]])
    mask, adv, scale = torch.ones(1, 2), torch.zeros(1), LossScale(2, 1, 2)
    loss, metrics = policy_loss(logprobs, logprobs, adv, mask, scale, ref_logprobs=ref, kl_coef=0.5,
                                entropy=entropy, entropy_coef=0.1)
    k3 = [0.5 - torch.log(torch.tensor(0.5)).item() - 1, 0.0]  # exp(r - l) - (r - l) - 1
    assert loss.item() == pytest.approx((0.5 * sum(k3) - 0.1 * 4.0) / 2, rel=1e-6)
    assert float(metrics["kl_sum"]) == pytest.approx(sum(k3), rel=1e-6) and metrics["entropy_sum"] == 4.0


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        policy_loss(NEW, OLD, ADV, MASK, SCALE, aggregation="mean")


def test_nan_outside_the_mask_reaches_neither_the_loss_nor_the_gradient():
    # NEW, OLD, MASK from above with NaN put at masked-out positions of every per-token input
    nan = float("nan")
    poisoned = [t.clone() for t in (NEW, OLD)]
    for t in poisoned:
        t[MASK == 0] = nan
    new = poisoned[0].requires_grad_()
    ref = torch.where(MASK > 0, OLD, torch.full_like(OLD, nan))
    entropy = torch.where(MASK > 0, torch.ones_like(OLD), torch.full_like(OLD, nan))
    loss, metrics = policy_loss(new, poisoned[1], ADV, MASK, SCALE, ref_logprobs=ref, kl_coef=0.1,
                                entropy=entropy, entropy_coef=0.01)
    clean, _ = policy_loss(NEW, OLD, ADV, MASK, SCALE, ref_logprobs=OLD, kl_coef=0.1, entropy=torch.ones_like(OLD),
                           entropy_coef=0.01)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-6)
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.isfinite(new.grad).all() and (new.grad[MASK == 0] == 0).all()


def test_a_non_finite_reward_is_an_error_not_a_zero_advantage():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"rewards at positions \[2\] are not finite"):
            group_advantages(torch.tensor([1.0, 0.0, bad, 1.0]), 4)


def test_group_advantages_normalize_each_group_alone():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # sample std, as masa_kernels/ documents
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-6))
    assert (adv[4:] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Gating and cutoff


def test_gate_needs_agreement_near_zero_or_one():
    prompts = [
        [0.0] * 8,  # confidently all-wrong: gated
        [1.0] * 7 + [0.9375],  # confidently all-right (std 0.02): gated
        [0.0] * 7 + [0.5],  # mean 0.0625 > eps: not gated
        [0.5] * 8,  # agreement, but on a mixed outcome: not gated
        [0.0, 0.0, 0.25, 0.25] * 2,  # mean 0.125, std 0.125: not gated
        [0.0] * 7 + [None],  # one prediction unparseable: not gated
        [],
    ]
    assert gate(prompts, gate_std=0.1, gate_eps=0.05) == [True, True, False, False, False, False, False]


def test_gate_measures_agreement_by_the_population_std():
    # The M predictions are all there is, not a sample of something larger: their spread is the
    # population std. Seven 0s and one 0.29: population std 0.0959 (< 0.1, gated), sample std 0.1025.
    rates = [0.0] * 7 + [0.29]
    assert statistics.pstdev(rates) < 0.1 < statistics.stdev(rates)
    assert gate([rates], gate_std=0.1, gate_eps=0.05) == [True]


def test_predicted_pass_rates_are_fractions_of_the_group():
    preds = [MetaPrediction(4, 10, []), None, MetaPrediction(None, 10, [])]
    assert predicted_pass_rates(preds, 16) == [0.25, None, None]


def test_cutoff_budgets_use_the_median_prediction():
    lengths = [[100, 300, 200], [10, None, 20, None], [5000, 6000], [None, None], [1, 1]]
    assert cutoff_budgets(lengths, factor=2.0, max_response_tokens=8192) == [400, 30, 8192, 8192, 2]
    assert cutoff_budgets([[101]], factor=1.5, max_response_tokens=8192) == [152]  # ceil(151.5)
    assert cutoff_budgets([[10, 10, 100]], factor=2.0, max_response_tokens=8192) == [20]  # median 10 (mean: 40)


def steered(predictions: list[list[tuple[int, int]]], **efficient) -> list[Prompt]:
    """Prompts after masa.steer at step 0, G = 16, from each prompt's (pass_rate, length) predictions."""
    cfg = Config()
    prompts = [Prompt(i, f"problem {i}", "1") for i in range(len(predictions))]
    meta = [Episode(i, "meta", [1], [2], prediction=MetaPrediction(k, n, [])) for i, ps in enumerate(predictions)
            for k, n in ps]
    switches = replace(cfg.efficient, gating=True, cutoff=True, gate_start_step=0, **efficient)
    steer(prompts, meta, switches, 0, 16, 8192, [0] * len(prompts), cfg.prompt)
    return prompts


def test_steer_gates_with_the_configured_std_and_eps():
    # gate_std 0.1, gate_eps 0.05. Every prediction "1 of 16": std 0 but mean 0.0625 > eps, not gated
    # (were std and eps swapped, it would be). Fifteen "0 of 16" and one "5 of 16": mean 0.0195,
    # population std 0.0756 < 0.1, gated (swapped: 0.0756 > 0.05, not gated).
    prompts = steered([[(1, 50)] * 16, [(0, 50)] * 15 + [(5, 50)]], gate_std=0.1, gate_eps=0.05)
    assert [p.gated for p in prompts] == [False, True]


def test_steer_sets_budgets_with_the_configured_cutoff_factor():
    # Median predicted length 10 (and 101): budget ceil(factor x median), capped at the response budget.
    predictions = [[(8, 10), (8, 9), (8, 30)], [(8, 101)], [(8, 6000)]]
    assert [p.budget for p in steered(predictions, cutoff_factor=1.5)] == [15, 152, 8192]
    assert [p.budget for p in steered(predictions, cutoff_factor=2.0)] == [20, 202, 8192]


# ---------------------------------------------------------------------------------------------------
# Hints, experts, audit


def test_hint_picks_one_prediction_that_has_notions():
    preds = [None, MetaPrediction(1, 2, []), MetaPrediction(1, 2, ["carry"]), MetaPrediction(1, 2, ["borrow"])]
    picks = {tuple(p.notions) for s in range(20) for p in hint_predictions(preds, torch.Generator().manual_seed(s))}
    assert picks == {("carry",), ("borrow",)}
    assert hint_predictions([None, MetaPrediction(1, 2, [])], torch.Generator()) == []
    # with the length, a prediction that gave only a length is a candidate too
    assert hint_predictions([None, MetaPrediction(1, 2, [])], torch.Generator(), with_length=True) == \
        [MetaPrediction(1, 2, [])]


def test_per_rollout_hints_draw_one_prediction_per_rollout():
    preds = [MetaPrediction(1, 10 * k, [f"notion{k}"]) for k in range(5)]
    one = hint_predictions(preds, torch.Generator().manual_seed(3), draws=1)
    many = hint_predictions(preds, torch.Generator().manual_seed(3), draws=16)
    assert len(many) == 16 and many[0] == one[0]  # the shared hint is the first per-rollout draw
    assert len({p.solution_length for p in many}) > 1  # 16 draws from 5 are not all the same (seed 3)


def test_hint_text_with_and_without_the_length():
    cfg = Config()
    p = MetaPrediction(3, 250, ["modular arithmetic", "x" * 100] + [f"n{i}" for i in range(10)])
    notions = ", ".join(["modular arithmetic", "x" * 80] + [f"n{i}" for i in range(6)])  # 8 kept, 80 chars each
    assert hint_text(p, cfg.prompt) == f" Notions that may help: {notions}."
    assert hint_text(p, cfg.prompt, with_length=True) == \
        f" Notions that may help: {notions}. A correct solution takes about 250 tokens."
    assert hint_text(MetaPrediction(3, 250, []), cfg.prompt, with_length=True) == \
        " A correct solution takes about 250 tokens."
    assert hint_text(MetaPrediction(3, None, []), cfg.prompt, with_length=True) == ""


def test_the_released_configs_hint_is_the_released_text():
    # masa_ray_trainer.py:290-300 appends "\n\n" and a sentence built with f-strings from the drawn JSON;
    # the notions are the list itself, so Python writes its repr
    intent = load_config(ROOT / "configs" / "qwen3_8b_released_intent.yaml")
    problem = "Find x if 2x + 3 = 7."
    for notions, length in ((["linear equation", "isolating a variable"], 180), (["Euler's theorem"], 95)):
        released = f" The problem could be solved using following math notions: {notions}. "
        released += f" The solution length in token level should be {length}."
        hinted = solution_prompt(problem, intent.prompt.solution,
                                 hint_text(MetaPrediction(4, length, notions), intent.prompt, with_length=True))
        assert hinted == solution_prompt(problem, intent.prompt.solution) + "\n\n" + released


def test_expert_is_the_best_meta_rollout_above_the_threshold():
    assert select_expert([0.2, 0.95, 0.95, 0.4], threshold=0.9) == 1  # first of the tied best
    assert select_expert([0.2, 0.85], threshold=0.9) is None
    assert select_expert([0.5, 0.9], threshold=0.9) == 1  # reaching the threshold is enough
    assert select_expert([], threshold=0.0) is None


def test_the_expert_rule_picks_by_the_meta_reward_or_by_the_notion_part():
    from masa import Episode, Prompt, expert_targets

    prompt = Prompt(0, "What is 7+8?", "15")
    solutions = [Episode(0, "solution", [1], [2] * n, reward=r) for n, r in ((30, 1.0), (50, 1.0), (9, 0.0))]
    # m0: best meta reward, weak notions; m1: perfect notions, poor reward; m2: unparseable
    meta = [Episode(0, "meta", [1], [3], "<meta>a</meta>", prediction=MetaPrediction(2, 40, ["sum"]), reward=0.8,
                    meta_parts={"pass_rate": 1.0, "length": 1.0, "notion": 0.4}),
            Episode(0, "meta", [1], [3], "<meta>b</meta>", prediction=MetaPrediction(0, 5, ["carry"]), reward=0.34,
                    meta_parts={"pass_rate": 0.01, "length": 0.0, "notion": 1.0}),
            Episode(0, "meta", [1], [3], "junk", prediction=None, reward=0.0,
                    meta_parts={"pass_rate": 0.0, "length": 0.0, "notion": 0.0})]
    target = '\n{"math_notion": [%s], "pass_rate": 2, "solution_length": 40}'  # 2 correct, median of 30 and 50
    assert expert_targets([prompt], solutions, meta, 0.5) == [(prompt, "<meta>a</meta>" + target % '"sum"')]
    assert expert_targets([prompt], solutions, meta, 0.2, "notion") == [(prompt, "<meta>b</meta>" + target % '"carry"')]
    assert expert_targets([prompt], solutions, meta, 0.9) == []  # 0.8 is below
    assert expert_targets([prompt], solutions, meta, 0.9, "notion") != []  # 1.0 is not
    # no correct solution rollout: the true length is unknown, no expert under either rule
    assert expert_targets([prompt], solutions[2:], meta, 0.2, "notion") == []
    with pytest.raises(ValueError, match="use score or notion"):
        expert_targets([prompt], solutions, meta, 0.2, "total")


def test_expert_target_parses_back_to_the_same_values():
    response = 'Hmm. <meta>Two-digit sums need one carry.</meta>\n{"math_notion": ["carry"], "pass_rate": 3}'
    prediction = parse_meta(response, group_size=4)
    target = expert_target(response, prediction, correct_lengths=[40, 44, 47], num_correct=3)
    assert target.startswith("<meta>Two-digit sums need one carry.</meta>\n")
    parsed = parse_meta(target, group_size=4, max_length=8192)
    assert (parsed.pass_rate, parsed.solution_length, parsed.notions) == (3, 44, ["carry"])
    assert json.loads(target.split("\n", 1)[1]) == {"math_notion": ["carry"], "pass_rate": 3, "solution_length": 44}


def test_expert_target_without_meta_tags_or_ascii():
    prediction = MetaPrediction(1, 12, ["Möbius inversion"])
    parsed = parse_meta(expert_target("no tags here", prediction, [], num_correct=0))
    assert (parsed.pass_rate, parsed.solution_length, parsed.notions) == (0, 12, ["Möbius inversion"])


# ---------------------------------------------------------------------------------------------------
# Prompts


def test_meta_prompt_states_the_group_size_and_the_response_budget():
    cfg = Config()
    text = meta_prompt(r"Find $\frac{a}{b}$ if {x} = 2.", cfg.prompt.meta, group_size=16, max_length=8192)
    assert r"Find $\frac{a}{b}$ if {x} = 2." in text  # braces in the problem survive
    assert "from 0 to 16" in text and "from 1 to 8192" in text
    assert "{group_size}" not in text and "{max_length}" not in text


def test_solution_prompt_with_and_without_a_hint():
    cfg = Config()
    plain = solution_prompt("What is 2+2?", cfg.prompt.solution)
    assert plain == r"What is 2+2? Let's think step by step and output the final answer within \boxed{}."
    hinted = solution_prompt("What is 2+2?", cfg.prompt.solution,
                             hint_text(MetaPrediction(1, None, ["addition", "carry"]), cfg.prompt))
    assert hinted == plain + " Notions that may help: addition, carry."


def test_templates_must_keep_their_placeholders():
    with pytest.raises(ConfigError, match="'prompt.meta' must contain {group_size}"):
        load_config(None, ["prompt.meta=Predict {problem} in {max_length} tokens"])


def test_uninformative_meta_targets_parse_and_spread_over_their_ranges():
    import random

    rng = random.Random(0)
    parsed = [parse_meta(uninformative_meta_target(rng, 16, 64, ["carry", "borrow"]), 16, 64) for _ in range(2000)]
    assert all(p is not None for p in parsed)
    assert {p.pass_rate for p in parsed} == set(range(17))  # every value occurs: uniform on 0..G
    assert min(p.solution_length for p in parsed) == 1 and max(p.solution_length for p in parsed) == 64
    assert {tuple(sorted(p.notions)) for p in parsed} == {("carry",), ("borrow",), ("borrow", "carry")}
    counts = [sum(p.pass_rate == v for p in parsed) for v in range(17)]
    assert max(counts) / min(counts) < 2  # roughly flat, about 118 each
