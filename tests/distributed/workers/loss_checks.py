"""One deepspeed launch: ZeRO-3 training with the plain and the chunked loss, tied embeddings.

The chunked run trains through ``TrainModule`` with ``trainer.loss.summed_loss`` in place of the
train module's own loss function (the swap the trainer makes when it adopts the chunked loss).
Each rank writes rank<N>.json: both runs' losses, an eval loss (no_grad) after training, the
weights' largest difference, and facts showing the chunked path ran on partitioned parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.distributed.workers.common import VOCAB, global_rows, micro_batches, tiny_job
from tests.helpers import tiny_model
from tests.launch import worker_args
from trainer.dist import DistInfo, all_reduce_sum, init_distributed
from trainer.ds_config import build_ds_config
from trainer.engine import build_engine
from trainer.export import consolidated_state_dict
from trainer.loss import causal_lm_of, enable_chunked_loss, uses_chunked_loss
from trainer.train_module import TrainModule, target_count

STEPS = 5
# Three tokens per chunk at VOCAB 128: every micro-batch spans several chunks.
CHUNK_BYTES = 3 * 4 * VOCAB


def train(dist: DistInfo, chunked: bool) -> tuple[list[float], dict, dict]:
    job = tiny_job(stage=3, micro=2, accum=2, steps=STEPS)
    model = tiny_model(seed=0)
    facts = {}
    if chunked:
        facts["enabled"] = enable_chunked_loss(model, chunk_bytes=CHUNK_BYTES)
    engine = build_engine(job, model, build_ds_config(job, "fp32", on_gpu=False), STEPS)
    if not chunked:  # after initialize, ZeRO-3 would not gather a new head: refused
        try:
            enable_chunked_loss(engine)
            facts["late_enable_refused"] = False
        except RuntimeError:
            facts["late_enable_refused"] = True
    causal = causal_lm_of(engine)
    head = causal.get_output_embeddings().weight
    facts.update(
        uses_chunked=uses_chunked_loss(engine),
        tied=head is causal.get_input_embeddings().weight,
        head_partitioned=hasattr(head, "ds_id") and head.numel() == 0,
    )
    module = TrainModule(engine, dist)
    losses = []
    for step in range(STEPS):
        rows = global_rows(step, dist.world_size, rows_per_rank=4)[dist.rank]
        batches = micro_batches(rows, 2)
        (targets,) = all_reduce_sum([sum(target_count(b) for b in batches)], dist)
        result = module.train_step(batches, int(targets), step)
        (loss_sum,) = all_reduce_sum([float(result.loss_sum)], dist)
        losses.append(loss_sum / targets)
    probe = micro_batches(global_rows(99, dist.world_size, rows_per_rank=2)[dist.rank], 2)[0]
    facts["eval_sum"], facts["eval_targets"] = module.eval_sums(probe)
    return losses, consolidated_state_dict(engine), facts


def main() -> None:
    (arg,) = worker_args(sys.argv)
    out = Path(arg)
    out.mkdir(parents=True, exist_ok=True)
    dist = DistInfo.from_env()
    init_distributed(dist)
    plain_losses, plain_state, plain_facts = train(dist, chunked=False)
    chunked_losses, chunked_state, chunked_facts = train(dist, chunked=True)
    result = {
        "plain": plain_losses,
        "chunked": chunked_losses,
        "plain_facts": plain_facts,
        "chunked_facts": chunked_facts,
    }
    if dist.is_main:
        result["keys_equal"] = sorted(plain_state) == sorted(chunked_state)
        result["weight_maxdiff"] = max(
            (plain_state[k] - chunked_state[k]).abs().max().item() for k in plain_state
        )
        first = next(iter(tiny_model(seed=0).state_dict().items()))
        result["weights_moved"] = (plain_state[first[0]] - first[1]).abs().max().item()
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
