"""Pre-tokenize text once into parquet shards (``dstrain data tokenize``).

Output, in ``out_dir``:

- ``part-00000.parquet`` ... with columns ``input_ids`` (list<int32>: the raw token ids, no
  special tokens, no EOS; the loader appends EOS when it packs) and ``doc_id`` (int64: the
  source's ``doc_id`` when it has one, else the row's index over the ordered inputs);
  each shard's parquet metadata carries ``dstrain.tokenizer`` (the tokenizer facts below);
- ``_manifest.json``: tokenizer (name, class, vocab size, EOS/BOS ids), source files and rows,
  shards with their rows and tokens, totals. The loader recognises pre-tokenized files by the
  ``input_ids`` column; the manifest is for people and for checks (same vocab size as the run).

Work is split into shards of consecutive rows; a process pool tokenizes shards in parallel.
Each worker holds one row group and one encode batch at a time, so memory does not grow with
the input. Workers get the fast tokenizer as its JSON (``tokenizers.Tokenizer.from_str``),
so they start without importing transformers; the ids are checked against
:func:`trainer.data.tokenize.encode_texts` (the loader's definition) on the first rows before
the workers start, and the workers fall back to that function when they differ.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.sources import DOC_ID_COLUMN, TOKENS_COLUMN, open_parquet
from trainer.data.tokenize import encode_texts, tokenizer_fingerprint
from trainer.data.tools_io import RowGroupWriter, resolve_text_column
from trainer.errors import DataError

MANIFEST = "_manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
ENCODE_BATCH_ROWS = 256
# The schema the loader reads (trainer.data.sources.write_tokenized_shard writes the same).
TOKENIZED_SCHEMA = pa.schema([(TOKENS_COLUMN, pa.list_(pa.int32())), (DOC_ID_COLUMN, pa.int64())])


def tokenizer_facts(tokenizer: Any, tokenizer_dir: str | Path) -> dict[str, Any]:
    """What a consumer of the shards must agree with: name, class, vocab size, special ids."""
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or tokenizer_dir),
        "class": type(tokenizer).__name__,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "add_special_tokens": False,
        "eos_appended": False,
    }


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Piece:
    """Rows [start, start + length) of one row group, the first being global row ``global_start``."""

    file: str
    row_group: int
    start: int
    length: int
    global_start: int


@dataclass(frozen=True)
class _ShardTask:
    index: int
    path: str
    pieces: tuple[_Piece, ...]
    text_columns: dict[str, str]
    id_columns: dict[str, bool]
    row_group_size: int
    metadata: dict[str, str]


_ENCODER: Callable[[list[str]], list[list[int]]] | None = None


def _init_worker(tokenizer_json: str | None, tokenizer_dir: str, parallel: bool) -> None:
    """Build this process's encoder once (fast tokenizers from JSON; slow ones via transformers)."""
    global _ENCODER
    if not parallel:
        # Several worker processes already use the cores; Rust threads on top would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_json)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

        def _encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode(texts, add_special_tokens=False)]

    else:
        from trainer.tokenizer import load_tokenizer

        hf_tokenizer = load_tokenizer(tokenizer_dir)

        def _encode(texts: list[str]) -> list[list[int]]:
            return encode_texts(hf_tokenizer, texts)

    _ENCODER = _encode


