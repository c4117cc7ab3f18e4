"""The memory plan: what one GPU holds during a run, from the config and the model's shape alone.

    python train.py CONFIG --plan [--gpus 8] [--gpu-memory 80]     # prints it (nothing is loaded)

A module of its own because it is arithmetic about a run, not part of one: train.py prints it and,
before loading anything, refuses sizes that cannot run (check_sizes); bench/gpu_check.py compares it
with a measured peak, and neither needs the other's machinery.

Exact: the FSDP shards, the rollout copy and the KV pool (the sampler's own sizing rule,
rollout.kv_tokens_that_fit). Stated assumption: the sequences decoded together, which depend on the
lengths the policy writes (MEAN_PROMPT, and a mean response of RESPONSE_SHARE of the budget unless
given). Estimated: activations (bytes autograd saves per token, read off model.py
and checked against autograd in tests/test_plan.py) and FSDP2's gathered parameters in flight.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from config import Config, ConfigError
from hf_checkpoint import cached, read_config
from model import PRESETS, Qwen3Config
from rollout import BLOCK_SIZE, decode_graph_bytes, kv_bytes_per_position, kv_tokens_that_fit

GIB = 1024 ** 3


def model_shape(cfg: Config) -> tuple[Qwen3Config, str]:
    """The model's Qwen3Config without loading or downloading weights: model.preset for init: random,
    else the local checkpoint's config.json (or a hub id's, from the local cache), else the preset
    named by a hub id such as Qwen/Qwen3-8B-Base. Returns the config and where it came from."""
    if cfg.model.init == "random":
        return PRESETS[cfg.model.preset], f"model.PRESETS[{cfg.model.preset!r}]"
    local = Path(cfg.model.path).expanduser()
    if (local / "config.json").is_file():
        return read_config(local, Qwen3Config)[0], str(local / "config.json")
    if not local.exists() and (snapshot := cached(cfg.model.path)):  # a hub id in the local cache
        return read_config(snapshot, Qwen3Config)[0], f"{cfg.model.path}'s config.json (cached)"
    size = re.search(r"Qwen3-(\d+(?:\.\d+)?B)", cfg.model.path)
    if size and size.group(1) in PRESETS:
        return PRESETS[size.group(1)], f"model.PRESETS[{size.group(1)!r}] (the shape of {cfg.model.path})"
    raise ConfigError(f"cannot tell the shape of model.path={cfg.model.path!r} without downloading it: set "
                     f"model.path to a local checkpoint directory (with config.json) or a Qwen3 hub id")


def activation_bytes_per_token(c: Qwen3Config, dtype_bytes: int) -> tuple[int, int]:
    """(one block, the final norm and fused log-prob head): bytes autograd saves per token in a
    training forward on a GPU, read off model.py. Per block: each RMSNorm keeps its fp32 input,
    1/rms and the normalized output; attention keeps q, k, v after q/k-norm and RoPE, its output, its
    log-sum-exp (fp32 per head) and o_proj's contiguous input; SwiGLU keeps gate, silu(gate), up and
    their product. The head keeps the final norm's tensors and the hidden states (the fused kernel
    recomputes logits in backward; targets and two fp32 per token)."""
    s, h, i = dtype_bytes, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def norm(width, rows=1):
        return 4 * width + 4 * rows + s * width

    block = (2 * norm(h) + norm(q, c.num_attention_heads) + norm(kv, c.num_key_value_heads)
             + s * (2 * q + 2 * kv) + 4 * c.num_attention_heads + s * q + 4 * s * i)
    head = norm(h) + s * h + 8 + 8
    return block, head


MEAN_PROMPT = 256  # tokens of a math problem in the chat template (MATH, DeepScaleR: mostly 100-400)
RESPONSE_SHARE = 0.375  # mean response / budget: about 3k of 8k tokens for a reasoning model


H100 = (3.35e12, 989e12)  # H100 SXM: HBM3 bytes/s, dense bf16 flop/s (NVIDIA's data sheet)


def memory_plan(cfg: Config, gpus: int, gpu_memory_gib: float, mean_response: float | None = None,
                gpu_speed: tuple[float, float] = H100) -> dict:
    """Per-GPU bytes of each thing a run of `cfg` on `gpus` GPUs holds, and the two peaks:
    rollouts (master weights, Adam state, the bf16 rollout copy(ies), the KV pool) and the update
    (the same minus the KV pool, plus gradients, gathered parameters in flight and activations).
    Estimates from shapes: bench/gpu_check.sh measures a real step's peak."""
    c, source = model_shape(cfg)
    P = c.num_parameters()
    s = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8  # bytes of the compute / rollout dtype
    h, layers = c.hidden_size, c.num_hidden_layers
    root = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h  # embedding, lm_head, final norm
    block = (P - root) // layers
    copies = 1 + (cfg.loss.kl_coef > 0)  # the rollout copy, and the frozen reference for the KL term
    out = {"model": source, "parameters": P, "gpus": gpus, "gpu_memory": gpu_memory_gib * GIB}
    out["master_weights"] = 4 * P / gpus  # fp32 FSDP shards
    out["adam_state"] = 8 * P / gpus  # exp_avg and exp_avg_sq, fp32
    out["gradients"] = 4 * P / gpus  # fp32 shards; freed by zero_grad(set_to_none=True) before rollouts
    out["rollout_copies"] = copies * s * P
    # FSDP2 gathers the root's parameters for the whole forward/backward and prefetches one block
    # ahead; in backward each gathered block also holds its unsharded fp32 gradients until reduced.
    out["gathered"] = (s + 4) * (root + 2 * block)
    resident = out["master_weights"] + out["adam_state"] + out["rollout_copies"]
    max_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    dtype = getattr(torch, cfg.model.dtype)
    out["kv_bytes_per_position"] = kv_bytes_per_position(c, dtype)
    free = out["gpu_memory"] - resident
    out["sequences_per_gpu"] = cfg.train.batch_size * (
        cfg.rollout.group_size + (cfg.rollout.meta_group_size if cfg.algorithm != "grpo" else 0)) // gpus
    lanes = cfg.rollout.slots or 256
    out["decode_graphs"] = decode_graph_bytes(c, lanes, dtype) if cfg.rollout.cuda_graphs else 0
    out["kv_tokens"] = cfg.rollout.kv_tokens or kv_tokens_that_fit(c, dtype, free - out["decode_graphs"])  # as generate
    out["kv_pool"] = out["kv_tokens"] * out["kv_bytes_per_position"]
    # A sequence holds its prompt and the response so far, so on average over its life about half its
    # final response: that is what the pool divides into.
    response = mean_response or RESPONSE_SHARE * cfg.rollout.max_response_tokens
    out["mean_response"] = response
    out["mean_held"] = MEAN_PROMPT + response / 2
    out["expected_concurrency"] = min(out["kv_tokens"] / out["mean_held"], lanes, out["sequences_per_gpu"])
    out["one_sequence_fits"] = out["kv_tokens"] >= max_len + 2 * BLOCK_SIZE  # rollout.generate refuses less
    tokens = max(cfg.train.micro_batch_tokens, max_len)  # a longer sequence gets a micro-batch of its own
    per_block, head = activation_bytes_per_token(c, s)
    out["micro_batch_tokens"] = tokens
    out["activations_checkpointed"] = tokens * (layers * s * h + per_block + head)  # block inputs + one block
    out["activations_full"] = tokens * (layers * per_block + head)
    out["activations"] = out["activations_checkpointed" if cfg.model.activation_checkpointing else "activations_full"]
    out["peak_rollout"] = resident + out["kv_pool"] + out["decode_graphs"]
    out["peak_update"] = resident + out["gradients"] + out["gathered"] + out["activations"]
    out["fits"] = max(out["peak_rollout"], out["peak_update"]) <= 0.9 * out["gpu_memory"] - GIB and out["one_sequence_fits"]
    # A step's time at a GPU's peak rates `gpu_speed` (bytes/s, flop/s), with the response lengths and
    # concurrency above (bench/sampler.py --long-tail's arithmetic): every decode step reads the rollout
    # copy's weights and every position the decoded sequences hold; the update runs forward, the forward
    # again (activation checkpointing) and backward (twice a forward) at 2 flops per parameter per token.
    # A bound for those lengths; meta responses are shorter than solutions, which it does not model.
    bandwidth, flops = gpu_speed
    out["gpu_speed"] = gpu_speed
    concurrency = out["expected_concurrency"]
    generated = out["sequences_per_gpu"] * response
    read_per_step = s * P + concurrency * out["mean_held"] * out["kv_bytes_per_position"]
    out["sampling_seconds"] = generated / concurrency * read_per_step / bandwidth if concurrency > 0 else float("inf")
    passes = 4 if cfg.model.activation_checkpointing else 3
    out["update_seconds"] = 2 * passes * P * out["sequences_per_gpu"] * (MEAN_PROMPT + response) / flops
    return out


