"""The MASA algorithm as plain functions over one step's records: prompts for both paths, group
advantages, the PPO-clip loss and its aggregation, predictive gating, early-cutoff budgets, notion
hints, meta rewards and expert meta trajectories for behaviour cloning (docs/method.md §1; Kim, Jang
and Yang, arXiv 2510.03259).

A step's data is a list of `Episode`s (one per rollout, both paths) and a list of `Prompt`s (one per
problem). masa_step.py samples and grades them and calls the stages here in this order:
    steer (gating, cutoff budgets, hints; MASA-efficient only) -> [sample, grade: masa_step.py]
    -> score_solutions -> score_meta -> assign_advantages -> expert_targets
and train.py's update calls policy_loss on each micro-batch. Each stage reads and fills fields of the
records, and each can be checked against docs/method.md §1 on its own.

Not here: models, devices, tokenizers and processes. The prompts' token ids (chat template
included) come from data.py, the log-probs from model.py's fused forward, the step's assembly from
masa_step.py, the loop and the distributed reductions from train.py (the loss takes the global
token and sequence counts as arguments). group_advantages calls masa_kernels.group_advantages
(Triton on CUDA).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

import torch

import masa_kernels
from meta_prediction import MetaPrediction, Outcome, meta_reward

# ---------------------------------------------------------------------------------------------------
# The records


@dataclass
class Prompt:
    """One problem of the step, and what the meta path decided for its solution rollouts."""
    index: int  # global index in the step's batch: the same on any number of ranks
    problem: str
    answer: str
    meta_ids: list[int] = field(default_factory=list, repr=False)  # the meta prompt, chat template applied
    # the solution prompt (with its hint): one list of ids for all G rollouts, or G lists, one per rollout
    # when each rollout has a hint of its own (efficient.hint_mode: rollout)
    solution_ids: list[list[int]] = field(default_factory=list, repr=False)
    gated: bool = False  # predicted zero-variance: it gets no solution rollouts
    budget: int | None = None  # token budget of its solution rollouts (early cutoff); None: no cutoff
    hints: list[str] = field(default_factory=list)  # hint text appended to its solution prompt: one shared by
    #                                                 its G rollouts, or one per rollout; []: none


@dataclass
class Episode:
    """One rollout, from the sampler to the loss. masa_step.py fills the first seven fields and
    `prediction` when it samples (and `correct` when it grades); the stages below fill the rest."""
    prompt_index: int  # Prompt.index of its prompt
    path: str  # "solution" | "meta"
    prompt_ids: list[int] = field(repr=False)
    response_ids: list[int] = field(repr=False)
    text: str = ""  # the response, decoded once
    finish_reason: str = "stop"  # "stop" | "length" | "cutoff"
    sampled_logprobs: list[float] = field(default_factory=list, repr=False)  # the sampler's, one per response token
    correct: bool = False  # solution path: the final boxed answer is right, as written
    prediction: MetaPrediction | None = None  # meta path: the parsed prediction (None: unparseable)
    reward: float = 0.0  # solution: 1 if correct and not cut off, else 0; meta: the meta score
    meta_parts: dict[str, float] = field(default_factory=dict)  # meta path: pass_rate, length, notion
    advantage: float = 0.0
    in_loss: bool = True  # False: the meta rollouts of a gated prompt (nothing to score them against) and,
    #                       with efficient.cutoff_in_loss false, cut solution rollouts

# ---------------------------------------------------------------------------------------------------
# Prompts (the text; data.py wraps it in the chat template)


def solution_prompt(problem: str, template: str, hint: str = "") -> str:
    """The solution path's user message: `template` with {problem} filled in, then the hint text
    (MASA-efficient's notion hints: hint_text), if any."""
    return template.replace("{problem}", problem) + hint


def meta_prompt(problem: str, template: str, group_size: int, max_length: int) -> str:
    """The meta path's user message. It states the real group size G and the real response budget
    (the paper's code stated the prompt budget by mistake)."""
    return (template.replace("{problem}", problem).replace("{group_size}", str(group_size))
            .replace("{max_length}", str(max_length)))


# ---------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups * group_size] -> (r - mean) / (std + eps) per consecutive group (sample std);
    0 for a group whose rewards are all equal. Solution groups (G) and meta groups (M) are normalized
    separately by calling this once for each. Step 3 of docs/method.md §1. A NaN or infinite reward is an
    error: it would silently zero its whole group's advantages."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards at positions {bad[:8]} are not finite ({rewards[bad[0]].item()}): every reward "
                         f"must be a finite number; a grader or meta reward produced this")
    return masa_kernels.group_advantages(rewards.float(), group_size, eps)


