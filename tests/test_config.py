"""config.py: the YAML files load into typed dataclasses, and every mistake a user can make is named."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from config import Config, ConfigError, load_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_values():
    cfg = Config()  # docs/method.md §1, written out independently of config.py
    assert (cfg.rollout.group_size, cfg.rollout.meta_group_size) == (16, 16)
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_response_tokens) == (2048, 8192)
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.aggregation) == (0.2, 0.28, "token-mean")
    assert (cfg.loss.kl_coef, cfg.loss.entropy_coef) == (0.0, 0.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (1e-6, 0.1, 20, 1.0)
    assert (cfg.train.batch_size, cfg.train.ppo_epochs, cfg.train.mini_batches) == (128, 1, 1)
    assert cfg.meta.pass_rate_base == 0.01
    assert (cfg.efficient.gate_std, cfg.efficient.cutoff_factor, cfg.efficient.gate_start_step) == (0.1, 2.0, 80)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_qwen3_8b_yaml_states_every_key_with_the_default_value():
    # The paper run is written out in full; it must agree with the defaults it documents.
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "qwen3_8b.yaml").read_text())
    defaults = to_dict(Config())
    assert raw.keys() == defaults.keys()
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert raw[section].keys() == values.keys(), section
    assert load_config(Path(__file__).parent.parent / "configs" / "qwen3_8b.yaml") == Config()


def test_the_released_configs_hold_every_override_of_the_readme_fidelity_table():
    import re

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    table = readme.split("## Fidelity to the released code", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[1]) for r in rows] == list(range(1, 21))  # all 20 differences, in order
    for r in rows:  # every row cites the released file and line it describes: path.ext:line
        assert re.search(r"`[\w/.]+\.(py|sh):\d+|`mrt:\d+", "|".join(r[2:4])), r[1]
    released = load_config(root / "configs" / "qwen3_8b_released.yaml")
    intent = load_config(root / "configs" / "qwen3_8b_released_intent.yaml")
    paper = load_config(root / "configs" / "qwen3_8b.yaml")
    overrides = {"run": [], "intent": []}  # rows for code no released script switches on: the intent config only
    for r in rows:
        found = re.findall(r"`([a-z_]+\.[a-z_]+=[^`]+)`", r[-2])  # last column
        overrides["intent" if "intent config" in r[-2] else "run"] += found
    assert (len(overrides["run"]), len(overrides["intent"])) == (6, 5)
    for override in overrides["run"] + overrides["intent"]:
        section, key = override.split("=")[0].split(".")
        wanted = getattr(getattr(load_config(None, [override]), section), key)
        assert getattr(getattr(intent, section), key) == wanted, override
        if override in overrides["run"]:
            assert getattr(getattr(released, section), key) == wanted, override

    def changes(cfg, base):
        return {f"{s}.{k}" for s, values in to_dict(cfg).items() if isinstance(values, dict)
                for k, v in values.items() if v != to_dict(base)[s][k]}

    # the released config otherwise keeps the paper run's settings, but for its run directory; the
    # intent config adds the hint and behaviour-cloning switches and the hint's wording (row 18)
    named = {o.split("=")[0] for o in overrides["run"]} - {"efficient.cutoff"}
    assert released.algorithm == "masa" and changes(released, paper) == named | {"checkpoint.dir"}
    named = {o.split("=")[0] for o in overrides["intent"]} | {"efficient.hints", "efficient.behaviour_cloning"}
    hint = {"prompt.hint", "prompt.hint_length", "prompt.hint_separator"}
    assert intent.algorithm == "masa_efficient" and changes(intent, released) == named | hint | {"checkpoint.dir"}
    # the switches of rows 16 and 17, as the released code sets them
    assert (released.rollout.stop_at_end_of_turn, released.prompt.meta_system) == (False, "You are a helpful assistant.")


def numeric_keys():
    import typing

    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                kind = typing.get_type_hints(cls)[f.name]
                if kind in (int, float) or typing.get_origin(kind) is list:
                    yield f"{section.name}.{f.name}", kind


@pytest.mark.parametrize("key,kind", list(numeric_keys()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_key_refuses_a_value_out_of_its_range(key, kind):
    # README: "unknown keys and values out of range are errors". No count, size, rate, step or
    # coefficient here means anything at -2 (where -1 means "off" it is the only negative allowed),
    # and no float key may be NaN: each is refused up front, naming the key.
    values = ["[-2, -2]"] if kind not in (int, float) else ["-2"] + ([".nan"] if kind is float else [])
    for value in values:
        with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
            load_config(None, [f"{key}={value}"])


def test_broken_files_overrides_and_presets_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim:\n  lr: 1.0e-6  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not UTF-8 \(byte 0xe9 on line 2\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'optim.betas=\[0.9, ': the value of 'optim.betas' is not valid YAML"):
        load_config(None, ["optim.betas=[0.9, "])
    with pytest.raises(ConfigError, match=r"'model.preset' must be one of tiny, 0.6B.*got 'nonexistent'"):
        load_config(None, ["model.preset=nonexistent"])
    for digits in ("[]", "[0]"):
        with pytest.raises(ConfigError, match="'data.arithmetic_digits' must be a non-empty list"):
            load_config(None, [f"data.arithmetic_digits={digits}"])


def test_overrides_apply_in_order_and_are_typed(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  lr: 3.0e-6\nrollout:\n  group_size: 8\n")
    cfg = load_config(file, ["optim.lr=2e-6", "rollout.top_k=20", "validation.path=/data/math500.jsonl",
                             "algorithm=grpo", "optim.betas=[0.9, 0.95]", "log.wandb=true"])
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)
    assert (cfg.rollout.group_size, cfg.rollout.top_k) == (8, 20)
    assert cfg.validation.path == "/data/math500.jsonl"
    assert cfg.algorithm == "grpo" and cfg.optim.betas == [0.9, 0.95] and cfg.log.wandb is True
    assert cfg.optim.weight_decay == 0.1  # untouched keys keep their defaults


def test_yaml_float_without_a_dot_is_read_as_a_float(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  lr: 1e-6\n")  # YAML 1.1 parses this as the string '1e-6'
    assert load_config(file).optim.lr == 1e-6


def test_integer_for_a_float_key_is_accepted():
    assert load_config(None, ["rollout.temperature=1"]).rollout.temperature == 1.0


def test_null_is_accepted_only_where_optional():
    assert load_config(None, ["validation.path=null"]).validation.path is None
    with pytest.raises(ConfigError, match="'data.train_path' expects str"):
        load_config(None, ["data.train_path=null"])


def test_unknown_key_lists_the_valid_keys_at_its_level(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError) as err:
        load_config(file)
    message = str(err.value)
    assert "'optim.learning_rate'" in message
    for key in (f.name for f in dataclasses.fields(Config().optim)):
        assert key in message


def test_unknown_section_lists_the_sections():
    with pytest.raises(ConfigError, match="'optimizer'; valid keys at the top level: .*model.*optim"):
        load_config(None, ["optimizer.lr=1"])


@pytest.mark.parametrize("override,expected", [
    ("rollout.group_size=sixteen", "'rollout.group_size' expects int, got 'sixteen'"),
    ("rollout.group_size=16.5", "'rollout.group_size' expects int, got 16.5"),
    ("rollout.group_size=true", "'rollout.group_size' expects int, got True"),
    ("optim.lr=fast", "'optim.lr' expects float, got 'fast'"),
    ("log.wandb=1", "'log.wandb' expects bool, got 1"),
    ("loss.aggregation=mean", r"'loss.aggregation' must be one of \['token-mean'"),
    ("optim.betas=0.9", "'optim.betas' expects a list"),
    ("optim=1", "'optim' is a section"),
])
def test_wrong_type_names_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])


def test_missing_or_broken_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=nan", "'optim.lr' must be a finite number"),
    ("loss.clip_high=.inf", "'loss.clip_high' must be a finite number"),
    ("rollout.group_size=0", "'rollout.group_size' must be at least 2"),
    ("rollout.group_size=1", r"'rollout.group_size' must be at least 2 \(a group of one has no advantage"),
    ("rollout.meta_group_size=1", "'rollout.meta_group_size' must be at least 2"),
    ("rollout.top_p=5", r"'rollout.top_p' must be in \(0, 1\], got 5.0"),
    ("optim.betas=[0.9]", "'optim.betas' must be two numbers"),
    ("efficient.gate_eps=0.7", r"'efficient.gate_eps' must be in \[0, 0.5\)"),
])
def test_values_that_cannot_run_are_refused(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused_not_run_as_the_paper_defaults(tmp_path, text):
    file = tmp_path / "empty.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(file)


def test_a_key_given_twice_is_refused(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  lr: 1.0e-6\n  lr: 2.0e-6\n")
    with pytest.raises(ConfigError, match="'lr' appears twice"):
        load_config(file)