def print_plan(cfg: Config, plan: dict):
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    ckpt = "on" if cfg.model.activation_checkpointing else "off"
    rows = [
        ("FSDP shards: fp32 master weights (4 B/param / GPUs)", plan["master_weights"]),
        ("FSDP shards: AdamW exp_avg + exp_avg_sq (8 B/param / GPUs)", plan["adam_state"]),
        ("FSDP shards: fp32 gradients (4 B/param / GPUs; update only)", plan["gradients"]),
        (f"full {cfg.model.dtype} rollout copy" + (" + KL reference" if cfg.loss.kl_coef else ""), plan["rollout_copies"]),
        ("gathered params + unsharded grads in flight (root + 2 blocks)", plan["gathered"]),
        (f"paged KV pool: {plan['kv_tokens']:,} positions of {plan['kv_bytes_per_position'] // 1024} KiB",
         plan["kv_pool"]),
        ("the decode step's CUDA graphs (an estimate: rollout.decode_graph_bytes)", plan["decode_graphs"]),
        (f"activations, {plan['micro_batch_tokens']}-token micro-batch, checkpointing on", plan["activations_checkpointed"]),
        (f"activations, {plan['micro_batch_tokens']}-token micro-batch, checkpointing off", plan["activations_full"]),
    ]
    print(f"memory plan per GPU: {plan['model']}, {plan['parameters']:,} parameters, {plan['gpus']} GPUs of "
          f"{plan['gpu_memory'] / GIB:.0f} GiB")
    for name, value in rows:
        print(f"  {name:<78} {g(value)}")
    print(f"  {'peak while sampling (shards + rollout copy + KV pool + graphs)':<78} {g(plan['peak_rollout'])}")
    print(f"  {f'peak while updating (activation checkpointing {ckpt})':<78} {g(plan['peak_update'])}")
    print(f"  {plan['sequences_per_gpu']} sequences per GPU per step; about {plan['expected_concurrency']:.0f} decoded "
          f"together if prompts average {MEAN_PROMPT} tokens and responses {plan['mean_response']:,.0f} (each holds "
          f"its prompt and, on average, half its response)")
    bandwidth, flops = plan["gpu_speed"]
    if plan["sampling_seconds"] < float("inf"):  # else nothing decodes: the verdict below says why
        print(f"  at peak rates, with those lengths: {plan['sampling_seconds']:.0f} s sampling a step (each decode step "
              f"reads the weights and the held KV at {bandwidth / 1e12:.2f} TB/s) + {plan['update_seconds']:.0f} s updating "
              f"(forward, recomputed forward and backward at {flops / 1e12:.0f} TFLOP/s): an estimate, not a measurement")
    budget = 0.9 * plan["gpu_memory"] / GIB - 1
    verdict = "yes" if plan["fits"] else "NO: lower the peak that exceeds the budget (see the rows above)"
    print(f"fits: {verdict} (budget {budget:.1f} GiB: 90% of the GPU less 1 GiB for the CUDA context and "
          f"allocator slack)")


