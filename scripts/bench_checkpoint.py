"""Save and resume time of a checkpoint, with and without reading it back for checksums.

    python scripts/bench_checkpoint.py [--hidden 768 --layers 8 --vocab 16000] [--repeat 3] [--dir D]

One CPU rank (gloo), a Qwen2-shaped model under ZeRO-2 with AdamW after one step, so the
checkpoint holds fp32 weights, fp32 master weights and both Adam moments. Each case runs
``--repeat`` times, interleaved, and the median is printed:

- save, checksummed while writing: ``Checkpointer.save`` (what dstrain does now);
- save, then read back: DeepSpeed's ``save_checkpoint`` (torch.save to a path) and a crc32 of
  every file read back, as dstrain did before (the manifest's cost; timed on its own too);
  both save paths fsync every file (the old one did not: added so that the figures compare);
- resume, sizes only: ``resolve_resume`` (sizes against the manifest, the pickle scan) and
  ``Checkpointer.load``; the default;
- resume, full: the same with every crc32 (``--verify-checkpoint full``; before, every resume).

The files were just written, so reads come from the page cache: the read-back figures are a
lower bound (on a disk or NFS they take the read bandwidth of the whole checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.checkpoint import Checkpointer, RNGState, file_records, resolve_resume
    from trainer.dist import DistInfo

    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    config = Qwen2Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        intermediate_size=args.hidden * 3,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(0, args.vocab, (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    dist = DistInfo()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    names = ["save, checksummed while writing", "save, then read back (before)", "  of which the read-back"]
    timings: dict[str, list[float]] = {name: [] for name in names}

    def timed(name: str, fn) -> None:
        started = time.perf_counter()
        fn()
        timings.setdefault(name, []).append(time.perf_counter() - started)

    def checkpointer(out: Path) -> Checkpointer:
        return Checkpointer(out, dist, engine, shared={}, per_rank={"rng": RNGState()}, keep_last=1)

    def save_then_read_back(out: Path) -> None:
        ckpts = out / "checkpoints"
        engine.save_checkpoint(str(ckpts), tag="step_1", save_latest=False)
        torch.save({"rng": RNGState().state_dict()}, ckpts / "step_1" / "dstrain_rank0.pt")
        for f in (ckpts / "step_1").rglob("*.pt"):  # the fsync the new save does, for a fair figure
            with f.open("rb+") as fh:
                os.fsync(fh.fileno())
        timed(
            "  of which the read-back",
            lambda: (ckpts / "step_1" / "MANIFEST.json").write_text(
                json.dumps(file_records(ckpts / "step_1", dist))
            ),
        )

    size_mb = 0.0
    for i in range(args.repeat):
        new, old = root / f"new{i}", root / f"old{i}"
        timed("save, checksummed while writing", lambda new=new: checkpointer(new).save(1))
        timed("save, then read back (before)", lambda old=old: save_then_read_back(old))
        path = new / "checkpoints" / "step_1"
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        for full in (False, True):
            name = "resume, full crc32 check" if full else "resume, sizes only (default)"

            def resume(path=path, full=full) -> None:
                resolve_resume(str(path), path.parent.parent, dist, full_verify=full)
                checkpointer(path.parent.parent).load(path)

            timed(name, resume)
        shutil.rmtree(new)
        shutil.rmtree(old)
    print(f"{params / 1e6:.1f}M parameters, checkpoint {size_mb:.0f} MB, median of {args.repeat}:")
    for name, values in timings.items():
        print(f"  {name:34s} {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
