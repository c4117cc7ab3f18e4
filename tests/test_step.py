"""The MASA step assembled: masa_step.collect with a scripted sampler and grader in place of the model
and the grader pool, every output checked against values worked out by hand in this file. Start here
to learn the method: the script below is one step's rollouts, and each test is one claim about what
the step makes of them.

The script (G = 4 solution and M = 3 meta rollouts per prompt, so a G/M mix-up cannot hide; response
budget 100 tokens; a character tokenizer, so a response of n characters plus its stop token is n + 1
tokens):
  P0  2+3=5    meta: 3 x pass_rate 4 of 4                 -> gated (predicted all-right)
  P1  4+4=8    meta: one with notions, one without, one unparseable; median length 8 -> budget 16;
               solutions: right, wrong but cut, right but cut (so reward 0), right
  P2  9+9=18   meta: pass rates 0, 0, 1 (mean 1/12 > gate_eps: not gated), lengths 20 -> budget 40;
               solutions: one right (20 tokens), three wrong
  P3  1+1=2    meta: 3 x pass_rate 0                       -> gated (predicted all-wrong)
The audit then runs P0 and P3's solutions after all (P0: 3 right, 1 wrong; P3: all wrong) and
continues P1's two cut rollouts (one would have ended right, one wrong).
"""

import math
import statistics
from pathlib import Path

import pytest
import torch

import masa_step
from config import load_config
from data import build_char_tokenizer
from parallel import Env
from rewards import Grades
from rollout import Rollout


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
G, M, BUDGET = 4, 3, 100
PROBLEMS = [{"problem": "What is 2+3?", "answer": "5"}, {"problem": "What is 4+4?", "answer": "8"},
            {"problem": "What is 9+9?", "answer": "18"}, {"problem": "What is 1+1?", "answer": "2"}]
META = {
    "2+3": ['{"math_notion": ["addition"], "pass_rate": 4, "solution_length": 9}'] * 3,
    "4+4": ['<meta>a carry</meta>{"math_notion": ["carry"], "pass_rate": 2, "solution_length": 12}',
            '{"pass_rate": 3, "solution_length": 4}',
            "no idea"],
    "9+9": ['{"math_notion": ["addition"], "pass_rate": 0, "solution_length": 20}'] * 2
           + ['{"math_notion": ["addition"], "pass_rate": 1, "solution_length": 20}'],
    "1+1": ['{"math_notion": [], "pass_rate": 0, "solution_length": 5}'] * 3,
}
SOLUTIONS = {
    "4+4": ["\\boxed{8}", "\\boxed{7} because seven", "\\boxed{8} and then more words", "carry\\boxed{8}"],
    "9+9": ["addition \\boxed{18}", "\\boxed{17}", "\\boxed{17}", "\\boxed{17}"],
    "2+3": ["\\boxed{5}"] * 3 + ["\\boxed{6}"],  # the audit's rollouts of the gated prompts
    "1+1": ["\\boxed{3}"] * 4,
}
CONTINUATIONS = {"\\boxed{7} becaus": "e it is \\boxed{8}", "\\boxed{8} and th": "en \\boxed{9}"}


