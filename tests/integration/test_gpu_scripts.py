"""The GPU check's scripts, as far as a CPU machine can run them: shell syntax and lint, the
listed steps, and the Python steps through their --cpu-fallback (tiny model, fp32). The wheel
downloads themselves never run here (only their --dry-run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.launch import run_group

SCRIPTS = [REPO / "scripts" / "gpu_check.sh", REPO / "scripts" / "gpu_wheels.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax_and_lint(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def dry_run(*args: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(SCRIPTS[0]), "--dry-run", *args], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()


def test_gpu_check_dry_run_lists_every_step_in_order(tmp_path):
    lines = dry_run("--out", str(tmp_path / "o u t"))
    steps = [line.split("]")[0][1:] for line in lines if line.startswith("[")]
    assert steps == ["env", "install", "parity", "syncs", "nccl", "bench", "resume", "attn", "summary"]
    install = next(line for line in lines if line.startswith("[install]"))
    assert "--no-index --find-links" in install and "--system-site-packages" in install
    (data,) = [line for line in dry_run("--only", "data") if line.startswith("[")]
    assert data.startswith("[data]") and "--workers 0\\,1\\,2\\,4" in data
    assert all("o\\ u\\ t" in line for line in lines if line.startswith(("[parity]", "[bench]")))
    assert not (tmp_path / "o u t").exists(), "a dry run writes nothing"
    cpu = dry_run("--cpu-fallback")
    assert not any(line.startswith("[install]") for line in cpu)
    assert all(
        "--cpu-fallback" in line
        for line in cpu
        if line.startswith(("[parity]", "[syncs]", "[resume]", "[bench]", "[attn]"))
    )


def test_gpu_wheels_dry_run_builds_deepspeed_and_skips_torch(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPTS[1]), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    ).stdout
    assert "DS_BUILD_OPS=0" in out and "pip wheel --no-deps --no-build-isolation --no-binary deepspeed" in out
    assert "--python-version 3.12" in out and "--only-binary=:all:" in out
    fetched = next(line for line in out.splitlines() if "--no-deps -d" in line)
    wanted = ("torchdata", "liger-kernel", "hjson", "pydantic", "pydantic-core", "annotated-types")
    assert all(name in fetched for name in wanted), fetched
    # Only what the GPU node lacks travels: never torch, transformers or what the node has.
    for name in ("torch", "transformers", "peft", "accelerate", "pyarrow", "datasets", "numpy"):
        assert f" {name} " not in f" {fetched} " and f" {name}==" not in fetched, name


def test_gpu_check_cpu_fallback_runs_env_parity_syncs_and_summary(tmp_path):
    out = tmp_path / "check"
    proc = run_group(
        ["bash", str(SCRIPTS[0]), "--cpu-fallback", "--only", "env,parity,syncs,summary", "--out", str(out)],
        timeout=600,
        PYTHON=sys.executable,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, _ in steps] == [
        ("env", "ok"),
        ("parity", "ok"),
        ("syncs", "ok"),
        ("summary", "ok"),
    ]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["pass"] and {"eager", "sdpa"} <= set(parity["cases"]) and parity["rows"] == 4
    for case in ("eager", "sdpa"):
        c = parity["cases"][case]
        assert c["kernel"] == case
        # The leak control shows the per-document check can see attention across documents.
        assert c["packed_vs_separate"] <= 1e-4 < c["leak_vs_separate"], c
    syncs = json.loads((out / "syncs.json").read_text())
    # the pretrain recipe's zero.stage auto, resolved by the planner as the trainer does: ZeRO-0 on one rank
    assert syncs["zero_stage"] == 0 and "no CUDA" in syncs["skipped"], syncs
    summary = (out / "summary.md").read_text()
    assert "# GPU check, 20" in summary and "Device: **CPU" in summary and "Loss parity (fp32" in summary
    assert "Host syncs in one `train_step`" in summary


def test_bench_gpu_cpu_fallback_runs_bare_hf_and_dstrain_on_the_same_batches(tmp_path):
    proc = run_group(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_gpu.py"),
            "bench",
            "--cpu-fallback",
            "--systems",
            "bare,hf,dstrain-best",
            "--best",
            "zero.stage=1 model.loss=chunked",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    bare, hf, best = bench["results"]
    assert (bare["system"], hf["system"], best["system"]) == ("bare", "hf", "dstrain-best")
    # --best applies (the chunked loss), and the planner runs ZeRO-1 on one rank as ZeRO-0
    assert best["zero_stage"] == 0 and best["loss_path"] == "chunked" and best["precision"] == "fp32"
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in (bare, hf, best)), "no MFU on CPU"
    # The same seeded rows: dstrain's first loss is the bare loop's (same architecture, random init
    # of the same scale; ln(vocab) at the start), so the systems really train on like batches.
    assert len(bare["losses"]) == len(best["losses"]) == 3
    assert all(0 < loss < 20 for loss in bare["losses"] + best["losses"])
    assert set(bench["ratios"]) == {best["case"], "hf"} and set(bench["ratios"][best["case"]]) == {
        "bare",
        "hf",
    }
