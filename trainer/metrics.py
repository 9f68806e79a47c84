"""Side effects of training, as callbacks: logs, metrics.jsonl, progress, the PNG, the trackers
(``trainer.reporters``),
and the measurements (throughput, memory) that go into each logged record.

Callbacks run on every rank. A callback measures on its own rank and records a metric with a
reduction over ranks (``trainer.metrics.record(name, value, "mean" | "sum" | "max" | "min")``);
on a log step the Trainer reduces everything recorded in two small all-reduces and hands the
record to ``on_log``. Only rank 0 prints progress and writes shared files. Every rank logs
warnings, with its rank in the prefix, to stderr and to its own file: ``<output_dir>/train.log``
(rank 0) or ``<output_dir>/logs/rank<N>.log`` (never two writers on one file, which NFS can interleave).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Literal

from trainer.callback import Callback
from trainer.dist import DistInfo, all_reduce_max, all_reduce_sum
from trainer.flops import mfu
from trainer.jsonl import keep_through_step

log = logging.getLogger("dstrain")

Reduction = Literal["sum", "mean", "max", "min"]


# ---------------------------------------------------------------------------------- logging


class ConsoleHandler(logging.StreamHandler):
    """stderr, or the live rich console while a progress bar is shown (lines print above it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.console: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.console is None:
            super().emit(record)
            return
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def setup_logging(
    output_dir: str | Path | None, dist: DistInfo, library_logs: bool = False
) -> ConsoleHandler:
    """Rank 0: INFO to stderr and train.log. Other ranks: WARNING and above, rank-prefixed.
    Libraries (DeepSpeed, transformers) say only warnings, and show no progress bars, unless
    ``library_logs`` (then rank 0 shows their INFO lines too)."""
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    fmt = logging.Formatter(f"[rank{dist.rank}] %(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = ConsoleHandler()
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
    # Library chatter (DeepSpeed's per-rank INFO lines, transformers' progress bars) stays quiet.
    verbose = library_logs and dist.is_main
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(
            logging.INFO if verbose else logging.WARNING if dist.is_main else logging.ERROR
        )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return console


# ---------------------------------------------------------------------------------- records


class MetricRecorder:
    """Metrics recorded by callbacks for the next log step, reduced over ranks in two all-reduces.

    Every rank must record the same names (callbacks run on every rank). ``None`` (a metric
    that does not exist here, such as MFU on a CPU) stays ``None``.
    """

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist
        self._values: dict[str, tuple[float, Reduction]] = {}

    def record(self, name: str, value: float | None, reduce: Reduction = "mean") -> None:
        self._values[name] = (math.nan if value is None else float(value), reduce)

    def reduce(self) -> dict[str, float | None]:
        names = sorted(self._values)
        additive = [n for n in names if self._values[n][1] in ("sum", "mean")]
        extreme = [n for n in names if self._values[n][1] in ("max", "min")]
        out: dict[str, float] = {}
        if additive:
            sums = all_reduce_sum([self._values[n][0] for n in additive], self.dist)
            for n, total in zip(additive, sums, strict=True):
                out[n] = total / self.dist.world_size if self._values[n][1] == "mean" else total
        if extreme:  # min is the max of the negation: one all-reduce for both
            signs = [1.0 if self._values[n][1] == "max" else -1.0 for n in extreme]
            peaks = all_reduce_max(
                [s * self._values[n][0] for s, n in zip(signs, extreme, strict=True)], self.dist
            )
            out.update({n: s * v for n, s, v in zip(extreme, signs, peaks, strict=True)})
        self._values.clear()
        return {n: None if math.isnan(v) else v for n, v in out.items()}


# ---------------------------------------------------------------------------------- measurements


class Throughput(Callback):
    """tokens/s of the steps since the last log: non-pad tokens of all ranks over the time spent
    in steps (waiting for data + compute), so eval and save time never dilute it.

    Records ``tokens_per_s`` (the slowest rank's view), ``mfu`` (model FLOPs of those tokens per
    second over the ranks' dense peak: ``trainer.flops``; None without a known peak, as on a
    CPU), ``data_wait_s`` and ``step_s`` (mean per step over the window, the slowest rank), and
    ``time`` (seconds since training started).
    """

    def __init__(self, flops_per_token: float | None = None, peak_tflops: float | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.tokens, self.steps, self.wait_s, self.compute_s = 0, 0, 0.0, 0.0

    def on_train_start(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def post_step(self, trainer: Any, plan: Any, result: Any, compute_s: float) -> None:
        self.tokens += plan.tokens
        self.steps += 1
        self.wait_s += plan.data_wait_s
        self.compute_s += compute_s
        if trainer.is_log_step():
            seconds = max(self.wait_s + self.compute_s, 1e-9)
            trainer.metrics.record("tokens_per_s", self.tokens / seconds, "min")
            utilisation = None
            if self.flops_per_token is not None:
                utilisation = mfu(
                    self.tokens / seconds, self.flops_per_token, trainer.dist.world_size, self.peak_tflops
                )
            trainer.metrics.record("mfu", utilisation, "min")
            trainer.metrics.record("data_wait_s", self.wait_s / self.steps, "max")
            trainer.metrics.record("step_s", (self.wait_s + self.compute_s) / self.steps, "max")
            trainer.metrics.record("time", time.perf_counter() - self.start, "max")
            self._reset()


class Memory(Callback):
    """Peak memory on log steps, max over ranks: ``mem_gb`` is the training device's peak
    (GPU max allocated; on a CPU the process's peak RSS), ``mem_reserved_gb`` the GPU allocator's
    peak reservation (None on a CPU), ``host_rss_gb`` the process's peak RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def post_step(self, trainer: Any, plan: Any, result: Any, compute_s: float) -> None:
        if not trainer.is_log_step():
            return
        host = peak_rss_bytes() / 1e9
        if self.cuda:
            import torch

            allocated = torch.cuda.max_memory_allocated() / 1e9
            reserved = torch.cuda.max_memory_reserved() / 1e9
        else:
            allocated, reserved = host, None
        trainer.metrics.record("mem_gb", allocated, "max")
        trainer.metrics.record("mem_reserved_gb", reserved, "max")
        trainer.metrics.record("host_rss_gb", host, "max")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------- outputs (rank 0)


class MetricsFile(Callback):
    """One JSON object per logged step (and per eval) in metrics.jsonl; a line to train.log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Any) -> None:
        """Drop records past the step training starts from (a killed run may have logged beyond
        its last checkpoint) and a torn last line (a full disk), so the file reads as one run."""
        keep_through_step(self.path, trainer.state.step)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self._write(record)
        log.info(
            "step %d | loss %.4f | lr %.3e | grad_norm %s | %.0f tok/s",
            record["step"],
            record["loss"],
            record["lr"],
            "n/a" if record.get("grad_norm") is None else f"{record['grad_norm']:.3f}",
            record.get("tokens_per_s") or 0.0,
        )

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        self._write(record)
        log.info(
            "eval step %d | loss %.4f | ppl %.2f", record["step"], record["eval_loss"], record["eval_ppl"]
        )

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self._write(record)
        counts = record["micro_batches_per_rank"]
        log.info(
            "epoch %d ended at step %d: micro-batches per rank %s (the shorter ranks ran one-token fillers)",
            record["epoch_end"],
            record["step"],
            counts,
        )


class Progress(Callback):
    """A rich progress bar on rank 0 (a terminal only): step, loss, lr, tokens/s and ETA. Log
    lines go through the same console, so they print above the bar instead of through it."""

    def __init__(self, total_steps: int, console_handler: ConsoleHandler | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total = total_steps
        self.handler = console_handler
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self.task = None

    def on_train_start(self, trainer: Any) -> None:
        self.bar.start()
        if self.handler is not None:
            self.handler.console = self.bar.console
        self.task = self.bar.add_task("train", total=self.total, completed=trainer.state.step, stats="")

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record.get('tokens_per_s') or 0:.0f} tok/s"
        self.bar.update(self.task, completed=record["step"], stats=stats)

    def on_train_end(self, trainer: Any) -> None:
        self.bar.stop()
        if self.handler is not None:
            self.handler.console = None


class LossCurve(Callback):
    """loss_curve.png from metrics.jsonl at the end (``trainer.plots``: train loss raw and
    smoothed, eval loss, lr on a second axis); ``dstrain plot`` draws the same from any run."""

    def __init__(self, metrics_path: Path, png_path: Path) -> None:
        self.metrics_path = metrics_path
        self.png_path = png_path

    def on_train_end(self, trainer: Any) -> None:
        from trainer.plots import plot_metrics

        plot_metrics([self.metrics_path], self.png_path)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def callbacks_for(
    job: Any,
    dist: DistInfo,
    total_steps: int,
    console_handler: ConsoleHandler | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
) -> list[Callback]:
    """Measurements on every rank; files and progress on rank 0 only."""
    from trainer.errors import ConfigError
    from trainer.flops import device_peak_tflops, flops_per_token

    try:
        flops = flops_per_token(model_config, job.data.max_seq_len, job.lora) if model_config is not None else None
    except ConfigError:  # an architecture the FLOPs count does not know: MFU stays null
        flops = None
    peak = (
        device_peak_tflops(job.log.peak_tflops)
        if dist.device.startswith("cuda") or job.log.peak_tflops
        else None
    )
    callbacks: list[Callback] = [Throughput(flops, peak), Memory(dist.device)]
    if job.log.sample_prompts and tokenizer is not None:
        from trainer.generate import Samples

        path = Path(job.output_dir) / "samples.jsonl"
        callbacks.append(Samples(job.log.sample_prompts, job.log.sample_tokens, tokenizer, path, job.seed))
    from trainer.reporters import Reporters

    # On every rank, as every rank loads its checkpoint part (the run ids); after Samples, whose
    # texts it reports; only rank 0 opens tracker runs.
    callbacks.append(Reporters(job, dist))
    if not dist.is_main:
        return callbacks
    out = Path(job.output_dir)
    metrics = out / "metrics.jsonl"
    callbacks.append(MetricsFile(metrics))
    if job.log.progress and sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        callbacks.append(Progress(total_steps, console_handler))
    if job.log.plot:
        callbacks.append(LossCurve(metrics, out / "loss_curve.png"))
    return callbacks