class ScriptedSampler:
    """Stands in for rollout.generate on a model: answers each prompt from the script above, honouring
    counts and budgets as the real sampler does (a budget below max_new_tokens that is reached: "cutoff")."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, prompts, params, budgets=None, seed=None, *, counts=None, first_samples=None, **kwargs):
        counts = counts or [params.n] * len(prompts)
        budgets = budgets or [None] * len(prompts)
        first_samples = first_samples or [0] * len(prompts)
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append({"prompts": texts, "counts": list(counts), "budgets": list(budgets),
                           "first_samples": list(first_samples), "stop": params.stop_token_ids})
        return [[self.rollout(text, first + j, budget, params.max_new_tokens) for j in range(n)]
                for text, n, budget, first in zip(texts, counts, budgets, first_samples)]

    def rollout(self, prompt: str, j: int, budget, max_new: int) -> Rollout:
        user, so_far = prompt.split("<|im_start|>assistant\n")
        key = next(k for k in META if f"What is {k}?" in user)
        if so_far:
            text = CONTINUATIONS[so_far]
        else:
            text = (META if "<|im_start|>user\nDo not solve" in user else SOLUTIONS)[key][j]
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        limit = min(budget or max_new, max_new)
        if len(ids) > limit:
            return Rollout(ids[:limit], [0.0] * limit, "cutoff" if limit < max_new else "length")
        return Rollout(ids, [0.0] * len(ids), "stop")


def scripted_grades(responses, answers):
    """Stands in for rewards.grade_batch: right when the last \\boxed{} holds exactly the answer."""
    last = [r.rsplit("\\boxed{", 1)[-1].split("}")[0] if "\\boxed{" in r else None for r in responses]
    return Grades([x == a for x, a in zip(last, answers)], last)


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """One masa_efficient step (step 0: gating, cutoff, hints, behaviour cloning and the audit all on)."""
    tokenizer = build_char_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cfg = load_config(CONFIG, ["algorithm=masa_efficient", f"rollout.group_size={G}", f"rollout.meta_group_size={M}",
                               f"rollout.max_response_tokens={BUDGET}", "train.batch_size=4",
                               "efficient.bc_threshold=0.9", "efficient.gate_eps=0.05", "efficient.gate_std=0.1",
                               "efficient.cutoff_factor=2.0"])
    sampler = ScriptedSampler(tokenizer)
    data = masa_step.collect(cfg, 0, Env(0, 1, torch.device("cpu")), tokenizer, PROBLEMS, sampler, scripted_grades)
    return cfg, tokenizer, sampler, data


def episodes(data, path, prompt):
    return [e for e in data.episodes if e.path == path and e.prompt_index == prompt]


def normalized(rewards):
    """(r - mean) / (sample std + 1e-6) of one group, 0 when all are equal (docs/method.md §1, step 3)."""
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    return [0.0] * len(rewards) if std == 0 else [(r - mean) / (std + 1e-6) for r in rewards]


# Meta scores worked by hand (b = 0.01; pass rate part b ** |p_true - k / G|):
#   P1: p_true = 2/4 (the cut right answer earns nothing); correct lengths {10, 15}
#       m0: pass 2/4 -> 1; length 12 in [10, 15] -> 1; "carry" in a right rollout only -> 1  => 1
#       m1: pass 3/4 -> 0.01 ** 0.25; length 4 -> 0; no notions -> 0                          => 0.01 ** 0.25 / 3
#       m2: unparseable                                                                      => 0
#   P2: p_true = 1/4; correct lengths {20} (inclusive bounds: one right rollout still pays)
#       m0, m1: pass 0 -> 0.01 ** 0.25; length 20 -> 1; "addition" in the right rollout only -> 1
#       m2: pass 1/4 -> 1; 1; 1                                                              => 1
ROOT4 = 0.01 ** 0.25
META_SCORES = {1: [1.0, ROOT4 / 3, 0.0], 2: [(ROOT4 + 2) / 3, (ROOT4 + 2) / 3, 1.0]}
META_PARTS = {1: [(1.0, 1.0, 1.0), (ROOT4, 0.0, 0.0), (0.0, 0.0, 0.0)],
              2: [(ROOT4, 1.0, 1.0), (ROOT4, 1.0, 1.0), (1.0, 1.0, 1.0)]}


def test_prompts_predicted_all_right_or_all_wrong_are_gated_and_get_no_solution_rollouts(step):
    _, _, sampler, data = step
    meta_call, solution_call = sampler.calls[0], sampler.calls[1]
    assert meta_call["counts"] == [M] * 4 and all("Do not solve" in p for p in meta_call["prompts"])
    assert solution_call["counts"] == [0, G, G, 0]  # P0 (all 4 of 4) and P3 (all 0) are gated
    assert [len(episodes(data, "solution", i)) for i in range(4)] == [0, G, G, 0]


def test_the_meta_prompt_states_the_response_budget_and_the_group_size(step):
    cfg, _, sampler, _ = step
    for prompt in sampler.calls[0]["prompts"]:  # max_prompt_tokens (1024 here) is the released code's bug
        assert f"an integer from 1 to {BUDGET}, how many tokens" in prompt and str(cfg.rollout.max_prompt_tokens) not in prompt
        assert f"an integer from 0 to {G}, how many of {G} independent attempts" in prompt


def test_cutoff_budgets_are_twice_the_median_predicted_length(step):
    _, _, sampler, data = step
    # P0: 2 x 9; P1: 2 x median(12, 4) = 16 (the unparseable one has no length); P2: 2 x 20 = 40; P3: 2 x 5
    assert sampler.calls[1]["budgets"] == [18, 16, 40, 10]
    assert [e.finish_reason for e in episodes(data, "solution", 1)] == ["stop", "cutoff", "cutoff", "stop"]
    assert [len(e.response_ids) for e in episodes(data, "solution", 1)] == [10, 16, 16, 15]


def test_the_hint_is_the_notions_of_the_one_prediction_that_has_any(step):
    _, _, sampler, _ = step
    prompts = sampler.calls[1]["prompts"]
    assert "What is 4+4? Let's think step by step" in prompts[1]
    assert prompts[1].endswith("within \\boxed{}. Notions that may help: carry.<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[2].endswith("Notions that may help: addition.<|im_end|>\n<|im_start|>assistant\n")


def test_solution_rewards_and_advantages(step):
    _, _, _, data = step
    p1, p2 = episodes(data, "solution", 1), episodes(data, "solution", 2)
    assert [e.correct for e in p1] == [True, False, True, True]  # graded as written
    assert [e.reward for e in p1] == [1.0, 0.0, 0.0, 1.0]  # the cut right answer earns 0
    assert [e.reward for e in p2] == [1.0, 0.0, 0.0, 0.0]
    # P1: mean 1/2, sample std sqrt(1/3); P2: mean 1/4, sample std 1/2
    s1, s2 = math.sqrt(1 / 3) + 1e-6, 0.5 + 1e-6
    assert [e.advantage for e in p1] == pytest.approx([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], abs=1e-6)
    assert [e.advantage for e in p2] == pytest.approx([0.75 / s2, -0.25 / s2, -0.25 / s2, -0.25 / s2], abs=1e-6)


def test_meta_rewards_and_advantages_per_group_of_m(step):
    _, _, _, data = step
    for prompt, scores in META_SCORES.items():
        meta = episodes(data, "meta", prompt)
        assert [e.reward for e in meta] == pytest.approx(scores, abs=1e-9)
        assert [(e.meta_parts["pass_rate"], e.meta_parts["length"], e.meta_parts["notion"]) for e in meta] == \
            [pytest.approx(parts, abs=1e-9) for parts in META_PARTS[prompt]]
        assert [e.advantage for e in meta] == pytest.approx(normalized(scores), abs=1e-5)
        assert all(e.advantage != 0 for e in meta[:1])  # MASA's meta path does carry a gradient
    assert episodes(data, "meta", 1)[2].prediction is None


def test_which_rollouts_enter_the_loss(step):
    _, _, _, data = step
    in_loss = [(e.path, e.prompt_index) for e in data.episodes if e.in_loss]
    # every solution rollout; the meta rollouts of the prompts that were not gated
    assert in_loss == [("solution", 1)] * G + [("solution", 2)] * G + [("meta", 1)] * M + [("meta", 2)] * M
    assert all(not e.in_loss for e in episodes(data, "meta", 0) + episodes(data, "meta", 3))


def test_experts_are_the_best_meta_rollouts_with_the_true_statistics(step):
    _, tokenizer, _, data = step
    assert [(s, i) for s, i, _, _ in data.experts] == [(0, 1), (0, 2)]
    targets = [tokenizer.decode(ids) for _, _, _, ids in data.experts]
    # P1: m0 (score 1), 2 right rollouts of 10 and 15 tokens -> median 12.5 -> 12; P2: m2 (score 1)
    assert targets == ['<meta>a carry</meta>\n{"math_notion": ["carry"], "pass_rate": 2, "solution_length": 12}'
                       '<|im_end|>',
                       '<meta></meta>\n{"math_notion": ["addition"], "pass_rate": 1, "solution_length": 20}<|im_end|>']
    assert data.experts[0][2] == episodes(data, "meta", 1)[0].prompt_ids


def test_the_audit_runs_what_gating_and_cutoff_skipped(step):
    _, _, sampler, _ = step
    gated_call, continuation_call = sampler.calls[2], sampler.calls[3]
    assert gated_call["counts"] == [G, G] and "2+3" in gated_call["prompts"][0] and "1+1" in gated_call["prompts"][1]
    assert continuation_call["counts"] == [1, 1] and continuation_call["budgets"] == [BUDGET - 16] * 2


def test_step_metrics(step, one_process_group):
    _, _, _, data = step
    record = data.record(one_process_group, 0, {})  # the line metrics.jsonl gets: summed over ranks
    scored = [s for scores in META_SCORES.values() for s in scores]
    parts = [p for ps in META_PARTS.values() for p in ps]
    expected = {
        "reward": 3 / 8, "accuracy": 4 / 8, "solution_rollouts": 8, "gated_fraction": 2 / 4, "cutoff_fraction": 2 / 8,
        "solution_tokens": 10 + 16 + 16 + 15 + 20 + 11 * 3,
        "meta_reward": sum(scored) / 6, "meta_pass_rate": sum(p[0] for p in parts) / 6,
        "meta_length": sum(p[1] for p in parts) / 6, "meta_notion": sum(p[2] for p in parts) / 6,
        # |k/G - p_true| over parsed pass rates of the scored meta rollouts: P1 0, 1/4; P2 1/4, 1/4, 0
        "pass_rate_mae": (0 + 0.25 + 0.25 + 0.25 + 0) / 5, "meta_parse_failures": 1 / 12,
        # the audit: P0 was not all-right after all (3 of 4), P3 really was all-wrong; of the two cut
        # rollouts of P1, one would have ended wrong
        "audit_gated": 2, "audit_gated_zero_variance": 1, "gating_precision": 0.5,
        "audit_cut": 2, "audit_cut_wrong": 1, "cutoff_precision": 0.5,
    }
    assert {k: record[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert record["meta_tokens"] == sum(len(text) + 1 for texts in META.values() for text in texts)  # gated ones too


# ---------------------------------------------------------------------------------------------------
# The released code's switches (configs/qwen3_8b_released.yaml and, for hints and behaviour cloning,
# qwen3_8b_released_intent.yaml) on the same script

RELEASED = ["efficient.hint_mode=rollout", "efficient.hint_with_length=true", "efficient.cutoff_in_loss=false",
            "efficient.bc_select=notion", "efficient.bc_threshold=0.2"]


def collect_scripted(tmp_path_factory, overrides, step=0):
    tokenizer = build_char_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cfg = load_config(CONFIG, ["algorithm=masa_efficient", f"rollout.group_size={G}", f"rollout.meta_group_size={M}",
                               f"rollout.max_response_tokens={BUDGET}", "train.batch_size=4"] + overrides)
    sampler = ScriptedSampler(tokenizer)
    data = masa_step.collect(cfg, step, Env(0, 1, torch.device("cpu")), tokenizer, PROBLEMS, sampler, scripted_grades)
    return cfg, sampler, data


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return collect_scripted(tmp_path_factory, RELEASED)


def test_per_rollout_hints_give_each_rollout_its_own_drawn_prediction(released):
    cfg, sampler, data = released
    call = sampler.calls[1]
    # one request per rollout (the gated P0 and P3 get none), rollout j as sample j of its prompt's stream
    assert call["counts"] == [0] * G + [1] * G + [1] * G + [0] * G and call["first_samples"] == list(range(G)) * 4
    p1, p2 = call["prompts"][G:2 * G], call["prompts"][2 * G:3 * G]
    # P1's candidates: m0 (notions and length 12) and m1 (length 4 only; m2 is unparseable)
    texts = [" Notions that may help: carry. A correct solution takes about 12 tokens.",
             " A correct solution takes about 4 tokens."]
    draws = torch.randint(2, (G,), generator=torch.Generator().manual_seed(masa_step.seed_for(cfg, 0, 1, masa_step.Purpose.HINTS)))
    assert [p.split("\\boxed{}.", 1)[1] for p in p1] == \
        [texts[int(d)] + "<|im_end|>\n<|im_start|>assistant\n" for d in draws]
    assert len(set(p1)) > 1  # the G solution prompts of one prompt differ (this seed draws both)
    assert all(p.endswith(" Notions that may help: addition. A correct solution takes about 20 tokens."
                          "<|im_end|>\n<|im_start|>assistant\n") for p in p2)
    # each rollout still samples what it would have as sample j of one request: the same script outcomes
    assert [e.reward for e in episodes(data, "solution", 1)] == [1.0, 0.0, 0.0, 1.0]
    assert [e.prompt_ids for e in episodes(data, "solution", 1)] == \
        [sampler.tokenizer.encode(p, add_special_tokens=False) for p in p1]


def test_cut_rollouts_out_of_the_loss_still_count_in_their_group(released):
    _, _, data = released
    p1 = episodes(data, "solution", 1)
    assert [e.finish_reason for e in p1] == ["stop", "cutoff", "cutoff", "stop"]
    assert [e.in_loss for e in p1] == [True, False, False, True]
    s1 = math.sqrt(1 / 3) + 1e-6  # the group's statistics are those of rewards [1, 0, 0, 1], as before
    assert [e.advantage for e in p1] == pytest.approx([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], abs=1e-6)
    assert all(e.in_loss for e in episodes(data, "solution", 2))  # nothing cut there


def test_the_released_meta_prompt_has_a_system_message_and_responses_stop_only_at_end_of_sequence(
        tmp_path_factory):
    _, sampler, data = collect_scripted(tmp_path_factory, ["rollout.stop_at_end_of_turn=false",
                                                           'prompt.meta_system="You are a helpful assistant."'])
    meta, solutions = sampler.calls[:2]  # the meta path runs first (the script's efficient settings steer)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDo not solve"
    assert all(p.startswith(system) for p in meta["prompts"])  # masa_rl_dataset.py:312
    assert solutions["prompts"] and not any("system" in p for p in solutions["prompts"])  # the solution prompt: none
    assert meta["stop"] == solutions["stop"] == (sampler.tokenizer.eos_token_id,)  # the char tokenizer's: <|im_end|>
    assert all(sampler.tokenizer.decode(e.prompt_ids).startswith(system) for e in data.episodes if e.path == "meta")
    # the defaults: no system message, end of text stops a response too
    _, sampler, _ = collect_scripted(tmp_path_factory, [])
    assert sampler.calls[0]["prompts"][0].startswith("<|im_start|>user\nDo not solve")
    assert set(sampler.calls[0]["stop"]) == set(sampler.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_hints_can_start_before_gating_and_cutoff(tmp_path_factory):
    _, sampler, data = collect_scripted(tmp_path_factory,
                                        ["efficient.gate_start_step=1", "efficient.hint_start_step=0"])
    meta_call, solution_call = sampler.calls[0], sampler.calls[1]
    assert meta_call["counts"] == [M] * 4 and solution_call["counts"] == [G] * 4  # sampled in turn; none gated
    assert solution_call["budgets"] == [None] * 4  # no cutoff before gate_start_step
    assert solution_call["prompts"][1].endswith("Notions that may help: carry.<|im_end|>\n<|im_start|>assistant\n")
    # hints with gating (-1): at step 0 nothing steers, so both paths share one sampler call and no hint
    _, sampler, _ = collect_scripted(tmp_path_factory, ["efficient.gate_start_step=1"])
    assert len(sampler.calls) == 1 and sampler.calls[0]["counts"] == [M] * 4 + [G] * 4
    assert not any("Notions" in p for p in sampler.calls[0]["prompts"])


@pytest.fixture(scope="module")
def one_process_group():
    import torch.distributed as dist

    import parallel

    env = parallel.setup_distributed()
    yield env
    dist.destroy_process_group()


class UniformSampler:
    """Stands in for rollout.generate for any G and M: on prompt 0 solution sample j is right for even
    j, on prompt 1 for j = 0 only; every solution is 10 tokens; meta sample j predicts a pass rate of
    G - j mod (G + 1) (so G itself first: out of range were M taken for G < it), a length of 10 and no
    notions."""

    def __init__(self, tokenizer, G):
        self.tokenizer, self.G, self.counts = tokenizer, G, []

    def __call__(self, prompts, params, budgets=None, seed=None, *, counts=None, **kwargs):
        self.counts.append(list(counts))
        texts = [self.tokenizer.decode(p) for p in prompts]
        return [[self.rollout(text, j) for j in range(n)] for text, n in zip(texts, counts)]

    def rollout(self, prompt: str, j: int) -> Rollout:
        first = "What is 2+3?" in prompt
        if "Do not solve" in prompt:
            text = f'{{"math_notion": [], "pass_rate": {self.G - j % (self.G + 1)}, "solution_length": 10}}'
        else:
            right = j % 2 == 0 if first else j == 0
            text = f"\\boxed{{{(5 if first else 8) + (not right)}}}"  # 9 characters
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Rollout(ids, [0.0] * len(ids), "stop")


@pytest.mark.parametrize("G,M", [(4, 4), (3, 5), (5, 3)])
def test_every_group_is_the_rollouts_of_one_prompt_and_one_path_for_any_g_and_m(tmp_path_factory, G, M):
    # The paper has G = M = 16, where a mix-up of the two sizes changes no count; G != M, where it does.
    tokenizer = build_char_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cfg = load_config(CONFIG, ["algorithm=masa", f"rollout.group_size={G}", f"rollout.meta_group_size={M}",
                               f"rollout.max_response_tokens={BUDGET}", "train.batch_size=2"])
    sampler = UniformSampler(tokenizer, G)
    data = masa_step.collect(cfg, 0, Env(0, 1, torch.device("cpu")), tokenizer, PROBLEMS[:2], sampler,
                             scripted_grades)
    assert sampler.counts == [[M, M, G, G]]  # one call: both meta prompts, then both solution prompts
    for prompt in range(2):
        solutions, meta = episodes(data, "solution", prompt), episodes(data, "meta", prompt)
        assert (len(solutions), len(meta)) == (G, M)
        rewards = [float(j % 2 == 0 if prompt == 0 else j == 0) for j in range(G)]
        assert [e.reward for e in solutions] == rewards
        assert [e.advantage for e in solutions] == pytest.approx(normalized(rewards), abs=1e-5)  # float32
        # pass-rate part 0.01 ** |p_true - k / G|, length part 1 (every right rollout has 10 tokens), notions 0
        p_true = sum(rewards) / G
        scores = [(0.01 ** abs(p_true - (G - j % (G + 1)) / G) + 1.0) / 3 for j in range(M)]
        assert [e.reward for e in meta] == pytest.approx(scores, abs=1e-9)
        assert [e.advantage for e in meta] == pytest.approx(normalized(scores), abs=1e-5)