# ---------------------------------------------------------------------------------------------------
# The policy loss


@dataclass
class LossScale:
    """Global counts the loss divides by, summed over all micro-batches and ranks of one optimizer
    step, so that per-micro-batch losses add up to the loss of the whole batch."""
    tokens: int  # response tokens in the global batch
    sequences: int  # responses in the global batch
    max_response_tokens: int  # the generation budget (Dr.GRPO's constant)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, scale: LossScale, clip_low: float = 0.2, clip_high: float = 0.28,
                aggregation: str = "token-mean", ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0, dual_clip: float = 0.0):
    """Token-level PPO-clip loss (step 4 of docs/method.md §1) for one micro-batch.

    logprobs, old_logprobs [B, T] float32: log pi(token) now and at sampling time (equal tensors on the
        first pass over a batch: the ratio is exactly 1 and the gradient is the plain policy gradient);
    advantages [B] (one per response) or [B, T]; mask [B, T]: 1 on response tokens;
    ref_logprobs [B, T]: a frozen reference policy, for the k3 KL estimator exp(r - l) - (r - l) - 1;
    entropy [B, T]: the policy's entropy per token, for an entropy bonus.

    Per token: max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)) (+ kl_coef k3 - entropy_coef H);
    with dual_clip = c > 1 (dual-clip PPO, Ye et al. 2020), a token with A < 0 is further capped at c |A|,
    so a huge ratio on a bad token cannot dominate (it then carries no gradient).
    Aggregation over tokens:
      token-mean            sum over all response tokens / scale.tokens (the paper's);
      seq-mean-token-mean   each response's token mean, summed / scale.sequences;
      constant              sum / (scale.sequences * scale.max_response_tokens) (Dr.GRPO).
    Returns (loss, metrics): metrics are 0-dim tensors, sums over this micro-batch's tokens (clipped
    tokens, ratio sum, entropy and KL sums, token count) that add across micro-batches and ranks, and
    the ratio's min and max (1 without tokens). Nothing is read back to the host here: the caller
    reads the sums once per optimizer step.
    """
    on = mask > 0
    # Positions outside the mask are set to 0 first (torch.where, whose backward sends them no
    # gradient), so that a NaN there (padding, a dropped token) reaches neither the loss nor a gradient.
    logprobs, old_logprobs = torch.where(on, logprobs, 0.0), torch.where(on, old_logprobs, 0.0)
    ref_logprobs = None if ref_logprobs is None else torch.where(on, ref_logprobs, 0.0)
    entropy = None if entropy is None else torch.where(on, entropy, 0.0)
    mask = mask.to(logprobs.dtype)
    advantages = advantages[:, None] if advantages.dim() == 1 else torch.where(on, advantages, 0.0)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    if dual_clip:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    kl = None
    if ref_logprobs is not None and kl_coef:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / scale.tokens
    elif aggregation == "seq-mean-token-mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum() / scale.sequences
    elif aggregation == "constant":
        loss = (per_token * mask).sum() / (scale.sequences * scale.max_response_tokens)
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; use token-mean, seq-mean-token-mean "
                         f"or constant")
    with torch.no_grad():  # tensors on the loss's device: reading none of them here costs no host sync
        empty, zero = ~on.any(), loss.new_zeros(())
        metrics = {
            "tokens": mask.sum(),
            "clipped_tokens": ((clipped > unclipped) & on).sum().to(loss.dtype),
            "ratio_sum": (ratio * mask).sum(),
            "ratio_min": torch.where(empty, 1.0, torch.where(on, ratio, torch.inf).amin()),
            "ratio_max": torch.where(empty, 1.0, torch.where(on, ratio, -torch.inf).amax()),
            "entropy_sum": (entropy * mask).sum() if entropy is not None else zero,
            "kl_sum": (kl * mask).sum() if kl is not None else zero,
        }
    return loss, metrics


