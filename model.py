"""Qwen3 dense transformer, written from scratch; loads and saves Hugging Face checkpoints (hf_checkpoint.py).

Every other stage runs this model: the sampler (rollout.py) drives its KV-cache forward, the trainer
(train.py) its training forward. The architecture follows the Qwen3 report (Yang et al., 2025):

    embed -> N x [x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))] -> RMSNorm -> lm_head

where attention has separate q/k/v/o projections, an RMSNorm over head_dim on every query and key
head (before RoPE), rotary embeddings with the config's theta, and grouped-query attention (several
query heads share one key/value head). The parameter names mirror the Hugging Face checkpoint
layout, less its `model.` prefix, so loading and saving is a rename and nothing else.

Two forwards, one module:
- training: `model(input_ids)` on a right-padded batch [B, T] -> logits [B, T, V]. Causal attention
  alone is enough for right padding: real tokens never see the pads that follow them, and whatever
  the model computes at pad positions is masked out of the loss by the caller.
- decoding: `model(input_ids, cache=PagedKVCache(...), start=..., block_table=..., kv_len=...)`: keys
  and values in a pool of fixed-size blocks that many sequences share, addressed through a block
  table (decode attention: masa_kernels.paged_decode_attention); see `PagedKVCache` for the contract.
`return_hidden=True` returns the final-norm hidden states instead of logits, so that the fused
log-prob kernel (masa_kernels/) or the sampler can apply the lm_head to just the rows they need.

Not here: mixture-of-experts Qwen3, sliding-window attention, RoPE scaling (YaRN), tensor
parallelism, the tokenizer. A checkpoint that needs one of these is refused with a message.

Run `python model.py` for a self-check: build a tiny random model, save it, load it back, and decode
greedily with the KV cache against a full-forward recomputation.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hf_checkpoint


# ---------------------------------------------------------------------------------------------------
# Configuration and named shapes


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # query heads per key/value head = num_attention_heads / this
    head_dim: int  # not necessarily hidden_size / num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + 2 * d + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


_QWEN3 = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, bos_token_id=151643, eos_token_id=151643)

# Shapes of the released Qwen3 dense models (their config.json files), for random-init benchmarks
# and memory planning; `tiny` is for tests. Real runs load shapes from the checkpoint instead.
PRESETS: dict[str, Qwen3Config] = {
    "tiny": Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "0.6B": Qwen3Config(**_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, tie_word_embeddings=True),
    "1.7B": Qwen3Config(**_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, tie_word_embeddings=True),
    "4B": Qwen3Config(**_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                      num_attention_heads=32, tie_word_embeddings=True),
    "8B": Qwen3Config(**_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32),
    "14B": Qwen3Config(**_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                       num_attention_heads=40),
}


# ---------------------------------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the normalization in float32 and the weight applied in x's dtype
    (the order Qwen3's reference code uses, which matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [*positions.shape, head_dim] for rotate-half RoPE, computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [..., head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos, sin: [B, T, D]. Rotates the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks (the paged sampler's pool).

    Layout: `k`, `v` are [layers, blocks, block_size, kv_heads, head_dim] (position-major: a block's
    positions are contiguous rows of all heads, so a token's keys are written as one row, and gathering
    a sequence's blocks gives its positions in order without a transpose). Which blocks hold which
    sequence is the caller's bookkeeping, passed to each forward as a block table:

        model(input_ids [B, T], cache=pool, start=start [B], block_table=[B, max_blocks], kv_len=int)

    writes the keys/values of input_ids[b, t] at position p = start[b] + t of sequence b, that is in
    block block_table[b, p // block_size] at offset p % block_size (every such block must be in the
    table). Then:
    - T > 1 (prefill): start must be 0 and the rows unpadded (the same T); attention is dense and
      causal over the T tokens (SDPA), nothing is read from the pool;
    - T = 1 (decode): the token attends to its sequence's start[b] + 1 live positions, wherever their
      blocks lie (masa_kernels.paged_decode_attention); `kv_len` bounds start + 1 from above (a host-side
      number, so that the kernel needs no device sync to size its work).
    Sequences may share blocks (a prompt's full blocks, written once, in every sample's table).
    """

    def __init__(self, config: Qwen3Config, blocks: int, block_size: int = 16, dtype=torch.float32, device=None):
        shape = (config.num_hidden_layers, blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    def __init__(self, c: Qwen3Config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=c.attention_bias, dtype=dtype, device=device)
        self.layer_idx, self.head_dim = layer_idx, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, **kw)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)

    def forward(self, x, cos, sin, cache: PagedKVCache | None = None, slots=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            blocks, offsets, table, lengths, kv_len = slots  # [B, T], [B, T], [B, nb], [B], int
            cache.k[self.layer_idx][blocks, offsets] = k.transpose(1, 2)  # [B, T, Hkv, D] rows
            cache.v[self.layer_idx][blocks, offsets] = v.transpose(1, 2)
            if T > 1:  # prefill from position 0: the row's own keys are all there is to attend to
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                import masa_kernels

                out = masa_kernels.paged_decode_attention(q[:, :, 0], cache.k[self.layer_idx], cache.v[self.layer_idx],
                                                     table, lengths, kv_len)[:, :, None]  # [B, H, 1, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Qwen3Config, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Qwen3Config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.self_attn = Attention(c, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.mlp = MLP(c, dtype, device)

    def forward(self, x, cos, sin, cache=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """The Qwen3 causal LM. `Qwen3(config)` is randomly initialized; `Qwen3.from_pretrained` loads."""

    def __init__(self, config: Qwen3Config, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(c, i, dtype, device) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        # Tied models have no lm_head module: the output projection *is* the embedding matrix.
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(
            c.hidden_size, c.vocab_size, bias=False, dtype=dtype, device=device)
        self.activation_checkpointing = False  # recompute each block in backward (trainer sets it)
        self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] lm_head weight (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Random init as Qwen3's config prescribes (normal(0, initializer_range), norms at 1)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids: torch.Tensor, *, cache: PagedKVCache | None = None, start=None,
                block_table: torch.Tensor | None = None, kv_len: int | None = None, return_hidden: bool = False,
                targets: torch.Tensor | None = None, temperature: float = 1.0):
        """input_ids [B, T] -> logits [B, T, V] (or final hidden states [B, T, H]).

        Without `cache`: causal attention over the T tokens at positions 0..T-1 (training forward).
        With `cache`: see `PagedKVCache` for `start`, `block_table` and `kv_len`.
        With `targets` [B, T] (the token that follows each position): returns (log p(target), entropy),
        each [B, T] float32 under softmax(logits / temperature), through masa_kernels.linear_token_logprobs,
        so full logits never exist. Computing them inside forward also lets FSDP keep the lm_head
        weight gathered exactly while it is used.
        """
        B, T = input_ids.shape
        device = input_ids.device
        x = self.embed_tokens(input_ids)  # [B, T, H]
        slots = None
        if cache is None:
            positions = torch.arange(T, device=device)[None]  # [1, T], broadcast over rows
        else:
            if start is None or block_table is None or kv_len is None:
                raise ValueError("a cached forward needs `start`, `block_table` and `kv_len` (see PagedKVCache)")
            start = torch.as_tensor(start, device=device).reshape(-1).expand(B)
            positions = start[:, None] + torch.arange(T, device=device)  # [B, T]
            blocks = block_table.gather(1, (positions // cache.block_size).long()).long()  # [B, T]
            slots = (blocks, positions % cache.block_size, block_table, (start + 1).int(), kv_len)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, slots)
        x = self.norm(x)
        if targets is not None:
            import masa_kernels

            logprobs, entropy = masa_kernels.linear_token_logprobs(x, self.output_weight, targets, temperature)
            return logprobs.clone(), entropy.clone()  # not views: FSDP's backward hooks need fresh outputs
        return x if return_hidden else self.logits(x)

    # -- checkpoints ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "Qwen3":
        """Load a Hugging Face Qwen3 checkpoint: a local directory with config.json and safetensors
        (one file, or shards listed in model.safetensors.index.json), or a hub id to download.
        dtype=None keeps the dtype recorded in config.json (float32 if none is recorded)."""
        directory = hf_checkpoint.resolve(path)
        config, stored_dtype = hf_checkpoint.read_config(directory, Qwen3Config)
        dtype = dtype or stored_dtype
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = hf_checkpoint.read_weights(directory, shapes, torch.device(device or "cpu"), dtype,
                                           tied=config.tie_word_embeddings)
        model.load_state_dict(state, assign=True)
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5_000_000_000):
        """Write config.json and safetensors (sharded with an index above max_shard_bytes) in the
        Hugging Face layout, atomically: a crash never leaves a half-written checkpoint at `path`.
        Saving over an existing checkpoint replaces its weights and config and keeps its other files
        (a tokenizer, a README)."""
        hf_checkpoint.write(path, self.state_dict(), self.config, max_shard_bytes)


# ---------------------------------------------------------------------------------------------------
# Self-check: `python model.py`


@torch.no_grad()
def greedy_decode(model: Qwen3, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt through the paged cache: each prompt prefilled into blocks of
    its own, then one token per row per step. A plain reference for rollout.py's sampler, which adds
    sharing, scheduling and sampling."""
    device, BS = model.embed_tokens.weight.device, 16
    need = [-(-(len(p) + max_new_tokens) // BS) for p in prompts]
    cache = PagedKVCache(model.config, sum(need), BS, model.embed_tokens.weight.dtype, device)
    table = torch.zeros(len(prompts), max(need), dtype=torch.int32, device=device)
    first = []
    for b, prompt in enumerate(prompts):
        table[b, :need[b]] = torch.arange(sum(need[:b]), sum(need[:b + 1]))
        hidden = model(torch.tensor([prompt], device=device), cache=cache, start=0, block_table=table[b:b + 1],
                       kv_len=len(prompt), return_hidden=True)  # [1, T, H]
        first.append(model.logits(hidden[0, -1]).argmax())
    token, length = torch.stack(first), torch.tensor([len(p) for p in prompts], device=device)
    out = [token]
    for _ in range(max_new_tokens - 1):
        token = model(token[:, None], cache=cache, start=length, block_table=table,
                      kv_len=int(length.max()) + 1)[:, -1].argmax(-1)
        length = length + 1
        out.append(token)
    return torch.stack(out, 1).tolist()


def _self_check():
    import time

    torch.manual_seed(0)
    config = replace(PRESETS["tiny"], tie_word_embeddings=False)
    model = Qwen3(config).eval()
    print(f"built a random Qwen3 ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} query/kv heads, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_bytes=100_000)
        loaded = Qwen3.from_pretrained(tmp).eval()
        files = sorted(p.name for p in Path(tmp).iterdir())
    ids = torch.randint(0, config.vocab_size, (4, 32))
    with torch.no_grad():
        diff = (model(ids) - loaded(ids)).abs().max().item()
    print(f"save_pretrained -> from_pretrained ({len(files)} files): max |logit difference| = {diff:.2e}")

    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (5, 9, 13, 17)]
    t0 = time.perf_counter()
    tokens = greedy_decode(loaded, prompts, max_new_tokens=48)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():  # reference: recompute the whole sequence at every step, no cache
        agree = all(
            loaded(torch.tensor([p + out[:i]]))[0, -1].argmax().item() == out[i]
            for p, out in zip(prompts, tokens) for i in range(len(out))
        )
    print(f"greedy decoding with the KV cache: {len(prompts)} prompts x 48 tokens in {elapsed:.2f} s; "
          f"identical to full-forward recomputation: {agree}")
    if diff != 0 or not agree:
        raise SystemExit("self-check FAILED")
    print("self-check passed")


if __name__ == "__main__":
    _self_check()
