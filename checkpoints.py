"""The run directory: checkpoints written atomically, exact resume, and the metrics log kept in step
with them.

A module of its own so that train.py reads as the method: this is the machinery that makes a run
survive a crash or a kill, and nothing in it depends on GRPO or MASA.

Layout of checkpoint.dir:
    initial/                  with model.init: random, the random starting model and its tokenizer
                              (warm_start.initial_model)
    step_NNNNNN/model/        Hugging Face checkpoint of the policy (loadable by transformers and vLLM),
                              tokenizer included
    step_NNNNNN/state/        torch.distributed.checkpoint of the sharded policy and optimizer
    step_NNNNNN/rank<r>.pt    per rank: the step, the LR scheduler, every RNG, and the trainer's extra
                              state (the behaviour-cloning buffer)
    step_NNNNNN/config.yaml   the resolved config
    step_NNNNNN/manifest.json every other file of the checkpoint with its size, and a SHA-256 for
                              files up to HASH_LIMIT bytes (all but the large weight shards); written last
    latest                    the name of the newest complete checkpoint (for people and tools)
    metrics.jsonl             one line per step (train.py)
The step's metrics go to metrics.jsonl through MetricsLog. Each checkpoint is written to
`.step_NNNNNN.tmp` and renamed when every rank has finished, and `latest` is replaced atomically
after that: a crash at any point leaves the previous checkpoint as `latest`, complete.

Resume takes the newest step_NNNNNN whose files match its manifest (`resumable`). A damaged newest
checkpoint (a truncated or missing file, a garbled `latest`) is skipped with a warning that says what
is wrong, and the one before it is used; if none is intact the run stops and says what to do. A
checkpoint that has to make way for a new one of the same step is renamed aside
(step_NNNNNN.set-aside-K), never deleted; rotation (checkpoint.keep) removes only old, intact-named
step_NNNNNN directories.

Every function here is collective (call it on every rank) unless it says otherwise.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from config import BENIGN_ON_RESUME, Config, flat, to_dict


def rng_state() -> dict:
    """Every random number generator this process draws from (local; not collective), as tensors, numbers
    and lists only: what torch.load(weights_only=True) reads back."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDirectoryError(Exception):
    """checkpoint.dir cannot be used as it is; the message says why and what to do (train.py prints it
    without a traceback)."""


