"""The run directory under careless or hostile use, as real train.py runs in subprocesses: damaged
checkpoints (skipped with a warning naming the damage, or a clear stop when none is intact), two
runs on one directory (the second stops at once), a stale lock (taken over). Nothing is deleted."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "test_tiny.yaml"


def command(assets, run_dir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), str(CONFIG), f"model.path={assets / 'model'}",
            f"data.train_path={assets / 'problems.jsonl'}", f"checkpoint.dir={run_dir}", "checkpoint.every=1",
            "checkpoint.keep=5", *overrides]


def train(assets, run_dir, *overrides, check=True):
    out = subprocess.run(command(assets, run_dir, *overrides), capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=child_env())
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def listing(directory: Path) -> dict[str, int]:
    """Every file under `directory` (but the lock) with its size."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def two_steps(assets, tmp_path_factory):
    """A run directory with intact checkpoints after steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    train(assets, run_dir, "train.total_steps=2")
    assert (run_dir / "latest").read_text().strip() == "step_000002"
    return run_dir


def truncate(file: Path):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def garbage(file: Path):
    file.write_bytes(os.urandom(file.stat().st_size))  # the same size: only the checksum can tell


DAMAGES = {
    "truncated rank0.pt": (lambda d: truncate(d / "step_000002" / "rank0.pt"), "rank0.pt has"),
    "deleted state/.metadata": (lambda d: (d / "step_000002" / "state" / ".metadata").unlink(),
                                "state/.metadata is missing"),
    "garbage state/.metadata": (lambda d: garbage(d / "step_000002" / "state" / ".metadata"),
                                "state/.metadata does not match the checksum"),
    "truncated .distcp": (lambda d: truncate(next((d / "step_000002" / "state").glob("*.distcp"))), ".distcp has"),
    "latest holds garbage": (lambda d: (d / "latest").write_bytes(b"\xff\xfe garbage"), "latest holds"),
    "latest names a missing step": (lambda d: (d / "latest").write_text("step_000009\n"), "latest holds"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_nothing_deleted(assets, two_steps, tmp_path,
                                                                                   damage):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    breaks, says = DAMAGES[damage]
    breaks(run_dir)
    damaged_step = run_dir / "step_000002"
    before = listing(damaged_step)
    out = train(assets, run_dir, "train.total_steps=3")
    metadata_only = damage.startswith("latest")
    resumed_from = "step_000002" if metadata_only else "step_000001"
    assert f"warning: resuming from {run_dir / resumed_from}: " in out.stdout
    assert says in out.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed after step 1 (or 2), the rest re-run
    assert (run_dir / "latest").read_text().strip() == "step_000003"
    if not metadata_only:  # the damaged step 2 was set aside when the run resumed before it, not deleted
        assert listing(run_dir / "step_000002.set-aside-1") == before
        assert "step_000002 is after step_000001, the resumed one: set aside as step_000002.set-aside-1" in out.stdout


def test_no_intact_checkpoint_stops_the_run_with_the_choices(assets, two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    for step in ("step_000001", "step_000002"):
        truncate(run_dir / step / "rank0.pt")
    before = listing(run_dir)
    out = train(assets, run_dir, "train.total_steps=3", check=False)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {run_dir} holds no intact checkpoint to resume from")
    assert "step_000002 is damaged: rank0.pt has" in message and "step_000001 is damaged" in message
    assert "checkpoint.resume_from" in message and "Nothing was deleted" in message
    assert "Traceback" not in out.stderr
    assert listing(run_dir) == before


def test_resume_from_names_the_checkpoint(assets, two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    intact = listing(run_dir / "step_000002")
    train(assets, run_dir, "train.total_steps=2", "checkpoint.resume_from=step_000001")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert listing(run_dir / "step_000002.set-aside-1") == intact  # the step it replaced, kept
    out = train(assets, run_dir, "train.total_steps=2", "checkpoint.resume_from=step_000007", check=False)
    assert "error: checkpoint.resume_from=step_000007: cannot resume from" in out.stderr and "does not exist" in out.stderr
    truncate(run_dir / "step_000001" / "rank0.pt")  # a chosen checkpoint is verified like the newest one
    out = train(assets, run_dir, "train.total_steps=2", "checkpoint.resume_from=step_000001", check=False)
    assert out.returncode != 0
    assert "error: checkpoint.resume_from=step_000001: cannot resume from" in out.stderr and "rank0.pt has" in out.stderr


def test_a_second_run_on_the_same_directory_stops_at_once_and_a_stale_lock_is_taken_over(assets, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(assets, run_dir, "train.total_steps=100"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=child_env())
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "latest").exists():  # the first run holds the lock and has checkpointed
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid
        started = time.monotonic()
        second = train(assets, run_dir, "train.total_steps=100", check=False)
        assert second.returncode != 0 and time.monotonic() - started < 60
        assert f"is in use by process {first.pid} on {holder['host']}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid  # killed: the lock stays behind
    third = train(assets, run_dir, "train.total_steps=1", "checkpoint.every=0")
    assert f"{run_dir / '.lock'} was left by process {first.pid}" in third.stdout
    assert "which is no longer running: taking the run directory over" in third.stdout
    assert not (run_dir / ".lock").exists()  # released at exit


def test_a_checkpoint_dir_that_is_a_file_is_refused(assets, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    out = train(assets, target, "train.total_steps=1", check=False)
    assert out.returncode != 0 and f"error: checkpoint.dir={target} is a file, not a directory" in out.stderr
    assert target.read_text() == "not a directory"


def test_a_resume_that_changes_the_experiment_stops_unless_allowed(assets, two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    before = listing(run_dir)
    out = train(assets, run_dir, "train.total_steps=3", "algorithm=grpo", "optim.lr=0.5", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert (f"error: resuming from {run_dir / 'step_000002'} with a config that changes the experiment "
            "(algorithm: 'masa' -> 'grpo'; optim.lr: ") in out.stderr
    assert "checkpoint.allow_config_change=true" in out.stderr
    assert listing(run_dir) == before
    # benign keys (how long, how often, where and what is shown) pass with a note
    out = train(assets, run_dir, "train.total_steps=3", "log.progress_bar=true", "checkpoint.keep=4")
    assert "resume: checkpoint.keep: 5 -> 4 (note)" in out.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("config_changes" in r for r in records)  # a note, not a change of the experiment
    # allowed: each difference printed and logged once, in the first step after the resume
    out = train(assets, run_dir, "train.total_steps=4", "optim.lr=0.5", "checkpoint.allow_config_change=true")
    assert "resume: optim.lr: " in out.stdout and "(changes the experiment (allowed by" in out.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[3]["config_changes"] == {"optim.lr": [0.001, 0.5]} and [r["step"] for r in records] == [1, 2, 3, 4]


def test_a_checkpoint_from_before_a_new_key_resumes_with_that_key_at_its_default(tmp_path):
    # checkpoints saved before config.py gained a key (efficient.hint_mode, optim.warmup_from_zero, ...)
    # ran with its default: that is no change of the experiment
    import yaml

    from checkpoints import RunDirectoryError, config_changes
    from config import load_config, to_dict

    cfg = load_config(CONFIG)
    saved = to_dict(cfg)
    del saved["efficient"]["hint_mode"], saved["optim"]["warmup_from_zero"], saved["prompt"]["hint_length"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(cfg, tmp_path) == {}
    changed = load_config(CONFIG, ["efficient.hint_mode=rollout"])  # a real change still stops the resume
    with pytest.raises(RunDirectoryError, match=r"efficient.hint_mode: 'prompt' -> 'rollout'"):
        config_changes(changed, tmp_path)


# ---------------------------------------------------------------------------------------------------
# Values that must be errors before any work


def test_lengths_beyond_the_model_are_refused_before_anything_is_allocated(assets, tmp_path):
    started = time.monotonic()
    out = train(assets, tmp_path / "run", "train.total_steps=1", "rollout.max_response_tokens=100000000", check=False)
    assert out.returncode != 0 and time.monotonic() - started < 120
    assert re.search(r"rollout.max_prompt_tokens \+ rollout.max_response_tokens = 100,00\d,\d{3} positions, more "
                     r"than the model takes \(4,096, max_position_embeddings of ", out.stderr)
    assert "lower rollout.max_response_tokens" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_weights_holding_nan_stop_the_run_before_the_first_step(assets, tmp_path):
    import torch

    from model import Qwen3

    model = Qwen3.from_pretrained(assets / "model")
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    for name in os.listdir(assets / "model"):  # the tokenizer files
        if not (broken / name).exists():
            shutil.copy(assets / "model" / name, broken / name)
    out = train(assets, tmp_path / "run", "train.total_steps=2", f"model.path={broken}", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"error: the weights loaded from {broken} hold NaN or infinite values (layers.0.mlp.up_proj.weight)" \
        in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_problem_file_that_is_not_utf8_names_the_file_and_row(assets, tmp_path):
    bad = tmp_path / "problems.jsonl"
    bad.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    out = train(assets, tmp_path / "run", "train.total_steps=1", f"data.train_path={bad}", check=False)
    assert out.returncode != 0
    assert f"{bad}, row 2: not UTF-8 (byte 0xe9 at column 17); problem files must be UTF-8 JSON lines" in out.stderr


@pytest.mark.parametrize("override,message", [
    ("loss.kl_coef=-0.1", "config key 'loss.kl_coef' must be at least 0 (a negative coefficient rewards moving away "
                          "from the reference), got -0.1"),
    ("train.seed=-1", "config key 'train.seed' must be in [0, 2^32), got -1"),
])
def test_bad_values_are_refused_when_the_config_loads(override, message):
    from config import load_config

    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(CONFIG, [override])


def test_a_restart_follows_the_branch_latest_names_and_sets_the_abandoned_one_aside(assets, tmp_path):
    # Four steps, then checkpoint.resume_from=step_000002 and one more step (a new step_000003), then a
    # plain restart to step 5. Before, the restart took the highest step by name, the abandoned
    # step_000004, and metrics.jsonl ended as steps [1, 2, 3, 5], the old step 4's line deleted.
    run_dir = tmp_path / "run"
    train(assets, run_dir, "train.total_steps=4", "checkpoint.keep=10")
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train(assets, run_dir, "train.total_steps=3", "checkpoint.keep=10", "checkpoint.resume_from=step_000002")
    assert (run_dir / "step_000004.set-aside-1").is_dir() and not (run_dir / "step_000004").exists()
    assert (run_dir / "latest").read_text().strip() == "step_000003"
    train(assets, run_dir, "train.total_steps=5", "checkpoint.keep=10")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    aside = [json.loads(line) for line in (run_dir / "metrics.jsonl.set-aside-1").read_text().splitlines()]
    assert [r["step"] for r in aside] == [3, 4] and aside == first[2:]  # the abandoned branch's lines, kept


def started_run(assets, run_dir, steps: int):
    """A long train.py run in the background, once it has finished `steps` steps."""
    proc = subprocess.Popen(command(assets, run_dir, "train.total_steps=1000", "checkpoint.every=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_finishes_the_step_writes_a_checkpoint_and_releases_the_lock(assets, tmp_path, signum):
    # Preemptible and SLURM jobs get SIGTERM (or SIGUSR1 ahead of time) before they are killed. Before,
    # the process died at once: no checkpoint since the last regular one, no message, a stale lock.
    run_dir = tmp_path / "run"
    proc = started_run(assets, run_dir, 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert proc.returncode == 1, err[-3000:]
    assert f"received {signum.name}: the run stops after this step" in err
    assert f"error: stopped by {signum.name} after step {done}; checkpoint step_{done:06d} written" in err
    assert (run_dir / f"step_{done:06d}").is_dir() and not (run_dir / ".lock").exists()
    train(assets, run_dir, f"train.total_steps={done + 1}")  # the same command resumes it
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))


def test_a_second_stop_signal_ends_the_run_at_once(assets, tmp_path):
    proc = started_run(assets, tmp_path / "run", 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the first one is handled
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_with_one_checkpoint(assets, tmp_path):
    # torchrun forwards SIGTERM to each rank; the ranks agree on it after the step (all_reduce) and write
    # one checkpoint of it together. Before, every rank died at once.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             *command(assets, run_dir, "train.total_steps=1000", "checkpoint.every=1000")[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    done = len(metrics.read_text().splitlines())
    assert proc.returncode != 0
    assert len(re.findall(r"^error: stopped by SIGTERM after step \d+; checkpoint step_\d+ written", err, re.M)) == 1
    assert f"error: stopped by SIGTERM after step {done}; checkpoint step_{done:06d} written" in err
    assert checkpoint_is_intact(run_dir / f"step_{done:06d}") and not (run_dir / ".lock").exists()
    assert sorted(p.name for p in (run_dir / f"step_{done:06d}").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


def checkpoint_is_intact(directory: Path) -> bool:
    import checkpoints

    return checkpoints.damage(directory) is None
