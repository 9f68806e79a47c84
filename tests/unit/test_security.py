"""Security defaults: remote code only when asked, secrets never written or printed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_OVERRIDES
from trainer.config import build_config
from trainer.errors import ConfigError

SECRET = "hf_not_a_real_token_0123456789"


def custom_code_model_dir(root: Path) -> Path:
    """A model dir whose config needs its own Python file (auto_map), like many hub models."""
    path = root / "custom"
    path.mkdir()
    (path / "configuration_tiny.py").write_text(
        "from transformers import Qwen2Config\n\nclass TinyConfig(Qwen2Config):\n    model_type = 'tiny-custom'\n"
    )
    config = {
        "model_type": "tiny-custom",
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"},
        **TINY_OVERRIDES,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_remote_code_is_refused_unless_the_recipe_trusts_it(tmp_path, caplog):
    from trainer.model import load_architecture, warn_remote_code

    path = custom_code_model_dir(tmp_path)
    job = build_config(base={"tokenizer": "t", "model": {"config": str(path)}})
    assert job.model.trust_remote_code is False
    with pytest.raises(ConfigError, match=r"--model\.config .*trust_remote_code") as info:
        load_architecture(job.model)
    assert "\n" not in str(info.value)
    trusted = build_config(base={"tokenizer": "t", "model": {"config": str(path), "trust_remote_code": True}})
    with caplog.at_level("WARNING", logger="dstrain"):
        warn_remote_code(trusted.model)
        assert type(load_architecture(trusted.model)).__name__ == "TinyConfig"
    assert any("runs the Python files" in r.message for r in caplog.records)


def test_a_forwarded_secret_travels_by_reference_in_sbatch_and_privately_to_pdsh(
    tmp_path, tiny_tokenizer_dir
):
    """`--env HF_TOKEN`: the sbatch script re-exports it from the submitting shell without its
    value; the pdsh env file holds it readable by its owner only; nothing prints the value."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"tokenizer: {tiny_tokenizer_dir}\noutput_dir: {tmp_path / 'out'}\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    env = {**os.environ, "HF_TOKEN": SECRET, "PYTHONPATH": str(REPO)}
    dstrain = str(Path(sys.executable).parent / "dstrain")
    slurm = subprocess.run(
        [dstrain, "slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "1", "--env", "HF_TOKEN"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert slurm.returncode == 0, slurm.stderr
    assert "export HF_TOKEN  #" in slurm.stdout and SECRET not in slurm.stdout + slurm.stderr
    run = subprocess.run(
        [dstrain, "run", str(recipe), "--hostfile", str(hostfile), "--env", "HF_TOKEN", "--dry-run"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert SECRET not in run.stdout + run.stderr
    env_file = tmp_path / "out" / ".deepspeed_env"
    assert f"HF_TOKEN={SECRET}" in env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert SECRET not in (tmp_path / "out" / "run.yaml").read_text()
