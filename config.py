"""Run configuration: typed, nested dataclasses whose defaults are the paper's values, filled from YAML.

A module of its own (not part of train.py) because train.py, eval.py and the bench/ scripts all read
the same configuration, and importing it must not pull in the trainer's distributed machinery.

    cfg = load_config("configs/qwen3_8b.yaml", ["optim.lr=2e-6", "rollout.group_size=8"])
    cfg.optim.lr  # 2e-06

Every knob of a run lives here, with its paper value (docs/method.md §1) as the default and a one-line
comment. The loader is strict so that a typo cannot silently fall back to a default: an unknown key
is an error listing the valid keys at that level, and a value of the wrong type is an error naming
the key and the type it needs. YAML 1.1 reads `1e-6` (no dot) as a string; float fields accept such
strings, since that is what the user meant.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override the user must fix; the message says what and how."""


# ---------------------------------------------------------------------------------------------------
# The schema


@dataclass
class ModelConfig:
    path: str = "Qwen/Qwen3-8B-Base"  # local checkpoint directory or Hugging Face hub id
    init: Literal["pretrained", "random"] = "pretrained"  # random: a new model of `preset`'s shape (demo)
    preset: str = "tiny"  # model.PRESETS entry for init: random (its vocabulary fits the tokenizer)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # parameter dtype (optimizer state is fp32)
    activation_checkpointing: bool = True  # recompute each block in backward


@dataclass
class DataConfig:
    source: Literal["file", "arithmetic", "multiplication"] = "file"  # generated: data.arithmetic_problems (the
    #                                                      CPU demo), data.multiplication_problems (the long task)
    train_path: str = "data/deepscaler.jsonl"  # JSONL or parquet of training problems (source: file)
    arithmetic_count: int = 4000  # problems generated when source is arithmetic or multiplication
    arithmetic_digits: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # difficulties: digits of the operands
    multiplier_digits: list[int] = field(default_factory=lambda: [1, 2])  # multiplication: digits of the multiplier
    problem_key: str = "problem"  # field holding the problem text
    answer_key: str = "answer"  # field holding the gold answer
    shuffle: bool = True  # reshuffle the training problems every epoch


@dataclass
class RolloutConfig:
    group_size: int = 16  # G: solution rollouts per prompt
    meta_group_size: int = 16  # M: meta-prediction rollouts per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 8192  # also the length range the meta prompt states
    slots: int = 0  # most sequences decoded at once per process (the sampler's lanes); 0: 256
    kv_tokens: int = 0  # positions the paged KV pool holds per process; 0: 60% of the free GPU memory
    cuda_graphs: bool = True  # decode through CUDA graphs on CUDA (false: eager); a CPU never uses them
    stop_at_end_of_turn: bool = True  # also stop at <|im_end|> and <|endoftext|>; false: only at the model's
    #                                   end-of-sequence id (generation_config.json), as the released code


@dataclass
class WarmStartConfig:
    """Supervised steps before RL on the problems' reference solutions, plus meta-path examples whose
    values carry no information (masa.uninformative_meta_target). Off for the paper's runs."""
    steps: int = 0  # 0: no warm start
    lr: float = 3e-3  # its own AdamW, linear warmup then constant
    warmup_steps: int = 50
    batch_size: int = 64  # examples per step
    meta_fraction: float = 0.25  # share of examples from the meta path


@dataclass
class TrainConfig:
    batch_size: int = 128  # B: prompts per optimizer step (global, across ranks)
    total_steps: int = 314  # one epoch of DeepScaleR (40,315 problems) at 128 prompts per step
    ppo_epochs: int = 1  # passes over each batch; 1 keeps the update fully on-policy
    mini_batches: int = 1  # optimizer steps per pass; 1: fully on-policy (here). The released code takes 2 per
    #                        MASA batch: its mini-batch holds 128 x 16 sequences and a batch 128 x (16 + 16)
    micro_batch_tokens: int = 16384  # tokens per forward/backward micro-batch on one GPU
    seed: int = 0
    max_skipped_steps: int = 3  # consecutive steps skipped for a non-finite loss or gradient before the run stops


