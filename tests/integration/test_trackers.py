"""``log.report_to`` with the real trackers and no network: TensorBoard, wandb (offline),
SwanLab (offline) and MLflow (sqlite), through ``dstrain run`` on 2 CPU ranks, killed with -9
after a save and resumed; and a missing package and an unreachable server, which cost one
warning each and never the run. Each store is read back with the tracker's own reader."""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults import runs
from tests.launch import DSTRAIN, communicate_or_kill, free_port
from tests.launch import start as start_group

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow-skinny"}
MISSING = [pkg for module, pkg in PACKAGES.items() if importlib.util.find_spec(module) is None]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        bool(MISSING), reason=f"needs the [track] extra: pip install {' '.join(MISSING)} (or dstrain[track])"
    ),
]
OFFLINE = {"WANDB_MODE": "offline", "SWANLAB_MODE": "offline", "WANDB_SILENT": "true"}


def cli(recipe: Path, *args: str, **env: str):
    """``dstrain run RECIPE --gpus 2 ARGS`` in its own process group (the kill helpers reach it)."""
    return start_group([DSTRAIN, "run", str(recipe), "--gpus", "2", *args], cwd=recipe.parent, **env)


# ------------------------------------------------------------------------------ the stores' readers


def leveldb_log(path: Path):
    """The records of a LevelDB-log file, the format of wandb's ``.wandb`` transaction log (a
    7-byte file header, then 32 KiB blocks of records with a crc32, length and type); a torn tail
    (a killed writer) ends the file."""
    data = path.read_bytes()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:
            pos += space
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle, last pieces
            pending = chunk
        else:
            pending += chunk
            if kind == 4:
                yield pending


