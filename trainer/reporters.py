"""Experiment trackers (``log.report_to``): TensorBoard, Weights & Biases, SwanLab, MLflow.

One :class:`Reporter` per tracker, fed by the :class:`Reporters` callback with what
metrics.jsonl gets (the same keys and values, at the record's step), the resolved recipe as the
run's config, and the eval samples as text. Rank 0 only.

**One tracker run across ``--resume``.** The run ids are a stateful part of every checkpoint
(``trackers`` in trainer_state.json) and are reopened on resume (wandb ``id`` + ``resume="allow"``,
SwanLab ``id`` + ``resume="allow"``, the same MLflow run id; TensorBoard keeps its directory).
Steps logged after the checkpoint and before a crash appear once: TensorBoard's events are
purged from the checkpoint's step on (``purge_step``: the resumed run overwrites them); MLflow
(written synchronously) keeps what it was sent, and the ledger ``<output_dir>/trackers.json`` (the last step
each tracker was sent, per record kind) tells the resumed run which steps to skip; wandb online
skips what its server reports holding (``run.step``); wandb offline writes its file every 15 s,
so after a kill -9 nothing tells what the killed session kept: the resumed session sends the
whole history again from metrics.jsonl, and ``wandb sync`` (steps must increase) keeps each step
once; SwanLab, which also writes in the background, is replayed the same way (its duplicate-step
guard keeps the first of each step). A resumed run computes the same losses (the checkpoint contract), so kept values are the
ones metrics.jsonl ends up with; only timings (tokens/s) differ.

**A tracker never stops training.** A missing package, a bad key or an unreachable server is
one warning at start naming the tracker and the fix, and the others go on; an error while
logging is one warning and that tracker is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from trainer.dist import DistInfo
from trainer.metrics import Callback

log = logging.getLogger("dstrain")

#: What to install for each tracker (all of them: ``pip install "dstrain[track]"``).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow-skinny"}
#: What to check when a tracker that is installed cannot start.
FIXES = {
    "tensorboard": "check that <output_dir>/tb is writable",
    "wandb": "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to log locally",
    "swanlab": "run `swanlab login` or set SWANLAB_API_KEY, or SWANLAB_MODE=offline (or local)",
    "mlflow": "check MLFLOW_TRACKING_URI (a server that answers, or sqlite:///mlflow.db)",
}
LEDGER = "trackers.json"


class Reporter:
    """One tracker's run. ``start`` opens it (or reopens ``run_id``) and returns its id."""

    name = ""
    #: True when ``start`` drops what the run logged after ``step`` (then nothing is skipped).
    rewinds = False
    #: The last step the tracker's own store reports holding after ``start`` (a resumed wandb
    #: run online); None when it cannot tell, and the ledger decides.
    holds_through: int | None = None
    #: True when a resumed session cannot tell what the crashed one kept (wandb offline: its
    #: file is written every 15 s, and a kill -9 loses the rest): it gets the whole history
    #: again from metrics.jsonl, and ``wandb sync`` keeps each step once (steps must increase).
    replays = False

    def __init__(self, output_dir: Path, project: str | None, run_name: str, config: dict[str, Any]):
        self.output_dir = output_dir
        self.project = project
        self.run_name = run_name
        self.config = config

    def start(self, run_id: str | None, step: int) -> str:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        """Eval samples (``{"prompt", "text"}``); trackers without text ignore them."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter(Reporter):
    """Scalars and sample text in ``<output_dir>/tb``; a resume purges the events after its step."""

    name = "tensorboard"
    rewinds = True

    def start(self, run_id: str | None, step: int) -> str:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard's readers drop the events at and after it that an earlier
        # session wrote, so the resumed run's steps replace the crashed run's.
        self.writer = SummaryWriter(str(self.output_dir / "tb"), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", 0)
        return run_id or "tb"

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        rows = "\n".join(f"| {s['prompt']!r} | {s['text']!r} |" for s in samples)
        self.writer.add_text("samples", "| prompt | text |\n|---|---|\n" + rows, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A W&B run (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, WANDB_API_KEY respected); files under
    ``<output_dir>/wandb`` unless WANDB_DIR says otherwise."""

    name = "wandb"

    def start(self, run_id: str | None, step: int) -> str:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=self.project or os.environ.get("WANDB_PROJECT") or "dstrain",
            name=self.run_name,
            id=run_id,  # None: wandb makes one
            resume="allow",
            config=self.config,
            dir=None if os.environ.get("WANDB_DIR") else str(self.output_dir),
            reinit="create_new",
        )
        if run_id is not None and self.run.settings._offline:
            self.replays = True
        elif run_id is not None:
            # The server's view after a crash: its next step (rows it never got are sent again).
            self.holds_through = self.run.step - 1
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        table = self.wandb.Table(
            columns=["step", "prompt", "text"], data=[[step, s["prompt"], s["text"]] for s in samples]
        )
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanlabReporter(Reporter):
    """A SwanLab experiment (SWANLAB_MODE, SWANLAB_PROJ_NAME, SWANLAB_LOG_DIR, SWANLAB_API_KEY
    respected); local files under ``<output_dir>/swanlog`` unless SWANLAB_LOG_DIR says otherwise."""

    name = "swanlab"

    def start(self, run_id: str | None, step: int) -> str:
        import swanlab

        self.swanlab = swanlab
        self.run = swanlab.init(
            project=self.project or os.environ.get("SWANLAB_PROJ_NAME") or "dstrain",
            name=self.run_name,
            id=run_id,
            resume="allow" if run_id else None,
            config=self.config,
            log_dir=None if os.environ.get("SWANLAB_LOG_DIR") else str(self.output_dir / "swanlog"),
            reinit=True,
        )
        # SwanLab writes its records in the background: after a kill -9 nothing tells what the
        # killed session kept, so a resumed one gets the whole history again (SwanLab's
        # duplicate-step guard keeps each step once when it syncs or resumes).
        self.replays = run_id is not None
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        texts = [self.swanlab.Text(s["text"], caption=s["prompt"]) for s in samples]
        self.run.log({"samples": texts}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter(Reporter):
    """An MLflow run in experiment ``project`` (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME
    respected; without a tracking URI, ``sqlite:///<output_dir>/mlflow.db``). The recipe goes
    in as params, the samples as text artifacts."""

    name = "mlflow"

    def start(self, run_id: str | None, step: int) -> str:
        # MLflow retries an unreachable server for minutes by default: fail fast instead
        # (the user's own settings win).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow
        from mlflow.entities import Param

        uri = (
            os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"
        )
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        name = self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dstrain"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten(self.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        body = "\n\n".join(f"{s['prompt']}\n---\n{s['text']}" for s in samples)
        self.client.log_text(self.run_id, body, f"samples/step_{step}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


REPORTERS: dict[str, type[Reporter]] = {
    cls.name: cls for cls in (TensorBoardReporter, WandbReporter, SwanlabReporter, MlflowReporter)
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under their own keys (a list such as ``lrs`` as
    ``lrs/0``, ``lrs/1``); the step is the tracker's step, document ids stay in the file."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "doc_ids") or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class Reporters(Callback):
    """The trackers of ``log.report_to`` behind one callback, and their run ids as a checkpoint
    part. Built on every rank (every rank loads the part); only rank 0 opens runs."""

    #: Checkpoints written before trackers existed lack this part: the run ids then start fresh.
    optional_in_checkpoint = True

    def __init__(self, job: Any, dist: DistInfo) -> None:
        self.names = job.log.trackers
        self.dist = dist
        self.output_dir = Path(job.output_dir)
        self.project = job.log.project
        self.run_name = job.log.run_name or self.output_dir.resolve().name
        self.config = job.to_dict()
        self.run_ids: dict[str, str] = {}
        self.active: dict[str, Reporter] = {}
        self.skip_through: dict[str, dict[str, int]] = {}
        self.sent: dict[str, dict[str, Any]] = {}

    # -- checkpoint part --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": dict(self.run_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_ids = dict(state.get("run_ids", {}))

    # -- callback ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Any) -> None:
        if not self.dist.is_main or not self.names:
            return
        step = trainer.state.step
        ledger = self._read_ledger()
        for name in self.names:
            reporter = REPORTERS[name](self.output_dir, self.project, self.run_name, self.config)
            run_id = self.run_ids.get(name) if step else None
            try:
                run_id = reporter.start(run_id, step)
            except ImportError as exc:
                log.warning(
                    "report_to %s: %s is not installed (%s); pip install %s (or dstrain[track]); "
                    "training goes on without it",
                    name,
                    PACKAGES[name],
                    exc,
                    PACKAGES[name],
                )
                continue
            except Exception as exc:  # a tracker never stops training: whatever it raised
                log.warning(
                    "report_to %s: could not start (%s); %s; training goes on without it",
                    name,
                    one_line(exc),
                    FIXES[name],
                )
                continue
            self.active[name] = reporter
            self.run_ids[name] = run_id
            sent = ledger.get(name, {})
            # Steps this run id was already sent (after the checkpoint, before a crash).
            kept = (
                sent.get("steps", {})
                if step and sent.get("run_id") == run_id and not reporter.rewinds
                else {}
            )
            if reporter.replays:  # the whole history again: nothing to skip
                kept = {}
            elif reporter.holds_through is not None:  # the tracker knows better than the ledger
                kept = dict.fromkeys(("train", "eval", "samples", "epoch"), reporter.holds_through)
            self.skip_through[name] = {kind: max(step, last) for kind, last in kept.items()}
            self.sent[name] = {"run_id": run_id, "steps": dict(kept)}
            if reporter.replays:
                self._replay(name, step)
        if self.active:
            log.info("reporting to %s", ", ".join(f"{n} (run {self.run_ids[n]})" for n in self.active))

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self._send("train", record["step"], lambda r: r.log(scalars(record), record["step"]))

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        step = record["step"]
        samples = self._samples(step)
        self._send("eval", step, lambda r: r.log(scalars(record), step))
        if samples:
            self._send("samples", step, lambda r: r.text(samples, step))

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self._send("epoch", record["step"], lambda r: r.log(scalars(record), record["step"]))

    def post_save(self, trainer: Any) -> None:
        for name in list(self.active):
            self._call(name, lambda r: r.flush())

    def on_train_end(self, trainer: Any) -> None:
        for name in list(self.active):
            self._call(name, lambda r: r.close())
        self.active.clear()

    # -- helpers ----------------------------------------------------------------------------
    def _send(self, kind: str, step: int, action: Any) -> None:
        if not self.active:
            return
        for name in list(self.active):
            if step <= self.skip_through[name].get(kind, -1):
                continue
            if self._call(name, action):
                self.sent[name]["steps"][kind] = step
        self._write_ledger()

    def _call(self, name: str, action: Any) -> bool:
        try:
            action(self.active[name])
            return True
        except Exception as exc:  # a tracker never stops training
            log.warning(
                "report_to %s: logging failed (%s); no more reports to it in this run, training goes on",
                name,
                one_line(exc),
            )
            reporter = self.active.pop(name)
            try:
                reporter.close()
            except Exception:  # already broken: its close may fail too
                pass
            return False

    def _replay(self, name: str, step: int) -> None:
        """metrics.jsonl's records up to ``step`` (the checkpoint's) to one tracker, in order."""
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        records = [json.loads(line) for line in lines if line.strip()]
        for record in records:
            if record["step"] <= step and not self._call(
                name, lambda r, rec=record: r.log(scalars(rec), rec["step"])
            ):
                return

    def _samples(self, step: int) -> list[dict[str, Any]]:
        """This eval's samples, as the Samples callback (which runs first) wrote them."""
        path = self.output_dir / "samples.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [row for row in rows if row.get("step") == step]

    def _read_ledger(self) -> dict[str, Any]:
        path = self.output_dir / LEDGER
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or torn by a crash: nothing to skip
            return {}

    def _write_ledger(self) -> None:
        path = self.output_dir / LEDGER
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.sent), encoding="utf-8")
        tmp.replace(path)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def reporters_of(callbacks: list[Callback]) -> Reporters:
    """The :class:`Reporters` among ``callbacks`` (``callbacks_for`` adds one on every rank)."""
    return next(c for c in callbacks if isinstance(c, Reporters))
