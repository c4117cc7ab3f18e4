"""bench/gpu_check.sh --cpu: the GPU check's code paths at toy sizes, so the script cannot rot while
no GPU is at hand. Its accuracy checks (Triton kernels in fp32 against float64) are judged here too."""

import subprocess
import sys
from pathlib import Path

from conftest import child_env

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_a_cpu_and_passes_its_judged_checks(tmp_path):
    log = tmp_path / "gpu_check.log"
    result = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--log", str(log)], capture_output=True,
                            text=True, timeout=600, env=child_env(threads=2, PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("\ncheck "):]
    for check in ["copy bandwidth", "logits kernel float32: log-prob error", "linear kernel float32: relative gradient",
                  "logits kernel fwd+bwd, of bandwidth floor", "sampler vs transformers", "train step time",
                  "of which logprobs + backward", "paged decode attention float32: error",
                  "sampler graph shapes vs eager", "training run: kernels that ran on Triton",
                  "checkpoint RNG state restores", "out-of-range log-prob target stops the run", "eval.py end to end",
                  "decode graphs' memory vs rollout.decode_graph_bytes",
                  "sampler vs trainer log-probs: mismatch KL"]:
        assert check in table
    assert "0 of 10 judged checks failed" in table
    assert log.read_text().endswith(result.stdout[-200:])  # the log holds what was printed
    update = next(line for line in table.splitlines() if "logprobs + backward" in line)
    assert float(update.split()[-2]) > 0  # the update really ran (the entropy bonus keeps responses in the loss)
