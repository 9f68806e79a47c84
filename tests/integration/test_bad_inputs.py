"""A sweep of bad inputs through the real `dstrain run` command: config values, data files,
tokenizer and model dirs, --resume paths and hostfiles. Each exits 2 with one line that names
the culprit (the key, file, line or option), no traceback, and no output_dir left behind for a
later `--resume auto` to trip over. One more case goes past the pre-flight into the ranks (a
bad row deep in a file), and a fixed rerun with `--resume auto` in the same output_dir trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.faults import runs
from tests.helpers import (
    alpaca_records,
    make_docs,
    save_chat_base,
    tiny_model,
    write_json_records,
    write_parquet,
)
from tests.launch import DSTRAIN, run_group


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_tokenizer_dir):
    """A valid tiny recipe and the broken inputs the cases point it at."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, "run", train={"max_steps": 2})
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad / "no_rows.parquet")
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "gbk.jsonl").write_bytes('{"text": "中文维基百科"}\n'.encode("gbk"))
    (bad / "notes.txt").write_text("text\n")
    (bad / "list.jsonl").write_text("[1, 2]\n")
    write_json_records(bad / "no_output.jsonl", [{"instruction": "hi", "answer": "x"}], lines=True)
    (bad / "not_a_tokenizer").mkdir()
    (bad / "not_a_tokenizer" / "README.md").write_text("nothing here\n")
    (bad / "no_config").mkdir()
    no_weights = bad / "no_weights"
    tiny_model().config.save_pretrained(no_weights)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(no_weights)
    (bad / "step_3").mkdir()  # a checkpoint dir whose save never finished
    (bad / "broken.yaml").write_text("stage: pretrain\ntrain: {max_steps: 2\n")
    (bad / "hosts_twice").write_text("node1 slots=2\nnode1 slots=2\n")
    (bad / "hosts_slots").write_text("node1 slots=two\n")
    cpt = runs.pretrained_recipe(root, no_weights, "cpt", "cpt", train={"max_steps": 2})
    return root, {"recipe": recipe, "cpt": cpt, "bad": bad}


# (id, arguments after `dstrain run`, what the one line must name). {recipe} and {bad} are filled in.
CASES = [
    # config values
    ("negative-lr", ["{recipe}", "--optim.lr", "-1"], "--optim.lr"),
    ("micro-batch-0", ["{recipe}", "--train.micro_batch_size", "0"], "--train.micro_batch_size"),
    ("unknown-stage", ["{recipe}", "--stage", "finetune"], "--stage"),
    ("wrong-type", ["{recipe}", "--train.max_steps", "ten"], "train.max_steps"),
    ("unknown-key", ["{recipe}", "--optim.lerning_rate", "1e-3"], "--optim.lr"),
    ("zero-stage-5", ["{recipe}", "--zero.stage", "5"], "--zero.stage"),
    ("offload-params-z2", ["{recipe}", "--zero.offload_params", "true"], "--zero.offload_params"),
    ("unknown-recipe", ["pretrian"], "pretrian"),
    ("broken-yaml", ["{bad}/broken.yaml"], "broken.yaml"),
    # data
    ("missing-file", ["{recipe}", "--data.train", "[{bad}/nope.parquet]"], "nope.parquet"),
    ("empty-glob", ["{recipe}", "--data.train", "[{bad}/*.arrowz]"], "matched no files"),
    ("corrupt-parquet", ["{recipe}", "--data.train", "[{bad}/corrupt.parquet]"], "corrupt.parquet"),
    ("missing-column", ["{recipe}", "--data.text_column", "body"], "--data.text_column"),
    ("empty-file", ["{recipe}", "--data.train", "[{bad}/empty.jsonl]"], "empty.jsonl"),
    ("no-rows", ["{recipe}", "--data.train", "[{bad}/no_rows.parquet]"], "no_rows.parquet"),
    ("non-utf8-json", ["{recipe}", "--data.train", "[{bad}/gbk.jsonl]"], "gbk.jsonl: not UTF-8"),
    ("unknown-suffix", ["{recipe}", "--data.train", "[{bad}/notes.txt]"], "notes.txt"),
    ("missing-validation", ["{recipe}", "--data.validation", "[{bad}/val.parquet]"], "--data.validation"),
    ("json-not-an-object", ["{recipe}", "--data.train", "[{bad}/list.jsonl]"], "list.jsonl record 0"),
    ("sft-text-format", ["{cpt}", "--stage", "sft"], "--data.format text"),
    (
        "sft-missing-field",
        ["{recipe}", "--data.train", "[{bad}/no_output.jsonl]", "--data.format", "alpaca"],
        "--data.output_column",
    ),
    # tokenizer and model
    ("tokenizer-missing", ["{recipe}", "--tokenizer", "{bad}/no_tokenizer"], "--tokenizer"),
    ("tokenizer-not-a-dir-of-one", ["{recipe}", "--tokenizer", "{bad}/not_a_tokenizer"], "not a tokenizer"),
    (
        "model-no-config",
        ["{cpt}", "--model.name_or_path", "{bad}/no_config"],
        "config.json",
    ),
    (
        "model-no-weights",
        ["{cpt}"],
        "no weights",
    ),
    ("arch-dir-no-config", ["{recipe}", "--model.config", "{bad}/no_config"], "--model.config"),
    # resume
    ("resume-missing", ["{recipe}", "--resume", "{bad}/step_9"], "step_9"),
    ("resume-incomplete", ["{recipe}", "--resume", "{bad}/step_3"], "COMPLETE"),
    ("resume-latest-none", ["{recipe}", "--resume", "latest"], "--resume latest"),
    # hostfiles and launch options
    ("hostfile-missing", ["{recipe}", "--hostfile", "{bad}/hosts"], "hosts"),
    ("hostfile-twice", ["{recipe}", "--hostfile", "{bad}/hosts_twice"], "listed twice"),
    ("hostfile-slots", ["{recipe}", "--hostfile", "{bad}/hosts_slots"], "slots"),
    ("gpus-0", ["{recipe}", "--gpus", "0"], "--gpus"),
    ("launcher-option-typo", ["{recipe}", "--gpu", "2"], "--gpus"),
]


