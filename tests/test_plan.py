"""train.py --plan: the per-GPU memory plan. The 8B numbers against arithmetic done by hand from the
Qwen3-8B model card's shape; the activation estimate against what autograd really saves."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from config import load_config
from model import PRESETS, Qwen3
from plan import GIB, activation_bytes_per_token, memory_plan, model_shape
from train import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_8b_plan_matches_hand_computation():
    cfg = load_config(CONFIGS / "qwen3_8b.yaml")
    plan = memory_plan(cfg, gpus=8, gpu_memory_gib=80)
    # Qwen3-8B: vocab 151936, hidden 4096, 36 layers, 32 query / 8 key-value heads of 128, MLP 12288, untied.
    P = 151936 * 4096 * 2 + 4096 + 36 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096)
    assert plan["parameters"] == P == 8_190_735_360
    assert plan["master_weights"] == 4_095_367_680  # 4 bytes x P / 8 GPUs
    assert plan["adam_state"] == 8_190_735_360  # 8 bytes x P / 8
    assert plan["gradients"] == 4_095_367_680
    assert plan["rollout_copies"] == 16_381_470_720  # 2 bytes x P, the full bf16 copy
    assert plan["kv_bytes_per_position"] == 2 * 36 * 8 * 128 * 2 == 147_456  # 144 KiB
    # the decode graphs, kept free: 2 x 256 lanes x (logits 151,936 x (2 + 4) bytes + bf16 activations
    # 2 x (4 x 4096 + (32 + 2 x 8) x 128 + 3 x 12288)) = 2 x 256 x 1,030,400 bytes
    assert plan["decode_graphs"] == 2 * 256 * (151_936 * 6 + 2 * (4 * 4096 + 48 * 128 + 3 * 12288)) == 527_564_800
    # 60% of what the shards, the rollout copy and the graphs leave of 80 GiB, in whole 16-position
    # blocks: 0.6 x (57,231,772,160 - 527,564,800) / (16 x 147,456) = 14,420.5 blocks
    assert plan["kv_tokens"] == 14_420 * 16 == 230_720 and plan["kv_pool"] == 230_720 * 147_456
    assert plan["sequences_per_gpu"] == 128 * (16 + 16) // 8 == 512
    # 256-token prompts, responses of 0.375 x 8192 = 3072 held half on average: 230,720 / 1,792 = 128.8
    assert plan["expected_concurrency"] == pytest.approx(230_720 / (256 + 3072 / 2))
    assert plan["micro_batch_tokens"] == 16384
    assert plan["peak_rollout"] == pytest.approx((4_095_367_680 + 8_190_735_360 + 16_381_470_720
                                                  + 230_720 * 147_456 + 527_564_800))
    # with activation checkpointing (the config's setting) the update fits; without it, it does not
    assert plan["activations"] == plan["activations_checkpointed"] < 10 * GIB < 100 * GIB < plan["activations_full"]
    assert plan["fits"]
    assert not memory_plan(load_config(CONFIGS / "qwen3_8b.yaml", ["model.activation_checkpointing=false"]), 8, 80)["fits"]


def test_8b_step_time_bound_matches_hand_computation():
    # On an H100 (3.35 TB/s, 989 TFLOP/s bf16). Sampling: 512 sequences x 3,072 tokens = 1,572,864 tokens
    # in steps of 230,720 / 1,792 = 128.75 sequences, 12,216.4 decode steps, each reading the bf16
    # weights (16,381,470,720 bytes) and 230,720 held positions x 147,456 bytes (the whole pool):
    # 12,216.4 x 50,402,099,200 / 3.35e12 = 183.8 s. Update: 8 x P flops a token (forward, recomputed
    # forward, backward) over 512 x (256 + 3,072) tokens: 8 x 8,190,735,360 x 1,703,936 / 989e12 = 112.9 s.
    plan = memory_plan(load_config(CONFIGS / "qwen3_8b.yaml"), gpus=8, gpu_memory_gib=80)
    assert plan["sampling_seconds"] == pytest.approx(1_572_864 / 128.75 * (16_381_470_720 + 230_720 * 147_456) / 3.35e12)
    assert plan["sampling_seconds"] == pytest.approx(183.8, abs=0.05)
    assert plan["update_seconds"] == pytest.approx(8 * 8_190_735_360 * 1_703_936 / 989e12) == pytest.approx(112.9, abs=0.05)
    grpo = memory_plan(load_config(CONFIGS / "qwen3_8b_grpo.yaml"), gpus=8, gpu_memory_gib=80)
    assert grpo["update_seconds"] == pytest.approx(plan["update_seconds"] / 2)  # no meta rollouts: half the tokens


def _saved_bytes_per_token(config, dtype, checkpointing, rows=2, length=32) -> float:
    """Bytes of the tensors autograd saves in a training forward (parameters excluded), per token."""
    model = Qwen3(config, dtype=dtype)
    model.activation_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (rows, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, return_hidden=True)
    return sum(saved.values()) / (rows * length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_what_autograd_saves(dtype):
    config = replace(PRESETS["tiny"], hidden_size=96, intermediate_size=160, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=24)
    s = torch.finfo(dtype).bits // 8
    block, _ = activation_bytes_per_token(config, s)

    def per_block(checkpointing):  # the difference between 3 blocks and 1 isolates one block
        one, three = (_saved_bytes_per_token(replace(config, num_hidden_layers=n), dtype, checkpointing) for n in (1, 3))
        return (three - one) / 2

    assert per_block(False) == pytest.approx(block, rel=0.05)  # measured within 2.5% on the CPU
    assert per_block(True) == pytest.approx(s * config.hidden_size, rel=0.05)  # checkpointing keeps block inputs


def test_plan_command_prints_the_table(capsys):
    main([str(CONFIGS / "qwen3_8b.yaml"), "--plan"])
    out = capsys.readouterr().out
    assert "8,190,735,360 parameters, 8 GPUs of 80 GiB" in out and "230,720 positions" in out and "fits: yes" in out
    main([str(CONFIGS / "qwen3_8b.yaml"), "--plan", "--gpus", "2", "--gpu-memory", "40"])
    assert "fits: NO" in capsys.readouterr().out


def test_model_shape_reads_a_local_checkpoint_and_names_the_fix_otherwise(tmp_path):
    Qwen3(PRESETS["tiny"]).save_pretrained(tmp_path / "ckpt")
    cfg = load_config(CONFIGS / "qwen3_8b.yaml", [f"model.path={tmp_path / 'ckpt'}"])
    assert model_shape(cfg)[0] == PRESETS["tiny"]
    with pytest.raises(ValueError, match="local checkpoint directory"):
        model_shape(load_config(CONFIGS / "qwen3_8b.yaml", ["model.path=someone/some-model"]))
