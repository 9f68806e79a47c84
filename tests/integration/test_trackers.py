"""``log.report_to`` with the real trackers and no network: TensorBoard, wandb (offline),
SwanLab (offline) and MLflow (sqlite), through ``dstrain run`` on 2 CPU ranks, killed with -9
after a save and resumed; and a missing package and an unreachable server, which cost one
warning each and never the run. Each store is read back with the tracker's own reader."""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from pathlib import Path

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


def tensorboard_losses(logdir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()  # purges what a resumed session's purge_step replaced, as TensorBoard shows it
    return [(e.step, e.value) for e in events.Scalars("loss")]


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


def wandb_sessions(root: Path) -> tuple[set[str], list[list[tuple[int, float]]]]:
    """The run ids, and the (step, loss) rows of each offline session under ``root/wandb`` in
    the order they ran (one directory per attempt)."""
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
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                if "loss" in items:
                    rows.append((items["_step"], items["loss"]))
        sessions.append(rows)
    return ids, sessions


def as_synced(sessions: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """What ``wandb sync`` of the sessions into one run keeps: a run's steps must increase, and
    wandb drops a row whose step is not above the run's last one."""
    kept: list[tuple[int, float]] = []
    for rows in sessions:
        for step, value in rows:
            if not kept or step > kept[-1][0]:
                kept.append((step, value))
    return kept


def swanlab_losses(root: Path) -> tuple[set[str], list[tuple[int, float]]]:
    """The run ids, and the (step, loss) rows of the sessions under ``root/swanlog`` as SwanLab
    merges them into one run (its duplicate-step guard keeps the first value of a step)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    ids, rows = set(), []
    for path in sorted(root.glob("swanlog/run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(path)
        for blob in reader:
            record = Record()
            record.ParseFromString(blob)
            kind = record.WhichOneof("record_type")
            if kind == "start":
                ids.add(record.start.id)
            elif kind == "scalar" and record.scalar.key == "loss":
                if record.scalar.step not in {step for step, _ in rows}:
                    rows.append((record.scalar.step, record.scalar.value.number))
        reader.close()
    return ids, rows


def mlflow_losses(root: Path) -> tuple[set[str], list[tuple[int, float]]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    ids = {r.info.run_id for r in found}
    rows = [(m.step, m.value) for r in found for m in client.get_metric_history(r.info.run_id, "loss")]
    return ids, rows


# ------------------------------------------------------------------------------ tests


def test_four_trackers_keep_one_run_across_kill9_and_resume(tmp_path, tiny_tokenizer_dir):
    """Killed at step 8 after the save of step 5 and resumed: each tracker holds one run, steps
    1..12 once each, with metrics.jsonl's losses; the run ids travel in the checkpoint."""
    name = "tracked"
    recipe = runs.make_recipe(
        tmp_path,
        tiny_tokenizer_dir,
        name,
        train={"max_steps": 12, "save_every": 5, "eval_every": 6},
        log={"doc_ids": False, "report_to": ["wandb", "swanlab", "mlflow"], "tensorboard": True},
    )
    out = tmp_path / name
    proc = cli(recipe, **OFFLINE)
    try:
        runs.wait_for_step(proc, out, 8, timeout=900)  # a first run may JIT-build DeepSpeed ops
    finally:
        runs.kill_all(proc)  # the kill -9 of the test, and no orphaned ranks if it never got there
    saved = json.loads((out / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    run_ids = saved["parts"]["trackers"]["run_ids"]
    assert set(run_ids) == {"tensorboard", "wandb", "swanlab", "mlflow"}

    proc = cli(recipe, "--resume", **OFFLINE)
    log, _ = communicate_or_kill(proc, 400)
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log and "report_to" not in log, log[-4000:]  # no tracker warned

    losses = {step: r["loss"] for step, r in sorted(runs.metrics(out).items())}
    assert list(losses) == list(range(1, 13))
    # wandb writes its offline file every 15 s, so the killed session kept what it had written;
    # the resumed one (offline: it cannot tell what that was) sends the whole history again.
    wandb_ids, sessions = wandb_sessions(out)
    assert len(sessions) == 2 and [s for s, _ in sessions[-1]] == list(range(1, 13)), sessions
    for tracker, (ids, rows) in {
        "wandb": (wandb_ids, as_synced(sessions)),
        "swanlab": swanlab_losses(out),
        "mlflow": mlflow_losses(out),
    }.items():
        assert ids == {run_ids[tracker]}, f"{tracker}: one run, the checkpoint's, got {ids}"
        assert [s for s, _ in sorted(rows)] == list(range(1, 13)), f"{tracker}: steps {sorted(rows)}"
        assert [v for _, v in sorted(rows)] == pytest.approx(list(losses.values()), rel=1e-6), tracker
    rows = tensorboard_losses(out / "tb")
    assert [s for s, _ in rows] == list(range(1, 13)), f"tensorboard: steps {rows}"
    assert [v for _, v in rows] == pytest.approx(list(losses.values()), rel=1e-6)  # float32 events


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
    assert [s for s, _ in tensorboard_losses(tmp_path / "partly" / "tb")] == [1, 2, 3]
