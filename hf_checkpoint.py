"""Hugging Face checkpoints for model.Qwen3: config.json and safetensors (one file, or shards with an
index), read and written without transformers' modeling code.

    directory = resolve("Qwen/Qwen3-8B-Base")               # a local directory, or a hub id downloaded
    config, dtype = read_config(directory, Qwen3Config)      # refuses what model.py cannot run exactly
    state = read_weights(directory, shapes, device, dtype, tied)   # our parameter names -> tensors
    write(path, model.state_dict(), model.config)            # atomic; a tokenizer beside it is kept

A module of its own so that model.py is the transformer alone: file formats, hub downloads,
validation of foreign files and atomic directory replacement are a different job. It knows no model
class (model.py passes its config dataclass and shapes in), so imports go one way, model -> here.
Parameter names are model.py's, which are the checkpoint's less its `model.` prefix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # what a hub checkpoint needs: config, weights, tokenizer


def _hf_name(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def resolve(path) -> Path:
    """A local checkpoint directory, or a hub id downloaded to the local cache (config, weights, tokenizer)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file; pass the directory that holds "
                                 f"config.json and the *.safetensors files")
    if not _HUB_ID.match(str(path)):
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found: pass a local directory with config.json "
                                f"and *.safetensors, or a Hugging Face hub id such as 'Qwen/Qwen3-8B-Base'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=CHECKPOINT_FILES))
    except Exception as e:
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a local directory, and downloading it from the "
                                f"Hugging Face hub failed ({type(e).__name__}: {e}); check the name, the "
                                f"network, or download it yourself and pass the directory") from e


def unavailable(path) -> str | None:
    """Why checkpoint `path` cannot be loaded here, found without loading or downloading anything (for
    the checks train.py and eval.py make before they start), or None: a local directory with a
    config.json; a hub id whose config, weights and tokenizer are in the local cache; or a hub id that
    will be downloaded (HF_HUB_OFFLINE unset; whether the hub can be reached is found by trying)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"{local} holds no config.json: not a checkpoint directory"
    if local.exists() or not _HUB_ID.match(str(path)):
        return f"{str(path)!r} is neither a checkpoint directory nor a Hugging Face hub id (owner/name)"
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE or cached(str(path)):
        return None
    return (f"{path} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), or not all of it, and HF_HUB_OFFLINE forbids "
            f"downloading it: run `hf download {path}` where there is network (it fills the same cache; copy it here "
            f"if that is another machine), or point at a local directory with its config.json, *.safetensors and tokenizer")


def cached(repo: str, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot of hub model `repo` in the local cache (`cache_dir`, default huggingface_hub's) when
    it holds the config, every weight file and a tokenizer (its config, and tokenizer.json or
    vocab.json); None otherwise. Never downloads."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True, cache_dir=cache_dir,
                                        allow_patterns=CHECKPOINT_FILES))
    except Exception:  # not in the cache, or incomplete
        return None
    index = folder / "model.safetensors.index.json"
    try:
        weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (OSError, ValueError, KeyError):
        return None
    needed = ["config.json", "tokenizer_config.json", *weights]
    tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    return folder if tokenizer and all((folder / name).is_file() for name in needed) else None


_CONFIG_TYPES = {**dict.fromkeys(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "max_position_embeddings"], "size"),
                 "rope_theta": "positive", "rms_norm_eps": "positive",
                 "tie_word_embeddings": "flag", "attention_bias": "flag"}


def read_config(directory: Path, config_class):
    """A checkpoint directory's config.json as (config_class instance, stored dtype), without reading
    weights; config_class is model.Qwen3Config (a dataclass whose fields are config.json's keys)."""
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a checkpoint directory needs config.json next to its "
                                f"*.safetensors (saved by save_pretrained or downloaded from the hub)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object of model settings, got a {type(raw).__name__}")
    model_type, archs = raw.get("model_type"), raw.get("architectures")
    if model_type != "qwen3":
        raise ValueError(f"{file} describes model_type={model_type!r} (architectures={archs}); masa implements "
                         f"dense Qwen3 only (model_type 'qwen3', Qwen3ForCausalLM)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{file}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{file} asks for RoPE scaling {rope}; masa implements plain RoPE only")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{file} sets use_sliding_window=true; masa implements full attention only")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{file} sets hidden_act={raw['hidden_act']!r}; Qwen3 uses 'silu'")
    known = {f.name for f in fields(config_class)}
    values = {k: v for k, v in raw.items() if k in known}
    values.setdefault("rope_theta", rope.get("rope_theta", 10_000.0))  # transformers' default
    values.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    values.setdefault("head_dim", 128)  # transformers' Qwen3Config default (every Qwen3 release states it)
    required = [f.name for f in fields(config_class) if f.default is MISSING]
    absent = [name for name in required if values.get(name) is None]
    if absent:
        raise ValueError(f"{file} lacks required field(s) {absent}")
    for name, value in values.items():  # a wrong type would otherwise fail far from here, naming no file
        kind = _CONFIG_TYPES.get(name)
        if kind == "size" and not (type(value) is int and value > 0):
            raise ValueError(f"{file}: {name} must be a positive integer, got {value!r}")
        if kind == "positive" and not (type(value) in (int, float) and value > 0):
            raise ValueError(f"{file}: {name} must be a positive number, got {value!r}")
        if kind == "flag" and type(value) is not bool:
            raise ValueError(f"{file}: {name} must be true or false, got {value!r}")
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise ValueError(f"{file} records dtype {dtype_name!r}; expected one of {sorted(_DTYPES)}")
    return config_class(**values), _DTYPES[dtype_name]


