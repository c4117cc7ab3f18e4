"""Shared fixtures: tiny random Qwen3 checkpoints written by transformers, the independent reference."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # Run Triton kernels on the CPU. Triton reads this when a kernel is defined, so it must be set
    # before `masa_kernels` is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def child_env(threads: int = 1, **changes: str | None) -> dict[str, str]:
    """The environment for a process a test starts: this one's, with the thread count fixed (a float
    sum's rounding depends on how many threads split it, so a child left to inherit the caller's
    OMP_NUM_THREADS could disagree in the last bits with a reference run) and `changes` applied (None
    removes a variable). Every test that starts a Python process passes it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env

# Tiny shapes that still exercise what real checkpoints vary: tied and untied embeddings, key/value
# head ratios 1, 2 and 4, a head_dim other than hidden / heads, attention biases, a non-default theta.
TINY_HF_CONFIGS = {
    "tied-mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
    "untied-gqa2-wide-heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   tie_word_embeddings=False, rope_theta=1_000_000.0),
    "tied-gqa4-bias": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                           tie_word_embeddings=True, attention_bias=True),
}


def make_hf_model(seed: int = 0, **overrides):
    """A random transformers Qwen3ForCausalLM in float32. Every parameter, norms and biases included,
    is perturbed away from its init, so a norm or bias that is skipped or misplaced shows up."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  rope_theta=10_000.0, max_position_embeddings=256)
    kwargs.update(overrides)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random transformers Qwen3 to a fresh directory; returns (hf_model, path)."""
    def build(name: str = "untied-gqa2-wide-heads", seed: int = 0, **save_kwargs):
        hf = make_hf_model(seed, **TINY_HF_CONFIGS[name])
        path = tmp_path / f"hf-{name}-{seed}"
        hf.save_pretrained(path, **save_kwargs)
        return hf, path
    return build


def make_tiny_checkpoint(directory):
    """A tiny random Qwen3 (seed 0) with a character tokenizer, saved where train.py and eval.py
    load real checkpoints from."""
    from dataclasses import replace

    from data import build_char_tokenizer
    from model import PRESETS, Qwen3

    build_char_tokenizer(directory)
    torch.manual_seed(0)
    Qwen3(replace(PRESETS["tiny"], vocab_size=128)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Qwen3 with a character tokenizer, and a few arithmetic problems (train.py's inputs)."""
    import json

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("assets")
    make_tiny_checkpoint(root / "model")
    AutoTokenizer.from_pretrained(root / "model")  # the tokenizer files survived save_pretrained
    with open(root / "problems.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"problem": f"What is {a}+{a + 1}?", "answer": str(2 * a + 1)}) + "\n")
    return root
