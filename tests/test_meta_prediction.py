"""meta_prediction.py: meta-prediction parsing on realistic model output and hostile input, and the
meta rewards computed by hand."""

import json
import time

import pytest

import rewards
from meta_prediction import MetaPrediction, Outcome, meta_reward, normalize_notion, parse_meta


def test_rewards_exports_the_meta_path_as_the_public_api_names_it():
    assert (rewards.parse_meta, rewards.meta_reward, rewards.MetaPrediction, rewards.Outcome) == \
        (parse_meta, meta_reward, MetaPrediction, Outcome)


# ---------------------------------------------------------------------------------------------------
# Meta-prediction parsing


@pytest.mark.parametrize("text,expected", [
    # compact, then pretty-printed, then any key order
    ('{"math_notion": ["carry"], "pass_rate": 12, "solution_length": 300}', (12, 300, ["carry"])),
    ('</meta>\n{\n  "math_notion": [\n    "modular arithmetic",\n    "Fermat\'s little theorem"\n  ],\n'
     '  "pass_rate": 4,\n  "solution_length": 1200\n}', (4, 1200, ["modular arithmetic", "Fermat's little theorem"])),
    ('{"solution_length": 512, "pass_rate": 16, "math_notion": ["induction"]}', (16, 512, ["induction"])),
    # single quotes, Python literals, trailing commas
    ("{'math_notion': ['sine rule', 'area'], 'pass_rate': 3, 'solution_length': 700}", (3, 700, ["sine rule", "area"])),
    ('{"math_notion": ["a"], "pass_rate": 3, "solution_length": 700, "confident": True}', (3, 700, ["a"])),
    ('{"math_notion": ["vieta",], "pass_rate": 9, "solution_length": 250,}', (9, 250, ["vieta"])),
    # code fences and prose around
    ('Here is my prediction:\n```json\n{"math_notion": ["parity"], "pass_rate": 10, "solution_length": 400}\n```\n'
     'Hope this helps!', (10, 400, ["parity"])),
    # the last well-formed object wins; objects in the reasoning come earlier
    ('<meta>For example {"pass_rate": 1} would mean hard.</meta>\n'
     '{"math_notion": ["graphs"], "pass_rate": 7, "solution_length": 900}', (7, 900, ["graphs"])),
    ('{"math_notion": ["x"], "pass_rate": 2, "solution_length": 100}\nActually, revised:\n'
     '{"math_notion": ["y"], "pass_rate": 5, "solution_length": 150}', (5, 150, ["y"])),
    ('{"math_notion": ["x"], "pass_rate": 2, "solution_length": 100} then a broken {"pass_rate": 5, "solu',
     (2, 100, ["x"])),
    # LaTeX braces around the object do not confuse it
    (r'We need $\frac{1}{2}$ and \boxed{3}. {"math_notion": ["fractions"], "pass_rate": 8, "solution_length": 60} '
     r'so $x^{2}$.', (8, 60, ["fractions"])),
    # numbers written in other types
    ('{"math_notion": [], "pass_rate": 8.0, "solution_length": "350"}', (8, 350, [])),
    ('{"math_notion": "algebra, geometry", "pass_rate": 4, "solution_length": 90}', (4, 90, ["algebra", "geometry"])),
    # missing, wrong-type and out-of-range fields are None; the rest still counts
    ('{"math_notion": ["sum"], "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": "high", "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": 17, "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": -1, "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": 0.5, "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": true, "solution_length": 200}', (None, 200, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": 3, "solution_length": 99999}', (3, None, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": 3, "solution_length": 0}', (3, None, ["sum"])),
    ('{"math_notion": ["sum"], "pass_rate": 3, "solution_length": 123456789012345678901234567890123}',
     (3, None, ["sum"])),
    ('{"math_notion": [1, "sum", null, ""], "pass_rate": 3, "solution_length": 10}', (3, 10, ["sum"])),
    ('{"pass_rate": 3, "solution_length": 10, "math_notion": {"a": 1}}', (3, 10, [])),
    ('{"Pass_Rate": 6, "Solution_Length": 80, "Math_Notion": ["ratio"]}', (6, 80, ["ratio"])),
    # JSON escapes, as json.dumps writes them by default
    ('{"math_notion": ["M\\u00f6bius inversion", "a\\tb"], "pass_rate": 1, "solution_length": 5}',
     (1, 5, ["Möbius inversion", "a\tb"])),
])
def test_parse_meta_reads_what_models_write(text, expected):
    meta = parse_meta(text, group_size=16, max_length=8192)
    assert meta is not None
    assert (meta.pass_rate, meta.solution_length, meta.notions) == expected


@pytest.mark.parametrize("text", [
    "", "I think the pass rate is about 8 and the length 300.", "{}", '{"answer": 5}', "{'pass_rate': 3",
    '{"pass_rate" 3}', "[1, 2, 3]", "{" * 10_000, '{"pass_rate": ' + "[" * 100 + "]" * 100 + "}",
])
def test_parse_meta_returns_none_without_a_meta_object(text):
    assert parse_meta(text, group_size=16) is None


def test_parse_meta_on_a_long_response_is_fast():
    text = r"\frac{a}{b} {x} " * 20_000 + '{"math_notion": ["x"], "pass_rate": 1, "solution_length": 5}'
    start = time.monotonic()
    assert parse_meta(text).pass_rate == 1
    assert time.monotonic() - start < 5


ADVERSARIAL = {  # 10 MB each: what a hostile caller of parse_meta could pass (the probe took 144 s)
    "nested arrays": "[" * 5_000_000 + "]" * 5_000_000,
    "open braces": "{" * 10_000_000,
    "nested objects": '{"a":' * 2_000_000,
    "unterminated strings": '{"x": "' * 1_500_000,
    "long arrays behind many braces": ('{"pass_rate":[' + "1," * 20) * 200_000,
    "one huge object": json.dumps({"math_notion": ["a" * 10] * 700_000, "pass_rate": 3}),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_parse_meta_does_bounded_work_on_10_mb(name):
    text = ADVERSARIAL[name]
    start = time.monotonic()
    assert parse_meta(text) is None  # nothing a meta object can be in its last META_TAIL_CHARS characters
    assert time.monotonic() - start < 1.0  # linear-time parsing of a bounded tail: milliseconds here


def test_parse_meta_reads_only_the_tail_and_caps_the_notions():
    from meta_prediction import MAX_NOTION_CHARS, MAX_NOTIONS, META_TAIL_CHARS

    meta = '{"math_notion": ["carry"], "pass_rate": 2, "solution_length": 9}'
    assert parse_meta("x" * 10_000_000 + meta).pass_rate == 2
    assert parse_meta(meta + " " + "x" * (META_TAIL_CHARS - len(meta) - 1)).pass_rate == 2  # just inside
    assert parse_meta(meta + " " + "x" * META_TAIL_CHARS) is None  # outside the tail
    notions = [f"notion {i}" for i in range(MAX_NOTIONS + 4)] + ["y" * (MAX_NOTION_CHARS + 1)]
    parsed = parse_meta(json.dumps({"math_notion": ["z" * (MAX_NOTION_CHARS + 1)] + notions, "pass_rate": 1}))
    assert parsed.notions == notions[:MAX_NOTIONS]  # too-long ones dropped, then the first MAX_NOTIONS kept


def test_meta_reward_is_bounded_on_huge_notions_and_outcomes():
    # the probe: a 1 MB notion against 16 outcomes of 1 MB took 572 s (a regex per notion)
    outcomes_ = [Outcome(i % 2 == 0, 10, "the carry and the notion word " * 35_000) for i in range(16)]
    start = time.monotonic()
    assert meta_reward(MetaPrediction(8, 10, ["carry" * 200_000]), outcomes_, "p", 16)["notion"] == 0.0  # dropped
    many = [f"notion {i}" for i in range(100)] + ["carry"]
    assert meta_reward(MetaPrediction(8, 10, many), outcomes_, "p", 16)["notion"] == 0.0  # 16 kept; none useful
    assert time.monotonic() - start < 1.0
    right = [Outcome(True, 10, "a carry " * 100_000)] + [Outcome(False, 10, "no " * 300_000)] * 15
    assert meta_reward(MetaPrediction(1, 10, ["carry"]), right, "p", 16)["notion"] == 1.0  # still matched


# ---------------------------------------------------------------------------------------------------
# Meta rewards, computed by hand


def outcomes(*spec):
    """spec: (correct, length, text) triples."""
    return [Outcome(c, n, t) for c, n, t in spec]


def test_meta_reward_pass_rate_length_and_notions():
    rollouts = outcomes((True, 100, "use the carry rule"), (True, 140, "carry twice, then add"),
                        (False, 300, "subtract and borrow"), (False, 90, "guess"))
    prediction = MetaPrediction(pass_rate=8, solution_length=120, notions=["Carries", "borrow", "addition"])
    r = meta_reward(prediction, rollouts, problem="Compute 47 + 85 by addition.", group_size=16)
    # p_true = 2/4 = 0.5 and 8/16 = 0.5: 0.01 ** 0 = 1
    assert r["pass_rate"] == 1.0
    # 100 <= 120 <= 140
    assert r["length"] == 1.0
    # "addition" is in the problem: dropped. "carry" (from "Carries"): 2 correct, 0 incorrect -> counts.
    # "borrow": 0 correct, 1 incorrect -> does not. 1 of 2.
    assert r["notion"] == 0.5
    assert r["score"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_a_notion_mentioned_more_by_incorrect_rollouts_earns_nothing():
    rollouts = outcomes((True, 10, "a carry here"), (False, 10, "carry, wrongly"), (False, 10, "carry again"),
                        (True, 10, "plain sum"))
    assert meta_reward(MetaPrediction(2, 10, ["carry"]), rollouts, "p", 4)["notion"] == 0.0  # 1 correct, 2 not
    assert meta_reward(MetaPrediction(2, 10, ["carry"]), rollouts[:2], "p", 4)["notion"] == 0.0  # 1 and 1: a tie
    assert meta_reward(MetaPrediction(2, 10, ["carry"]), rollouts[:1], "p", 4)["notion"] == 1.0


def test_meta_reward_pass_rate_decays_with_distance():
    rollouts = outcomes(*[(i < 3, 50, "") for i in range(4)])  # p_true = 0.75
    r = meta_reward(MetaPrediction(4, None, []), rollouts, "", group_size=16)  # predicted 0.25
    assert r["pass_rate"] == pytest.approx(0.01 ** 0.5)  # = 0.1
    assert r["score"] == pytest.approx(0.1 / 3)


def test_meta_reward_with_no_correct_rollout():
    rollouts = outcomes((False, 10, "carry"), (False, 20, "carry"))
    r = meta_reward(MetaPrediction(0, 15, ["carry"]), rollouts, "", group_size=2)
    assert r == {"score": pytest.approx(1 / 3), "pass_rate": 1.0, "length": 0.0, "notion": 0.0}


def test_meta_reward_with_exactly_one_correct_rollout_pays_its_exact_length():
    rollouts = outcomes((True, 77, ""), (False, 20, ""), (False, 30, ""), (False, 40, ""))
    assert meta_reward(MetaPrediction(None, 77, []), rollouts, "", 4)["length"] == 1.0  # inclusive bounds
    assert meta_reward(MetaPrediction(None, 78, []), rollouts, "", 4)["length"] == 0.0


def test_meta_reward_drops_notions_written_in_the_problem_and_merges_plurals():
    rollouts = outcomes((True, 5, "the prime factors and primes"), (False, 5, "nothing"))
    prediction = MetaPrediction(1, 5, ["prime", "Primes", "factor", "prime numbers"])
    r = meta_reward(prediction, rollouts, problem="How many prime numbers divide 30?", group_size=2)
    # "prime" and "primes" normalize to "prime", which the problem mentions ("prime numbers" too): dropped.
    # Only "factor" remains; "factors" appears in the correct rollout only.
    assert r["notion"] == 1.0


def test_meta_reward_empty_notions_and_missing_prediction():
    rollouts = outcomes((True, 5, "x"), (False, 5, "y"))
    assert meta_reward(MetaPrediction(1, 5, []), rollouts, "", 2)["notion"] == 0.0
    assert meta_reward(None, rollouts, "", 2) == {"score": 0.0, "pass_rate": 0.0, "length": 0.0, "notion": 0.0}


def test_meta_reward_out_of_range_pass_rate_scores_zero_for_that_part():
    rollouts = outcomes((True, 5, ""), (True, 6, ""))
    r = meta_reward(MetaPrediction(3, 5, []), rollouts, "", group_size=2)
    assert r["pass_rate"] == 0.0 and r["length"] == 1.0


def test_notions_next_to_digits_are_mentioned_but_not_inside_other_words():
    rollouts = outcomes((True, 9, "4+8+1=13carry1"), (False, 9, "the scary part"))
    assert meta_reward(MetaPrediction(1, 9, ["carry"]), rollouts, "48+95", group_size=2)["notion"] == 1.0
    assert meta_reward(MetaPrediction(1, 9, ["car"]), rollouts, "48+95", group_size=2)["notion"] == 0.0
    wrong = outcomes((False, 9, "4+8+1=13carry1"), (True, 9, "12"))
    assert meta_reward(MetaPrediction(1, 9, ["carry"]), wrong, "48+95", group_size=2)["notion"] == 0.0


def test_notion_normalization():
    assert [normalize_notion(n) for n in ["Carries", "boxes", "Prime Numbers", " series ", "class", "radius",
                                          "matches", "sum."]] == \
        ["carry", "box", "prime number", "series", "class", "radius", "match", "sum"]


def test_parse_meta_and_meta_reward_compose():
    text = '<meta>Easy.</meta>\n{"math_notion": ["carry"], "pass_rate": 2, "solution_length": 40}'
    rollouts = outcomes((True, 40, "carry 1"), (True, 44, "carry"))
    r = meta_reward(parse_meta(text, group_size=2), rollouts, "7 + 5", group_size=2)
    assert r["score"] == 1.0