class StopSignals:
    """SIGTERM and SIGUSR1 (what preemptible and SLURM jobs get before they are killed; SLURM sends
    SIGUSR1 ahead of time with --signal=USR1@SECONDS) ask the run to stop after its current step,
    with a checkpoint; a second one ends the process at once (the signal's default action). Every
    rank installs them (main thread only); train.py agrees on `received` over the ranks after each step."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, main: bool):
        self.received, self.main = 0, main
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        if self.main:
            print(f"received {signal.Signals(signum).name}: the run stops after this step, with a checkpoint "
                  f"(a second signal ends it at once)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @staticmethod
    def stopped(cfg: Config, signum: int, step: int):
        """Raise RunStopped for a stop signal after `step` (whose checkpoint train.py has written)."""
        saved = f"step_{step:06d} written" if cfg.checkpoint.every else "none written (checkpoint.every=0)"
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {saved}: the same "
                         f"command resumes the run")


class RunStopped(Exception):
    """The run cannot usefully go on; the message says why and where to pick up (printed without a traceback)."""


def stop(cfg: Config, why: str):
    """Raise RunStopped: `why`, and the newest intact checkpoint to resume from (call it before a
    checkpoint of the weights that made the run stop is written)."""
    last = resumable(replace(cfg, checkpoint=replace(cfg.checkpoint, resume_from="")))
    raise RunStopped(f"{why}. The last good checkpoint is {last or 'none (no checkpoint yet)'}; see metrics.jsonl.")


LOCK = ".lock"


def lock(cfg: Config):
    """Take checkpoint.dir for this run: a lock file holding host, pid and start time, removed at exit.
    Another live run holding it stops this one at once (RunDirectoryError naming the holder); a lock
    left by a process that is gone (same host, pid not running) is reported and taken over. Rank 0 only."""
    root = Path(cfg.checkpoint.dir)
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"checkpoint.dir={root} is a file, not a directory: choose another checkpoint.dir")
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                host, pid, since = holder["host"], int(holder["pid"]), holder.get("since", "?")
            except (OSError, ValueError, KeyError, TypeError):
                host, pid, since = None, None, None
            if host == me["host"] and not _alive(pid):
                print(f"warning: {path} was left by process {pid} on {host} (since {since}), which is no longer "
                      f"running: taking the run directory over", flush=True)
                path.unlink(missing_ok=True)
                continue
            holder = f"process {pid} on {host} (since {since})" if host else "a process whose lock file is unreadable"
            raise RunDirectoryError(
                f"checkpoint.dir={root} is in use by {holder}: two runs in one directory would overwrite each "
                f"other's checkpoints. Choose another checkpoint.dir, or, if that run is gone, delete {path}.")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    _held.append((path, me["pid"]))
    if len(_held) == 1:
        atexit.register(unlock)


_held: list[tuple[Path, int]] = []  # the lock files this process took, with its pid


def unlock():
    """Remove the lock files this process took (at exit, or before an exit that skips exit handlers)."""
    while _held:
        _unlock(*_held.pop())


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True  # unknown: assume the holder is running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlock(path: Path, pid: int):
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


MANIFEST = "manifest.json"
HASH_LIMIT = 64 * 2 ** 20  # files up to this size get a SHA-256 in the manifest; larger ones, their size
STEP_NAME = re.compile(r"step_\d{6}")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path):
    """Record every file under `directory` (size, and SHA-256 up to HASH_LIMIT). Rank 0 only."""
    files = {}
    for file in sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST):
        size = file.stat().st_size
        files[file.relative_to(directory).as_posix()] = {"bytes": size, **(
            {"sha256": _sha256(file)} if size <= HASH_LIMIT else {})}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def damage(directory: Path) -> str | None:
    """What is wrong with the checkpoint in `directory`, or None when every file matches its manifest.
    Local (not collective)."""
    if not directory.is_dir():
        return "it does not exist"
    if not (directory / MANIFEST).is_file():
        return f"it has no {MANIFEST} (its write never finished)"
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size:,} bytes where {entry['bytes']:,} were written"
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            return f"{name} does not match the checksum written with it"
    return None


def resumable(cfg: Config, verbose: bool = False) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume_from if set (it must be intact), else the one
    `latest` names when it is intact (the branch the run was on), else the newest intact step_NNNNNN
    of checkpoint.dir (damaged newer ones are named in a warning); None for a fresh run. Raises
    RunDirectoryError, naming the directory and the choices, when checkpoints exist and none is
    intact. Nothing is deleted. Local (not collective)."""
    root = Path(cfg.checkpoint.dir)
    if cfg.checkpoint.resume_from:
        chosen = Path(cfg.checkpoint.resume_from)
        chosen = chosen if chosen.is_absolute() or chosen.parent != Path(".") else root / chosen
        problem = damage(chosen)
        if problem:
            raise RunDirectoryError(f"checkpoint.resume_from={cfg.checkpoint.resume_from}: cannot resume from "
                                    f"{chosen}: {problem}")
        return chosen
    steps = sorted((d for d in root.glob("step_*") if STEP_NAME.fullmatch(d.name)), reverse=True)
    pointer = root / "latest"
    if not steps and not pointer.exists():
        return None
    notes = []
    if pointer.exists():
        named = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if not STEP_NAME.fullmatch(named) or not (root / named).is_dir():
            notes.append(f"{pointer} holds {named[:40]!r}, not the name of a checkpoint here")
        elif damage(root / named) is None:
            return root / named
    for directory in steps:
        problem = damage(directory)
        if problem is None:
            if notes and verbose:
                print(f"warning: resuming from {directory}: " + "; ".join(notes), flush=True)
            return directory
        notes.append(f"{directory.name} is damaged: {problem}")
    raise RunDirectoryError(f"{root} holds no intact checkpoint to resume from (" + "; ".join(notes) + "). Nothing "
                            "was deleted. Either start fresh in another checkpoint.dir (or move this one away), or "
                            "set checkpoint.resume_from to a step directory you have repaired.")


def follow(cfg: Config, directory: Path | None):
    """Make `directory` (resumable's choice) the branch the run continues: every step_NNNNNN after it
    (an abandoned branch, after checkpoint.resume_from or past a damaged checkpoint) is set aside as
    step_NNNNNN.set-aside-K, never deleted, and `latest` names `directory`. Rank 0 only."""
    if directory is None:
        return
    root = Path(cfg.checkpoint.dir)
    newer = [d for d in root.glob("step_*") if STEP_NAME.fullmatch(d.name) and d.name > directory.name]
    for d in sorted(newer):
        print(f"checkpoint: {d.name} is after {directory.name}, the resumed one: set aside as {_set_aside(d).name}",
              flush=True)
    if directory.parent.resolve() == root.resolve():
        _point_latest(root, directory.name)


def config_changes(cfg: Config, directory: Path, verbose: bool = False) -> dict[str, list]:
    """Compare the run's resolved config with the one saved in the checkpoint it resumes from. A
    difference outside config.BENIGN_ON_RESUME raises RunDirectoryError listing them all, unless
    checkpoint.allow_config_change; with `verbose`, every difference is printed once. Returns the
    experiment-changing ones that were allowed, {key: [saved, now]}, for metrics.jsonl. Local (not
    collective)."""
    # A key the saved config lacks was added to config.py after that checkpoint: it ran with the default.
    saved = {**flat(to_dict(Config())), **flat(yaml.safe_load((directory / "config.yaml").read_text()))}
    now = flat(to_dict(cfg))
    changes = {k: [saved.get(k), now.get(k)] for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    experiment = {k: v for k, v in changes.items() if not k.startswith(BENIGN_ON_RESUME)}
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in experiment.items())
    if experiment and not cfg.checkpoint.allow_config_change:
        raise RunDirectoryError(f"resuming from {directory} with a config that changes the experiment ({listed}). "
                                f"Restore those values, start a new run in another checkpoint.dir, or set "
                                f"checkpoint.allow_config_change=true to continue with them (they are logged).")
    if verbose:
        for k, (old, new) in changes.items():
            kind = "changes the experiment (allowed by checkpoint.allow_config_change)" if k in experiment else "note"
            print(f"resume: {k}: {old!r} -> {new!r} ({kind})", flush=True)
    return experiment