def dstrain(*args, cwd) -> tuple[int, str, str]:
    proc = run_group([str(DSTRAIN), *map(str, args)], cwd=cwd, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_leaves_no_output_dir(work, args, culprit):
    root, paths = work
    argv = [a.format(**paths) for a in args]
    code, out, err = dstrain("run", *argv, cwd=root)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("dstrain: error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not (root / "run").exists() and not (root / "cpt").exists(), "a failed start leaves no output_dir"


def test_the_sweep_reaches_every_refusal_the_preflight_has(work, monkeypatch):
    """Every ``raise`` in launcher/preflight.py (found in its source) is reached by at least one
    case, run in-process through ``launcher.cli.main`` with the same arguments: a new pre-flight
    check without a case here fails this test. Nothing is launched (exec_command refuses)."""
    import ast
    import sys

    import launcher.cli
    import launcher.preflight

    source = Path(launcher.preflight.__file__)
    raises = {n.lineno for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Raise)}
    reached: set[int] = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != str(source):
            return None
        if event == "line" and frame.f_lineno in raises:
            reached.add(frame.f_lineno)
        return tracer

    def no_launch(*args, **kwargs):
        raise AssertionError("a bad-input case got as far as the launch")

    root, paths = work
    monkeypatch.chdir(root)
    monkeypatch.setattr(launcher.cli, "exec_command", no_launch)
    codes = {}
    sys.settrace(tracer)
    try:
        for name, args, _ in CASES:
            codes[name] = launcher.cli.main(["run", *(a.format(**paths) for a in args)])
    finally:
        sys.settrace(None)
    assert set(codes.values()) == {2}, codes
    missing = sorted(raises - reached)
    lines = source.read_text().splitlines()
    assert not missing, "no case reaches: " + "; ".join(f"line {n}: {lines[n - 1].strip()}" for n in missing)


def test_a_bad_row_found_by_the_ranks_is_one_line_and_a_fixed_rerun_resumes_auto(
    tmp_path, tiny_tokenizer_dir
):
    """Past the pre-flight: record 700 of an SFT jsonl is not JSON. The rank that reads it
    names the file and record, the others say a peer failed, nobody prints a traceback, and the
    run exits 2; with the line fixed, `--resume auto` in the same output_dir starts fresh."""
    base = save_chat_base(tmp_path / "base", tiny_tokenizer_dir)
    rows = [json.dumps(r) for r in alpaca_records(800, seed=3)]
    good = "\n".join(rows) + "\n"
    rows[700] = rows[700][:-5]  # a truncated line
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(rows) + "\n")
    recipe = runs.pretrained_recipe(
        tmp_path,
        base,
        "sft",
        "sft",
        data={"train": [str(data)], "format": "alpaca", "max_seq_len": 64, "validation_fraction": 0.0},
        lora={"enabled": True, "r": 4, "alpha": 8},
        train={"max_steps": 400, "save_every": 0},
    )
    code, out, err = dstrain("run", recipe, "--gpus", 2, cwd=tmp_path)
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("dstrain: error:")]
    assert any("sft.jsonl record 700" in line and "invalid JSON" in line for line in errors), err
    assert len(errors) <= 2 and "Traceback" not in out + err, err
    data.write_text(good)
    fixed = yaml.safe_load(recipe.read_text())
    fixed["train"]["max_steps"] = 2
    recipe.write_text(yaml.safe_dump(fixed))
    code, out, err = dstrain("run", recipe, "--gpus", 2, "--resume", "auto", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert len(runs.metrics(tmp_path / "sft")) == 2


def test_a_parquet_without_the_text_column_names_the_columns(work):
    """The one-line error lists the columns the file does have, so the fix is in the message."""
    root, paths = work
    recipe, bad = paths["recipe"], paths["bad"]
    path = write_parquet(bad / "other.parquet", make_docs(5, seed=1))
    table = pq.read_table(path).rename_columns(["body", "doc_id"])
    pq.write_table(table, path)
    code, _, err = dstrain("run", recipe, "--data.train", f"[{path}]", cwd=root)
    assert code == 2 and "other.parquet" in err and "body" in err, err