def sampler_gap(episodes: list[Episode], logprobs: torch.Tensor, mask: torch.Tensor, total: torch.Tensor):
    """How far the trainer's log-probs of the sampled tokens are from the sampler's (how on-policy the
    update is; verl and TRL users read the same): logprobs [B, T] from the trainer's forward over
    these episodes (position t scores token t + 1), mask [B, T] on response tokens. Over the response
    tokens of episodes that carry the sampler's log-probs, with d = trainer - sampler, adds sum |d|,
    sum exp(d) - d - 1 and the token count to total[:3] and keeps max |d| in total[3] (total: [4]
    float64, on logprobs' device: no host sync). exp(d) - d - 1 estimates the KL between the two
    distributions (the k3 estimator, the sampler's as the reference). The two agree exactly only with the same weights, precision and kernels: with top-k or
    top-p the sampler's distribution is also renormalized, a gap by design."""
    sampled = torch.zeros(logprobs.shape, dtype=torch.float32)  # built on the host, copied once
    carried = torch.zeros(logprobs.shape[0], 1)
    for i, e in enumerate(episodes):
        if e.sampled_logprobs and len(e.sampled_logprobs) == len(e.response_ids):
            start = len(e.prompt_ids) - 1
            sampled[i, start:start + len(e.response_ids)] = torch.tensor(e.sampled_logprobs)
            carried[i] = 1
    sampled, counted = sampled.to(logprobs.device), mask * carried.to(mask.device)
    d = torch.where(counted > 0, logprobs.detach().float() - sampled, 0.0).double()
    total[:3] += torch.stack([d.abs().sum(), (torch.exp(d) - d - 1).sum(), counted.sum().double()])
    total[3] = torch.maximum(total[3], d.abs().max())


# ---------------------------------------------------------------------------------------------------
# MASA-efficient: gating, cutoff, hints, experts


def predicted_pass_rates(predictions: list[MetaPrediction | None], group_size: int) -> list[float | None]:
    """Each prediction's pass rate as a fraction of G (None where it gave none)."""
    return [None if p is None or p.pass_rate is None else p.pass_rate / group_size for p in predictions]


def gate(pass_rates: list[list[float | None]], gate_std: float = 0.1, gate_eps: float = 0.05) -> list[bool]:
    """Predictive gating. pass_rates: per prompt, its M predicted pass rates as fractions (None for an
    unparseable prediction). A prompt is gated (gets no solution rollouts) when all M predictions are
    valid, their population std is below gate_std, and their mean is <= gate_eps or >= 1 - gate_eps:
    it is confidently predicted to be all-wrong or all-right, a group whose advantages would be 0."""
    gated = []
    for rates in pass_rates:
        if not rates or any(r is None for r in rates):
            gated.append(False)
            continue
        mean, std = statistics.fmean(rates), statistics.pstdev(rates)
        gated.append(std < gate_std and (mean <= gate_eps or mean >= 1 - gate_eps))
    return gated


def cutoff_budgets(lengths: list[list[int | None]], factor: float, max_response_tokens: int) -> list[int]:
    """Early cutoff. lengths: per prompt, its M predicted solution lengths (None where missing). The
    budget of every solution rollout of that prompt is min(max_response_tokens, ceil(factor x median
    of the valid predictions)); a prompt with no valid prediction gets max_response_tokens."""
    budgets = []
    for predicted in lengths:
        valid = [n for n in predicted if n is not None]
        budget = math.ceil(factor * statistics.median(valid)) if valid else max_response_tokens
        budgets.append(max(1, min(max_response_tokens, budget)))
    return budgets


def hint_predictions(predictions: list[MetaPrediction | None], generator: torch.Generator, draws: int = 1,
                     with_length: bool = False) -> list[MetaPrediction]:
    """Notion hints: `draws` meta predictions drawn at random (with replacement) among those that listed
    notions (or, with_length, gave a length); [] when none did. One draw per prompt shares a hint
    among its G rollouts; G draws give each rollout its own (the released code's way)."""
    candidates = [p for p in predictions
                  if p is not None and (p.notions or (with_length and p.solution_length is not None))]
    if not candidates:
        return []
    return [candidates[int(i)] for i in torch.randint(len(candidates), (draws,), generator=generator)]


MAX_HINT_NOTIONS, MAX_HINT_NOTION_CHARS = 8, 80  # a hint is model-written text put in a prompt: keep it short