def check_sizes(cfg: Config, world: int, device: torch.device, main: bool = True):
    """Refuse, before anything is loaded or allocated, lengths the model cannot take and (on CUDA) a
    KV pool the memory plan says cannot hold one sequence; warn when the plan's peak exceeds the GPU,
    or when the learning rate is far above any RL fine-tuning's (train.py stops a diverging run)."""
    shape, source = model_shape(cfg)
    positions = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if positions > shape.max_position_embeddings:
        raise ConfigError(f"rollout.max_prompt_tokens + rollout.max_response_tokens = {positions:,} positions, more "
                         f"than the model takes ({shape.max_position_embeddings:,}, max_position_embeddings of "
                         f"{source}): lower rollout.max_response_tokens")
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / GIB
        plan = memory_plan(cfg, world, gib)
        if not plan["one_sequence_fits"]:
            raise ConfigError(f"the KV pool ({plan['kv_tokens']:,} positions) cannot hold one sequence of {positions:,} "
                             f"positions on a {gib:.0f} GiB GPU (train.py CONFIG --plan): lower "
                             f"rollout.max_response_tokens or set rollout.kv_tokens")
        if not plan["fits"] and main:
            print(f"warning: train.py --plan puts this run's peak above the GPU's budget ({gib:.0f} GiB): expect "
                  f"out-of-memory errors", flush=True)
    if cfg.optim.lr > 1e-2 and main:
        print(f"warning: optim.lr={cfg.optim.lr:g} is far above what RL fine-tuning uses (the paper: 1e-6); a run "
              f"whose weights' norm grows 100-fold stops", flush=True)
