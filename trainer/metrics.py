"""Side effects of training: logs, metrics.jsonl, progress, TensorBoard, the loss-curve PNG.

Only rank 0 prints progress and writes shared files. Every rank logs warnings, with its rank
in the prefix, to stderr and to its own file: ``<output_dir>/train.log`` (rank 0) or
``<output_dir>/logs/rank<N>.log``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from trainer.dist import DistInfo

log = logging.getLogger("dstrain")


def setup_logging(output_dir: str | Path | None, dist: DistInfo) -> None:
    """Rank 0: INFO to stderr and train.log. Other ranks: WARNING and above, rank-prefixed."""
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    fmt = logging.Formatter(f"[rank{dist.rank}] %(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # One file per rank: appends from several nodes to one file on NFS are not atomic and
        # interleave mid-line. delay: a rank that never warns leaves no empty file.
        path = Path(output_dir) / ("train.log" if dist.is_main else f"logs/rank{dist.rank}.log")
        path.parent.mkdir(exist_ok=True)
        file_handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    # Library chatter (DeepSpeed's per-rank INFO lines) only from rank 0 and only warnings.
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING if dist.is_main else logging.ERROR)


class Callback:
    """Hooks the Trainer calls; each callback carries one side effect."""

    def on_train_start(self, trainer: Any) -> None: ...

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...


class MetricsFile(Callback):
    """One JSON object per logged step (and per eval) in metrics.jsonl; a line to train.log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Any) -> None:
        """Drop records past the step training starts from (a killed run may have logged beyond
        its last checkpoint), so the file always reads as one consistent run."""
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= trainer.state.step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        self._write(record)
        log.info(
            "step %d | loss %.4f | lr %.3e | grad_norm %s | %.0f tok/s",
            record["step"],
            record["loss"],
            record["lr"],
            "n/a" if record.get("grad_norm") is None else f"{record['grad_norm']:.3f}",
            record["tokens_per_s"],
        )

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        self._write(record)
        log.info(
            "eval step %d | loss %.4f | ppl %.2f", record["step"], record["eval_loss"], record["eval_ppl"]
        )


class Progress(Callback):
    """A rich progress bar on rank 0: step, loss, lr, tokens/s and ETA."""

    def __init__(self, total_steps: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total = total_steps
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = None

    def on_train_start(self, trainer: Any) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, completed=trainer.state.step, stats="")

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=record["step"], stats=stats)

    def on_train_end(self, trainer: Any) -> None:
        self.bar.stop()


class TensorBoard(Callback):
    """TensorBoard scalars under <output_dir>/tb (needs the [track] extra)."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
        self.writer.add_scalar("eval/ppl", record["eval_ppl"], record["step"])

    def on_train_end(self, trainer: Any) -> None:
        self.writer.close()


class LossCurve(Callback):
    """loss_curve.png from metrics.jsonl at the end: train and eval loss on one chart."""

    def __init__(self, metrics_path: Path, png_path: Path) -> None:
        self.metrics_path = metrics_path
        self.png_path = png_path

    def on_train_end(self, trainer: Any) -> None:
        plot_loss_curve(self.metrics_path, self.png_path)


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Draw train and eval loss against the optimizer step; None when there is nothing to draw."""
    if not metrics_path.is_file():
        return None
    train, evals = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            evals.append((record["step"], record["eval_loss"]))
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


class Throughput:
    """tokens/s over the window since the last log, counting non-pad tokens of all ranks."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.window_start = self.start
        self.window_tokens = 0

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def callbacks_for(job: Any, dist: DistInfo, total_steps: int) -> list[Callback]:
    """Rank 0 gets the side effects; other ranks get none (they only log warnings)."""
    if not dist.is_main:
        return []
    out = Path(job.output_dir)
    metrics = out / "metrics.jsonl"
    callbacks: list[Callback] = [MetricsFile(metrics)]
    if job.log.progress and sys.stderr.isatty():
        callbacks.append(Progress(total_steps))
    if job.log.tensorboard:
        callbacks.append(TensorBoard(out / "tb"))
    if job.log.plot:
        callbacks.append(LossCurve(metrics, out / "loss_curve.png"))
    return callbacks
