"""Training reporters: the progress bar, `metrics.jsonl`, `loss.png` and console summaries.

The library raises and returns; everything a user reads while a run goes on comes from here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from .checkpoints import atomic_path, write_text


class MetricsWriter:
    """Keeps metrics.jsonl: one JSON object per report, rewritten atomically each time."""

    def __init__(self, path: Path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if resume_from_step is not None and self.path.is_file():
            # On resume keep what was logged up to the checkpoint, drop what came after it.
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= resume_from_step:
                        self.rows.append(row)

    def on_start(self, info):
        pass

    def on_report(self, report):
        row = {k: v for k, v in asdict(report).items() if k != "total_steps" and v is not None}
        self.rows.append(row)
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def on_checkpoint(self, path):
        plot_losses(self.rows, self.path.with_name("loss.png"))

    def on_interrupt(self, step, path):
        plot_losses(self.rows, self.path.with_name("loss.png"))

    def on_end(self, summary):
        plot_losses(self.rows, self.path.with_name("loss.png"))


def plot_losses(rows: list[dict], path: Path) -> None:
    """Training and validation loss against step, as a PNG (written atomically).

    Preference runs (rows with `reward_accuracy`) get a second panel: the training reward
    accuracy and margin, and the validation preference accuracy.
    """
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preference = any("reward_accuracy" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100)
    ax = axes[0] if preference else axes
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (objective per pair)" if preference else "loss (cross-entropy per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        _plot_rewards(axes[1], rows)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_rewards(ax, rows: list[dict]) -> None:
    accuracy = [(r["step"], r["reward_accuracy"]) for r in rows if "reward_accuracy" in r]
    held_out = [(r["step"], r["val_preference_accuracy"]) for r in rows if "val_preference_accuracy" in r]
    margin = [(r["step"], r["reward_margin"]) for r in rows if "reward_margin" in r]
    ax.plot(*zip(*accuracy), label="train reward accuracy", color="tab:green")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="validation preference accuracy", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(*zip(*margin), "--", label="train reward margin", color="tab:purple")
    twin.set_ylabel("reward margin")
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="lower right")


class ProgressBar:
    """A tqdm bar with loss, learning rate, tokens/s and peak memory; prints validation lines."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_step = 0

    def on_start(self, info):
        from tqdm import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info["start_step"], desc="train", unit="step",
                        file=self.stream, dynamic_ncols=True, mininterval=1.0)
        self.last_step = info["start_step"]

    def on_report(self, report):
        self.bar.update(report.step - self.last_step)
        self.last_step = report.step
        rewards = {}
        if getattr(report, "reward_accuracy", None) is not None:
            rewards = {"acc": f"{report.reward_accuracy:.2f}", "margin": f"{report.reward_margin:.3f}"}
        self.bar.set_postfix(loss=f"{report.train_loss:.3f}", **rewards, lr=f"{report.learning_rate:.1e}",
                             tok_s=f"{report.tokens_per_second:.0f}", mem=f"{report.peak_memory_gb:.2f}GB")
        if report.val_loss is not None:
            held_out = getattr(report, "val_preference_accuracy", None)
            accuracy = f", val preference accuracy {held_out:.3f}" if held_out is not None else ""
            self.bar.write(f"step {report.step}: train loss {report.train_loss:.3f}, val loss {report.val_loss:.3f}"
                           f"{accuracy}", file=self.stream)

    def on_checkpoint(self, path):
        pass

    def on_interrupt(self, step, path):
        self.close()
        where = f"checkpoint saved to {path}" if path else "no checkpoint yet"
        run = f" (the run in {Path(path).parent.parent}: keep any output_dir=... you gave)" if path else ""
        print(f"\ninterrupted at step {step}: {where}; continue with the same command and --resume{run}",
              file=self.stream)

    def on_end(self, summary):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_table(title: str, rows: list[tuple], stream=None) -> None:
    """A simple aligned two-or-more column table."""
    stream = stream or sys.stdout
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(title, file=stream)
    for row in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)), file=stream)
