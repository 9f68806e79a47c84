"""Benchmark the data pipeline against the raw tokenizer and `datasets` streaming.

Cases, each in its own subprocess (so its memory is its own), on the same files, tokenizer
and cores:

  a       the ceiling: raw fast-tokenizer batch encode (backend ``encode_batch_fast``) over
          pyarrow record batches, no pipeline
  a-hf    the same through the Hugging Face tokenizer call (what the pipeline calls)
  b<w>    ``trainer.data.build_train_data`` (pack=true, max_seq_len, 1 rank), num_workers=w
  c       ``datasets`` streaming parquet + batched ``map`` tokenization + greedy packing
          (documents joined with EOS, cut into max_seq_len rows, stacked into micro-batch tensors)
  d<w>    ``build_train_data`` on pre-tokenized shards (written by ``dstrain data tokenize``)

tokens/s = tokens delivered (EOS included, padding never) / seconds from the start of
iteration to the last batch: worker start-up and shuffle-buffer fills count; tokenizer
loading and ``build_train_data`` / ``load_dataset`` are set-up and do not. For (a) the tokens
are the document tokens + one EOS per document, the same work. The pipeline shuffles in blocks
of ``data.buffer_size`` chunks (it tokenizes a block, then emits it), so a case stopped by
``--max-tokens`` mid-block has done up to one block of work it did not deliver: the benchmark
uses ``--buffer-size 1000`` (about 0.5M tokens at max_seq_len 512) so that a 10M-token run
is within ~5% of the long-run rate (the block size changes latency, not long-run throughput).
``--epochs N`` runs N passes over the small ``--input`` (the pipeline restarts its workers
each epoch, as in training), so its figure is not all start-up.
The 1-minute load average before/after each case is recorded: the
figures only mean something on an otherwise idle machine.
Memory: the peak over the case's process tree of the summed PSS (shared pages split between
the processes that share them; forked workers share most of their parent) and of the summed
RSS, sampled every 0.1 s, and the largest single process's ``ru_maxrss``.

    python scripts/bench_data.py                                   # zh-wiki sample + Qwen2.5
    python scripts/bench_data.py --generate-gb 1.0 --max-tokens 20000000 --json bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the tree this script lives in, with or without an install
    sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_INPUT = SHARED_DATA / "zhwiki-sample" / "wikipedia-cn-sample.json"
DEFAULT_TOKENIZER = SHARED_DATA / "qwen2.5-0.5b"
READ_BATCH_ROWS = 1024
CHILD_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# The parent imports nothing heavy: Linux carries ru_maxrss across fork+exec, so a big parent
# would inflate every child's figure. Preparation (convert, generate, pre-tokenize) and the
# cases run in child processes.


# ============================================================================ cases (child side)


def _run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up one case, then time its iteration to ``max_tokens`` (or one full epoch)."""
    from trainer.tokenizer import load_tokenizer

    case, files = spec["case"], spec["files"]
    cap = spec["max_tokens"] or float("inf")
    tokenizer = load_tokenizer(spec["tokenizer"])
    if case in ("a", "a-hf"):
        batches = _raw_batches(tokenizer, files, spec["text_column"], case == "a", spec["epochs"])
    elif case.startswith(("b", "d")):
        batches = _pipeline_batches(tokenizer, files, spec)
    elif case == "c":
        batches = _datasets_batches(tokenizer, files, spec)
    else:
        raise ValueError(f"unknown case {case!r}")
    tokens = first_tokens = 0
    first_at = None
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for n in batches:
        tokens += n
        if first_at is None:
            first_at, first_tokens = time.perf_counter(), n
        if tokens >= cap:
            break
    ended = time.perf_counter()
    after_first = (tokens - first_tokens) / (ended - first_at) if first_at and ended > first_at else 0.0
    return {
        "tokens": tokens,
        "seconds": round(ended - started, 3),
        "ttfb_s": round((first_at or ended) - started, 3),
        "tokens_per_s": round(tokens / max(ended - started, 1e-9), 1),
        "tokens_per_s_after_first_batch": round(after_first, 1),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "maxrss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "maxrss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _raw_batches(
    tokenizer: Any, files: list[str], text_column: str, backend: bool, epochs: int
) -> Iterator[int]:
    import pyarrow.parquet as pq

    raw = tokenizer.backend_tokenizer
    encode_fast = getattr(raw, "encode_batch_fast", raw.encode_batch)

    def batches() -> Iterator[int]:
        for _, path in itertools.product(range(epochs), files):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=[text_column]):
                texts = batch.column(0).to_pylist()
                if backend:
                    ids = [e.ids for e in encode_fast(texts, add_special_tokens=False)]
                else:
                    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                yield sum(len(x) for x in ids) + len(ids)  # + one EOS per document

    return batches()


