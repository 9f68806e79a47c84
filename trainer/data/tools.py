"""``dstrain data``: prepare training data before a run. Every subcommand streams its input.

    convert  IN OUT.parquet   json (array) / jsonl / csv / parquet -> parquet with a text column,
                              a doc_id column and row groups of a chosen size
    split    IN --out-dir D   train.parquet / validation.parquet by a seeded per-row rule
    sample   IN OUT           random (--n / --fraction) or --smart: exact dedup + length-stratified
    inspect  IN...            rows, row groups, columns, token lengths, tokens, steps and hours per epoch
    tokenize IN... --tokenizer DIR --out-dir D
                              pre-tokenize into input_ids/doc_id shards, in parallel processes

Memory: readers hold one chunk or row group at a time. ``sample`` and ``split`` keep a few
bytes per row (lengths, 8-byte hashes, a selection mask), never the text.
Run as ``dstrain data SUBCOMMAND ...`` or ``python -m trainer.data.tools SUBCOMMAND ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.sharding import held_out
from trainer.data.sources import open_parquet
from trainer.data.tokenize import encode_texts
from trainer.data.tools_io import (
    DOC_ID,
    BadRows,
    RowGroupWriter,
    detect_format,
    iter_parquet_batches,
    iter_tables,
    resolve_inputs,
    resolve_text_column,
    source_columns,
)
from trainer.errors import DataError, DstrainError, user_error

READ_BATCH_ROWS = 8192  # rows per read batch: bounds memory at a few MB of text per batch

# Length buckets for --smart sampling and the statistics: powers of two in characters.
BUCKET_EDGES = np.array([0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], dtype=np.int64)
BUCKET_LABELS = [f"{lo}-{hi - 1}" for lo, hi in zip(BUCKET_EDGES[:-1], BUCKET_EDGES[1:], strict=True)] + [
    f"{BUCKET_EDGES[-1]}+"
]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ============================================================================ convert


@dataclass
class ConvertResult:
    """What ``convert`` wrote: rows, row groups, the text column it read, rows it skipped."""

    rows: int
    row_groups: int
    text_column: str
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def convert(
    src: str | Path,
    dst: str | Path,
    text_column: str | None = None,
    out_column: str = "text",
    row_group_size: int = 10_000,
    keep_columns: Sequence[str] = (),
    skip_bad: bool = False,
) -> ConvertResult:
    """Stream ``src`` (json array, jsonl, csv or parquet) into ``dst`` parquet.

    Output columns: ``doc_id`` (int64; the input's own ``doc_id`` or the row position),
    ``out_column`` (string) and ``keep_columns``; row groups hold ``row_group_size`` rows.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: convert would overwrite its own input; choose another OUT path")
    resolved = resolve_text_column(src, text_column, source_columns(src))
    bad = BadRows(skip=skip_bad)
    schema = pa.schema([(DOC_ID, pa.int64()), (out_column, pa.string())])
    batch_rows = min(row_group_size, READ_BATCH_ROWS)
    if keep_columns:  # their types come from the data; strings if every row was bad
        fallback = pa.schema([*schema, *((name, pa.string()) for name in keep_columns)])
    with RowGroupWriter(dst, row_group_size, schema=None if keep_columns else schema) as writer:
        for table in iter_tables(src, resolved, out_column, keep_columns, batch_rows, bad):
            writer.write(table)
        if keep_columns:
            writer.default_schema(fallback)
    return ConvertResult(writer.rows, writer.row_groups, resolved, bad.count, bad.examples)


@contextmanager
def parquet_inputs(
    paths: Sequence[Path], text_column: str | None, keep_all: bool = False
) -> Iterator[list[Path]]:
    """``paths`` as parquet files: json/jsonl/csv inputs are converted to a temporary directory
    first (streaming), keeping the text column's name (and, with ``keep_all``, every field)."""
    if all(detect_format(p) == "parquet" for p in paths):
        yield list(paths)
        return
    with tempfile.TemporaryDirectory(prefix="dstrain-data-") as tmp:
        out = []
        for i, path in enumerate(paths):
            if detect_format(path) == "parquet":
                out.append(path)
                continue
            columns = source_columns(path)
            text = resolve_text_column(path, text_column, columns)
            keep = [c for c in columns if c not in (text, DOC_ID)] if keep_all else []
            dst = Path(tmp) / f"{i:04d}-{path.stem}.parquet"
            _log(f"converting {path} to parquet first (dstrain data convert does this once, for reuse)")
            convert(path, dst, text, out_column=text, keep_columns=keep)
            out.append(dst)
        yield out


# ============================================================================ split


def split(
    src: str | Path,
    out_dir: str | Path,
    validation_fraction: float = 0.1,
    seed: int = 2222,
    row_group_size: int | None = None,
) -> dict[str, int]:
    """Write ``train.parquet`` and ``validation.parquet`` (all columns kept, order kept).

    A row is held out by the trainer's own rule (:func:`trainer.data.sharding.held_out`: a
    seeded hash of the row index below the fraction), so this split of one file holds out the
    same rows as a run with ``data.validation: null`` and the same fraction and seed.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
    out_dir = Path(out_dir)
    pf = open_parquet(str(src))
    size = row_group_size or _row_group_size_of(pf)
    offset = 0
    with (
        RowGroupWriter(out_dir / "train.parquet", size, pf.schema_arrow) as train,
        RowGroupWriter(out_dir / "validation.parquet", size, pf.schema_arrow) as val,
    ):
        for batch in iter_parquet_batches(pf, READ_BATCH_ROWS):
            index = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
            mask = held_out(index, validation_fraction, seed)
            table = pa.Table.from_batches([batch])
            val.write(table.filter(pa.array(mask)))
            train.write(table.filter(pa.array(~mask)))
            offset += batch.num_rows
    return {"rows": offset, "train": train.rows, "validation": val.rows}


def _row_group_size_of(pf: pq.ParquetFile) -> int:
    meta = pf.metadata
    return max(1, meta.row_group(0).num_rows) if meta.num_row_groups else 10_000


# ============================================================================ sample


def length_stats(lengths: np.ndarray) -> dict[str, float | int]:
    """rows, total, mean, median, p95 and max of an array of lengths."""
    if len(lengths) == 0:
        return {"rows": 0, "total": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    return {
        "rows": len(lengths),
        "total": int(lengths.sum()),
        "mean": round(float(lengths.mean()), 1),
        "p50": round(float(np.percentile(lengths, 50)), 1),
        "p95": round(float(np.percentile(lengths, 95)), 1),
        "max": int(lengths.max()),
    }


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket index (see ``BUCKET_LABELS``) of each length in characters."""
    return (np.searchsorted(BUCKET_EDGES, lengths, side="right") - 1).astype(np.int8)


def normalized_hashes(text: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """8-byte hashes of each text after NFKC, lower-casing and whitespace collapsing."""
    norm = pc.utf8_normalize(text, "NFKC")
    norm = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(norm), r"\s+", " "))
    values = norm.cast(pa.binary()).to_pylist()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(v or b"", digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Mask of the first row of each distinct hash (a stable sort keeps the earliest first)."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes) == 0:
        return keep
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    first = np.empty(len(hashes), dtype=bool)
    first[0] = True
    np.not_equal(sorted_hashes[1:], sorted_hashes[:-1], out=first[1:])
    keep[order[first]] = True
    return keep


def stratified_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Rows to draw per bucket: proportional (largest remainder), at least one per non-empty
    bucket when ``n`` allows, never more than a bucket holds."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    n = min(n, total)
    if total == 0 or n == 0:
        return np.zeros_like(counts)
    exact = counts * n / total
    quotas = np.floor(exact).astype(np.int64)
    remainder = n - int(quotas.sum())
    for b in np.argsort(-(exact - quotas), kind="stable")[:remainder]:
        quotas[b] += 1
    nonempty = np.flatnonzero(counts > 0)
    if n >= len(nonempty):
        for b in nonempty:
            if quotas[b] == 0:
                donor = int(np.argmax(quotas))
                quotas[donor] -= 1
                quotas[b] = 1
    return np.minimum(quotas, counts)


def sample(
    src: str | Path,
    dst: str | Path,
    n: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    smart: bool = False,
    text_column: str | None = None,
    row_group_size: int | None = None,
) -> dict[str, Any]:
    """Write a random sample of ``src`` to ``dst`` (input order kept) and return before/after stats.

    ``smart``: drop exact duplicates (normalized text), then draw per length bucket in
    proportion to its share, with every non-empty bucket represented.
    """
    if (n is None) == (fraction is None):
        raise DataError("sample needs exactly one of --n N or --fraction F")
    if n is not None and n < 1:
        raise DataError(f"--n must be >= 1, got {n}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}")
    pf = open_parquet(str(src))
    text_column = resolve_text_column(src, text_column, pf.schema_arrow.names)
    total = pf.metadata.num_rows

    # Pass 1: a few bytes per row (length, bucket, hash), never the text.
    lengths = np.empty(total, dtype=np.int32)
    hashes = np.empty(total if smart else 0, dtype=np.uint64)
    offset = 0
    for batch in iter_parquet_batches(pf, READ_BATCH_ROWS, [text_column]):
        text = batch.column(0)
        k = batch.num_rows
        lengths[offset : offset + k] = pc.fill_null(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
        if smart:
            hashes[offset : offset + k] = normalized_hashes(text)
        offset += k
    buckets = length_buckets(lengths)
    want = n if n is not None else round(fraction * total)
    rng = np.random.default_rng(seed)

    if smart:
        unique = first_occurrences(hashes)
        del hashes
        duplicates = int(total - unique.sum())
        counts = np.bincount(buckets[unique], minlength=len(BUCKET_LABELS))
        quotas = stratified_quotas(counts, want)
        mask = np.zeros(total, dtype=bool)
        for b in np.flatnonzero(quotas):
            rows = np.flatnonzero(unique & (buckets == b))
            mask[rng.choice(rows, size=int(quotas[b]), replace=False)] = True
    else:
        duplicates = 0
        mask = np.zeros(total, dtype=bool)
        mask[rng.choice(total, size=min(want, total), replace=False)] = True
    if int(mask.sum()) < want:
        _log(
            f"sample: asked for {want} rows, {int(mask.sum())} available (after dedup: {total - duplicates})"
        )

    # Pass 2: copy the chosen rows, all columns, in input order.
    offset = 0
    size = row_group_size or _row_group_size_of(pf)
    with RowGroupWriter(dst, size, pf.schema_arrow) as writer:
        for batch in iter_parquet_batches(pf, READ_BATCH_ROWS):
            k = batch.num_rows
            writer.write(pa.Table.from_batches([batch]).filter(pa.array(mask[offset : offset + k])))
            offset += k

    before_buckets = np.bincount(buckets, minlength=len(BUCKET_LABELS))
    after_buckets = np.bincount(buckets[mask], minlength=len(BUCKET_LABELS))
    return {
        "input": str(src),
        "output": str(dst),
        "mode": "smart" if smart else "random",
        "seed": seed,
        "requested": want,
        "duplicates_removed": duplicates,
        "before": length_stats(lengths),
        "after": length_stats(lengths[mask]),
        "buckets": [
            {"chars": label, "before": int(b), "after": int(a)}
            for label, b, a in zip(BUCKET_LABELS, before_buckets, after_buckets, strict=True)
            if b or a
        ],
    }


# ============================================================================ inspect


def inspect(
    paths: Sequence[Path],
    tokenizer_dir: str | Path | None = None,
    text_column: str | None = None,
    max_seq_len: int = 512,
    micro_batch_size: int = 16,
    grad_accum: int = 8,
    world_size: int = 1,
    step_seconds: float = 1.0,
    sample_rows: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Facts about parquet ``paths`` and what one epoch over them costs.

    Character lengths are exact (every row is read, text column only); token lengths come from
    a seeded sample of ``sample_rows`` rows and are scaled to the whole by the chars-per-token
    ratio. Pre-tokenized files (an ``input_ids`` column) give exact token counts instead.
    """
    for name, value in (
        ("--max-seq-len", max_seq_len),
        ("--micro-batch-size", micro_batch_size),
        ("--grad-accum", grad_accum),
        ("--world-size", world_size),
    ):
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    files = [open_parquet(str(p)) for p in paths]
    rows = sum(f.metadata.num_rows for f in files)
    columns = {f.name: str(f.type) for f in files[0].schema_arrow} if files else {}
    pretokenized = "input_ids" in columns
    report: dict[str, Any] = {
        "files": [str(p) for p in paths],
        "rows": rows,
        "row_groups": sum(f.metadata.num_row_groups for f in files),
        "bytes": sum(Path(p).stat().st_size for p in paths),
        "columns": columns,
        "pretokenized": pretokenized,
    }
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(sample_rows, rows), replace=False)) if rows else np.array([])
    encode = None
    tokenizer = None
    if tokenizer_dir is not None and not pretokenized:
        from trainer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_dir))

        def encode(texts: list[str]) -> list[int]:
            return [len(x) for x in encode_texts(tokenizer, texts)]

    char_lengths: list[np.ndarray] = []
    token_lengths: list[np.ndarray] = []
    sample_chars: list[np.ndarray] = []
    offset = 0
    for path, pf in zip(paths, files, strict=True):
        column = (
            "input_ids" if pretokenized else resolve_text_column(path, text_column, pf.schema_arrow.names)
        )
        if pretokenized and "input_ids" not in pf.schema_arrow.names:
            raise DataError(f"{path}: has no input_ids column but {paths[0]} does; inspect them separately")
        for rg in range(pf.metadata.num_row_groups):
            array = pf.read_row_group(rg, columns=[column]).column(0)
            k = len(array)
            if pretokenized:
                token_lengths.append(
                    pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
                )
            else:
                lengths = pc.fill_null(pc.utf8_length(array), 0).to_numpy(zero_copy_only=False)
                char_lengths.append(lengths)
                lo, hi = np.searchsorted(chosen, [offset, offset + k])
                local = chosen[lo:hi] - offset
                if encode is not None and len(local):
                    texts = [t or "" for t in array.take(pa.array(local)).to_pylist()]
                    token_lengths.append(np.asarray(encode(texts), dtype=np.int64))
                    sample_chars.append(lengths[local])
            offset += k

    chars = np.concatenate(char_lengths) if char_lengths else np.zeros(0, dtype=np.int64)
    tokens = np.concatenate(token_lengths) if token_lengths else None
    if not pretokenized:
        report["chars"] = length_stats(chars)
    if tokens is not None:
        stats = length_stats(tokens)
        if pretokenized:
            total_tokens = stats["total"]
        else:
            sampled_chars = int(np.concatenate(sample_chars).sum())
            chars_per_token = sampled_chars / max(1, stats["total"])
            stats["chars_per_token"] = round(chars_per_token, 3)
            total_tokens = round(int(chars.sum()) / chars_per_token) if chars_per_token else 0
        stats["sampled_rows"] = stats.pop("rows")
        stats.pop("total")
        stats["over_max_seq_len"] = round(float((tokens >= max_seq_len).mean()), 4) if len(tokens) else 0.0
        report["tokens"] = stats
        report["tokenizer"] = str(tokenizer_dir) if tokenizer_dir else None
        report["estimated_total_tokens"] = int(total_tokens)
        # Packing joins documents with one EOS each and cuts max_seq_len windows.
        packed_tokens = int(total_tokens) + rows
        sequences = packed_tokens // max_seq_len
        sequences_per_step = micro_batch_size * grad_accum * world_size
        steps = sequences // sequences_per_step
        report["epoch"] = {
            "max_seq_len": max_seq_len,
            "packed_tokens": packed_tokens,
            "sequences": sequences,
            "micro_batch_size": micro_batch_size,
            "grad_accum": grad_accum,
            "world_size": world_size,
            "sequences_per_step": sequences_per_step,
            "tokens_per_step": sequences_per_step * max_seq_len,
            "micro_batches_per_rank": sequences // (micro_batch_size * world_size),
            "steps": steps,
            "step_seconds": step_seconds,
            "hours": round(steps * step_seconds / 3600, 3),
        }
    return report


# ============================================================================ printing


def _print_tables(title: str, sections: list[tuple[str, list[tuple[str, Any]]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    for i, (section, rows) in enumerate(sections):
        if i:
            table.add_section()
        if section:
            table.add_row(f"[bold]{section}[/bold]", "")
        for name, value in rows:
            table.add_row(name, _fmt(value))
    Console().print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value):,}"
    return str(value)


def _print_sample(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"dstrain data sample ({report['mode']})", caption=f"{report['input']} -> {report['output']}"
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = report["before"], report["after"]
    for key, label in (
        ("rows", "rows"),
        ("mean", "mean chars"),
        ("p50", "median chars"),
        ("p95", "p95 chars"),
    ):
        table.add_row(label, _fmt(before[key]), _fmt(after[key]))
    table.add_row("duplicates removed", "", _fmt(report["duplicates_removed"]))
    table.add_section()
    for b in report["buckets"]:
        share_b = b["before"] / max(1, before["rows"])
        share_a = b["after"] / max(1, after["rows"])
        table.add_row(
            f"{b['chars']} chars", f"{b['before']:,} ({share_b:.1%})", f"{b['after']:,} ({share_a:.1%})"
        )
    Console().print(table)


def _print_inspect(r: dict[str, Any]) -> None:
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        (
            "input",
            [
                ("files", len(r["files"])),
                ("rows", r["rows"]),
                ("row groups", r["row_groups"]),
                ("bytes", r["bytes"]),
                ("columns", ", ".join(f"{k}: {v}" for k, v in r["columns"].items())),
                ("pre-tokenized", r["pretokenized"]),
            ],
        )
    ]
    if "chars" in r:
        c = r["chars"]
        sections.append(
            (
                "characters",
                [("total", c["total"]), ("mean", c["mean"]), ("median", c["p50"]), ("p95", c["p95"])],
            )
        )
    if "tokens" in r:
        t = r["tokens"]
        rows = [("sampled rows", t["sampled_rows"]), ("mean", t["mean"]), ("median", t["p50"])]
        rows += [("p95", t["p95"]), ("max", t["max"]), ("share >= max_seq_len", t["over_max_seq_len"])]
        if "chars_per_token" in t:
            rows.append(("chars per token", t["chars_per_token"]))
        rows.append(("estimated total tokens", r["estimated_total_tokens"]))
        sections.append(("tokens", rows))
        e = r["epoch"]
        sections.append(
            (
                "one epoch, packed",
                [
                    ("max_seq_len", e["max_seq_len"]),
                    ("sequences", e["sequences"]),
                    (
                        "micro x accum x world",
                        f"{e['micro_batch_size']} x {e['grad_accum']} x {e['world_size']}",
                    ),
                    ("tokens per step", e["tokens_per_step"]),
                    ("steps", e["steps"]),
                    ("hours at step_seconds", f"{e['hours']:,.2f} h at {e['step_seconds']} s/step"),
                ],
            )
        )
    else:
        sections.append(("tokens", [("token estimates", "pass --tokenizer DIR")]))
    _print_tables("dstrain data inspect", sections)


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``dstrain data`` argument parser (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="dstrain data", description="Prepare training data: convert, split, sample, inspect, tokenize."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def text_column(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--text-column",
            default=None,
            help="Column/field holding the document text (default: the first of text, content, completion).",
        )

    def row_group_size(p: argparse._ActionsContainer, default: int | None, text: str) -> None:
        # Every subcommand that writes parquet takes it; main() checks that it is >= 1.
        p.add_argument("--row-group-size", type=int, default=default, help=text)

    p = sub.add_parser("convert", help="json (array) / jsonl / csv / parquet -> parquet, streaming.")
    p.add_argument("input", type=Path, help="Input file (.json array or lines, .jsonl, .csv/.tsv, .parquet).")
    p.add_argument("output", type=Path, help="Output parquet file.")
    text_column(p)
    p.add_argument("--out-column", default="text", help="Name of the text column in the output.")
    row_group_size(p, 10_000, "Rows per parquet row group.")
    p.add_argument("--keep-columns", default="", help="Comma-separated extra columns/fields to carry over.")
    p.add_argument(
        "--skip-bad", action="store_true", help="Drop bad rows (counted and reported) instead of failing."
    )

    p = sub.add_parser("split", help="Split rows into train.parquet / validation.parquet by a seeded rule.")
    p.add_argument("input", type=Path, help="Input file (parquet; other formats are converted first).")
    p.add_argument(
        "--out-dir", type=Path, required=True, help="Directory for train.parquet and validation.parquet."
    )
    p.add_argument("--validation-fraction", type=float, default=0.1, help="Expected share of rows held out.")
    p.add_argument(
        "--seed", type=int, default=2222, help="Seed of the per-row hash that picks validation rows."
    )
    row_group_size(p, None, "Rows per row group (default: the input's).")
    text_column(p)
    p.add_argument("--json", action="store_true", help="Print the counts as JSON.")

    p = sub.add_parser("sample", help="Random or --smart (dedup + length-stratified) sample of rows.")
    p.add_argument("input", type=Path, help="Input file (parquet; other formats are converted first).")
    p.add_argument("output", type=Path, help="Output parquet file.")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--n", type=int, help="Rows to keep.")
    size.add_argument("--fraction", type=float, help="Share of the input rows to keep, in (0, 1].")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument(
        "--smart",
        action="store_true",
        help="Drop exact duplicates (NFKC, case and whitespace normalized) and sample each length bucket "
        "in proportion, every bucket represented.",
    )
    row_group_size(p, None, "Rows per row group (default: the input's).")
    text_column(p)
    p.add_argument("--json", action="store_true", help="Print the statistics as JSON.")

    p = sub.add_parser("inspect", help="Rows, columns, token lengths, tokens and steps per epoch.")
    p.add_argument(
        "input", type=Path, nargs="+", help="Files, directories or globs (parquet; others converted)."
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="Tokenizer directory for token statistics.")
    text_column(p)
    p.add_argument("--max-seq-len", type=int, default=512, help="Tokens per packed training sequence.")
    p.add_argument("--micro-batch-size", type=int, default=16, help="Sequences per micro-batch per rank.")
    p.add_argument("--grad-accum", type=int, default=8, help="Micro-batches per optimizer step.")
    p.add_argument("--world-size", type=int, default=1, help="Data-parallel ranks.")
    p.add_argument(
        "--step-seconds", type=float, default=1.0, help="Seconds per optimizer step, for the hours estimate."
    )
    p.add_argument("--sample-rows", type=int, default=2000, help="Rows tokenized to estimate token lengths.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the row sample.")
    p.add_argument("--json", action="store_true", help="Print machine-readable JSON instead of a table.")

    p = sub.add_parser("tokenize", help="Pre-tokenize into input_ids/doc_id parquet shards, in parallel.")
    p.add_argument("input", type=Path, nargs="+", help="Files, directories or globs, in order.")
    p.add_argument("--tokenizer", type=Path, required=True, help="Tokenizer directory.")
    p.add_argument(
        "--out-dir", type=Path, required=True, help="Directory for part-*.parquet and _manifest.json."
    )
    text_column(p)
    shards = p.add_argument_group(
        "shards", "About 2 output files (shards) per worker, of at most 100k rows, unless --rows-per-shard."
    )
    shards.add_argument("--workers", type=int, default=2, help="Tokenizer processes (0 = in this process).")
    shards.add_argument("--rows-per-shard", type=int, default=None, help="Rows per output file.")
    row_group_size(shards, 1000, "Rows per row group in the shards.")
    p.add_argument("--max-rows", type=int, default=None, help="Tokenize only the first N rows of the inputs.")
    p.add_argument("--overwrite", action="store_true", help="Replace shards already in --out-dir.")
    return parser


def _inputs(specs: Sequence[Path]) -> list[Path]:
    return resolve_inputs(specs)


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        keep = [c.strip() for c in args.keep_columns.split(",") if c.strip()]
        result = convert(
            args.input,
            args.output,
            args.text_column,
            args.out_column,
            args.row_group_size,
            keep,
            args.skip_bad,
        )
        _log(
            f"convert: {args.input} -> {args.output}: {result.rows:,} rows in {result.row_groups} row group(s), "
            f"text from {result.text_column!r}"
        )
        if result.skipped:
            _log(f"convert: skipped {result.skipped} bad row(s); first: {'; '.join(result.skipped_examples)}")
        return 0
    if args.command == "split":
        with parquet_inputs([args.input], args.text_column, keep_all=True) as (src,):
            counts = split(src, args.out_dir, args.validation_fraction, args.seed, args.row_group_size)
        if args.json:
            print(json.dumps(counts))
        else:
            _log(
                f"split: {counts['rows']:,} rows -> {args.out_dir}/train.parquet ({counts['train']:,}), "
                f"validation.parquet ({counts['validation']:,})"
            )
        return 0
    if args.command == "sample":
        with parquet_inputs([args.input], args.text_column, keep_all=True) as (src,):
            report = sample(
                src,
                args.output,
                args.n,
                args.fraction,
                args.seed,
                args.smart,
                args.text_column,
                args.row_group_size,
            )
        report["input"] = str(args.input)
        print(json.dumps(report)) if args.json else _print_sample(report)
        return 0
    if args.command == "inspect":
        files = _inputs(args.input)
        with parquet_inputs(files, args.text_column) as pq_files:
            report = inspect(
                pq_files,
                args.tokenizer,
                args.text_column,
                args.max_seq_len,
                args.micro_batch_size,
                args.grad_accum,
                args.world_size,
                args.step_seconds,
                args.sample_rows,
                args.seed,
            )
        report["files"] = [str(p) for p in files]
        if any(detect_format(p) != "parquet" for p in files):
            report["row_groups"] = None  # those of the temporary parquet copy mean nothing
            report["bytes"] = sum(p.stat().st_size for p in files)
        print(json.dumps(report)) if args.json else _print_inspect(report)
        return 0
    if args.command == "tokenize":
        from trainer.data.tools_tokenize import tokenize_files

        files = _inputs(args.input)
        with parquet_inputs(files, args.text_column) as pq_files:
            tokenize_files(
                pq_files,
                args.tokenizer,
                args.out_dir,
                args.text_column,
                args.workers,
                args.rows_per_shard,
                args.row_group_size,
                args.max_rows,
                args.overwrite,
                log=_log,
            )
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dstrain data``: run one subcommand; user errors print one line, exit 2.

    User errors: a :class:`DstrainError`, and an ``OSError`` on a path the user gave (a missing
    directory, no permission, a full disk), which is about the environment, not a bug.
    """
    args = build_parser().parse_args(argv)
    try:
        size = getattr(args, "row_group_size", None)
        if size is not None and size < 1:
            raise DataError(f"--row-group-size must be >= 1, got {size}")
        return _run(args)
    except DstrainError as e:
        message = str(e)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}"
    return user_error(message, f"dstrain data {args.command}")


if __name__ == "__main__":
    sys.exit(main())