def hint_text(prediction: MetaPrediction, templates, with_length: bool = False) -> str:
    """The text a hint appends to the solution prompt, from the templates of config.PromptConfig:
    hint_separator, then `hint` with the prediction's notions (at most MAX_HINT_NOTIONS, each cut to
    MAX_HINT_NOTION_CHARS) as {notions} ("a, b") or {notion_list} ("['a', 'b']", a Python list, the
    released code's form), then with `with_length` `hint_length` with its {length}; "" when the
    prediction gives neither."""
    text = ""
    if prediction.notions:
        notions = [n[:MAX_HINT_NOTION_CHARS] for n in prediction.notions[:MAX_HINT_NOTIONS]]
        text += templates.hint.replace("{notions}", ", ".join(notions)).replace("{notion_list}", repr(notions))
    if with_length and prediction.solution_length is not None:
        text += templates.hint_length.replace("{length}", str(prediction.solution_length))
    return templates.hint_separator + text if text else ""


def select_expert(meta_scores: list[float], threshold: float) -> int | None:
    """Expert meta trajectory of one prompt: the index of its highest-scoring meta rollout (the first
    on ties) if that score reaches `threshold`, else None."""
    if not meta_scores:
        return None
    best = max(range(len(meta_scores)), key=lambda i: meta_scores[i])
    return best if meta_scores[best] >= threshold else None


def expert_target(response: str, prediction: MetaPrediction, correct_lengths: list[int], num_correct: int) -> str:
    """The behaviour-cloning target for an expert meta rollout: its <meta> reasoning, then the JSON
    the meta path must produce, with the true statistics of this step's rollouts filled in (pass rate
    = number correct, solution length = median correct length, or the prediction's when none was
    correct) and the expert's notions. Written with json.dumps, i.e. exactly what
    meta_prediction.parse_meta reads back (the paper's code wrote Python-dict text its parser rejected)."""
    start, end = response.find("<meta>"), response.find("</meta>")
    reasoning = response[start:end + len("</meta>")] if 0 <= start < end else "<meta></meta>"
    length = int(statistics.median(correct_lengths)) if correct_lengths else prediction.solution_length
    target = {"math_notion": prediction.notions, "pass_rate": num_correct, "solution_length": length}
    return reasoning + "\n" + json.dumps(target, ensure_ascii=False)