def _pipeline_batches(tokenizer: Any, files: list[str], spec: dict[str, Any]) -> Iterator[int]:
    from trainer.data import build_train_data
    from trainer.data.config import DataConfig
    from trainer.dist import DistInfo

    cfg = DataConfig(
        train=files,
        text_column=spec["text_column"],
        max_seq_len=spec["max_seq_len"],
        pack=True,
        num_workers=spec["workers"],
        validation_fraction=0.0,
        **({"buffer_size": spec["buffer_size"]} if spec.get("buffer_size") else {}),
    )
    data = build_train_data(cfg, tokenizer, DistInfo(), seed=0, micro_batch_size=spec["micro_batch_size"])
    # Iterating again runs the next epoch (new order; workers restart, as in training).
    return (int((b["doc_ids"] >= 0).sum()) for _ in range(spec["epochs"]) for b in data)


def _datasets_batches(tokenizer: Any, files: list[str], spec: dict[str, Any]) -> Iterator[int]:
    import torch
    from datasets import load_dataset

    text_column, max_seq_len, mbs = spec["text_column"], spec["max_seq_len"], spec["micro_batch_size"]
    eos = tokenizer.eos_token_id
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]}

    ds = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names)

    def batches() -> Iterator[int]:
        buffer: list[int] = []
        rows: list[list[int]] = []
        for example in (ex for _ in range(spec["epochs"]) for ex in ds):
            buffer.extend(example["input_ids"])
            buffer.append(eos)
            while len(buffer) >= max_seq_len:
                rows.append(buffer[:max_seq_len])
                del buffer[:max_seq_len]
                if len(rows) == mbs:
                    input_ids = torch.tensor(rows, dtype=torch.long)
                    _labels = input_ids.clone()  # what a training batch would carry
                    rows = []
                    yield input_ids.numel()

    return batches()


# ============================================================================ preparation (child side)