def wandb_sessions(root: Path) -> tuple[set[str], list[list[tuple[str, int, float]]]]:
    """The run ids, and the (key, step, value) of each history row's values (a Table's as a
    dict), of each offline session under ``root/wandb`` in the order they ran (one directory
    per attempt)."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, sessions = set(), []
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        rows = []
        for blob in leveldb_log(path):
            record = pb.Record()
            record.ParseFromString(blob)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items: dict[str, Any] = {}
                for i in record.history.item:  # a Table is several items under its key
                    path = [i.key] if i.key else list(i.nested_key)
                    value = json.loads(i.value_json)
                    if len(path) == 1:
                        items[path[0]] = value
                    else:
                        items.setdefault(path[0], {})["/".join(path[1:])] = value
                rows += [(k, items["_step"], v) for k, v in items.items() if not k.startswith("_")]
        sessions.append(rows)
    return ids, sessions


def swanlab_sessions(root: Path) -> tuple[set[str], list[list[tuple[str, int, Any]]]]:
    """The run ids, and the (key, step, value) of each scalar and media (value None), of each
    session under ``root/swanlog`` in the order they ran, read with SwanLab's own reader."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    ids, sessions = set(), []
    for path in sorted(root.glob("swanlog/run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(path)
        rows = []
        for blob in reader:  # stops at a record torn by the kill
            record = Record()
            record.ParseFromString(blob)
            kind = record.WhichOneof("record_type")
            if kind == "start":
                ids.add(record.start.id)
            elif kind == "scalar":
                rows.append((record.scalar.key, record.scalar.step, record.scalar.value.number))
            elif kind == "media":
                rows.append((record.media.key, record.media.step, None))
        reader.close()
        sessions.append(rows)
    return ids, sessions


def mlflow_rows(root: Path) -> tuple[set[str], list[tuple[str, int, Any]]]:
    """The run ids, and the (key, step, value) of each metric and of each sample artifact
    (``samples/step_N.txt``: value None)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    rows = [
        (key, m.step, m.value)
        for r in found
        for key in r.data.metrics
        for m in client.get_metric_history(r.info.run_id, key)
    ]
    for r in found:
        artifacts = client.list_artifacts(r.info.run_id, "samples")
        rows += [("samples", int(a.path.split("_")[-1].removesuffix(".txt")), None) for a in artifacts]
    return {r.info.run_id for r in found}, rows


def tensorboard_rows(path: Path) -> list[tuple[str, int, Any]]:
    """The (tag, step, value) of each scalar and of each text (``samples``, ``config``: value
    None) in an event file or a directory of them, as TensorBoard's accumulator reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = [(tag, e.step, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    texts = events.Tags()["tensors"]
    return rows + [
        (tag.removesuffix("/text_summary"), e.step, None) for tag in texts for e in events.Tensors(tag)
    ]


def steps_of(rows: list[tuple[str, int, Any]], key: str) -> list[int]:
    return sorted(step for k, step, _ in rows if k == key)


# ------------------------------------------------------------------------------ tests


def test_four_trackers_keep_one_run_across_kill9_and_resume(tmp_path, tiny_tokenizer_dir):
    """Killed at step 8 after the save of step 5 and resumed: each tracker's local store holds
    one run (the checkpoint's id) whose steps are 1..12 once each (every key; evals and their
    samples at 6 and 12), with metrics.jsonl's losses, in the raw files of all its sessions
    (no sync-time deduplication, no TensorBoard purge); the crashed session kept some steps
    (wandb flushes every 0.1 s here, SwanLab at each 8 KiB, torn by the kill, TensorBoard at
    the save of step 5)."""
    name = "tracked"
    recipe = runs.make_recipe(
        tmp_path,
        tiny_tokenizer_dir,
        name,
        train={"max_steps": 12, "save_every": 5, "eval_every": 6},
        log={
            "doc_ids": False,
            "report_to": ["wandb", "swanlab", "mlflow"],
            "tensorboard": True,
            "sample_prompts": ["doc 1:"],
            "sample_tokens": 4,
        },
    )
    out = tmp_path / name
    env = {**OFFLINE, "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.1"}
    proc = cli(recipe, **env)
    try:
        runs.wait_for_step(proc, out, 8, timeout=900)  # a first run may JIT-build DeepSpeed ops
    finally:
        runs.kill_all(proc)  # the kill -9 of the test, and no orphaned ranks if it never got there
    saved = json.loads((out / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    run_ids = saved["parts"]["trackers"]["run_ids"]
    assert set(run_ids) == {"tensorboard", "wandb", "swanlab", "mlflow"}
    killed = {
        "wandb": wandb_sessions(out)[1],
        "swanlab": swanlab_sessions(out)[1],
        "tensorboard": [tensorboard_rows(path) for path in (out / "tb").iterdir()],
    }
    for tracker, sessions in killed.items():  # something to double, or the test proves nothing
        assert len(sessions) == 1 and steps_of(sessions[0], "loss"), f"{tracker}: {sessions}"

    proc = cli(recipe, "--resume", **env)
    log, _ = communicate_or_kill(proc, 400)
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log and "report_to" not in log, log[-4000:]  # no tracker warned

    losses = {step: r["loss"] for step, r in sorted(runs.metrics(out).items())}
    assert list(losses) == list(range(1, 13))
    evals = sorted(json.loads(line)["step"] for line in (out / "metrics.jsonl").open() if "eval_loss" in line)
    wandb_ids, wandb_rows = wandb_sessions(out)
    swanlab_ids, swanlab_rows = swanlab_sessions(out)
    stores = {
        "wandb": (wandb_ids, [row for rows in wandb_rows for row in rows]),
        "swanlab": (swanlab_ids, [row for rows in swanlab_rows for row in rows]),
        "mlflow": mlflow_rows(out),
        "tensorboard": ({run_ids["tensorboard"]}, tensorboard_rows(out / "tb")),
    }
    for tracker, (ids, rows) in stores.items():
        assert ids == {run_ids[tracker]}, f"{tracker}: one run, the checkpoint's, got {ids}"
        assert steps_of(rows, "loss") == list(range(1, 13)), f"{tracker}: loss steps {steps_of(rows, 'loss')}"
        assert steps_of(rows, "eval_loss") == evals == [6, 12], tracker
        assert steps_of(rows, "samples") == [6, 12], f"{tracker}: eval samples {steps_of(rows, 'samples')}"
        twice = [(k, s) for k, s in Counter((k, s) for k, s, _ in rows).items() if s > 1]
        assert not twice, f"{tracker}: values stored twice: {twice}"
        got = [v for _, v in sorted((s, v) for k, s, v in rows if k == "loss")]
        # the resume tests' tolerance (runs.assert_same_run): a resumed run recomputes the
        # losses the crashed one stored; TensorBoard keeps float32
        assert got == pytest.approx(list(losses.values()), rel=0, abs=1e-6), tracker
    torn_files_end_cleanly(out, tmp_path / "cut")


def torn_files_end_cleanly(out: Path, cut: Path) -> None:
    """The reader a resume uses on the killed session's files (the first of each tracker):
    whole, it finds what this test's readers find; cut at any byte, as a kill -9 mid-write
    leaves a file, it returns a prefix of that and never raises."""
    from trainer.reporters import SwanlabReporter, TensorBoardReporter, WandbReporter

    for reporter, pattern, read in (
        (WandbReporter, "wandb/offline-run-*/run-*.wandb", lambda path: wandb_sessions(out)[1][0]),
        (SwanlabReporter, "swanlog/run-*/run-*.swanlab", lambda path: swanlab_sessions(out)[1][0]),
        (TensorBoardReporter, "tb/events.out.tfevents.*", tensorboard_rows),
    ):
        path = sorted(out.glob(pattern))[0]
        whole = list(reporter.held_steps(path))
        assert sorted(set(whole)) == sorted({(key, step) for key, step, _ in read(path)}), reporter.name
        data = path.read_bytes()
        for size in sorted({*range(0, len(data), 41), len(data) - 1}):
            cut.write_bytes(data[:size])
            got = list(reporter.held_steps(cut))
            assert got == whole[: len(got)], (reporter.name, size)
        cut.unlink()


def test_a_missing_package_and_an_unreachable_server_cost_a_warning_each(tmp_path, tiny_tokenizer_dir):
    """wandb cannot be imported (a stand-in package that raises ImportError, first on the
    path) and MLflow points at a closed localhost port: one warning line each, and the run
    finishes with TensorBoard holding every step."""
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    recipe = runs.make_recipe(
        tmp_path,
        tiny_tokenizer_dir,
        "partly",
        train={"max_steps": 3, "save_every": 0},
        log={"doc_ids": False, "report_to": ["wandb", "mlflow", "tensorboard"]},
    )
    env = {
        "PYTHONPATH": f"{tmp_path / 'shim'}:{runs.REPO}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
    }
    proc = start_group([DSTRAIN, "run", str(recipe), "--gpus", "1"], cwd=tmp_path, **env)
    log, _ = communicate_or_kill(proc, 300)
    assert proc.returncode == 0, log[-4000:]
    warnings = [line for line in log.splitlines() if "report_to" in line]
    assert len(warnings) == 2, warnings
    assert "report_to wandb: wandb is not installed" in warnings[0] and "pip install wandb" in warnings[0]
    assert "report_to mlflow: could not start" in warnings[1] and "MLFLOW_TRACKING_URI" in warnings[1]
    assert steps_of(tensorboard_rows(tmp_path / "partly" / "tb"), "loss") == [1, 2, 3]
