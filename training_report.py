"""What a training run shows of itself: a progress bar while it runs (`progress_bar`), and at the end,
from its metrics.jsonl, the first steps against the last (`run_summary`, the line train.py prints
last) and the training curves (`plot_training`, curves.png beside the checkpoints).

A module of its own because it reads a finished log and draws: train.py writes the log
(checkpoints.MetricsLog) and calls these at the end, and bench/ or a notebook can call them on any
run directory. It imports nothing of the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def progress_bar(total: int, name: str, initial: int, enabled: bool, unit: str = "step"):
    """A tqdm bar counting `unit`s, or one that shows nothing when not `enabled` (train.py: rank 0 with
    log.progress_bar; rollout.generate: its `progress` argument)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit=unit)


class _NoBar:
    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def run_summary(metrics_file: Path, window: int = 20) -> str:
    """First vs last `window` steps of the run, from metrics.jsonl: what the run changed."""
    records = _records(metrics_file)
    if not records:
        return "no steps recorded"
    n = max(1, min(window, len(records) // 2))
    parts = []
    for key, label in [("accuracy", "accuracy"), ("pass_rate_mae", "pass-rate MAE"),
                       ("meta_reward", "meta reward"), ("meta_parse_failures", "meta parse failures")]:
        first, last = ([r[key] for r in part if r.get(key) is not None] for part in (records[:n], records[-n:]))
        if first and last:
            parts.append(f"{label} {np.mean(first):.3f} -> {np.mean(last):.3f}")
    span = f"steps {records[0]['step']}-{records[n - 1]['step']} vs {records[-n]['step']}-{records[-1]['step']}"
    return f"{span}: {', '.join(parts)}"


def plot_training(metrics_file: Path, out: Path, window: int = 10) -> Path | None:
    """A training run's curves from its metrics.jsonl: solution reward and accuracy, meta reward, and
    the pass-rate error of the meta predictions (lower is better calibrated), as moving averages over
    `window` steps. Returns the PNG path, or None without matplotlib or without a step to draw."""
    if not _records(metrics_file):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no training plot (pip install matplotlib)")
        return None
    records = _records(metrics_file)
    steps = [r["step"] for r in records]

    def curve(key):
        values = np.array([r.get(key, float("nan")) for r in records], dtype=float)
        smooth = [np.nanmean(values[max(0, i - window + 1):i + 1]) if np.isfinite(values[max(0, i - window + 1):i + 1]).any()
                  else np.nan for i in range(len(values))]
        return np.array(smooth)

    panels = [("solution path", ["reward", "accuracy"]), ("meta path", ["meta_reward", "meta_parse_failures"]),
              ("calibration", ["pass_rate_mae"])]
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]  # GRPO runs have no meta path
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, curve(key), label=key)
        ax.set(title=title, xlabel="step")
        ax.legend()
    fig.suptitle(f"{Path(metrics_file).parent.name}: moving averages over {window} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _records(metrics_file: Path) -> list[dict]:
    """The steps metrics.jsonl holds; none when it was never written (a run of train.total_steps=0)."""
    path = Path(metrics_file)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