def _prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Convert json inputs, generate the big file, pre-tokenize: the datasets the cases read."""
    import pyarrow.parquet as pq

    from trainer.data.tools import convert, inspect
    from trainer.data.tools_io import detect_format, parquet_columns, resolve_text_column
    from trainer.data.tools_tokenize import tokenize_files

    work = Path(spec["work"])
    inputs = []
    for i, path in enumerate(map(Path, spec["input"])):
        if detect_format(path) == "parquet":
            if resolve_text_column(path, spec["text_column"], parquet_columns(path)) == "text":
                inputs.append(path)
                continue
        dst = work / f"input-{i}-{path.stem}.parquet"
        result = convert(path, dst, spec["text_column"], "text", row_group_size=spec["row_group_size"])
        _say(f"converted {path} -> {dst.name}: {result.rows} rows, text from {result.text_column!r}")
        inputs.append(dst)
    datasets = [{"name": "input", "files": [str(p) for p in inputs]}]
    if spec["generate_gb"] > 0:
        gen = work / f"generated-{spec['generate_gb']:g}gb.parquet"
        if not gen.exists():
            t0 = time.perf_counter()
            generate_parquet(inputs, gen, int(spec["generate_gb"] * 1e9), "text", spec["row_group_size"])
            _say(
                f"generated {gen.name} ({gen.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s"
            )
        datasets.append({"name": f"{gen.stat().st_size / 1e9:.2f}GB", "files": [str(gen)]})
    for ds in datasets:
        files = [Path(f) for f in ds["files"]]
        metas = [pq.ParquetFile(f).metadata for f in files]
        ds["rows"] = sum(m.num_rows for m in metas)
        ds["row_groups"] = sum(m.num_row_groups for m in metas)
        ds["bytes"] = sum(f.stat().st_size for f in files)
        if not spec["pretokenize"]:
            continue
        max_rows = None
        if spec["max_tokens"]:
            facts = inspect(files, spec["tokenizer"], "text", sample_rows=300)
            per_row = facts["estimated_total_tokens"] / max(1, facts["rows"]) + 1
            max_rows = int(min(facts["rows"], 1.25 * spec["max_tokens"] / per_row + 1))
        out = work / f"tokenized-{ds['name']}"
        manifest = tokenize_files(
            files,
            spec["tokenizer"],
            out,
            "text",
            workers=2,
            max_rows=max_rows,
            overwrite=True,
            log=lambda m: None,
        )
        ds["pretokenized"] = {
            "dir": str(out),
            "rows": manifest["rows"],
            "tokens": manifest["tokens"],
            "tokenize_workers": 2,
            "tokenize_tokens_per_s": manifest["tokens_per_second"],
        }
        _say(
            f"[{ds['name']}] pre-tokenized {manifest['rows']:,} rows, {manifest['tokens']:,} tokens "
            f"(dstrain data tokenize, 2 workers): {manifest['tokens_per_second']:,.0f} tokens/s"
        )
    return {"datasets": datasets}


def generate_parquet(
    sources: list[Path], out: Path, target_bytes: int, text_column: str, row_group_size: int, seed: int = 0
) -> Path:
    """A parquet file of about ``target_bytes`` on disk: documents of ``sources`` repeated with
    variation (rotated at a random point, one in five joined with another, a random tag)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    for path in sources:
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):
            texts.extend(t for t in batch.column(0).to_pylist() if t)
            if len(texts) >= 50_000:  # enough variety; the source may itself be big
                break
    if not texts:
        raise SystemExit(f"{sources}: no text to generate from")
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    schema = pa.schema([("doc_id", pa.int64()), ("text", pa.string())])
    doc_id = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        while tmp.stat().st_size < target_bytes:  # each row group is written through as it comes
            picks = rng.integers(0, len(texts), size=(row_group_size, 2))
            cuts = rng.random(row_group_size)
            joins = rng.random(row_group_size) < 0.2
            tags = rng.integers(0, 1_000_000, size=row_group_size)
            docs = []
            for (i, j), cut, join, tag in zip(picks, cuts, joins, tags, strict=True):
                text = texts[i]
                k = int(cut * len(text))
                text = text[k:] + text[:k]
                if join:
                    text += "\n" + texts[j]
                docs.append(f"{text} ({tag})")
            ids = pa.array(np.arange(doc_id, doc_id + row_group_size, dtype=np.int64))
            writer.write_table(pa.Table.from_arrays([ids, pa.array(docs, pa.string())], schema=schema))
            doc_id += row_group_size
    os.replace(tmp, out)
    return out


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ============================================================================ parent side


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes, from /proc (PSS falls back to RSS elsewhere)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
        return pss, rss
    except OSError:
        pass
    try:
        import psutil

        rss = psutil.Process(pid).memory_info().rss
    except Exception:  # gone, or no psutil
        pass
    return rss, rss


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # the process ended, or no psutil
        return []


