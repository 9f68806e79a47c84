"""Experiment trackers (``log.report_to``): TensorBoard, Weights & Biases, SwanLab, MLflow.

One :class:`Reporter` per tracker, fed by the :class:`Reporters` callback with what
metrics.jsonl gets (the same keys and values, at the record's step), the resolved recipe as the
run's config, and the eval samples as text. Rank 0 only.

**One tracker run across ``--resume``, each step once.** The run ids are a stateful part of
every checkpoint (``trackers`` in trainer_state.json) and are reopened on resume (wandb ``id`` +
``resume="allow"``, SwanLab ``id`` + ``resume="allow"``, the same MLflow run id; TensorBoard
keeps its directory). A crashed session may have stored steps after the checkpoint, and may
have lost the last seconds before the crash (wandb and SwanLab write in the background), so a
resumed session first asks each tracker's store what it holds for the run (:meth:`Reporter.stored`:
the last step per key) and then sends only what is not there: metrics.jsonl's records up to
the checkpoint that the store lacks, then the live records after the ones it holds. That is what
the trackers' servers do anyway (wandb and ``wandb sync`` drop a step that is not above the run's
last one; SwanLab keeps the first value of a step), done before sending, so the local files that
get synced also hold each step once. The stores:

- wandb offline: every earlier session of the run id is a ``offline-run-*-<id>`` directory whose
  ``run-<id>.wandb`` transaction log (LevelDB log records of wandb's protobuf ``Record``) holds the
  history rows that its wandb-core flushed (every 15 s: ``x_transaction_log_flush_interval``); a
  row is written whole once a later step begins, and a record torn by a kill fails its CRC and
  ends the file. wandb-core runs in its own session, so a kill -9 of the training's process
  group spares it, but it exits without flushing once its parent is gone (wandb 0.31): the
  file does not grow after the resumed session read it. wandb online: the server's last step
  (``run.step``).
- SwanLab: every earlier session is a ``run-*-<id>`` directory of the log dir whose
  ``run-<id>.swanlab`` (the same LevelDB log format) swanlab's own ``DataStoreReader`` reads up to
  the first torn or damaged record (a kill -9 loses its unflushed buffer mid-record).
- MLflow writes each ``log_batch`` as one transaction: the run's latest metrics (the last step
  per key) and its ``samples/step_N.txt`` artifacts are what it holds.
- TensorBoard: every session writes an event file in ``<output_dir>/tb``, flushed every 120 s
  and before each checkpoint; TensorBoard's ``EventFileLoader`` reads the earlier ones up to a
  record cut short. (Not ``purge_step``: the readers honour it unevenly. TensorBoard's plugin
  accumulator ignores a first restart, and the legacy one keeps text, so the steps after the
  checkpoint showed twice.)

A resumed run computes the same losses (the checkpoint contract), so the values a store kept
from the crashed session are the ones metrics.jsonl ends up with; only timings (tokens/s) differ.

**A tracker never stops training.** A missing package, a bad key or an unreachable server is
one warning at start naming the tracker and the fix, and the others go on; an error while
logging is one warning and that tracker is dropped.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
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
#: The key under which a store holds the eval samples (text).
SAMPLES = "samples"


@dataclass
class Stored:
    """What a tracker's store holds for a run: ``through`` for every key (a store rewound to
    the checkpoint, a server that reports its last step), and the last step per key."""

    through: int = 0
    keys: dict[str, int] = field(default_factory=dict)

    def last(self, key: str) -> int:
        return max(self.through, self.keys.get(key, 0))

    def add(self, key: str, step: int) -> None:
        self.keys[key] = max(step, self.keys.get(key, 0))


class Reporter:
    """One tracker's run. ``start`` opens it (or reopens ``run_id``) and returns its id."""

    name = ""

    def __init__(self, output_dir: Path, project: str | None, run_name: str, config: dict[str, Any]):
        self.output_dir = output_dir
        self.project = project
        self.run_name = run_name
        self.config = config

    def start(self, run_id: str | None, step: int) -> str:
        raise NotImplementedError

    def stored(self, step: int) -> Stored:
        """What the run's store already holds after ``start`` reopened it at checkpoint ``step``
        (what earlier sessions of the run wrote, a crashed one's included): by default what
        the local files of the earlier sessions hold."""
        held = Stored()
        for path in self.earlier_sessions():
            for key, at in self.held_steps(path):
                held.add(key, at)
        return held

    def earlier_sessions(self) -> list[Path]:
        """The local files that this run's earlier sessions wrote, oldest first."""
        return []

    @staticmethod
    def held_steps(path: Path) -> Iterator[tuple[str, int]]:
        """(key, step) of each value that one session's file holds: whole records only (a
        record that a kill cut short ends the file)."""
        return iter(())

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        """Eval samples (``{"prompt", "text"}``); trackers without text ignore them."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter(Reporter):
    """Scalars and sample text in ``<output_dir>/tb``, one event file per session."""

    name = "tensorboard"

    def start(self, run_id: str | None, step: int) -> str:
        from torch.utils.tensorboard import SummaryWriter

        logdir = self.output_dir / "tb"
        self.earlier = sorted(logdir.glob("events.out.tfevents.*"))  # the writer adds its own
        self.writer = SummaryWriter(str(logdir))
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", 0)
        return run_id or "tb"

    def earlier_sessions(self) -> list[Path]:
        return self.earlier

    @staticmethod
    def held_steps(path: Path) -> Iterator[tuple[str, int]]:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        # TensorBoard's own reader: a record cut short ends the file (it says so at debug level).
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                yield value.tag.removesuffix("/text_summary"), event.step

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        rows = "\n".join(f"| {s['prompt']!r} | {s['text']!r} |" for s in samples)
        self.writer.add_text(SAMPLES, "| prompt | text |\n|---|---|\n" + rows, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class SessionReporter(Reporter):
    """A tracker whose ``init(project, name, id, resume, config, ...)`` opens a run that logs
    with ``run.log(values, step=)`` and ends with ``run.finish()`` (wandb, SwanLab); each
    session leaves a local LevelDB-log file."""

    #: The package, and the variable its docs name for the project.
    module = ""
    project_env = ""

    def init_args(self, run_id: str | None) -> dict[str, Any]:
        """The tracker's own ``init`` arguments besides project, name, id and config."""
        raise NotImplementedError

    def start(self, run_id: str | None, step: int) -> str:
        self.lib = importlib.import_module(self.module)
        self.run = self.lib.init(
            project=self.project or os.environ.get(self.project_env) or "dstrain",
            name=self.run_name,
            id=run_id,  # None: the tracker makes one
            config=self.config,
            **self.init_args(run_id),
        )
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class WandbReporter(SessionReporter):
    """A W&B run (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, WANDB_API_KEY respected); files under
    ``<output_dir>/wandb`` unless WANDB_DIR says otherwise."""

    name = "wandb"
    module = "wandb"
    project_env = "WANDB_PROJECT"

    def init_args(self, run_id: str | None) -> dict[str, Any]:
        return {
            "resume": "allow",
            "dir": None if os.environ.get("WANDB_DIR") else str(self.output_dir),
            "reinit": "create_new",
        }

    def stored(self, step: int) -> Stored:
        if not self.run.settings._offline:
            # The server's view after a crash: its next step (rows it never got are sent again).
            return Stored(through=self.run.step - 1)
        return super().stored(step)

    def earlier_sessions(self) -> list[Path]:
        here = Path(self.run.settings.sync_dir)
        found = here.parent.glob(f"offline-run-*-{self.run.id}/run-{self.run.id}.wandb")
        return sorted(path for path in found if path.parent != here)

    @staticmethod
    def held_steps(path: Path) -> Iterator[tuple[str, int]]:
        from wandb.proto import wandb_internal_pb2

        for blob in leveldb_log(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(blob)
            except Exception:  # a CRC-clean record wandb's proto cannot read: not a row
                continue
            if record.WhichOneof("record_type") == "history":
                # A logged key is ``nested_key[0]``; a Table (the samples) is several items
                # under it (``samples``/``path``, ...).
                keys = {item.key or item.nested_key[0] for item in record.history.item}
                for key in sorted(keys):
                    if not key.startswith("_"):  # _step, _runtime, _timestamp
                        yield key, record.history.step.num

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        table = self.lib.Table(
            columns=["step", "prompt", "text"], data=[[step, s["prompt"], s["text"]] for s in samples]
        )
        self.run.log({SAMPLES: table}, step=step)


class SwanlabReporter(SessionReporter):
    """A SwanLab experiment (SWANLAB_MODE, SWANLAB_PROJ_NAME, SWANLAB_LOG_DIR, SWANLAB_API_KEY
    respected); local files under ``<output_dir>/swanlog`` unless SWANLAB_LOG_DIR says otherwise."""

    name = "swanlab"
    module = "swanlab"
    project_env = "SWANLAB_PROJ_NAME"

    def init_args(self, run_id: str | None) -> dict[str, Any]:
        return {
            "resume": "allow" if run_id else None,
            "log_dir": None if os.environ.get("SWANLAB_LOG_DIR") else str(self.output_dir / "swanlog"),
            "reinit": True,
        }

    def earlier_sessions(self) -> list[Path]:
        here = Path(self.run.dir)
        found = here.parent.glob(f"run-*-{self.run.id}/run-{self.run.id}.swanlab")
        return sorted(path for path in found if path.parent != here)

    @staticmethod
    def held_steps(path: Path) -> Iterator[tuple[str, int]]:
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
        from swanlab.sdk.internal.core_python.store import DataStoreError, DataStoreReader

        reader = DataStoreReader()
        try:
            reader.open(path)
            # scan() rather than iterating: the iterator prints an error for a torn header.
            while (blob := reader.scan()) is not None:
                record = Record()
                record.ParseFromString(blob)
                kind = record.WhichOneof("record_type")
                if kind in ("scalar", "media"):
                    value = getattr(record, kind)
                    yield value.key, value.step
        except (OSError, AssertionError, DataStoreError):  # a header or record torn by a kill: the end
            return
        finally:
            with contextlib.suppress(AssertionError):  # not opened
                reader.close()

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        texts = [self.lib.Text(s["text"], caption=s["prompt"]) for s in samples]
        self.run.log({SAMPLES: texts}, step=step)


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

    def stored(self, step: int) -> Stored:
        held = Stored()
        # The run's latest metrics: the last step of each key (sent in step order).
        for metric in self.client.get_run(self.run_id).data.to_proto().metrics:
            held.add(metric.key, metric.step)
        for artifact in self.client.list_artifacts(self.run_id, SAMPLES):
            if match := re.fullmatch(rf"{SAMPLES}/step_(\d+)\.txt", artifact.path):
                held.add(SAMPLES, int(match.group(1)))
        return held

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def text(self, samples: list[dict[str, Any]], step: int) -> None:
        body = "\n\n".join(f"{s['prompt']}\n---\n{s['text']}" for s in samples)
        self.client.log_text(self.run_id, body, f"{SAMPLES}/step_{step}.txt")

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


def leveldb_log(path: Path) -> Iterator[bytes]:
    """The whole records of a LevelDB-log file (wandb's ``.wandb`` transaction log: a 7-byte
    file header, then 32 KiB blocks of chunks, each a 7-byte header (crc32 of type and bytes,
    length, type) and its bytes; a record is one FULL chunk or FIRST, MIDDLE..., LAST). The first
    chunk that is cut short or fails its checksum (a writer killed mid-write) ends the file, and
    a record whose LAST chunk never came is left out."""
    block, header = 32768, struct.Struct("<IHB")
    with path.open("rb") as f:
        data = f.read()
    pos, pieces = 7, b""
    while True:
        if block - pos % block < header.size:  # a block's tail too short for a header is padding
            pos += block - pos % block
        if pos + header.size > len(data):
            return
        crc, length, kind = header.unpack_from(data, pos)
        chunk = data[pos + header.size : pos + header.size + length]
        if (
            len(chunk) < length
            or kind not in (1, 2, 3, 4)
            or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc
        ):
            return
        pos += header.size + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        else:
            yield pieces + chunk


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
        #: What each active tracker's store held at start (a resumed run sends only the rest).
        self.held: dict[str, Stored] = {}

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
        for name in self.names:
            reporter = REPORTERS[name](self.output_dir, self.project, self.run_name, self.config)
            run_id = self.run_ids.get(name) if step else None
            try:
                run_id = reporter.start(run_id, step)
                held = reporter.stored(step) if step else Stored()
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
            self.held[name] = held
            if step:
                self._backfill(name, step)
        if self.active:
            log.info("reporting to %s", ", ".join(f"{n} (run {self.run_ids[n]})" for n in self.active))

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        for name in list(self.active):
            self._deliver(name, record["step"], scalars(record))

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        samples = self._samples().get(record["step"], []) if self.active else []
        for name in list(self.active):
            self._deliver(name, record["step"], scalars(record), samples)

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.on_log(trainer, record)

    def pre_save(self, trainer: Any) -> None:
        # Before the checkpoint exists: a resume from it finds its steps stored, not to re-send.
        for name in list(self.active):
            self._call(name, lambda r: r.flush())

    def on_train_end(self, trainer: Any) -> None:
        for name in list(self.active):
            self._call(name, lambda r: r.close())
        self.active.clear()

    # -- helpers ----------------------------------------------------------------------------
    def _deliver(
        self, name: str, step: int, values: dict[str, float], samples: list[dict[str, Any]] | None = None
    ) -> bool:
        """``values`` (and ``samples``) at ``step`` to one tracker, less what its store already
        holds; False once the tracker failed (and was dropped)."""
        held = self.held[name]
        fresh = {key: value for key, value in values.items() if step > held.last(key)}
        if fresh and not self._call(name, lambda r: r.log(fresh, step)):
            return False
        if samples and step > held.last(SAMPLES):
            return self._call(name, lambda r: r.text(samples, step))
        return True

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

    def _backfill(self, name: str, step: int) -> None:
        """What the tracker's store lacks of the run up to the checkpoint's ``step``, in order,
        from metrics.jsonl and samples.jsonl (the crashed session's last seconds, lost with its
        unflushed buffer; everything, for a tracker added at this resume)."""
        samples = self._samples()
        for record in self._records("metrics.jsonl"):
            at = record.get("step", 0)
            if at <= step and not self._deliver(
                name, at, scalars(record), samples.get(at) if "eval_loss" in record else None
            ):
                return

    def _samples(self) -> dict[int, list[dict[str, Any]]]:
        """The eval samples by step, as the Samples callback (which runs first) wrote them."""
        by_step: dict[int, list[dict[str, Any]]] = {}
        for row in self._records("samples.jsonl"):
            by_step.setdefault(row.get("step", 0), []).append(row)
        return by_step

    def _records(self, filename: str) -> list[dict[str, Any]]:
        """A JSON-lines file of the run, without a line a crash cut short (the last one: the
        file's own callback warns about it and drops it)."""
        path = self.output_dir / filename
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return [record for record in records if isinstance(record, dict)]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def reporters_of(callbacks: list[Callback]) -> Reporters:
    """The :class:`Reporters` among ``callbacks`` (``callbacks_for`` adds one on every rank)."""
    return next(c for c in callbacks if isinstance(c, Reporters))
