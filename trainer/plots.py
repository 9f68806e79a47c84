"""Loss curves from ``metrics.jsonl``: train loss (raw and smoothed), eval loss, lr on a second axis.

    dstrain plot RUN_DIR [RUN_DIR ...] [--out PNG] [--smoothing S]

One run or several overlaid, one colour per run (a resumed run over the original, two recipes).
Each run's name is its directory's. The smoothed curve is a debiased exponential moving average
(TensorBoard's): each logged loss moves it by ``1 - smoothing``, and early points are not pulled
towards zero. The PNG is written atomically (a temporary file, then a rename), so a reader never
sees half a picture. matplotlib runs headless (Agg) and is imported only when drawing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import DataError, DstrainError, user_error
from trainer.jsonl import read_jsonl

DEFAULT_SMOOTHING = 0.6
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunMetrics:
    """One run's logged series, as (optimizer step, value) pairs."""

    name: str
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.train and not self.evals


def metrics_path(run: str | Path) -> Path:
    """``run`` as a metrics file: a run directory's ``metrics.jsonl``, or the file itself."""
    path = Path(run)
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(run: str | Path, name: str | None = None) -> RunMetrics:
    """The train, eval and lr series of a run directory (or its metrics.jsonl)."""
    path = metrics_path(run)
    if not path.is_file():
        raise DataError(f"{run}: no {METRICS_FILE} there; pass a run's output_dir")
    metrics = RunMetrics(name or (path.parent.name if path.name == METRICS_FILE else path.stem))
    for record in read_jsonl(path).records:  # a torn last line (a full disk) is left out
        step = record.get("step")
        if step is None:
            continue
        if record.get("loss") is not None:
            metrics.train.append((step, float(record["loss"])))
        if record.get("lr") is not None:
            metrics.lr.append((step, float(record["lr"])))
        if record.get("eval_loss") is not None:
            metrics.evals.append((step, float(record["eval_loss"])))
    return metrics


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average: s_t = a s_(t-1) + (1 - a) x_t, divided by 1 - a^t."""
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing**t))
    return out


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Directory names, or the whole paths where two runs share a name."""
    names = [metrics_path(r).parent.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(metrics_path(r).parent) for r in runs]


def loss_figure(runs: Sequence[RunMetrics], smoothing: float = DEFAULT_SMOOTHING) -> Any:
    """The matplotlib Figure: losses on the left axis, lr on a twin right axis, one colour a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    ax_lr = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        prefix = f"{run.name}: " if many else ""
        if run.train:
            steps, losses = zip(*run.train, strict=True)
            ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8, label=f"{prefix}train loss")
            ax.plot(
                steps,
                ema(losses, smoothing),
                color=color,
                linewidth=1.8,
                label=f"{prefix}train loss (EMA {smoothing:g})",
            )
        if run.evals:
            steps, losses = zip(*run.evals, strict=True)
            ax.plot(
                steps, losses, "o--", color=color, markersize=4, linewidth=1.0, label=f"{prefix}eval loss"
            )
        if run.lr:
            steps, rates = zip(*run.lr, strict=True)
            ax_lr.plot(steps, rates, ":", color=color, linewidth=1.2, alpha=0.7, label=f"{prefix}lr")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def save_figure(fig: Any, png: Path) -> Path:
    """Write ``fig`` to ``png`` through a temporary file and a rename; closes the figure."""
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png


def plot_metrics(
    run_dirs: Sequence[str | Path], png: str | Path, smoothing: float = DEFAULT_SMOOTHING
) -> Path | None:
    """Draw the runs' curves into ``png``; None (and no file) when no run has logged a loss yet."""
    runs = [read_metrics(run, name) for run, name in zip(run_dirs, run_names(run_dirs), strict=True)]
    runs = [run for run in runs if not run.empty]
    if not runs:
        return None
    return save_figure(loss_figure(runs, smoothing), Path(png))


def main(argv: list[str] | None = None) -> int:
    """``dstrain plot``: re-render loss curves from metrics.jsonl, overlaying several runs."""
    parser = argparse.ArgumentParser(
        prog="dstrain plot",
        description="Draw train loss (raw and smoothed), eval loss and lr from runs' metrics.jsonl; "
        "several runs are overlaid, one colour each.",
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="Run output_dir(s) or metrics.jsonl files."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG to write (default: RUN_DIR/loss_curve.png for one run, ./loss_compare.png for several).",
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        default=DEFAULT_SMOOTHING,
        help="EMA weight in [0, 1) of the smoothed curve.",
    )
    args = parser.parse_args(argv)
    try:
        if not 0.0 <= args.smoothing < 1.0:
            raise DataError(f"--smoothing must be in [0, 1), got {args.smoothing}")
        out = args.out or (
            metrics_path(args.runs[0]).parent / "loss_curve.png"
            if len(args.runs) == 1
            else Path("loss_compare.png")
        )
        written = plot_metrics(args.runs, out, args.smoothing)
        if written is None:
            raise DataError(
                f"nothing to draw: no loss or eval_loss records in {', '.join(map(str, args.runs))}"
            )
    except DstrainError as exc:
        return user_error(exc)
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