def uninformative_meta_target(rng, group_size: int, max_length: int, notions: list[str]) -> str:
    """A meta-path response in the exact format meta_prediction.parse_meta reads, whose values carry no
    information about any problem: pass rate uniform on 0..G, length uniform on 1..max_length, one
    or two notions drawn from `notions`. A supervised warm start on these teaches the format only,
    so whatever calibration appears later was learned from the meta rewards. rng: random.Random."""
    target = {"math_notion": rng.sample(notions, k=min(len(notions), rng.randint(1, 2))),
              "pass_rate": rng.randint(0, group_size), "solution_length": rng.randint(1, max_length)}
    return "<meta></meta>\n" + json.dumps(target, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# The stages of one step, over its records (train.collect calls them in this order)

def hint_start_step(efficient) -> int:
    """The first step with notion hints: efficient.hint_start_step, or gate_start_step when that is -1."""
    return efficient.gate_start_step if efficient.hint_start_step < 0 else efficient.hint_start_step


def steers(efficient, step: int) -> bool:
    """Whether MASA-efficient samples the meta path first at `step`, for `steer` to act on: from
    efficient.gate_start_step on, or from hint_start_step when hints start earlier."""
    return step >= efficient.gate_start_step or (efficient.hints and step >= hint_start_step(efficient))


def steer(prompts: list[Prompt], meta: list[Episode], efficient, step: int, group_size: int,
          max_response_tokens: int, hint_seeds: list[int], templates):
    """MASA-efficient, once its meta rollouts have run first: from each prompt's M predictions set
    `gated` (gate) and `budget` (cutoff_budgets) from efficient.gate_start_step on, and `hints`
    (hint_predictions, drawn with the prompt's seed from `hint_seeds`, written with hint_text and the
    `templates` of config.PromptConfig) from hint_start_step on, each as `efficient`
    (config.EfficientConfig) switches it on."""
    predictions = [[e.prediction for e in meta if e.prompt_index == p.index] for p in prompts]
    if efficient.gating and step >= efficient.gate_start_step:
        rates = [predicted_pass_rates(ps, group_size) for ps in predictions]
        for prompt, gated in zip(prompts, gate(rates, efficient.gate_std, efficient.gate_eps)):
            prompt.gated = gated
    if efficient.cutoff and step >= efficient.gate_start_step:
        lengths = [[p.solution_length if p else None for p in ps] for ps in predictions]
        for prompt, budget in zip(prompts, cutoff_budgets(lengths, efficient.cutoff_factor, max_response_tokens)):
            prompt.budget = budget
    if efficient.hints and step >= hint_start_step(efficient):
        draws = group_size if efficient.hint_mode == "rollout" else 1
        for prompt, ps, hint_seed in zip(prompts, predictions, hint_seeds):
            drawn = hint_predictions(ps, torch.Generator().manual_seed(hint_seed), draws, efficient.hint_with_length)
            prompt.hints = [hint_text(p, templates, efficient.hint_with_length) for p in drawn]


def score_solutions(solutions: list[Episode], cutoff_in_loss: bool = True):
    """Solution reward: 1 if the graded answer is correct and the rollout was not stopped at its
    cutoff budget (a cut rollout earns 0 whatever it wrote), else 0. With cutoff_in_loss False a cut
    rollout also leaves the loss: its 0 still counts in its group's mean and std, but it carries no
    gradient and no token of it enters the normalizer."""
    for e in solutions:
        cut = e.finish_reason == "cutoff"
        e.reward = float(e.correct and not cut)
        e.in_loss = cutoff_in_loss or not cut


def score_meta(prompts: list[Prompt], solutions: list[Episode], meta: list[Episode], group_size: int,
               base: float = 0.01):
    """Meta rewards: every meta rollout is scored (meta_prediction.meta_reward) against the G solution rollouts
    of its own prompt, a rollout counting as correct when it earned its reward. A gated prompt has no
    solution rollouts, so nothing to score its predictions against: they leave the loss."""
    for prompt in prompts:
        outcomes = [Outcome(e.reward > 0, len(e.response_ids), e.text) for e in solutions
                    if e.prompt_index == prompt.index]
        for e in meta:
            if e.prompt_index != prompt.index:
                continue
            if prompt.gated:
                e.in_loss = False
                continue
            parts = meta_reward(e.prediction, outcomes, prompt.problem, group_size, base)
            e.reward = parts.pop("score")
            e.meta_parts = parts


def assign_advantages(solutions: list[Episode], meta: list[Episode], group_size: int, meta_group_size: int,
                      device: torch.device | str = "cpu"):
    """Group-normalized advantages (step 3 of docs/method.md §1): the G solution rollouts of a prompt form
    one group, the M meta rollouts of a prompt another. Episodes come grouped by prompt, as sampled.
    Computed on `device` (the trainer's: on CUDA, the Triton kernel)."""
    for episodes, size in ((solutions, group_size), ([e for e in meta if e.in_loss], meta_group_size)):
        assert len(episodes) % size == 0 and all(
            len({e.prompt_index for e in episodes[i:i + size]}) == 1 for i in range(0, len(episodes), size))
        if episodes:
            advantages = group_advantages(torch.tensor([e.reward for e in episodes], device=device), size)
            for e, a in zip(episodes, advantages.tolist()):
                e.advantage = a


def expert_targets(prompts: list[Prompt], solutions: list[Episode], meta: list[Episode],
                   threshold: float, select: str = "score") -> list[tuple[Prompt, str]]:
    """Behaviour cloning's experts: per prompt, its best parseable meta rollout by `select` ("score":
    the meta reward, here; "notion": its notion part alone, the released code's rule) if that reaches
    `threshold` and at least one solution rollout earned its reward (else the true length is
    unknown). Returns (prompt, target text) pairs, the true statistics filled in by expert_target."""
    if select not in ("score", "notion"):
        raise ValueError(f"unknown expert selection {select!r}; use score or notion")
    experts = []
    for prompt in prompts:
        scored = [e for e in meta if e.prompt_index == prompt.index and e.in_loss]
        value = [(e.reward if select == "score" else e.meta_parts["notion"]) if e.prediction is not None else -1.0
                 for e in scored]
        best = select_expert(value, threshold)
        lengths = [len(e.response_ids) for e in solutions if e.prompt_index == prompt.index and e.reward > 0]
        if best is not None and lengths:
            expert = scored[best]
            experts.append((prompt, expert_target(expert.text, expert.prediction, lengths, len(lengths))))
    return experts