def _run_child(flag: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``bench_data.py <flag> SPEC`` and return its last stdout line as JSON, with the peak
    PSS/RSS of its process tree."""
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **CHILD_ENV}
    )
    peak = {"pss": 0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            mem = [_memory(p) for p in [proc.pid, *_descendants(proc.pid)]]
            peak["pss"] = max(peak["pss"], sum(m[0] for m in mem))
            peak["rss"] = max(peak["rss"], sum(m[1] for m in mem))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_lines: list[str] = []

    def pump() -> None:  # relay the child's progress lines, keep the tail for errors
        for line in proc.stderr:
            stderr_lines.append(line)
            if flag == "--_prepare":
                sys.stderr.write(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    killer = threading.Timer(timeout_s, kill)
    killer.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
        done.set()
        sampler.join()
        pumper.join(timeout=5)
    if killed.is_set():
        return {"error": f"killed after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in stderr_lines[-3:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_tree_pss_mb"] = round(peak["pss"] / 2**20, 1)
    result["peak_tree_rss_mb"] = round(peak["rss"] / 2**20, 1)
    return result


def _cases(cases: str, workers: list[int]) -> list[tuple[str, int]]:
    wanted = set(cases.split(","))
    out = [(name, 0) for name in ("a", "a-hf") if name in wanted]
    out += [(f"b{w}", w) for w in workers] if "b" in wanted else []
    out += [("c", 0)] if "c" in wanted else []
    out += [(f"d{w}", w) for w in workers] if "d" in wanted else []
    return out


def _targets(results: list[dict[str, Any]], workers: list[int]) -> list[tuple[str, str, bool]]:
    """(target, measured, pass) for the figures the pipeline promises."""
    ok = [r for r in results if "tokens_per_s" in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in results))

    def rate(dataset: str, case: str) -> float | None:
        return next((r["tokens_per_s"] for r in ok if r["dataset"] == dataset and r["case"] == case), None)

    out: list[tuple[str, str, bool]] = []
    for ds in datasets:
        a, c = rate(ds, "a"), rate(ds, "c")
        bs = {w: v for w in workers if (v := rate(ds, f"b{w}"))}
        pre = {w: v for w in workers if (v := rate(ds, f"d{w}"))}
        if a and bs:
            w, best = max(bs.items(), key=lambda kv: kv[1])
            out.append((f"{ds}: (b) >= 0.9x (a)", f"b{w}: {best / a:.2f}x", best / a >= 0.9))
        if c and bs.get(1):
            out.append((f"{ds}: (b, 1 worker) >= 1.0x (c)", f"{bs[1] / c:.2f}x", bs[1] / c >= 1.0))
        if bs.get(1) and max(bs) > 1:
            top = max(bs)
            out.append(
                (f"{ds}: (b) scales: b{top} >= 1.2x b1", f"{bs[top] / bs[1]:.2f}x", bs[top] / bs[1] >= 1.2)
            )
        if c and pre:
            w, best = max(pre.items(), key=lambda kv: kv[1])
            out.append((f"{ds}: (d) >= 10x (c)", f"d{w}: {best / c:.1f}x", best / c >= 10))
    if len(datasets) >= 2:
        small, large = datasets[0], datasets[-1]
        for r in ok:
            base = next((s for s in ok if s["dataset"] == small and s["case"] == r["case"]), None)
            if r["dataset"] == large and base:
                lo, hi = base["peak_tree_pss_mb"], r["peak_tree_pss_mb"]
                out.append(
                    (
                        f"peak PSS flat in file size ({r['case']}): <= 1.2x + 64 MB",
                        f"{lo:,.0f} -> {hi:,.0f} MB",
                        hi <= 1.2 * lo + 64,
                    )
                )
    return out


def _print(results: list[dict[str, Any]], targets: list[tuple[str, str, bool]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title="data pipeline throughput (tokens incl. EOS, no padding)")
    columns = (
        "dataset",
        "case",
        "tokens",
        "tok/s",
        "x (a)",
        "tok/s after 1st batch",
        "first batch s",
        "peak PSS MB",
        "peak RSS MB",
        "max proc MB",
        "load 1m",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("dataset", "case") else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["dataset"], r["case"], "error: " + r["error"][-60:], *[""] * (len(columns) - 3))
            continue
        a = next(
            (s for s in results if s["dataset"] == r["dataset"] and s["case"] == "a" and "tokens_per_s" in s),
            None,
        )
        table.add_row(
            r["dataset"],
            r["case"],
            f"{r['tokens']:,}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / a['tokens_per_s']:.2f}" if a else "",
            f"{r['tokens_per_s_after_first_batch']:,.0f}",
            f"{r['ttfb_s']:.2f}",
            f"{r['peak_tree_pss_mb']:,.0f}",
            f"{r['peak_tree_rss_mb']:,.0f}",
            f"{max(r['maxrss_self_mb'], r['maxrss_children_mb']):,.0f}",
            "{:.1f}/{:.1f}".format(*r["load_avg_1m"]),
        )
    console.print(table)
    t = Table(title="targets")
    t.add_column("target")
    t.add_column("measured", justify="right")
    t.add_column("result")
    for name, measured, passed in targets:
        t.add_row(name, measured, "[green]PASS" if passed else "[red]FAIL")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", type=Path, nargs="+", default=[DEFAULT_INPUT], help="parquet/json/jsonl files."
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.exists() else None
    )
    parser.add_argument("--text-column", default=None, help="Text column of the inputs (default: detected).")
    parser.add_argument("--max-seq-len", type=int, default=512, help="Tokens per packed row.")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="Rows per micro-batch.")
    parser.add_argument("--workers", default="0,1,2", help="num_workers values for (b) and (d).")
    parser.add_argument("--cases", default="a,a-hf,b,c,d", help="Cases to run (a, a-hf, b, c, d).")
    parser.add_argument(
        "--generate-gb", type=float, default=0.0, help="Also run on a generated file of this many GB."
    )
    parser.add_argument(
        "--row-group-size", type=int, default=1000, help="Rows per row group of converted/generated files."
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="Passes over the (small) --input data per case; generated: one."
    )
    parser.add_argument(
        "--buffer-size", type=int, default=1000, help="data.buffer_size for (b)/(d) (0: the config default)."
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="Stop each case after this many tokens.")
    parser.add_argument("--case-timeout", type=float, default=900, help="Seconds before a case is killed.")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="Keep converted/generated/tokenized files here (reused)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_prepare", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        print(json.dumps(_run_case(json.loads(args._case))), flush=True)
        # Skip interpreter teardown: a stream stopped mid-epoch (datasets' reader threads,
        # dataloader workers) can abort there, after the result is already out.
        os._exit(0)
    if args._prepare:
        print(json.dumps(_prepare(json.loads(args._prepare))), flush=True)
        return 0
    if args.tokenizer is None:
        parser.error("--tokenizer is required (no default tokenizer in ../shared/data)")
    workers = [int(w) for w in args.workers.split(",")]
    cases = _cases(args.cases, workers)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prep_spec = {
            "work": str(work),
            "input": [str(p) for p in args.input],
            "text_column": args.text_column,
            "tokenizer": str(args.tokenizer),
            "generate_gb": args.generate_gb,
            "row_group_size": args.row_group_size,
            "max_tokens": args.max_tokens,
            "pretokenize": any(c.startswith("d") for c, _ in cases),
        }
        prepared = _run_child("--_prepare", prep_spec, timeout_s=3600)
        if "error" in prepared:
            raise SystemExit(f"preparation failed: {prepared['error']}")
        results: list[dict[str, Any]] = []
        for ds in prepared["datasets"]:
            print(
                f"[{ds['name']}] {ds['rows']:,} rows, {ds['row_groups']} row groups, {ds['bytes'] / 1e6:,.1f} MB",
                flush=True,
            )
            for case, w in cases:
                files = [ds["pretokenized"]["dir"]] if case.startswith("d") else ds["files"]
                spec = {
                    "case": case,
                    "files": files,
                    "tokenizer": str(args.tokenizer),
                    "text_column": "text",
                    "max_seq_len": args.max_seq_len,
                    "micro_batch_size": args.micro_batch_size,
                    "workers": w,
                    "max_tokens": args.max_tokens,
                    "buffer_size": args.buffer_size,
                    "epochs": args.epochs if ds["name"] == "input" else 1,
                }
                result = {
                    "dataset": ds["name"],
                    "case": case,
                    "workers": w,
                    **_run_child("--_case", spec, args.case_timeout),
                }
                results.append(result)
                print(json.dumps(result), flush=True)
        targets = _targets(results, workers)
        _print(results, targets)
        if args.json:
            config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
            payload = {
                "config": json.loads(json.dumps(config, default=str)),
                "cpu_count": os.cpu_count(),
                "datasets": prepared["datasets"],
                "results": results,
                "targets": [{"target": n, "measured": m, "pass": p} for n, m, p in targets],
            }
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