def read_weights(directory: Path, shapes: dict[str, tuple], device: torch.device, dtype: torch.dtype,
                 tied: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under model.py's parameter names, in `dtype` on `device`: every name in
    `shapes` with that shape, nothing else (a tied checkpoint may store lm_head.weight as well)."""
    state = {}
    for name, (tensor, file) in _read_tensors(directory, device).items():
        key = name.removeprefix("model.")
        if key == "lm_head.weight" and tied:
            continue  # some tied checkpoints store the shared matrix twice
        if key not in shapes:
            raise ValueError(f"unexpected tensor {name!r} in {file}: dense Qwen3 has no such weight "
                             f"(is this checkpoint from another architecture?)")
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, but "
                             f"{directory / 'config.json'} implies {shapes[key]}")
        state[key] = tensor.to(dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        shown = ", ".join(_hf_name(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {directory} is missing {len(missing)} tensor(s): {shown}")
    return state


def write(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config, max_shard_bytes: int):
    """config.json and safetensors (sharded with an index above max_shard_bytes) for a model's state
    dict, written into a temporary sibling directory and renamed into place, so a crash never leaves a
    half-written checkpoint at `path`. Over an existing checkpoint: its weights and config are
    replaced, its other files (a tokenizer, a README) kept."""
    from safetensors.torch import save_file

    path = Path(path).resolve()
    _check_replaceable(path)
    state = {_hf_name(k): v.detach() for k, v in state_dict.items()}
    dtype = next(iter(state.values())).dtype
    shards = _plan_shards(state, max_shard_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weight_map = {}
        for i, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: state[n].cpu().contiguous() for n in names}, tmp / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", _hf_config(config, dtype))
        if path.is_dir():
            for f in path.iterdir():
                if not _is_weights_or_config(f.name):
                    shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_tensors(directory: Path, device: torch.device) -> dict[str, tuple[torch.Tensor, Path]]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e!r}") from None
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} lists shard {f.name}, which is not in {directory}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        hint = " (PyTorch .bin weights: re-save them as safetensors)" if any(
            n.endswith(".bin") for n in found) else ""
        raise FileNotFoundError(f"no *.safetensors weights in {directory}; found {found}{hint}")
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    tensors[name] = (handle.get_tensor(name), f)
        except Exception as e:  # safetensors' own error type names no file
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            raise ValueError(f"{f} cannot be read as safetensors ({e}): the file is damaged or truncated; save "
                             f"or download the checkpoint again") from e
    return tensors


def _hf_config(c, dtype: torch.dtype) -> dict:
    dtype_name = next(name for name, d in _DTYPES.items() if d == dtype)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **asdict(c),
        "rope_scaling": None,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,
    }


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy in layer order: start a new shard when the next tensor would push this one past max_bytes."""
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_json(file: Path, obj: dict):
    file.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fsync_tree(directory: Path):
    for f in directory.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _is_weights_or_config(name: str) -> bool:
    return name == "config.json" or (name.startswith("model") and ".safetensors" in name)


def _check_replaceable(path: Path):
    """save_pretrained replaces a directory: refuse one that is not a checkpoint (it holds folders)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {path}: it is a file")
    if path.is_dir():
        folders = [p.name for p in path.iterdir() if p.is_dir()]
        if folders:
            raise IsADirectoryError(f"cannot save a checkpoint to {path}: it holds folders ({', '.join(folders[:3])}),"
                                    f" so it is not a checkpoint directory; choose a new or empty directory")


def _replace_dir(tmp: Path, path: Path):
    """Move a finished directory into place. An existing `path` is moved aside first, put back if
    anything fails, and deleted last, so at every instant a complete checkpoint is on disk."""
    _fsync_tree(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / path.name)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old / path.name, path)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)
