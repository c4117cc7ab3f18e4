"""train.py end to end on a tiny random model: every algorithm writes metrics and a checkpoint that
transformers loads, resuming continues exactly, and 2 processes make the same update as 1."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import chat_ids
from masa import Episode, Prompt
from model import Qwen3

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "test_tiny.yaml"


def run(assets, run_dir, *overrides, nproc=1, timeout=600):
    """python train.py (or torchrun) in a subprocess, as a user runs it."""
    args = [str(CONFIG), f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
            f"checkpoint.dir={run_dir}", *overrides]
    if nproc == 1:
        command = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", str(ROOT / "train.py"),
                   *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time_")}


def test_a_step_runs_in_the_kernel_environment_gpu_check_gives_train_py(assets, tmp_path):
    # bench/gpu_check.py sets MASA_KERNELS=triton for train.py; on a GPU there is no interpreter. The
    # CPU-side pieces must still run (on the twins), and the run says which implementation each used.
    env = child_env(TRITON_INTERPRET=None, MASA_KERNELS="triton")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIG), f"model.path={assets / 'model'}",
                          f"data.train_path={assets / 'problems.jsonl'}", f"checkpoint.dir={tmp_path / 'run'}",
                          "train.total_steps=1"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = next(line for line in out.stdout.splitlines() if line.startswith("kernel calls on rank 0: "))
    calls = dict(item.split(": ") for item in report.removeprefix("kernel calls on rank 0: ").split(", "))
    assert {"group_advantages", "linear_token_logprobs", "paged_decode_attention", "sample_tokens"} <= set(calls)
    assert all(impl.startswith("torch x ") for impl in calls.values())  # CPU tensors: the twins


def test_a_kl_term_to_the_initial_policy_is_logged(assets, tmp_path):
    records = run(assets, tmp_path / "run", "algorithm=grpo", "loss.kl_coef=0.1", "train.total_steps=2")
    assert records[0]["kl"] == 0.0  # the policy is still the reference
    assert records[1]["kl"] > 0.0  # one step later it is not


@pytest.mark.parametrize("algorithm", ["grpo", "masa", "masa_efficient"])
def test_each_algorithm_runs_and_writes_a_checkpoint_transformers_loads(assets, tmp_path, algorithm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = run(assets, tmp_path / "run", f"algorithm={algorithm}", f"validation.path={assets / 'problems.jsonl'}",
                  "validation.every=2", "validation.temperature=0")
    assert [r["step"] for r in records] == [1, 2]
    assert "val_accuracy" not in records[0] and records[1]["val_accuracy"] == 0.0  # a random model
    for key in ("time_rollout", "time_grading", "time_logprobs_backward", "time_optimizer"):
        assert all(r[key] >= 0 for r in records)
    assert all(r["solution_rollouts"] == 8 for r in records)  # 2 prompts x G = 4
    if algorithm != "grpo":
        assert all("meta_reward" in r and "pass_rate_mae" in r for r in records)
    latest = (tmp_path / "run" / "latest").read_text().strip()
    assert latest == "step_000002"
    checkpoint = tmp_path / "run" / latest / "model"
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ours = Qwen3.from_pretrained(checkpoint).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    assert AutoTokenizer.from_pretrained(checkpoint).decode([40, 41]) != ""


def test_resume_repeats_the_uninterrupted_run_exactly(assets, tmp_path):
    settings = ["algorithm=masa_efficient", "optim.warmup_steps=5"]  # the warmup spans the resume: the LR
    full = run(assets, tmp_path / "full", *settings, "train.total_steps=3")  # scheduler must come back too
    run(assets, tmp_path / "split", *settings, "train.total_steps=1")
    resumed = run(assets, tmp_path / "split", *settings, "train.total_steps=3")
    assert [r["lr"] for r in full] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3)])
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in full]
    assert any(r["trained_tokens"] > 0 and r["grad_norm"] > 0 for r in full)  # the weights did move
    a = Qwen3.from_pretrained(tmp_path / "full" / "step_000003" / "model")
    b = Qwen3.from_pretrained(tmp_path / "split" / "step_000003" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(assets, tmp_path):
    run(assets, tmp_path / "run", "train.total_steps=1")
    # a crash mid-write leaves a temporary directory and no pointer change
    shutil.copytree(tmp_path / "run" / "step_000001", tmp_path / "run" / ".step_000002.tmp")
    (tmp_path / "run" / ".step_000002.tmp" / "rank0.pt").unlink()
    records = run(assets, tmp_path / "run", "train.total_steps=2")
    assert [r["step"] for r in records] == [1, 2]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_000002"


@pytest.mark.parametrize("mini_batches", [1, 3])
def test_two_processes_sample_and_update_what_one_process_does(assets, tmp_path, mini_batches):
    # Sampled rollouts (temperature 1): each sequence's noise comes from its global prompt index
    # (rollout.generate's streams), so 2 ranks draw exactly the tokens 1 rank draws and both runs see
    # one global batch; with several mini-batches, each rollout must land in the same one.
    settings = ["algorithm=masa", "train.total_steps=1", "rollout.temperature=1.0", f"train.mini_batches={mini_batches}"]
    one = run(assets, tmp_path / "one", *settings)
    two = run(assets, tmp_path / "two", *settings, nproc=2)
    # torchrun's ranks end without the interpreter's teardown (train.py's __main__), after releasing the lock
    assert not (tmp_path / "one" / ".lock").exists() and not (tmp_path / "two" / ".lock").exists()
    for key in ("solution_rollouts", "solution_tokens", "meta_tokens", "accuracy", "meta_parse_failures"):
        assert one[0][key] == two[0][key], key
    a = Qwen3.from_pretrained(tmp_path / "one" / "step_000001" / "model")
    b = Qwen3.from_pretrained(tmp_path / "two" / "step_000001" / "model")
    start = Qwen3.from_pretrained(assets / "model")
    moved = max((x - s).abs().max().item() for x, s in zip(a.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-5
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() <= 1e-6, name


def test_a_killed_run_resumes_to_the_same_result(assets, tmp_path):
    import signal
    import time

    settings = ["algorithm=masa_efficient", "train.total_steps=3"]
    full = run(assets, tmp_path / "full", *settings)
    args = [str(CONFIG), f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
            f"checkpoint.dir={tmp_path / 'killed'}", *settings, "train.total_steps=50"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    pointer = tmp_path / "killed" / "latest"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() >= "step_000002"):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # somewhere in step 3 or later: rollouts, update or a checkpoint
    process.wait()
    resumed = run(assets, tmp_path / "killed", *settings)
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in full]
    a = Qwen3.from_pretrained(tmp_path / "full" / "step_000003" / "model")
    b = Qwen3.from_pretrained(tmp_path / "killed" / "step_000003" / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    import parallel

    env = parallel.setup_distributed()
    yield env
    dist.destroy_process_group()


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights(assets, tmp_path, one_process_group):
    import parallel
    import train
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}"])
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = {n: p.full_tensor().clone() for n, p in policy.named_parameters()}
    bad = [Episode(0, "solution", [1, 2, 3], [4, 5], advantage=float("nan")),
           Episode(1, "solution", [1, 2], [6], advantage=1.0)]
    metrics = train.update(cfg, one_process_group, policy, optimizer, scheduler, bad)
    assert metrics["skipped_steps"] == 1
    assert all(torch.equal(before[n], p.full_tensor()) for n, p in policy.named_parameters())
    good = [Episode(0, "solution", [1, 2, 3], [4, 5], advantage=-1.0),
            Episode(1, "solution", [1, 2], [6], advantage=1.0)]
    metrics = train.update(cfg, one_process_group, policy, optimizer, scheduler, good)
    assert metrics["skipped_steps"] == 0
    assert any(not torch.equal(before[n], p.full_tensor()) for n, p in policy.named_parameters())


def test_the_response_mask_covers_exactly_the_response_targets():
    import train

    ids, targets, mask, adv = train.tensors([Episode(0, "solution", [1, 2, 3], [4, 5], advantage=0.5),
                                             Episode(1, "meta", [7], [8, 9, 10], advantage=-1.0)], "cpu")
    assert ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0]]
    assert targets[mask > 0].tolist() == [4, 5, 8, 9, 10]  # every response token, nothing else
    assert mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]] and adv.tolist() == [0.5, -1.0]


def test_every_mini_batch_after_the_first_is_off_policy(assets, one_process_group):
    # with train.mini_batches=2 the log-probs of the sampling policy must be kept from before the first
    # step: the second mini-batch's ratio is then not 1 (the weights moved), and PPO's clip has work
    import parallel
    import train
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "train.mini_batches=2", "loss.entropy_coef=0"])
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    episodes = [Episode(i, "solution", [1, 2, 3], [4 + i, 5, 6], advantage=a) for i, a in ((0, 1.0), (1, -1.0))]
    metrics = train.update(cfg, one_process_group, policy, optimizer, scheduler, episodes)
    # token mean over both steps: 1 for the first, something else for the second
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-4, metrics["ratio_mean"]


def test_a_cut_rollout_out_of_the_loss_carries_no_gradient(assets, one_process_group):
    # efficient.cutoff_in_loss=false: masa.score_solutions takes a cut rollout out of the loss (in_loss);
    # the update must then be exactly the update without it, normalizer included
    import parallel
    import train
    from config import load_config
    from masa import score_solutions

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "loss.entropy_coef=0"])
    kept = Episode(0, "solution", [1, 2, 3], [4, 5, 6], advantage=1.0)

    def weights_after(episodes):
        policy = parallel.build_policy(cfg, one_process_group)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        train.update(cfg, one_process_group, policy, optimizer,
                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), episodes)
        return [p.full_tensor().clone() for p in policy.parameters()]

    def cut(in_loss):
        episode = Episode(0, "solution", [1, 2], [7, 8], finish_reason="cutoff", correct=True)
        score_solutions([episode], cutoff_in_loss=in_loss)
        episode.advantage = -1.0
        return episode

    alone = weights_after([kept])
    assert all(torch.equal(a, b) for a, b in zip(weights_after([kept, cut(False)]), alone))
    assert not all(torch.equal(a, b) for a, b in zip(weights_after([kept, cut(True)]), alone))


def test_the_released_warmup_starts_at_lr_zero(assets, tmp_path):
    import train
    from config import load_config

    optim = load_config(CONFIG, ["optim.warmup_steps=4"]).optim
    assert [train.warmup_factor(optim, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    optim.warmup_from_zero = True
    assert [train.warmup_factor(optim, s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    optim.warmup_steps = 0
    assert train.warmup_factor(optim, 0) == 1.0
    # a real run records each batch's rate: lr x s / 4, two optimizer steps a batch at one rate
    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
                               f"checkpoint.dir={tmp_path / 'run'}", "checkpoint.every=0", "optim.warmup_steps=4",
                               "optim.warmup_from_zero=true", "train.mini_batches=2", "train.total_steps=3"])
    train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.0, 0.25e-3, 0.5e-3])


def test_the_released_config_runs_batch_1_at_lr_0_and_reaches_full_rate_at_batch_21(assets, one_process_group):
    # verl steps the schedule once per RL batch, after the batch's optimizer steps (fsdp_workers.py:700-702,
    # dp_actor.py:557), with the rate lr x min(1, s / 20) for batch s from 0 (torch_functional.py:602-605)
    import parallel
    import train
    from config import load_config

    cfg = load_config(ROOT / "configs" / "qwen3_8b_released.yaml", [f"model.path={assets / 'model'}", "model.dtype=float32"])
    assert cfg.train.mini_batches == 2
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer, scheduler = train.optimizer_and_schedule(cfg, policy)
    rates = []  # the rate of every optimizer step, as AdamW takes it
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    episodes = [Episode(i, "solution", [1, 2, 3], [4 + i, 5], advantage=1.0 - 2 * i) for i in range(2)]  # 2 mini-batches
    before = [p.full_tensor().clone() for p in policy.parameters()]
    for batch in range(1, 22):
        train.update(cfg, one_process_group, policy, optimizer, scheduler, episodes)
        if batch == 1:
            assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, policy.parameters()))
    released = [1e-6 * min(1.0, (batch - 1) / 20) for batch in range(1, 22) for _ in range(2)]
    assert rates == pytest.approx(released, rel=1e-12, abs=0)
    assert rates[:2] == [0.0, 0.0] and rates[-2:] == [1e-6, 1e-6] and rates[-3] < 1e-6


def test_a_bfloat16_policy_computes_in_bf16_on_fp32_master_weights(assets, one_process_group):
    # model.dtype=bfloat16 is what every GPU config uses (FSDP2's MixedPrecisionPolicy); the CPU demo
    # and the other tests use float32, so this is the path's only run on a CPU.
    import parallel
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "model.dtype=bfloat16"])
    policy = parallel.build_policy(cfg, one_process_group)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights (and AdamW's state)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = policy(ids)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        reference = Qwen3.from_pretrained(assets / "model", dtype=torch.float32)(ids)
    assert (logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()  # bf16 rounding, no more
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.parameters())


def test_behaviour_cloning_lowers_the_nll_of_the_expert_target(assets, one_process_group):
    import parallel
    import train
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "efficient.bc_lr=0.01"])
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    experts = [([1, 5, 9], [20, 21, 22, 23]), ([1, 7], [30, 31])]
    losses = [train.supervised_step(cfg, one_process_group, policy, optimizer, experts, cfg.efficient.bc_lr)
              for _ in range(3)]
    assert losses[2] < losses[0]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-6]  # restored after each BC step


def test_the_audit_reruns_what_gating_and_cutoff_skipped(assets):
    from functools import partial

    from transformers import AutoTokenizer

    import masa_step
    from config import load_config
    from rewards import GraderPool, grade_batch
    from rollout import generate

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "rollout.max_response_tokens=8"])
    actor = Qwen3.from_pretrained(assets / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    prompts = [Prompt(0, "1+1", "2", gated=True), Prompt(1, "2+2", "4")]
    for p in prompts:
        p.solution_ids = [chat_ids(tokenizer, p.problem)]
    cut = Episode(1, "solution", prompts[1].solution_ids[0], [40, 41, 42], finish_reason="cutoff")
    with GraderPool(workers=1) as pool:
        out = masa_step.audit(cfg, tokenizer, prompts, [cut], partial(generate, actor), partial(grade_batch, pool=pool),
                              (0, 1))
    # a random model answers nothing correctly: the gated prompt really was all-wrong (zero variance),
    # and the cut rollout would have ended wrong
    assert out == {"audit_gated": 1, "audit_cut": 1, "audit_gated_zero_variance": 1, "audit_cut_wrong": 1}


def test_metrics_after_the_resumed_step_and_a_torn_line_are_dropped(tmp_path):
    from checkpoints import truncate_metrics

    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    truncate_metrics(file, 2)
    assert [json.loads(line)["step"] for line in file.read_text().splitlines()] == [1, 2]


def test_a_hint_that_would_overflow_the_prompt_is_dropped(assets):
    from masa_step import prompts_fit, solution_prompt_ids
    from config import load_config
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, ["rollout.max_prompt_tokens=200"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    plain = solution_prompt_ids(tokenizer, cfg, "What is 1+1?")
    assert solution_prompt_ids(tokenizer, cfg, "What is 1+1?", " Notions that may help: carry.") != plain
    assert solution_prompt_ids(tokenizer, cfg, "What is 1+1?", " Notions that may help: " + "x" * 700) == plain
    assert not prompts_fit(tokenizer, cfg, "What is 1+1?")  # its meta prompt is ~750 characters
    assert prompts_fit(tokenizer, replace_algorithm(cfg, "grpo"), "What is 1+1?")


def test_a_huge_problem_is_dropped_without_being_tokenized(assets, monkeypatch):
    # A 2-million-character row (issue 27 saw a 50 MB one take 4 GiB in 10 s, then killed) cannot fit in
    # max_prompt_tokens of this vocabulary's longest tokens: it is dropped before the chat template.
    import masa_step
    from config import load_config
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, ["algorithm=grpo"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    calls = []
    real = masa_step.chat_ids
    monkeypatch.setattr(masa_step, "chat_ids", lambda tok, text: calls.append(len(text)) or real(tok, text))
    assert not masa_step.prompts_fit(tokenizer, cfg, "What is 1+1? " * 150_000)
    assert calls == []
    assert masa_step.prompts_fit(tokenizer, cfg, "What is 1+1?") and len(calls) == 1  # a short one still is


def replace_algorithm(cfg, algorithm):
    import dataclasses

    return dataclasses.replace(cfg, algorithm=algorithm)


def test_the_cpu_demo_config_runs_a_warm_start_then_rl(tmp_path):
    """configs/tiny.yaml end to end, shortened: a random model and tokenizer are built, warm-started on
    reference solutions and uninformative meta examples (checkpointed as step 0), then trained."""
    command = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "tiny.yaml"),
               f"checkpoint.dir={tmp_path / 'run'}", "warm_start.steps=5", "train.total_steps=1",
               "train.batch_size=2", "rollout.group_size=4", "rollout.meta_group_size=2", "log.progress_bar=false"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_000000", "step_000001"]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["solution_rollouts"] == 8 and record["meta_tokens"] > 0
    initial = Qwen3.from_pretrained(tmp_path / "run" / "initial")
    warmed = Qwen3.from_pretrained(tmp_path / "run" / "step_000000" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), warmed.state_dict().values()))


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite_values(tmp_path):
    from checkpoints import MetricsLog
    from config import load_config
    from training_report import run_summary

    cfg = load_config(CONFIG, [f"checkpoint.dir={tmp_path}"])
    log = MetricsLog(cfg, start=0)
    for step, accuracy in ((1, 0.5), (2, float("nan")), (3, 0.25), (4, float("inf"))):
        log.write({"step": step, "accuracy": accuracy, "parts": [float("-inf"), 1.0], "extra": {"x": float("nan")}})

    def strict(constant):  # what a strict JSON reader does with a bare NaN or Infinity
        raise ValueError(f"not JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in records] == [0.5, None, 0.25, None]
    assert records[1]["parts"] == [None, 1.0] and records[1]["extra"] == {"x": None}
    assert run_summary(tmp_path / "metrics.jsonl", window=2) == "steps 1-2 vs 3-4: accuracy 0.500 -> 0.250"


def test_run_summary_compares_the_first_and_last_steps(tmp_path):
    from training_report import run_summary

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "accuracy": a} for s, a in [(1, 0.1), (2, 0.2), (3, 0.5), (4, 0.7)]]
    rows[3]["pass_rate_mae"] = 0.2  # present in the last window only: left out
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_summary(metrics) == "steps 1-2 vs 3-4: accuracy 0.150 -> 0.600"


def test_a_run_of_skipped_steps_stops_naming_the_last_good_checkpoint(assets, tmp_path, one_process_group,
                                                                       monkeypatch):
    import checkpoints
    import train
    from config import load_config

    real_update = train.update

    def nothing_finite(*args, **kwargs):  # every optimizer step skipped, as a non-finite loss does
        return {**real_update(*args, **kwargs), "skipped_steps": 1}

    monkeypatch.setattr(train, "update", nothing_finite)
    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
                               f"checkpoint.dir={tmp_path / 'run'}", "checkpoint.every=1", "train.total_steps=10",
                               "train.max_skipped_steps=2"])
    with pytest.raises(checkpoints.RunStopped, match=r"2 steps in a row were skipped .* The last good checkpoint is "
                                               + re.escape(str(tmp_path / "run" / "step_000001"))):
        train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not (tmp_path / "run" / "step_000002").exists()


def test_a_checkpoint_restores_every_global_random_generator(assets, tmp_path, one_process_group):
    # Nothing in a step reads the global generators today (rollouts and the warm start have their own
    # seeds), so the resume tests cannot see them; a later change that does must still resume exactly.
    import random

    import numpy as np
    from transformers import AutoTokenizer

    import checkpoints
    import parallel
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", f"checkpoint.dir={tmp_path / 'run'}"])
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoints.save(cfg, 0, 1, policy, optimizer, scheduler, Qwen3.from_pretrained(assets / "model"),
                     AutoTokenizer.from_pretrained(assets / "model"), {})
    after_save = draws()
    assert draws() != after_save  # the generators moved on
    step, _ = checkpoints.load(cfg, 0, policy, optimizer, scheduler, tmp_path / "run" / "step_000001")
    assert step == 1 and draws() == after_save


@pytest.mark.parametrize("micro_batch_tokens", [4096, 12])  # each mini-batch in one forward, or one per row
def test_the_update_matches_an_independent_ppo_computation(assets, one_process_group, micro_batch_tokens):
    # Two mini-batches (the second off-policy), clip range [1 - 0.1, 1 + 0.3], per-sequence token means,
    # sampling temperature 0.7, responses of unequal lengths: the update's loss, clip fraction, ratio and
    # entropy against the same PPO step computed here on a plain copy of the model with autograd and SGD.
    import parallel
    import train
    from config import load_config

    T, lr, low, high = 0.7, 0.5, 0.1, 0.3
    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "train.mini_batches=2", "loss.entropy_coef=0",
                               f"loss.clip_low={low}", f"loss.clip_high={high}", f"rollout.temperature={T}",
                               "loss.aggregation=seq-mean-token-mean", "optim.grad_clip=1e9",
                               f"train.micro_batch_tokens={micro_batch_tokens}"])
    g = torch.Generator().manual_seed(0)
    episodes = [Episode(i, "solution", torch.randint(3, 60, (3 + i % 2,), generator=g).tolist(),
                        torch.randint(3, 60, (2 + 3 * i,), generator=g).tolist(), advantage=a)
                for i, a in enumerate([1.0, -1.5, 0.5, -0.5, 2.0, -1.0])]
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    got = train.update(cfg, one_process_group, policy, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), episodes)

    plain = Qwen3.from_pretrained(assets / "model", dtype=torch.float32)

    def response_logprobs(e):  # log p(token) and the entropy at each response token, under softmax(logits / T)
        logits = plain(torch.tensor([e.prompt_ids + e.response_ids]))[0, len(e.prompt_ids) - 1:-1] / T
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, torch.tensor(e.response_ids)[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    def ppo(lo, hi):
        """(loss, clipped tokens, ratio sum, entropy sum, tokens) summed over both mini-batches."""
        model_state = {k: v.clone() for k, v in plain.state_dict().items()}
        with torch.no_grad():
            old = {e.prompt_index: response_logprobs(e)[0] for e in episodes}
        totals = [0.0] * 5
        for part in ([e for e in episodes if e.prompt_index % 2 == i] for i in range(2)):
            loss = 0.0
            for e in part:
                logp, entropy = response_logprobs(e)
                ratio = torch.exp(logp - old[e.prompt_index])
                unclipped, clipped = -e.advantage * ratio, -e.advantage * ratio.clamp(1 - lo, 1 + hi)
                loss = loss + torch.maximum(unclipped, clipped).mean() / len(part)
                totals[1] += float((clipped > unclipped).sum())
                totals[2] += float(ratio.detach().sum())
                totals[3] += float(entropy.detach().sum())
                totals[4] += len(e.response_ids)
            plain.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in plain.parameters():
                    p -= lr * p.grad
            totals[0] += float(loss.detach())
        plain.load_state_dict(model_state)
        return totals

    loss, clipped, ratio, entropy, tokens = ppo(low, high)
    assert clipped > 0 and ppo(high, low)[1] != clipped  # the step clips, and the two ends are told apart
    assert got["trained_tokens"] == tokens
    assert got["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    assert got["clip_fraction"] == pytest.approx(clipped / tokens, abs=1e-6)
    assert got["ratio_mean"] == pytest.approx(ratio / tokens, rel=1e-5)
    assert got["entropy"] == pytest.approx(entropy / tokens, rel=1e-5)


@pytest.mark.parametrize("mini_batches", [1, 2])  # the gap from the one optimizer step's forward, or the old pass
def test_the_update_reports_how_far_the_sampler_log_probs_are_from_its_own(assets, one_process_group, mini_batches):
    # Episodes whose sampler log-probs are the trainer's own, offset by +0.1 (first) and -0.2 (second):
    # d = trainer - sampler is -0.1 and +0.2 on every response token; a third carries none (not counted).
    import parallel
    import train
    from config import load_config

    T = 0.7
    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", f"train.mini_batches={mini_batches}",
                               f"rollout.temperature={T}"])
    plain = Qwen3.from_pretrained(assets / "model", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    episodes = [Episode(i, "solution", torch.randint(3, 60, (4,), generator=g).tolist(),
                        torch.randint(3, 60, (3 + 2 * i,), generator=g).tolist(), advantage=a)
                for i, a in enumerate([1.0, -1.0, 0.5])]
    for e, offset in zip(episodes[:2], (0.1, -0.2)):
        with torch.no_grad():
            logits = plain(torch.tensor([e.prompt_ids + e.response_ids]))[0, len(e.prompt_ids) - 1:-1] / T
        own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(e.response_ids)[:, None])[:, 0]
        e.sampled_logprobs = (own + offset).tolist()
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    got = train.update(cfg, one_process_group, policy, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), episodes)
    n0, n1 = len(episodes[0].response_ids), len(episodes[1].response_ids)  # 3 and 5 tokens
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    assert got["logprob_gap_mean"] == pytest.approx((0.1 * n0 + 0.2 * n1) / (n0 + n1), abs=1e-5)
    assert got["logprob_gap_max"] == pytest.approx(0.2, abs=1e-5)
    assert got["mismatch_kl"] == pytest.approx((n0 * k3(-0.1) + n1 * k3(0.2)) / (n0 + n1), abs=1e-6)



# ---------------------------------------------------------------------------------------------------
# Runs that cannot go on: stopped early, with the reason (issue 27)


def train_process(assets, run_dir, *overrides):
    """python train.py as a user runs it; the finished process (any exit status)."""
    args = [str(CONFIG), f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
            f"checkpoint.dir={run_dir}", "log.progress_bar=false", *overrides]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=child_env())


def test_a_diverging_run_stops_before_checkpointing_the_exploded_weights(assets, tmp_path):
    # optim.lr=1e10: AdamW moves every weight by about lr at the first step. Before, the run exited 0 and
    # checkpointed the exploded weights (grad norm 0.0 afterwards, so no step counted as skipped).
    out = train_process(assets, tmp_path / "run", "optim.lr=1e10", "train.total_steps=4", "checkpoint.every=1")
    assert out.returncode != 0
    assert "warning: optim.lr=1e+10 is far above" in out.stdout
    assert re.search(r"error: the weights' norm went from \S+ to \S+ at step 1 \(optim.lr=1e\+10\): the run is "
                     r"diverging\. The last good checkpoint is none", out.stderr), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "step_000001").exists()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["weight_norm"] > 1e6  # logged: the step that diverged


def test_a_run_of_zero_steps_ends_cleanly(assets, tmp_path):
    out = train_process(assets, tmp_path / "run", "train.total_steps=0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no steps recorded" in out.stdout


def test_a_missing_validation_file_stops_the_run_before_anything_is_loaded_or_written(assets, tmp_path):
    # with a warm start, which (before) ran and was checkpointed as step_000000 before the file was read
    out = train_process(assets, tmp_path / "run", f"validation.path={tmp_path / 'held_out.jsonl'}",
                        "data.source=arithmetic", "warm_start.steps=1")
    assert out.returncode != 0 and "held_out.jsonl" in out.stderr
    assert not (tmp_path / "run" / "step_000000").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_means_over_no_trained_token_are_null_not_zero(assets, one_process_group):
    # Every advantage 0 and no entropy or KL term: no response is forwarded, so the clip fraction, the
    # ratio, the entropy and the KL are unmeasured (NaN, written as null), not 0.
    import parallel
    import train
    from config import load_config

    cfg = load_config(CONFIG, [f"model.path={assets / 'model'}", "loss.entropy_coef=0"])
    policy = parallel.build_policy(cfg, one_process_group)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    episodes = [Episode(i, "solution", [5, 6, 7], [8, 9], advantage=0.0) for i in range(4)]
    got = train.update(cfg, one_process_group, policy, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), episodes)
    assert got["trained_tokens"] == 0
    assert all(math.isnan(got[key]) for key in ("clip_fraction", "ratio_mean", "entropy", "kl"))


class _Payload:
    """What a hostile rank<r>.pt could carry: unpickling it calls Path.touch (any callable would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_whose_state_file_would_run_code_is_refused_and_the_code_never_runs(assets, tmp_path):
    import checkpoints

    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    run(assets, run_dir, "train.total_steps=1", "checkpoint.every=1")
    step = run_dir / "step_000001"
    torch.save({"step": 1, "payload": _Payload(marker)}, step / "rank0.pt")
    checkpoints.write_manifest(step)  # as a run directory from elsewhere would be: intact by its manifest
    out = train_process(assets, run_dir, "train.total_steps=2")
    assert out.returncode != 0 and "rank0.pt holds objects other than tensors, numbers and lists" in out.stderr
    assert not marker.exists() and "Traceback" not in out.stderr


@pytest.mark.parametrize("mistake,message", [
    (["rollout.grup_size=4"], "error: unknown config key 'rollout.grup_size'; valid keys in section 'rollout'"),
    (["data.train_path=/nonexistent/problems.jsonl"], "error: the run cannot start:\n  data.train_path: "
                                                      "/nonexistent/problems.jsonl does not exist; set data.train_path"),
    (["train.batch_size=3", "nproc=2"], "error: train.batch_size=3 must be a multiple of the 2 processes"),
    (["checkpoint.dir=FILE/run"], r"error: \[Errno 20\] Not a directory: .*FILE"),
])
def test_a_users_mistake_is_one_message_once_not_a_traceback(assets, tmp_path, mistake, message):
    # Before, load_config ran outside any handler, and data, size and permission errors reached the
    # user as tracebacks, one per rank under torchrun ("[rank0]: Traceback ...").
    nproc = int(next((m.split("=")[1] for m in mistake if m.startswith("nproc=")), 1))
    overrides = [m for m in mistake if not m.startswith("nproc=")]
    if any("FILE" in m for m in overrides):  # a run directory under a file (even root cannot make that)
        (tmp_path / "FILE").write_text("not a directory")
        overrides = [f"checkpoint.dir={tmp_path / 'FILE' / 'run'}"]
    args = [str(CONFIG), f"model.path={assets / 'model'}", f"data.train_path={assets / 'problems.jsonl'}",
            f"checkpoint.dir={tmp_path / 'run'}", "log.progress_bar=false", *overrides]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=child_env())
    assert out.returncode != 0
    assert re.search(message, out.stderr), out.stderr[-3000:]
    assert 'train.py", line' not in out.stderr, out.stderr[-3000:]  # no traceback through this project's code
    # (torchrun's launcher still prints its own report of a failed child, traceback included)
    assert len(re.findall(r"^error: ", out.stderr, re.MULTILINE)) == 1  # once, not once per rank