def _aside(path: Path) -> Path:
    """The first free <name>.set-aside-K beside `path`."""
    k = 1
    while path.with_name(f"{path.name}.set-aside-{k}").exists():
        k += 1
    return path.with_name(f"{path.name}.set-aside-{k}")


def _set_aside(directory: Path) -> Path:
    """Rename `directory` to the first free <name>.set-aside-K and return the new path. Rank 0 only."""
    aside = _aside(directory)
    os.rename(directory, aside)
    return aside


def _point_latest(root: Path, name: str):
    """Replace root/latest atomically with `name`. Rank 0 only."""
    latest = root / "latest.tmp"
    latest.write_text(name + "\n")
    os.replace(latest, root / "latest")


def save(cfg: Config, rank: int, step: int, policy, optimizer, scheduler, actor, tokenizer, extra: dict):
    """Write checkpoint.dir/step_NNNNNN atomically (temporary directory, then rename), point `latest`
    at it, and keep the newest checkpoint.keep. `actor` is the full (unsharded) copy of the policy
    that rank 0 saves in Hugging Face format; `extra` is this rank's trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(cfg.checkpoint.dir)
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "state"))
    # plain data only (tensors, numbers, lists, dicts): load() reads it with weights_only=True
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tmp / f"rank{rank}.pt")
    if rank == 0:
        actor.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    if rank == 0:
        write_manifest(tmp)  # last: every rank's files are in place
        if final.exists():  # a damaged checkpoint skipped at resume, or one after checkpoint.resume_from
            print(f"checkpoint: {final.name} already exists; set aside as {_set_aside(final).name}", flush=True)
        os.rename(tmp, final)
        _point_latest(root, final.name)
        for old in sorted(d for d in root.glob("step_*") if STEP_NAME.fullmatch(d.name))[:-cfg.checkpoint.keep]:
            shutil.rmtree(old)
    dist.barrier()


def load(cfg: Config, rank: int, policy, optimizer, scheduler, directory: Path | None) -> tuple[int, dict] | None:
    """Restore the checkpoint in `directory` (the one `resumable` picked; None: a fresh run) into the
    policy, optimizer, scheduler and this process's RNGs: returns (its step, this rank's extra state),
    else None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if directory is None:
        return None
    if not (directory / f"rank{rank}.pt").is_file():
        raise RunDirectoryError(f"{directory} was written by {len(list(directory.glob('rank*.pt')))} processes and "
                                f"has no state for rank {rank}: resume with the number of processes that wrote it")
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory / "state"))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    try:  # tensors, numbers and lists only: a pickle that would run code when loaded is refused, never run
        extra = torch.load(directory / f"rank{rank}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RunDirectoryError(
            f"{directory / f'rank{rank}.pt'} holds objects other than tensors, numbers and lists, which loading "
            f"would let run code; it was not loaded ({str(e).splitlines()[0][:200]}). This project writes none: resume "
            f"from a checkpoint it wrote, or from an earlier one with checkpoint.resume_from") from None
    scheduler.load_state_dict(extra.pop("scheduler"))
    set_rng_state(extra.pop("rng"))
    return extra.pop("step"), extra


def truncate_metrics(file: Path, step: int):
    """Keep the lines of steps up to `step` and move the others (steps run after the resumed checkpoint
    by a run that was killed or abandoned, and a line cut short by a kill) to the first free
    metrics.jsonl.set-aside-K, rewriting the file atomically: nothing is mixed or deleted. Rank 0 only."""
    if not file.exists():
        return
    kept, moved = [], []
    for line in file.read_text().splitlines():
        try:
            (kept if json.loads(line).get("step", 0) <= step else moved).append(line)
        except json.JSONDecodeError:
            moved.append(line)
    if moved:
        _aside(file).write_text("".join(line + "\n" for line in moved))
    tmp = file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, file)


def _nulled(value):
    """`value` with every non-finite float replaced by None, in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl in checkpoint.dir, one JSON line per step, and with log.wandb the same records in
    Weights & Biases. Rank 0 only. Opening it after a resume first drops the lines of steps after the
    resumed checkpoint (truncate_metrics): the resumed run writes them again."""

    def __init__(self, cfg: Config, start: int):
        self.file = Path(cfg.checkpoint.dir) / "metrics.jsonl"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.file, start)
        self.wandb = None
        if cfg.log.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.log.wandb_project, config=to_dict(cfg), resume="allow")
            except ImportError:
                print("log.wandb is set but wandb is not installed (pip install wandb); logging to metrics.jsonl only")

    def write(self, record: dict):
        """Append one step's record. A NaN or infinite value is written as null (strict JSON readers
        reject a bare NaN); wandb gets the values as they are."""
        with self.file.open("a") as f:
            f.write(json.dumps(_nulled(record), allow_nan=False) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()
