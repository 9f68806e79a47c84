"""Benchmark dstrain's training step against Hugging Face's Trainer and a bare torch loop.

Same tiny Qwen2 (hidden 64, 2 layers, the Qwen tokenizer's 151,680-entry vocabulary, tied
embeddings, fp32, SDPA, no checkpointing), built by ``trainer.model.build_model`` with the same
seed; same AdamW and LR schedule (``trainer.optim``), clipping at 1.0; one CPU process at a time.
dstrain runs its real path: ``deepspeed.initialize`` through ``trainer.engine.build_engine``
(ZeRO-0, one gloo rank), ``TrainModule.train_step`` and, in (b), the streaming data pipeline.

(a) identical fixed-length batches (the zh-wiki sample tokenized and cut into rows of
    ``--seq-len-a``, no padding): optimizer steps/s of each system, and each system's per-step loss
    against the bare loop's. The bare loop and dstrain run in one process, step by step in
    alternating order, so both see the same machine load; HF's Trainer (which owns its loop) runs
    in its own. Target: dstrain within 5% of the bare loop's steps/s.
(b) the zh-wiki sample as each system prepares it: HF the way the seed tutorials do (tokenize,
    truncate and pad every paragraph to ``--seq-len``, pad labels masked, a pre-tokenized
    dataset), dstrain with packing (``build_train_data``, tokenizing as it streams, 0 workers)
    and, by default, its chunked loss (``--loss plain``: the full-logits one HF also uses).
    Figure: useful (non-pad) tokens/s. Target: dstrain >= 1.5x HF. Truncating and padding to 512
    leaves 70% of the sample's row tokens real, so packing alone gives about 1.43x at equal step
    times; the rest has to come from a faster step.

    Each system runs twice, in the order HF, dstrain, dstrain, HF.

The first ``--warmup`` steps of a run are not timed, and a rate is taken from the median step
time (useful tokens: the mean per step over the median step time), so a load spike from another
process on a shared machine does not decide a ratio. No timing is asserted anywhere: this
prints figures for docs/benchmarks.md.

    python scripts/bench_trainer.py                       # both parts, under 5 minutes on 2 cores
    python scripts/bench_trainer.py --cases a --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_INPUT = SHARED_DATA / "zhwiki-sample" / "wikipedia-cn-sample.json"
DEFAULT_TOKENIZER = SHARED_DATA / "qwen2.5-0.5b"
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
# (b) runs each system twice in the order A B B A, so a drift in machine load affects both alike.
CASES = ("a-pair", "a-hf", "b-hf-1", "b-dstrain-1", "b-dstrain-2", "b-hf-2")


# ============================================================================ child side


def make_job(spec: dict[str, Any]) -> Any:
    from trainer.config import build_config

    return build_config(
        base={
            "output_dir": spec["output_dir"],
            "seed": 1234,
            "tokenizer": spec["tokenizer"],
            "model": {
                "config": "qwen2.5-0.5b",
                "overrides": TINY,
                "attn_implementation": "sdpa",
                "gradient_checkpointing": False,
                "dtype": "fp32",
                "loss": spec.get("loss", "plain"),  # (a) compares like with like: the full-logits loss
            },
            "data": {
                "train": [spec["input"]],
                "text_column": "completion",
                "max_seq_len": spec["seq_len"],
                "pack": True,
                "num_workers": 0,
                "validation_fraction": 0.0,
                "buffer_size": 1000,
            },
            "optim": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "max_grad_norm": 1.0},
            "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
            "train": {"micro_batch_size": spec["micro"], "grad_accum": 1, "max_steps": spec["steps"]},
            "zero": {"stage": 0},
        }
    )


def texts_of(path: str) -> list[str]:
    return [row["completion"] for row in json.loads(Path(path).read_text(encoding="utf-8"))]


def fixed_batches(tokenizer: Any, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """(a): the sample's tokens joined by EOS and cut into [micro, seq_len] rows, no padding."""
    import torch

    from trainer.data import encode_texts

    stream: list[int] = []
    for ids in encode_texts(tokenizer, texts_of(spec["input"])):
        stream += [*ids, tokenizer.eos_token_id]
    rows, seq = spec["micro"] * spec["steps"], spec["seq_len"]
    if len(stream) < rows * seq:
        raise SystemExit(f"the input has {len(stream)} tokens, fewer than {rows * seq} for (a)")
    ids = torch.tensor(stream[: rows * seq]).view(spec["steps"], spec["micro"], seq)
    positions = torch.arange(seq).expand(spec["micro"], seq)
    return [{"input_ids": b, "labels": b.clone(), "position_ids": positions} for b in ids]