@dataclass
class LossConfig:
    clip_low: float = 0.2  # PPO ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher)
    clip_high: float = 0.28
    aggregation: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    kl_coef: float = 0.0  # k3 KL to the initial policy; the paper uses none
    entropy_coef: float = 0.0  # entropy bonus; the paper uses none
    dual_clip: float = 0.0  # dual-clip PPO constant c: for A < 0 a token's loss is capped at c|A|; 0: off (here);
    #                         the released code (verl's clip_ratio_c) uses 10, which matters only off-policy


@dataclass
class OptimConfig:
    lr: float = 1e-6  # AdamW
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    warmup_steps: int = 20  # batches of linear warmup, then constant (every optimizer step of a batch: one rate)
    warmup_from_zero: bool = False  # batch s (from 0) gets lr x min(1, (s + 1) / warmup_steps) (here); true:
    #                                 lr x min(1, s / warmup_steps), so the first batch has lr 0 (released code)
    grad_clip: float = 1.0  # global gradient-norm clip


SOLUTION_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."
META_TEMPLATE = """Do not solve the problem below yet. Predict how your own attempts at it will go.

Problem: {problem}

First reason briefly inside <meta> and </meta>: which mathematical notions a solution needs (leave out \
notions the problem already names), how hard it is, and how long a correct solution is. Then write one \
JSON object with exactly these keys:
- "math_notion": a list of strings, the notions a solution needs;
- "pass_rate": an integer from 0 to {group_size}, how many of {group_size} independent attempts will \
reach the correct answer;
- "solution_length": an integer from 1 to {max_length}, how many tokens a correct solution takes."""


@dataclass
class PromptConfig:
    """User messages for both paths; the tokenizer's chat template wraps them."""
    solution: str = SOLUTION_TEMPLATE  # must contain {problem}
    meta: str = META_TEMPLATE  # must contain {problem}, {group_size} and {max_length}
    meta_system: str = ""  # a system message before the meta prompt ("": none)
    hint: str = " Notions that may help: {notions}."  # appended to the solution prompt (efficient.hints); {notions}:
    #                                                  a, b; {notion_list}: ['a', 'b'] (a Python list)
    hint_length: str = " A correct solution takes about {length} tokens."  # then this, with efficient.hint_with_length
    hint_separator: str = ""  # written between the solution prompt and a hint


@dataclass
class MetaConfig:
    pass_rate_base: float = 0.01  # b in the pass-rate reward b ** |p_true - pass_rate / G|


@dataclass
class EfficientConfig:
    """MASA-efficient's mechanisms; each switch is one ablation."""
    gating: bool = False  # skip solution rollouts of prompts predicted all-correct or all-wrong
    gate_start_step: int = 80  # gating and cutoff (hints too, see hint_start_step) start once the meta path is trained
    gate_std: float = 0.1  # gate only when the M predicted pass rates agree (std below this)
    gate_eps: float = 0.05  # ... and their mean is <= eps or >= 1 - eps (the paper gives no value)
    cutoff: bool = False  # stop solution rollouts past cutoff_factor x the predicted length
    cutoff_factor: float = 2.0
    hints: bool = False  # append one meta rollout's notions to the solution prompt
    hint_mode: Literal["prompt", "rollout"] = "prompt"  # prompt: one drawn prediction per prompt, shared by its G
    #                                                     rollouts (here); rollout: one per rollout (released code)
    hint_with_length: bool = False  # the hint also states the drawn prediction's length (released code: true)
    hint_start_step: int = -1  # first step with hints; -1: gate_start_step (here); released code: 0, the start
    cutoff_in_loss: bool = True  # a cut rollout (reward 0) stays in the loss, i.e. a length penalty (here); false:
    #                              it counts in its group's statistics but carries no gradient
    behaviour_cloning: bool = False  # supervised steps on expert meta trajectories
    bc_select: Literal["score", "notion"] = "score"  # what picks a prompt's expert meta rollout: its meta reward
    #                                                  (here) or its notion part alone (released code, threshold 0.2)
    # The paper leaves the three below unstated; these are this project's choices.
    bc_threshold: float = 0.9  # an expert's meta reward (or notion part, per bc_select) must reach this
    bc_batch_size: int = 32  # experts per behaviour-cloning step
    bc_lr: float = 1e-6
    audit_every: int = 10  # every N steps also run what gating/cutoff skipped, to measure precision


