"""model.py against transformers' Qwen3ForCausalLM, the independent reference, on tiny random models."""

import json
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_HF_CONFIGS
from model import PRESETS, Qwen3, greedy_decode


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def ours_logits(model, ids):
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", list(TINY_HF_CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    hf, path = hf_checkpoint(name)
    model = Qwen3.from_pretrained(path).eval()
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    diff = (ours_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4


def test_tied_model_shares_one_matrix(hf_checkpoint):
    _, path = hf_checkpoint("tied-mha")
    model = Qwen3.from_pretrained(path)
    assert model.lm_head is None and model.output_weight is model.embed_tokens.weight


@pytest.mark.parametrize("name", ["tied-gqa4-bias", "untied-gqa2-wide-heads"])
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(hf_checkpoint, tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf, path = hf_checkpoint(name)
    model = Qwen3.from_pretrained(path).eval()
    model.save_pretrained(tmp_path / "ours")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    assert torch.equal(ours_logits(model, ids), ours_logits(Qwen3.from_pretrained(tmp_path / "ours"), ids))


def test_sharded_save_writes_an_index_that_both_loaders_read(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = hf_checkpoint("untied-gqa2-wide-heads")
    model = Qwen3.from_pretrained(path).eval()
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    stored = sum(t.numel() * t.element_size() for s in shards for t in load_file(out / s).values())
    assert index["metadata"]["total_size"] == stored
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    assert torch.equal(hf_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), hf_logits(hf, ids))
    assert torch.equal(ours_logits(Qwen3.from_pretrained(out), ids), hf_logits(hf, ids))


def test_loads_checkpoints_sharded_by_transformers(hf_checkpoint):
    hf, path = hf_checkpoint("tied-gqa4-bias", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    assert (ours_logits(Qwen3.from_pretrained(path), ids) - hf_logits(hf, ids)).abs().max() <= 1e-4


def test_save_replaces_an_existing_checkpoint_completely(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("untied-gqa2-wide-heads")
    model = Qwen3.from_pretrained(path)
    out = tmp_path / "runs" / "ckpt"
    model.save_pretrained(out, max_shard_bytes=30_000)  # sharded first ...
    model.save_pretrained(out)  # ... then one file: no stale shard or index may survive
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_save_over_a_checkpoint_keeps_its_other_files(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path)
    out = tmp_path / "ckpt"
    model.save_pretrained(out, max_shard_bytes=30_000)
    (out / "tokenizer.json").write_text("{}")
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_save_refuses_a_directory_that_is_not_a_checkpoint(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    (tmp_path / "project" / "src").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="holds folders"):
        Qwen3.from_pretrained(path).save_pretrained(tmp_path / "project")
    assert (tmp_path / "project" / "src").is_dir()


def test_a_failed_swap_puts_the_previous_checkpoint_back(hf_checkpoint, tmp_path, monkeypatch):
    import os

    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path)
    out = tmp_path / "runs" / "ckpt"
    model.save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old checkpoint is aside; moving the new one in fails
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    monkeypatch.setattr(os, "rename", real_rename)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]  # nothing left aside


def test_float64_round_trip(tmp_path):
    model = Qwen3(PRESETS["tiny"], dtype=torch.float64)
    model.save_pretrained(tmp_path / "f64")
    assert Qwen3.from_pretrained(tmp_path / "f64").embed_tokens.weight.dtype == torch.float64


def test_greedy_decoding_matches_transformers_generate(hf_checkpoint):
    hf, path = hf_checkpoint("tied-gqa4-bias")
    model = Qwen3.from_pretrained(path).eval()
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 31], [70]]
    ours = greedy_decode(model, prompts, max_new_tokens=20)
    for prompt, tokens in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


def test_cached_forward_requires_its_addressing(hf_checkpoint):
    from model import PagedKVCache

    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path)
    with pytest.raises(ValueError, match="start`, `block_table` and `kv_len"):
        model(torch.tensor([[1, 2]]), cache=PagedKVCache(model.config, 2), start=0)


# ---------------------------------------------------------------------------------------------------
# Training forward


def test_right_padding_does_not_change_logits_of_real_tokens(hf_checkpoint):
    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    assert torch.allclose(ours_logits(model, padded)[:, :10], ours_logits(model, ids), atol=1e-5)


def test_return_hidden_then_lm_head_gives_the_logits(hf_checkpoint):
    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 12, model.config.hidden_size)
        assert torch.equal(model.logits(hidden), model(ids))


