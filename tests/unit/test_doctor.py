"""``dstrain doctor`` on this CPU machine through the real CLI, blocking problems made to happen
here, exit codes, and the fields of the start-up summary line against what the libraries report."""

from __future__ import annotations

import importlib
import io
import json
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.launch import run_group, venv_bin
from trainer import doctor
from trainer.config import build_config
from trainer.dist import DistInfo

GIB = 1024**3


def dstrain_doctor(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``dstrain doctor ...`` as a user runs it (CPU ranks' environment: no CUDA device visible)."""
    return run_group([venv_bin("dstrain"), "doctor", *args], timeout=300, cwd=cwd, **env)


def df_free_bytes(path: Path) -> int:
    """Free bytes under ``path`` as df reports them (an independent reading of the filesystem)."""
    out = subprocess.run(
        ["df", "-B1", "--output=avail", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def checks_by_name(report: dict) -> dict[str, dict]:
    return {c["check"]: c for c in report["checks"]}


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_doctor_json_on_this_machine_matches_the_libraries(tmp_path: Path) -> None:
    import deepspeed
    import torch
    import transformers

    proc = dstrain_doctor("--json", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # DeepSpeed logs to stdout: the doctor keeps it off the report
    assert report["ok"] is True and report["blocking"] == []
    checks = checks_by_name(report)
    for name, check in checks.items():
        assert check["status"] in ("ok", "warn"), (name, check)
        assert check["status"] == "ok" or check["fix"], f"{name}: a warning must say what to do"

    assert checks["python"]["facts"]["version"] == platform.python_version()
    versions = checks["packages"]["facts"]
    assert versions["torch"] == torch.__version__
    assert versions["deepspeed"] == deepspeed.__version__
    assert versions["transformers"] == transformers.__version__
    assert checks["gpu"]["status"] == "warn" and checks["gpu"]["facts"]["devices"] == []
    assert checks["backend"]["facts"] == {"backend": "gloo", "available": True, "version": None}
    assert checks["deepspeed"]["facts"]["accelerator"] == "cpu"
    # README: auto is bf16 on GPUs that support it, else fp32; flash-attention-2 only on CUDA.
    assert checks["precision"]["facts"] == {"requested": "auto", "resolved": "fp32"}
    assert checks["attention"]["facts"] == {"requested": "auto", "resolved": "sdpa"}
    assert checks["zero"]["facts"] == {"stage": 2, "offload": [], "optimizer": "torch AdamW"}
    # The default job offloads nothing: only DeepSpeed's CPU all-reduce is loaded, and CPU Adam
    # is reported without blocking.
    assert checks["op deepspeed_shm_comm"]["facts"]["needed_by"]
    assert checks["op cpu_adam"]["facts"]["needed_by"] is None

    disk = checks["disk"]["facts"]
    assert disk["checked"] == str(tmp_path)  # run/ does not exist yet: its parent is checked
    assert abs(disk["free_bytes"] - df_free_bytes(tmp_path)) < GIB  # other writers move it a little
    assert not (tmp_path / "run").exists()  # the doctor creates nothing
    assert report["summary"].startswith("doctor: python ")


def test_doctor_plain_lines_for_a_recipe_with_overrides(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""\
        output_dir: {tmp_path / "run"}
        tokenizer: unused
        zero: {{stage: 3}}
        """,
    )
    proc = dstrain_doctor(
        str(recipe), "--zero.offload_optimizer", "true", "--optim.lr", "-1e-3", cwd=tmp_path
    )
    # An override reached the config: a negative learning rate is refused before any check.
    assert proc.returncode == 2 and proc.stderr.strip().endswith("--optim.lr must be > 0, got -0.001")

    proc = dstrain_doctor(str(recipe), "--zero.offload_optimizer", "true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("doctor: python ")  # the summary line first
    assert lines[-1].startswith("nothing blocks a run")
    rows = {
        m.group(2): (m.group(1), m.group(3))
        for m in map(re.compile(r"^(ok|warn|fail) +(\S.*?)  +(.*)$").match, lines)
        if m
    }
    assert rows["zero"] == ("ok", "ZeRO-3, offload optimizer, DeepSpeed CPU Adam")
    assert rows["op cpu_adam"][1].endswith("needed by zero.offload_optimizer (CPU Adam)")
    assert rows["disk"][0] == "ok" and str(tmp_path) in rows["disk"][1]
    # Every warning is followed by what to do.
    for i, line in enumerate(lines):
        if line.startswith("warn"):
            assert "fix: " in lines[i + 1], line


def test_blocking_problems_exit_1_and_are_named(tmp_path: Path) -> None:
    """A compute node without a C++ compiler and an empty JIT cache (so DeepSpeed's CPU ops cannot
    be built), flash-attention-2 on a CPU, and an output_dir on /proc (read-only, 0 bytes free)."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        """\
        output_dir: /proc/dstrain-doctor-test/run
        tokenizer: unused
        model: {attn_implementation: flash_attention_2}
        zero: {stage: 2, offload_optimizer: true}
        """,
    )
    cache = tmp_path / "extensions"
    cache.mkdir()
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(cache)}
    proc = dstrain_doctor(str(recipe), "--json", cwd=tmp_path, **env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report["blocking"]) == {"op deepspeed_shm_comm", "op cpu_adam", "attention", "disk"}
    assert (
        proc.stderr.strip().splitlines()[-1] == f"dstrain doctor: blocking: {', '.join(report['blocking'])}"
    )
    checks = checks_by_name(report)
    cpu_adam = checks["op cpu_adam"]
    assert (
        "no-such-compiler is not on PATH" in cpu_adam["detail"] and "DS_BUILD_CPU_ADAM=1" in cpu_adam["fix"]
    )
    assert checks["op fused_adam"]["status"] == "warn"  # just as unbuildable, but this job does not load it
    assert "flash-attn" in checks["attention"]["fix"]
    assert checks["disk"]["facts"]["checked"] == "/proc"
    assert list(cache.iterdir()) == []  # nothing was built or even started


def test_fp16_on_cpu_and_a_forced_accelerator_exit_1(tmp_path: Path) -> None:
    proc = dstrain_doctor("--json", "--model.dtype", "fp16", cwd=tmp_path, DS_ACCELERATOR="cuda")
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["blocking"] == ["deepspeed", "precision"]
    checks = checks_by_name(report)
    assert "DS_ACCELERATOR" in checks["deepspeed"]["fix"]
    assert "fp16 needs a GPU" in checks["precision"]["fix"]
    assert checks["attention"]["status"] == "warn"  # unchecked until the precision resolves
    assert not any(name.startswith("op ") for name in checks)  # op builders of the wrong accelerator
    assert "precision fp16 (unusable here)" in report["summary"]


def test_config_errors_are_one_line_exit_2_before_torch_loads(tmp_path: Path) -> None:
    code = (
        "import sys; from launcher.cli import main; "
        "rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"
    )
    for args, message in (
        (["doctor", "no-such-recipe"], "recipe no-such-recipe is neither a file nor a built-in recipe"),
        (["doctor", "--model.dtyp", "fp16"], "did you mean --model.dtype?"),
        (["doctor", "--model.dtype"], "--model.dtype needs a value"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=tmp_path,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.split() == ["2", "False"], (args, proc.stdout, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dstrain: error: ") and message in err[0], (args, err)


def summary_fields(line: str) -> dict[str, str]:
    """``doctor: python 3.11.7, torch 2.13.0, cuda none (cpu, gloo), ...`` -> {"python": "3.11.7", ...}."""
    assert line.startswith("doctor: ")
    parts = re.split(r", (?![^(]*\))", line.removeprefix("doctor: "))  # commas outside parentheses
    fields = {}
    for part in parts:
        key, value = re.match(r"(free disk|[\w-]+) (.*)", part).groups()
        fields[key] = value
    return fields


def test_summary_line_fields_are_what_the_libraries_report(tmp_path: Path) -> None:
    import deepspeed
    import torch
    import transformers

    job = build_config(base={"tokenizer": "unused", "output_dir": str(tmp_path / "run")})
    fields = summary_fields(doctor.summary_line(job, DistInfo()))  # rank 0 on the CPU
    assert list(fields) == [
        "python", "torch", "deepspeed", "transformers", "cuda", "attention", "precision", "flash-attn", "free disk",
    ]  # fmt: skip
    assert fields["python"] == platform.python_version()
    assert fields["torch"] == torch.__version__
    assert fields["deepspeed"] == deepspeed.__version__
    assert fields["transformers"] == transformers.__version__
    if torch.version.cuda is None:
        assert fields["cuda"] == "none (cpu, gloo)"
    else:
        assert fields["cuda"] == f"{torch.version.cuda} built, no GPU visible (cpu, gloo)"
    assert fields["attention"] == "sdpa" and fields["precision"] == "fp32"
    try:
        flash_attn = importlib.import_module("flash_attn")
    except ImportError:
        assert fields["flash-attn"] == "absent"
    else:
        assert fields["flash-attn"] == flash_attn.__version__
    free_gib, under = re.fullmatch(r"([\d.]+) GiB under (.*)", fields["free disk"]).groups()
    assert under == str(tmp_path / "run")
    assert abs(float(free_gib) - df_free_bytes(tmp_path) / GIB) < 1.0


def test_summary_line_starts_no_process_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer calls it on rank 0 before init: no subprocess (compiler, ninja, nvidia-smi
    probes), and a dtype the machine cannot run is shown, not raised (the trainer raises it)."""

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"summary_line started a process: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_subprocess)
    job = build_config(
        base={"tokenizer": "unused", "output_dir": str(tmp_path), "model": {"dtype": "fp16"}},
    )
    fields = summary_fields(doctor.summary_line(job, DistInfo()))
    assert fields["precision"] == "fp16 (unusable here)" and fields["attention"] == "auto (unchecked)"
    job = build_config(
        base={
            "tokenizer": "unused",
            "output_dir": str(tmp_path),
            "model": {"attn_implementation": "flash_attention_2"},
        }
    )
    fields = summary_fields(doctor.summary_line(job, DistInfo()))
    assert fields["precision"] == "fp32" and fields["attention"] == "flash_attention_2 (unusable here)"


def test_disk_check_fails_where_output_dir_cannot_be_made(tmp_path: Path) -> None:
    ok = doctor.check_disk(str(tmp_path / "a" / "b"))
    assert ok.facts["checked"] == str(tmp_path) and ok.status in ("ok", "warn")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    under_file = doctor.check_disk(str(blocker / "run"))
    assert under_file.status == "fail" and str(blocker) in under_file.detail and under_file.fix


def test_a_terminal_gets_a_table_and_markup_in_findings_stays_text() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    findings = [
        doctor.Finding("flash-attn", "warn", "absent", "pip install 'dstrain[flash]'"),
        doctor.Finding("disk", "fail", "cannot write under /proc", "choose a writable --output_dir"),
    ]
    out = Terminal()
    doctor.print_report(findings, "doctor: python 3", out, as_json=False)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    assert "┃ check" in text and "dstrain[flash]" in text  # rich would eat "[flash]" as a style tag
    assert text.rstrip().endswith("blocking: disk (1 warning)")
