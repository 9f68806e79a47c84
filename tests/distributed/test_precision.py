"""bf16 as dstrain configures it sums the micro-batches' gradients in fp32 at every ZeRO stage.

The configs are what `dstrain ds-config --precision bf16 --zero N` prints; the engine is real
DeepSpeed on one CPU rank; the reference is plain torch autocast with the micro-batches' gradients
summed in fp64 (see tests/distributed/workers/precision_checks.py). DeepSpeed's own bf16 mode
(16-bit parameters, dstrain's configuration before) runs beside it and must miss the bound.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import REPO
from tests.launch import DSTRAIN, cpu_env, read_results, run_ranks

pytestmark = pytest.mark.distributed

# fp32 summation of the same four gradients, read back through fp32 weights: ~1e-6 relative.
FP32_SUM_BOUND = 1e-5
# micro 4 x accum 1 vs micro 1 x accum 4 run different bf16 matmul shapes: their gradients differ
# by bf16 rounding (~1e-2 relative), in any framework; accumulation must not add to it.
BF16_SPLIT_BOUND = 2e-2


@pytest.fixture(scope="module")
def precision_results(tmp_path_factory):
    configs = tmp_path_factory.mktemp("ds_configs")
    for stage in range(4):
        cmd = [DSTRAIN, "ds-config", "--precision", "bf16", "--zero", str(stage), "--device", "cpu",
               "--micro-batch-size", "1", "--grad-accum", "4", "--optim.max_grad_norm", "0"]  # fmt: skip
        text = subprocess.run(cmd, env=cpu_env(), check=True, capture_output=True, text=True).stdout
        (configs / f"zero{stage}.json").write_text(text)
    out = tmp_path_factory.mktemp("precision")
    run_ranks(1, REPO / "tests/distributed/workers/precision_checks.py", [str(out), str(configs)])
    return configs, read_results(out, 1)[0]


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_bf16_accumulates_micro_batches_in_fp32(precision_results, stage):
    configs, results = precision_results
    emitted = json.loads((configs / f"zero{stage}.json").read_text())
    assert emitted["bf16"]["enabled"] is False and emitted["torch_autocast"]["dtype"] == "bfloat16"
    ours, legacy = results["dstrain"][stage], results["deepspeed_bf16"][stage]
    assert ours["accum_err"] <= FP32_SUM_BOUND, f"ZeRO-{stage}: {ours}"
    # DeepSpeed's bf16 mode sums in bf16 (measured 1.5e-2 to 5.7e-2): far outside the bound.
    assert legacy["accum_err"] > 100 * FP32_SUM_BOUND, f"ZeRO-{stage}: {legacy}"
    assert ours["split_err"] <= BF16_SPLIT_BOUND, f"ZeRO-{stage}: {ours}"


def test_zero0_bf16_steps_fp32_parameters_with_a_fused_adamw(precision_results):
    """Not DeepSpeed's per-parameter unfused bf16 wrapper: dstrain's own AdamW, fused kernel."""
    found = precision_results[1]["zero0_optimizer"]
    assert found["class"] == "FiniteAdamW", found
    assert all(found["fused"]) and found["param_dtypes"] == ["torch.float32"], found