def test_activation_checkpointing_gives_the_same_gradients(hf_checkpoint):
    _, path = hf_checkpoint("tied-mha")
    ids = torch.randint(0, 97, (2, 16))
    grads = []
    for recompute in (False, True):
        model = Qwen3.from_pretrained(path)
        model.activation_checkpointing = recompute
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_bf16_forward_stays_within_bf16_tolerance_of_float32(hf_checkpoint):
    hf, path = hf_checkpoint("untied-gqa2-wide-heads")
    ids = torch.randint(0, hf.config.vocab_size, (2, 32))
    ref = ours_logits(Qwen3.from_pretrained(path, dtype=torch.float32), ids)
    model = Qwen3.from_pretrained(path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    low = ours_logits(model, ids)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (relative step 2^-8); a 2-layer network compounds a few such errors.
    assert (low.float() - ref).abs().max() <= 0.03 * ref.abs().max()
    # and it agrees with transformers run in bf16 just as closely
    hf_low = hf_logits(hf.to(torch.bfloat16), ids).float()
    assert (low.float() - hf_low).abs().max() <= 0.03 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------
# Named shapes


def test_presets_match_the_published_parameter_counts():
    # Qwen3 model cards: total / non-embedding parameters, in billions (rounded as published).
    published = {"0.6B": (0.6, 0.44), "1.7B": (1.7, 1.4), "4B": (4.0, 3.6), "8B": (8.2, 6.95), "14B": (14.8, 13.2)}
    for name, (total, non_embedding) in published.items():
        c = PRESETS[name]
        with torch.device("meta"):
            counted = sum(p.numel() for p in Qwen3(c).parameters())
        assert counted == c.num_parameters()
        embedding = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        assert round(counted / 1e9, 1) == round(total, 1), name
        assert abs((counted - embedding) / 1e9 - non_embedding) < 0.05, name


def test_tiny_preset_round_trips_through_save_and_load(tmp_path):
    model = Qwen3(PRESETS["tiny"]).eval()
    model.save_pretrained(tmp_path / "tiny")
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(ours_logits(model, ids), ours_logits(Qwen3.from_pretrained(tmp_path / "tiny"), ids))


# ---------------------------------------------------------------------------------------------------
# Errors a user can cause


def test_missing_directory_is_reported():
    with pytest.raises(FileNotFoundError, match="not found"):
        Qwen3.from_pretrained("./no/such/checkpoint")


def test_missing_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3.from_pretrained(tmp_path)


def test_missing_weights_are_reported_with_a_hint_for_bin_files(hf_checkpoint):
    _, path = hf_checkpoint()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*\.bin"):
        Qwen3.from_pretrained(path)


def test_missing_shard_is_reported(hf_checkpoint):
    _, path = hf_checkpoint(max_shard_size="20KB")
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Qwen3.from_pretrained(path)


@pytest.mark.parametrize("model_type,architecture", [("qwen3_moe", "Qwen3MoeForCausalLM"),
                                                     ("llama", "LlamaForCausalLM")])
def test_other_architectures_are_refused_by_name(hf_checkpoint, model_type, architecture):
    _, path = hf_checkpoint()
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, architectures=[architecture])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"model_type='{model_type}'.*{architecture}"):
        Qwen3.from_pretrained(path)


def test_rope_scaling_is_refused(hf_checkpoint):
    _, path = hf_checkpoint()
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="RoPE scaling"):
        Qwen3.from_pretrained(path)


def test_shape_mismatch_names_the_tensor(hf_checkpoint):
    _, path = hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*shape \(47, 48\).*\(48, 48\)"):
        Qwen3.from_pretrained(path)


def test_missing_tensor_is_named(hf_checkpoint):
    _, path = hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 1 tensor.*model.layers.0.self_attn.q_norm.weight"):
        Qwen3.from_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoint):
    _, path = hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.experts.0.weight'"):
        Qwen3.from_pretrained(path)


def test_config_without_required_fields_is_reported(hf_checkpoint):
    _, path = hf_checkpoint()
    config = json.loads((path / "config.json").read_text())
    del config["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intermediate_size"):
        Qwen3.from_pretrained(path)



@pytest.mark.parametrize("damage,message", [
    (lambda c: {**c, "hidden_size": "48"}, r"config.json: hidden_size must be a positive integer, got '48'"),
    (lambda c: {**c, "num_hidden_layers": 0}, r"config.json: num_hidden_layers must be a positive integer, got 0"),
    (lambda c: {**c, "tie_word_embeddings": "no"}, r"config.json: tie_word_embeddings must be true or false"),
    (lambda c: {**c, "rope_parameters": "linear", "rope_scaling": "linear"}, r"config.json: rope_parameters / rope_scaling must be an object"),
    (lambda c: [c], r"config.json must hold a JSON object of model settings, got a list"),
])
def test_a_config_json_of_the_wrong_shape_is_named(hf_checkpoint, damage, message):
    _, path = hf_checkpoint()
    (path / "config.json").write_text(json.dumps(damage(json.loads((path / "config.json").read_text()))))
    with pytest.raises(ValueError, match=message):
        Qwen3.from_pretrained(path)