def ends_to_durations(ends: list[float], start: float) -> list[float]:
    """Per-step seconds from step end times (the first step from ``start``)."""
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def bare_stepper(spec: dict[str, Any], job: Any, model: Any) -> Any:
    """One optimizer step of a plain torch loop: forward, mean CE, backward, clip, AdamW, schedule."""
    import torch
    import torch.nn.functional as F

    from trainer.optim import build_optimizer, make_scheduler

    optimizer = build_optimizer(model, job.optim)
    scheduler = make_scheduler(optimizer, spec["steps"], job.schedule)
    model.train()

    def step(batch: dict[str, Any]) -> float:
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def dstrain_engine(spec: dict[str, Any], job: Any, model: Any) -> tuple[Any, Any]:
    from trainer.dist import DistInfo, init_distributed
    from trainer.ds_config import build_ds_config
    from trainer.engine import build_engine
    from trainer.train_module import TrainModule

    dist = DistInfo.from_env()
    init_distributed(dist)
    engine = build_engine(job, model, build_ds_config(job, "fp32", on_gpu=False), spec["steps"])
    return TrainModule(engine, dist), dist


def run_pair(spec: dict[str, Any], job: Any, tokenizer: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """(a) bare loop and dstrain in one process, step by step in alternating order, so both see
    the same machine load; each step is timed on its own."""
    from bench_gpu import local_step

    from trainer.model import build_model

    bare = bare_stepper(spec, job, build_model(job, tokenizer, "fp32", on_gpu=False))
    module, _ = dstrain_engine(spec, job, build_model(job, tokenizer, "fp32", on_gpu=False))
    runs = {
        "bare": (bare, {"losses": [], "durations": []}),
        "dstrain": (lambda b: local_step(module, [b])[0], {"losses": [], "durations": []}),
    }
    rows_tokens = spec["micro"] * spec["seq_len"]
    for i, batch in enumerate(batches):
        for name in ("bare", "dstrain") if i % 2 == 0 else ("dstrain", "bare"):
            step, out = runs[name]
            started = time.perf_counter()
            out["losses"].append(step(batch))
            out["durations"].append(time.perf_counter() - started)
    return {name: {**out, "tokens": [rows_tokens] * len(batches)} for name, (_, out) in runs.items()}


def run_dstrain_packed(spec: dict[str, Any], job: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """(b) dstrain end to end: the streaming pipeline (tokenize, shuffle, pack) and train_step,
    with the loss ``spec["loss"]`` (chunked: ``trainer.loss``, as bench_gpu.py sets it up)."""
    from bench_gpu import local_step, use_loss

    from trainer.data import build_train_data

    use_loss(model, spec["loss"])
    module, dist = dstrain_engine(spec, job, model)
    data = build_train_data(job.data, tokenizer, dist, job.seed, job.train.micro_batch_size)
    stream = iter(data)
    tokens, ends, losses = [], [], []
    start = time.perf_counter()  # the first step's clock starts with the data stream
    for _ in range(spec["steps"]):
        loss, step_tokens = local_step(module, [next(stream)])
        tokens.append(step_tokens)
        losses.append(loss)
        ends.append(time.perf_counter())
    return {"losses": losses, "durations": ends_to_durations(ends, start), "tokens": tokens}


def run_hf(spec: dict[str, Any], job: Any, model: Any, dataset: Any, collator: Any) -> dict[str, Any]:
    """HF's Trainer with dstrain's optimizer and schedule, sequential sampling, CPU."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.optim import build_optimizer, make_scheduler

    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    optimizer = build_optimizer(model, job.optim)
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["micro"],
        max_steps=spec["steps"],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_grad_norm=job.optim.max_grad_norm,
        train_sampling_strategy="sequential",
        seed=1234,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(optimizer, make_scheduler(optimizer, spec["steps"], job.schedule)),
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    trainer.train()
    return {"losses": losses, "durations": ends_to_durations(ends, start)}


def run_hf_padded(spec: dict[str, Any], job: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """(b) for HF: the seed tutorials' preprocessing, then the Trainer on the padded rows."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    texts = texts_of(spec["input"])
    rows_needed = spec["micro"] * spec["steps"]
    offset = spec["offset"] % len(texts)  # a repeat run takes the next paragraphs
    texts = (texts * (1 + (offset + rows_needed) // len(texts)))[offset : offset + rows_needed]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=spec["seq_len"], padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    result = run_hf(spec, job, model, dataset, collator)
    real = [sum(mask) for mask in dataset["attention_mask"]]
    result["tokens"] = [sum(real[i * spec["micro"] : (i + 1) * spec["micro"]]) for i in range(spec["steps"])]
    return result


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer

    torch.set_num_threads(spec["threads"])
    job = make_job(spec)
    tokenizer = load_tokenizer(spec["tokenizer"])
    case = spec["case"]
    if case == "a-pair":
        return run_pair(spec, job, tokenizer, fixed_batches(tokenizer, spec))
    model = build_model(job, tokenizer, "fp32", on_gpu=False)
    if case == "a-hf":
        from transformers import default_data_collator

        batches = fixed_batches(tokenizer, spec)
        rows = [{"input_ids": r, "labels": r.clone()} for b in batches for r in b["input_ids"]]
        result = run_hf(spec, job, model, rows, default_data_collator)
        return {**result, "tokens": [spec["micro"] * spec["seq_len"]] * spec["steps"]}
    if case.startswith("b-hf"):
        return run_hf_padded(spec, job, model, tokenizer)
    if case.startswith("b-dstrain"):
        return run_dstrain_packed(spec, job, model, tokenizer)
    raise ValueError(case)


# ============================================================================ parent side


def run_child(case: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    part = case[0]
    spec = {
        "case": case,
        "input": str(args.input),
        "tokenizer": str(args.tokenizer),
        "seq_len": args.seq_len_a if part == "a" else args.seq_len,
        "micro": args.micro_batch_size,
        "steps": args.warmup + (args.steps_a if part == "a" else args.steps_b),
        "warmup": args.warmup,
        "threads": args.threads,
        "loss": args.loss,
        "offset": 0 if case.endswith("-1") else args.micro_batch_size * (args.warmup + args.steps_b),
        "output_dir": str(workdir / case),
    }
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + os.getpid() % 1000),
    )
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(
        f"  {case}: {result['wall_s']} s, 1-minute load {result['load_avg_1m']}", file=sys.stderr, flush=True
    )
    return result


def rates(runs: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """steps/s from the median timed step, tokens/s = mean tokens a step / median step seconds."""
    seconds = [d for run in runs for d in run["durations"][warmup:]]
    tokens = [t for run in runs for t in run["tokens"][warmup:]]
    median = statistics.median(seconds)
    return {
        "steps_per_s": 1.0 / median,
        "tokens_per_s": statistics.mean(tokens) / median,
        "median_step_s": median,
    }


def corpus_useful_fraction(args: argparse.Namespace) -> float:
    """The share of non-pad tokens if every paragraph of the sample is truncated/padded to seq_len."""
    from trainer.data import encode_texts
    from trainer.tokenizer import load_tokenizer

    lengths = [
        len(ids) for ids in encode_texts(load_tokenizer(str(args.tokenizer)), texts_of(str(args.input)))
    ]
    return sum(min(n, args.seq_len) for n in lengths) / (len(lengths) * args.seq_len)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    summary: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "seq_len_a": args.seq_len_a,
        "seq_len_b": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "results": results,
    }
    lines = [f"bench_trainer {summary['date']}: {summary['machine']}, {args.warmup} untimed steps per run"]
    if "a-pair" in results:
        bare = results["a-pair"]["bare"]
        systems = {"bare loop": bare, "dstrain": results["a-pair"]["dstrain"]}
        if "a-hf" in results:
            systems["HF Trainer"] = results["a-hf"]
        base = rates([bare], args.warmup)["steps_per_s"]
        lines.append(
            f"(a) identical fixed batches of {args.micro_batch_size} x {args.seq_len_a}, {args.steps_a} timed steps "
            "(bare and dstrain interleaved in one process, HF in its own):"
        )
        for name, run in systems.items():
            rate = rates([run], args.warmup)["steps_per_s"]
            diff = max(abs(x - y) for x, y in zip(run["losses"], bare["losses"], strict=True))
            summary[f"a {name}"] = {"steps_per_s": rate, "ratio_to_bare": rate / base, "loss_maxdiff": diff}
            lines.append(
                f"  {name:11s} {rate:7.3f} steps/s  x{rate / base:.3f} of bare  max |loss - bare| {diff:.1e}"
            )
        # Each interleaved pair of steps saw the same load: the median of their ratios is the
        # figure to trust on a busy machine.
        pairs = zip(
            bare["durations"][args.warmup :], systems["dstrain"]["durations"][args.warmup :], strict=True
        )
        paired = statistics.median(b / d for b, d in pairs)
        summary["a dstrain paired ratio"] = paired
        lines.append(f"  dstrain / bare, median of the step-by-step ratios: x{paired:.3f} (target >= 0.95)")
    if all(f"b-{s}-{i}" in results for s in ("hf", "dstrain") for i in (1, 2)):
        hf = rates([results["b-hf-1"], results["b-hf-2"]], args.warmup)
        ds = rates([results["b-dstrain-1"], results["b-dstrain-2"]], args.warmup)
        share = corpus_useful_fraction(args)
        summary["b"] = {
            "hf": hf,
            "dstrain": ds,
            "ratio": ds["tokens_per_s"] / hf["tokens_per_s"],
            "hf_useful_share": share,
        }
        lines += [
            f"(b) zh-wiki sample, rows of {args.seq_len} x {args.micro_batch_size}, 2 x {args.steps_b} timed steps "
            "each (order HF, dstrain, dstrain, HF): useful tokens/s",
            f"  HF Trainer  {hf['tokens_per_s']:8,.0f} tok/s  {hf['steps_per_s']:.3f} steps/s  (truncate + pad to "
            f"{args.seq_len}: {share:.1%} of the sample's row tokens are real)",
            f"  dstrain     {ds['tokens_per_s']:8,.0f} tok/s  {ds['steps_per_s']:.3f} steps/s  (packed: every token "
            f"real; {args.loss} loss)",
            f"  dstrain / HF: x{summary['b']['ratio']:.2f} (target >= 1.5)",
        ]
    print("\n".join(lines))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--input", type=Path, default=DEFAULT_INPUT, help="JSON array of {completion: ...} rows."
    )
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="Tokenizer directory.")
    parser.add_argument("--cases", default="a,b", help="Parts to run: a, b or a,b.")
    parser.add_argument("--seq-len", type=int, default=512, help="Row length (tokens) in (b).")
    parser.add_argument(
        "--seq-len-a",
        type=int,
        default=128,
        help="Row length in (a): shorter steps make a per-step overhead of the trainer easier to see.",
    )
    parser.add_argument("--micro-batch-size", type=int, default=2, help="Rows per step.")
    parser.add_argument("--steps-a", type=int, default=6, help="Timed steps in (a).")
    parser.add_argument("--steps-b", type=int, default=4, help="Timed steps per (b) run (two runs a system).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps at the start of each run.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per case.")
    parser.add_argument(
        "--loss",
        choices=("chunked", "plain"),
        default="chunked",
        help="dstrain's loss in (b): chunked (trainer.loss, without full logits) or the plain full-logits one.",
    )
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per case.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_case(json.loads(args.child))))
        return 0
    for path in (args.input, args.tokenizer):
        if not path.exists():
            raise SystemExit(f"{path} is missing: pass --input/--tokenizer (defaults live in ../shared/data)")
    parts = {p.strip() for p in args.cases.split(",")}
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        for case in CASES:
            if case[0] in parts:
                results[case] = run_child(case, args, Path(tmp))
    summary = report(results, args)
    summary["total_wall_s"] = round(time.perf_counter() - started, 1)
    print(f"total {summary['total_wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