@dataclass
class ValidationConfig:
    path: str | None = None  # held-out problems (JSONL or parquet); null disables validation
    every: int = 5  # optimizer steps between validations
    samples: int = 1  # responses per problem
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 0.7


@dataclass
class CheckpointConfig:
    dir: str = "runs/qwen3_8b_masa"  # checkpoints, metrics.jsonl and the resolved config go here
    every: int = 10  # optimizer steps between checkpoints (and one at the end); 0: none (benchmarks)
    keep: int = 3  # most recent checkpoints kept
    resume_from: str = ""  # a step directory (step_000120, or a path) to resume from; "": the newest intact one
    allow_config_change: bool = False  # resume even if keys that change the experiment differ (each is logged)


@dataclass
class LogConfig:
    wandb: bool = False  # also log to Weights & Biases when it is installed
    wandb_project: str = "masa"
    progress_bar: bool = True


@dataclass
class Config:
    algorithm: Literal["grpo", "masa", "masa_efficient"] = "masa"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    efficient: EfficientConfig = field(default_factory=EfficientConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error rather than last-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- the YAML file at `path` (if any) <- `a.b=value` overrides, in that order."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path} is not UTF-8 (byte {data[e.start]:#04x} on line {line}); save it as "
                              f"UTF-8") from None
        try:
            raw = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if raw is None:  # an empty file (or only comments) would silently run the paper's 8B defaults
            raise ConfigError(f"{path} is empty: a config names at least what it changes from config.py's defaults "
                              f"(start from configs/qwen3_8b.yaml or configs/tiny.yaml)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        *sections, leaf = key.split(".")
        target = raw
        for part in sections:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            target[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value of {key!r} is not valid YAML ({problem}); quote "
                              f"strings that hold YAML syntax, e.g. {key}='\"...\"'") from None
    cfg = from_dict(Config, raw)
    check(cfg)
    return cfg


# (key, test, what it must be): values that type-check but cannot run
_RULES = [
    # a group of one has advantage 0 whatever its reward: nothing would be learned
    ("rollout.group_size", lambda v: v >= 2, "at least 2 (a group of one has no advantage to learn from)"),
    ("rollout.meta_group_size", lambda v: v >= 2, "at least 2 (a group of one has no advantage to learn from)"),
    ("rollout.temperature", lambda v: v >= 0, "at least 0 (0 is greedy)"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rollout.top_k", lambda v: v == -1 or v >= 1, "-1 (off) or at least 1"),
    ("rollout.max_prompt_tokens", lambda v: v >= 1, "at least 1"),
    ("rollout.max_response_tokens", lambda v: v >= 1, "at least 1"),
    ("rollout.slots", lambda v: v >= 0, "at least 0 (0: 256)"),
    ("rollout.kv_tokens", lambda v: v >= 0, "at least 0 (0: sized from free memory)"),
    ("train.batch_size", lambda v: v >= 1, "at least 1"),
    ("warm_start.steps", lambda v: v >= 0, "at least 0"),
    ("warm_start.lr", lambda v: v > 0, "positive"),
    ("warm_start.warmup_steps", lambda v: v >= 0, "at least 0"),
    ("data.arithmetic_digits", lambda v: len(v) > 0 and all(1 <= d <= 20 for d in v),
     "a non-empty list of digit counts from 1 to 20"),
    ("data.multiplier_digits", lambda v: len(v) > 0 and all(1 <= d <= 20 for d in v),
     "a non-empty list of digit counts from 1 to 20"),
    ("warm_start.batch_size", lambda v: v >= 1, "at least 1"),
    ("warm_start.meta_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.arithmetic_count", lambda v: v >= 1, "at least 1"),
    ("train.total_steps", lambda v: v >= 0, "at least 0"),
    ("train.ppo_epochs", lambda v: v >= 1, "at least 1"),
    ("train.mini_batches", lambda v: v >= 1, "at least 1"),
    ("train.micro_batch_tokens", lambda v: v >= 1, "at least 1"),
    ("train.seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"),
    ("train.max_skipped_steps", lambda v: v >= 1, "at least 1"),
    ("loss.kl_coef", lambda v: v >= 0, "at least 0 (a negative coefficient rewards moving away from the reference)"),
    ("loss.entropy_coef", lambda v: v >= 0, "at least 0"),
    ("loss.dual_clip", lambda v: v == 0 or v > 1, "0 (off) or greater than 1"),
    ("loss.clip_low", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss.clip_high", lambda v: v >= 0, "at least 0"),
    ("optim.lr", lambda v: v > 0, "positive"),
    ("optim.weight_decay", lambda v: v >= 0, "at least 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.warmup_steps", lambda v: v >= 0, "at least 0"),
    ("optim.grad_clip", lambda v: v > 0, "positive"),
    ("meta.pass_rate_base", lambda v: 0 < v < 1, "in (0, 1)"),
    ("efficient.gate_std", lambda v: v >= 0, "at least 0"),
    ("efficient.gate_eps", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("efficient.cutoff_factor", lambda v: v > 0, "positive"),
    ("efficient.bc_batch_size", lambda v: v >= 1, "at least 1"),
    ("efficient.bc_threshold", lambda v: 0 <= v <= 1, "in [0, 1] (meta rewards and their parts lie there)"),
    ("efficient.bc_lr", lambda v: v > 0, "positive"),
    ("efficient.gate_start_step", lambda v: v >= 0, "at least 0"),
    ("efficient.hint_start_step", lambda v: v >= -1, "-1 (with gate_start_step) or at least 0"),
    ("efficient.audit_every", lambda v: v >= 1, "at least 1"),
    ("validation.every", lambda v: v >= 1, "at least 1"),
    ("validation.samples", lambda v: v >= 1, "at least 1"),
    ("validation.temperature", lambda v: v >= 0, "at least 0 (0 is greedy)"),
    ("validation.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("checkpoint.every", lambda v: v >= 0, "at least 0 (0 writes no checkpoint)"),
    ("checkpoint.keep", lambda v: v >= 1, "at least 1"),
]


_PLACEHOLDERS = {"solution": ["{problem}"], "meta": ["{problem}", "{group_size}", "{max_length}"],
                 "hint": ["{notions}|{notion_list}"], "hint_length": ["{length}"]}  # |: either


def check(cfg: Config):
    """Raise ConfigError for the first value that is of the right type but out of range."""
    for key, ok, expected in _RULES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")
    from model import PRESETS  # here, not at the top: importing config.py needs no torch, checking a config does

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset' must be one of {', '.join(PRESETS)}, got {cfg.model.preset!r}")
    for name, needed in _PLACEHOLDERS.items():
        text = getattr(cfg.prompt, name)
        missing = [p.replace("|", " or ") for p in needed if not any(q in text for q in p.split("|"))]
        if missing:
            raise ConfigError(f"config key 'prompt.{name}' must contain {', '.join(missing)}")


def from_dict(cls, raw: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value against the schema."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        name = f"{where}{key}"
        if key not in hints:
            level = f"in section {where[:-1]!r}" if where else "at the top level"
            raise ConfigError(f"unknown config key {name!r}; valid keys {level}: {', '.join(valid)}")
        values[key] = _convert(value, hints[key], name)
    return cls(**values)


def _convert(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} is a section; give it a mapping, not {value!r}")
        return from_dict(hint, value, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # only `X | None` occurs in the schema
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {name!r} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {name!r} expects a list, got {value!r}")
        return [_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {name!r} must be a finite number, got {value!r}")
            return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name!r} expects {hint.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


# What a resumed run may change without changing the experiment (checkpoints.config_changes): where
# and how often things are written or shown, how long the run goes on, held-out validation, the
# audit's cadence (it only measures), and the sampler's memory knobs (they change no sampled token:
# rollout.generate draws each sequence from its own stream). Keys are dotted; a trailing dot takes a
# whole section. Every other key changes the experiment: a resume that changes one stops, unless
# checkpoint.allow_config_change=true.
BENIGN_ON_RESUME = ("log.", "checkpoint.", "validation.", "train.total_steps", "efficient.audit_every",
                    "rollout.slots", "rollout.kv_tokens", "rollout.cuda_graphs")


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(cfg: Config) -> dict:
    """The resolved configuration as plain data (saved next to every checkpoint)."""
    return dataclasses.asdict(cfg)