def encode_to_arrow(texts: list[str], encode: Callable[[list[str]], list[list[int]]]) -> pa.ListArray:
    """Token ids of ``texts`` as one list<int32> array (built from flat numpy, not per-row lists)."""
    ids = encode(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _tokenize_shard(task: _ShardTask) -> dict[str, Any]:
    assert _ENCODER is not None, "_init_worker was not called"
    started = time.perf_counter()
    tokens = 0
    files: dict[str, pq.ParquetFile] = {}
    with RowGroupWriter(task.path, task.row_group_size, TOKENIZED_SCHEMA, task.metadata) as writer:
        for piece in task.pieces:
            pf = files.get(piece.file)
            if pf is None:
                files.clear()  # one open file at a time
                pf = files[piece.file] = open_parquet(str(piece.file))
            text_column = task.text_columns[piece.file]
            has_id = task.id_columns[piece.file]
            columns = [text_column, DOC_ID_COLUMN] if has_id else [text_column]
            table = pf.read_row_group(piece.row_group, columns=columns).slice(piece.start, piece.length)
            for offset in range(0, table.num_rows, ENCODE_BATCH_ROWS):
                part = table.slice(offset, ENCODE_BATCH_ROWS)
                texts = part.column(text_column).to_pylist()
                if any(t is None for t in texts):
                    row = piece.global_start + offset + texts.index(None)
                    raise DataError(
                        f"{piece.file}: row group {piece.row_group} (global row {row}): "
                        f"column {text_column!r} is null; drop null rows (dstrain data convert --skip-bad)"
                    )
                input_ids = encode_to_arrow(texts, _ENCODER)
                if has_id:
                    doc_id = part.column(DOC_ID_COLUMN).combine_chunks()
                    if doc_id.null_count:
                        raise DataError(
                            f"{piece.file}: row group {piece.row_group}: column 'doc_id' has nulls; "
                            "fill them or drop the column"
                        )
                    doc_id = doc_id.cast(pa.int64())
                else:
                    first = piece.global_start + offset
                    doc_id = pa.array(np.arange(first, first + part.num_rows, dtype=np.int64))
                tokens += len(input_ids.values)
                writer.write(pa.Table.from_arrays([input_ids, doc_id], schema=TOKENIZED_SCHEMA))
    return {
        "file": Path(task.path).name,
        "rows": writer.rows,
        "tokens": tokens,
        "row_groups": writer.row_groups,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ----------------------------------------------------------------------------- driver


def _plan_shards(files: Sequence[Path], rows_per_shard: int, max_rows: int | None) -> list[list[_Piece]]:
    """Cut the ordered inputs' row groups into shards of ``rows_per_shard`` consecutive rows."""
    shards: list[list[_Piece]] = []
    current: list[_Piece] = []
    in_shard = 0
    global_row = 0
    limit = max_rows if max_rows is not None else float("inf")
    for path in files:
        meta = open_parquet(str(path)).metadata
        for rg in range(meta.num_row_groups):
            rg_rows = meta.row_group(rg).num_rows
            start = 0
            while start < rg_rows and global_row < limit:
                take = int(min(rg_rows - start, rows_per_shard - in_shard, limit - global_row))
                current.append(_Piece(str(path), rg, start, take, global_row))
                start += take
                in_shard += take
                global_row += take
                if in_shard == rows_per_shard:
                    shards.append(current)
                    current, in_shard = [], 0
    if current:
        shards.append(current)
    return shards


def tokenize_files(
    files: Sequence[Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    text_column: str | None = None,
    workers: int = 2,
    rows_per_shard: int | None = None,
    row_group_size: int = 1000,
    max_rows: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenize parquet ``files`` (in order) into shards in ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if row_group_size < 1:
        raise DataError(f"--row-group-size must be >= 1, got {row_group_size}")
    old = sorted(out_dir.glob("part-*.parquet")) + sorted(out_dir.glob(MANIFEST))
    if old and not overwrite:
        raise DataError(
            f"{out_dir}: already holds tokenized shards ({old[0].name}, ...); "
            "pass --overwrite or choose another --out-dir"
        )
    text_columns: dict[str, str] = {}
    id_columns: dict[str, bool] = {}
    sources = []
    total_rows = 0
    for path in files:
        pf = open_parquet(str(path))
        names = pf.schema_arrow.names
        text_columns[str(path)] = resolve_text_column(path, text_column, names)
        id_columns[str(path)] = DOC_ID_COLUMN in names
        sources.append({"path": str(path), "rows": pf.metadata.num_rows, "bytes": path.stat().st_size})
        total_rows += pf.metadata.num_rows
    rows = min(total_rows, max_rows) if max_rows is not None else total_rows
    if rows == 0:
        raise DataError(f"{', '.join(map(str, files))}: no rows to tokenize")
    if rows_per_shard is None:
        # Enough shards to keep every worker busy, none so big that a shard takes ages.
        rows_per_shard = max(1, min(100_000, -(-rows // max(1, 2 * workers))))
    if rows_per_shard < 1:
        raise DataError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")

    from trainer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    facts = tokenizer_facts(tokenizer, tokenizer_dir)
    plan = _plan_shards(files, rows_per_shard, max_rows)
    tokenizer_json = _backend_json_if_equivalent(tokenizer, plan[0][0], text_columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()
    metadata = {"dstrain.tokenizer": json.dumps(facts)}
    tasks = [
        _ShardTask(
            i,
            str(out_dir / SHARD_PATTERN.format(i)),
            tuple(p),
            text_columns,
            id_columns,
            row_group_size,
            metadata,
        )
        for i, p in enumerate(plan)
    ]
    log(f"tokenize: {rows} rows from {len(files)} file(s) -> {len(tasks)} shard(s), {workers} worker(s)")
    started = time.perf_counter()
    init_args = (tokenizer_json, str(tokenizer_dir), workers <= 1)
    try:
        if workers == 0:
            _init_worker(*init_args)
            shards = _collect(map(_tokenize_shard, tasks), len(tasks), log)
        else:
            # spawn: never fork a parent whose arrow/tokenizer threads may hold locks.
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=init_args) as pool:
                shards = _collect(pool.imap(_tokenize_shard, tasks), len(tasks), log)
    except BaseException:
        for task in tasks:  # no manifest, no shards: a failed run leaves nothing to mistake for data
            Path(task.path).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in shards)
    manifest = {
        "format": "dstrain-pretokenized",
        "version": 1,
        "tokenizer": facts,
        "text_columns": text_columns,
        "sources": sources,
        "rows": sum(s["rows"] for s in shards),
        "tokens": tokens,
        "shards": shards,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    log(
        f"tokenize: wrote {manifest['rows']} rows, {tokens} tokens in {len(shards)} shard(s) to {out_dir} "
        f"({seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return manifest


def _backend_json_if_equivalent(tokenizer: Any, piece: _Piece, text_columns: dict[str, str]) -> str | None:
    """The fast tokenizer's JSON for the workers when its raw encode gives the same ids as
    :func:`trainer.data.tokenize.encode_texts` (the loader's definition) on the first rows;
    else None, and the workers load the Hugging Face tokenizer and call encode_texts."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    table = open_parquet(str(piece.file)).read_row_group(piece.row_group, columns=[text_columns[piece.file]])
    texts = [t for t in table.column(0).slice(0, 64).to_pylist() if t is not None]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    raw = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer_json if raw == encode_texts(tokenizer, texts) else None


def _collect(results, total: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    shards = []
    for i, shard in enumerate(results, start=1):
        shards.append(shard)
        log(f"tokenize: shard {i}/{total} {shard['file']}: {shard['rows']} rows, {shard['tokens']} tokens")
    return shards