def test_a_truncated_safetensors_file_is_named(hf_checkpoint):
    _, path = hf_checkpoint()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read as safetensors .* damaged or truncated"):
        Qwen3.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a safetensors index"):
        Qwen3.from_pretrained(path)


def test_a_hub_id_is_downloaded_then_loaded(hf_checkpoint, monkeypatch):
    import huggingface_hub

    hf, path = hf_checkpoint()
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or path)
    model = Qwen3.from_pretrained("Qwen/Qwen3-8B-Base")
    assert asked == ["Qwen/Qwen3-8B-Base"]
    ids = torch.randint(0, hf.config.vocab_size, (1, 8))
    assert (ours_logits(model, ids) - hf_logits(hf, ids)).abs().max() <= 1e-4


def test_failed_download_says_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="not a local directory.*ConnectionError.*download it yourself"):
        Qwen3.from_pretrained("Qwen/Qwen3-8B-Base")


def test_targets_give_the_log_softmax_of_the_logits(hf_checkpoint):
    _, path = hf_checkpoint()
    model = Qwen3.from_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    targets = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logprobs, entropy = model(ids, targets=targets, temperature=0.8)
        logp = torch.log_softmax(model(ids) / 0.8, -1)
    assert torch.allclose(logprobs, logp.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The paged KV cache


def paged_rollouts(model, prompts, steps, seed=0):
    """Prefill each prompt into its own shuffled blocks of a PagedKVCache, let a second sample of the
    first prompt share that prompt's full blocks (its partial last block copied), then decode `steps`
    teacher-forced random tokens for every sequence at once. Returns the per-step logits [B, V] and
    each sequence's tokens."""
    from model import PagedKVCache

    g = torch.Generator().manual_seed(seed)
    BS = 16
    seqs = [list(p) for p in prompts] + [list(prompts[0])]  # the last one shares prompt 0's blocks
    need = [-(-(len(s) + steps) // BS) for s in seqs]
    pool = PagedKVCache(model.config, blocks=sum(need) + 2, block_size=BS)
    order = torch.randperm(sum(need) + 2, generator=g).tolist()
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    for b in range(len(seqs)):
        table[b, :need[b]] = torch.tensor([order.pop() for _ in range(need[b])], dtype=torch.int32)
    full = len(prompts[0]) // BS  # prompt 0's full blocks: shared, never copied
    table[-1, :full] = table[0, :full]
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), cache=pool, start=0, block_table=table[b:b + 1], kv_len=len(prompt))
        partial = int(table[0, full]), int(table[-1, full])  # copy on write of the partly filled block
        pool.k[:, partial[1]], pool.v[:, partial[1]] = pool.k[:, partial[0]], pool.v[:, partial[0]]
        logits = []
        for _ in range(steps):
            token = torch.randint(0, model.config.vocab_size, (len(seqs),), generator=g)
            start = torch.tensor([len(s) for s in seqs])
            logits.append(model(token[:, None], cache=pool, start=start, block_table=table,
                                kv_len=int(start.max()) + 1)[:, 0])
            for s, t in zip(seqs, token.tolist()):
                s.append(t)
    return logits, seqs


@pytest.mark.parametrize("name", list(TINY_HF_CONFIGS))
def test_paged_decode_agrees_with_the_full_forward(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = Qwen3.from_pretrained(path).eval()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4], [2, 7, 1, 8, 2], list(range(16)),
               list(range(40, 73))]  # 20 (one full block, then 4), 5, exactly 16, and 33 tokens
    logits, seqs = paged_rollouts(model, prompts, steps=6)
    with torch.no_grad():
        for b, seq in enumerate(seqs):
            full = model(torch.tensor([seq]))[0]  # [len, V]
            prompt_len = len(seq) - 6
            for t, step in enumerate(logits):
                assert (step[b] - full[prompt_len + t]).abs().max() <= 1e-4, (b, t)  # its input: token prompt_len + t
    assert not torch.equal(logits[-1][0], logits[-1][-1])  # the two samples of prompt 0 did diverge


def test_paged_decode_through_the_triton_kernel(hf_checkpoint, monkeypatch):
    monkeypatch.setenv("MASA_KERNELS", "triton")  # the interpreter, in float32
    _, path = hf_checkpoint("untied-gqa2-wide-heads")
    model = Qwen3.from_pretrained(path).eval()
    logits, seqs = paged_rollouts(model, [[5, 6, 7, 8, 9] * 4, [1, 2, 3]], steps=3, seed=1)
    with torch.no_grad():
        full = model(torch.tensor([seqs[0]]))[0]
    assert (logits[-1][0] - full[-1]).abs().max() <= 1e-4
