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


# ---------------------------------------------------------------- checkpoint pickles


class RunsAShellCommand:
    """What a crafted checkpoint holds: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_zip(path: Path, pickle_bytes: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """A file laid out as torch.save writes it (archive/data.pkl ...), holding ``pickle_bytes``."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_a_real_state_dict_passes_and_a_crafted_global_is_named_without_running_it(tmp_path):
    import collections

    import torch

    from trainer.safe_load import unsafe_global

    good = tmp_path / "good.pt"
    torch.save(
        {
            "module": collections.OrderedDict(w=torch.ones(2, 3), b=torch.zeros(3, dtype=torch.bfloat16)),
            "param_shapes": [collections.OrderedDict(w=torch.Size([2, 3]))],
            "ids": torch.zeros(4, dtype=torch.uint32),
            "bytes": b"\x00\x01",
            "device": torch.device("cpu"),
        },
        good,
    )
    assert unsafe_global(good) is None
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(1)}, "x": RunsAShellCommand(marker)}, evil)
    assert unsafe_global(evil).startswith("its evil/data.pkl imports posix.system, which no DeepSpeed")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: this is what DeepSpeed's load would do
    assert marker.exists()


def test_tricks_that_hide_a_global_are_refused(tmp_path):
    import pickle
    import pickletools

    from trainer.safe_load import pickle_globals, unsafe_global

    def op(name: str) -> bytes:
        return next(o for o in pickletools.opcodes if o.name == name).code.encode("latin-1")

    def text(s: str) -> bytes:
        return op("SHORT_BINUNICODE") + bytes([len(s)]) + s.encode()

    # STACK_GLOBAL whose module name comes back from the memo: the names are followed exactly.
    memo_trick = (
        b"\x80\x04" + text("collections") + op("MEMOIZE") + text("OrderedDict") + op("STACK_GLOBAL")
        + op("POP") + op("BINGET") + b"\x00" + text("system") + op("STACK_GLOBAL") + op("STOP")
    )  # fmt: skip
    assert pickle_globals(memo_trick) == [("collections", "OrderedDict"), ("collections", "system")]
    assert pickle_globals(pickle.dumps(os.system, protocol=4)) == [("posix", "system")]
    # STACK_GLOBAL on names that are not plain strings, a global by copyreg number, INST, garbage.
    not_strings = b"\x80\x04" + text("x") + op("EMPTY_LIST") + op("STACK_GLOBAL") + op("STOP")
    ext = b"\x80\x02" + op("EXT1") + b"\x01" + op("STOP")
    inst = b"(" + op("INST") + b"os\nsystem\n" + op("STOP")
    cases = {
        "not_strings": (not_strings, "cannot be checked"),
        "ext": (ext, "cannot be checked"),
        "inst": (inst, "imports os.system"),
        "garbage": (b"\x80\x02\xff\xff", "cannot be checked"),
    }
    for name, (data, want) in cases.items():
        assert want in str(unsafe_global(torch_zip(tmp_path / f"{name}.pt", data))), name
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "not a zip-format torch file" in str(unsafe_global(legacy))
    hidden = torch_zip(tmp_path / "hidden.pt", pickle.dumps({}, protocol=2), {"archive/DATA.pkl": b"x"})
    assert "two entries of the same name" in str(unsafe_global(hidden))
