"""bench/efficiency.py (the paper's Figure 4 and Figure 3 in miniature on configs/tiny_multiply.yaml): the
whole pipeline runs on a few steps, and the speedup it reports is the one worked by hand below."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_the_speedup_is_where_grpo_first_reached_its_best_over_where_the_method_did():
    from efficiency import speedups

    grpo = {"step": [0, 10, 20, 30], "tokens": [0, 1.0, 2.0, 3.0], "seconds": [0, 5, 10, 15],
            "accuracy": [0.2, 0.4, 0.5, 0.5]}  # best 0.5, first at step 20 (2.0 M tokens, 10 s)
    fast = {"step": [0, 10, 20, 30], "tokens": [0, 0.5, 1.0, 1.5], "seconds": [0, 4, 8, 12],
            "accuracy": [0.2, 0.5, 0.3, 0.6]}  # first >= 0.5 at step 10 (0.5 M tokens, 4 s)
    slow = {"step": [0, 10, 20, 30], "tokens": [0, 1.0, 2.0, 3.0], "seconds": [0, 5, 10, 15],
            "accuracy": [0.2, 0.3, 0.4, 0.49]}  # never reaches 0.5
    out = speedups({"grpo": {0: grpo, 1: grpo}, "masa_efficient": {0: fast, 1: slow}}, "masa_efficient")
    assert out[0] == {"target": 0.5, "step": 2.0, "tokens": 4.0, "seconds": 2.5}
    assert out[1] == {"target": 0.5, "step": None, "tokens": None, "seconds": None}


def test_the_long_task_runs_end_to_end_through_the_bench_script(tmp_path):
    # a few steps of each algorithm on configs/tiny_multiply.yaml, validated on held-out problems at
    # every step, with the audit on from step 0: the figures and the report come out
    out = tmp_path / "efficiency"
    command = [sys.executable, str(ROOT / "bench" / "efficiency.py"), "--seeds", "0", "--out", str(out), "--problems", "6",
               "--samples", "1", "--every", "1", "warm_start.steps=2", "train.total_steps=2", "train.batch_size=2",
               "rollout.max_response_tokens=24", "efficient.gate_start_step=0", "checkpoint.every=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(threads=2))
    assert result.returncode == 0, result.stderr[-3000:]
    if importlib.util.find_spec("matplotlib"):  # an optional dependency (.[plot]); CI installs .[test] only
        assert (out / "efficiency_fig4.png").stat().st_size > 0 and (out / "efficiency_fig3.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in result.stdout and not list(out.glob("*.png"))
    assert "| masa_efficient |" in result.stdout and "gating precision" in result.stdout
    held_out = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 6 and all("*" in p["problem"] for p in held_out)
    records = [json.loads(line) for line in (out / "masa_efficient_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("audit_gated" in r and r["val_accuracy"] is not None and r["meta_tokens"] > 0 for r in records)
    assert json.loads((out / "grpo_seed0" / "start.json").read_text())["val_accuracy"] == pytest.approx(
        json.loads((out / "masa_seed0" / "start.json").read_text())["val_accuracy"])  # one warm start per seed
