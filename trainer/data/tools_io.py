"""Streaming readers and writers behind ``dstrain data``: json/jsonl/csv/parquet in, parquet out.

Every reader holds at most one chunk of the input plus one batch of rows, so memory does not
grow with the file size. A JSON array is read with an incremental parser over
``json.JSONDecoder.raw_decode`` (the stdlib has no streaming JSON parser and ``ijson`` is
not a dependency). Bad rows raise a :class:`DataError` naming the file and line (or row),
unless the caller asks to skip them, in which case they are counted in :class:`BadRows`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.sources import SUFFIXES, json_holds_lines, open_parquet
from trainer.errors import DataError

Format = Literal["parquet", "jsonl", "json", "csv"]

#: Text columns tried, in order, when ``--text-column`` is not given.
TEXT_COLUMN_CANDIDATES = ("text", "content", "completion")
DOC_ID = "doc_id"

#: What the trainer reads (less Arrow files), plus csv, which only the tools convert.
_SUFFIXES: dict[str, Format] = {
    **{suffix: kind for suffix, kind in SUFFIXES.items() if kind != "arrow"},
    ".csv": "csv",
    ".tsv": "csv",
}
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def detect_format(path: str | Path) -> Format:
    """The format of ``path`` from its suffix; a ``.json`` file that starts with ``{`` is JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use one of "
            f"{', '.join(sorted(_SUFFIXES))} (rename the file to say what it holds)"
        )
    return "jsonl" if fmt == "json" and json_holds_lines(path) else fmt


def resolve_inputs(specs: Sequence[str | Path], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files named by paths, globs or directories (a directory means its data files, sorted).

    Like :func:`trainer.data.sources.resolve_paths`, plus csv/tsv (which only the tools read).
    """
    suffixes = tuple(suffixes or _SUFFIXES)
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            # _manifest.json, .tmp files: bookkeeping, not data (the loader skips them too).
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith(("_", "."))
            )
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(spec)))
            if not matches:
                raise DataError(f"{spec}: no such file, directory or glob match; check the path")
            files.extend(m for m in matches if m.is_file())
    return files


# ----------------------------------------------------------------------------- bad rows


@dataclass
class BadRows:
    """Rows dropped under ``--skip-bad``: how many, and the first few reasons (file:line: why)."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        """Record a bad row, or raise if bad rows are not being skipped."""
        if not self.skip:
            raise DataError(f"{where}: {reason}; fix the row or pass --skip-bad to drop bad rows")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One input row: its 0-based position in the file, the line it starts on, its value."""

    index: int
    line: int
    value: Any


def iter_json_array(
    path: str | Path, chunk_chars: int = 1 << 20, max_element_chars: int = 1 << 28
) -> Iterator[Record]:
    """Yield the elements of a top-level JSON array one at a time, reading ``chunk_chars`` at a time.

    A syntax error inside the array cannot be skipped (there is no safe place to resume), so it
    always raises, naming the line; a file of one JSON object per line should be ``.jsonl``.
    """
    decoder = json.JSONDecoder()
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:
        buf = ""
        pos = 0
        eof = False
        # Line bookkeeping: ``line`` is the 1-based line number of buf[line_pos].
        line, line_pos = 1, 0

        def line_at(p: int) -> int:
            nonlocal line, line_pos
            line += buf.count("\n", line_pos, p)
            line_pos = p
            return line

        def refill(min_chars: int) -> None:
            nonlocal buf, pos, eof, line_pos
            line_at(pos)
            buf, line_pos, pos = buf[pos:], 0, 0
            try:
                more = f.read(max(chunk_chars, min_chars))
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: after line {line}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8"
                ) from e
            eof = not more
            buf += more

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = _WHITESPACE.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                refill(0)

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(
                f"{path}: line {line_at(pos)}: expected a JSON array '[' at the start; "
                "for one JSON object per line name the file .jsonl"
            )
        pos += 1
        index = 0
        need_comma = False
        while True:
            skip_ws()
            if pos >= len(buf):
                raise DataError(f"{path}: line {line_at(pos)}: the JSON array is not closed by ']'")
            if buf[pos] == "]":
                return
            if need_comma:
                if buf[pos] != ",":
                    raise DataError(
                        f"{path}: line {line_at(pos)}: expected ',' or ']' after array element {index - 1}"
                    )
                pos += 1
                need_comma = False
                skip_ws()
            start = pos
            try:
                value, end = decoder.raw_decode(buf, pos)
                # A number cut by the chunk boundary ("3." of "3.25") decodes "successfully":
                # anything ending this close to the end of the buffer is read again with more text.
                incomplete = not eof and end >= len(buf) - 64
            except json.JSONDecodeError as e:
                # Errors at the end of the buffer (or unterminated strings) may just need more text.
                incomplete = not eof and (e.pos >= len(buf) - 64 or e.msg.startswith("Unterminated"))
                if not incomplete:
                    raise DataError(
                        f"{path}: line {line_at(e.pos)}: invalid JSON in array element {index} "
                        f"({e.msg}); fix the file, or convert it to JSON lines"
                    ) from e
            if incomplete:
                pending = len(buf) - start
                if pending > max_element_chars:
                    raise DataError(
                        f"{path}: line {line_at(start)}: array element {index} is over "
                        f"{max_element_chars} characters; split the document or fix the JSON"
                    )
                pos = start
                refill(pending)  # double the read so a huge element costs linear time
                continue
            yield Record(index, line_at(start), value)
            index += 1
            need_comma = True
            pos = end
            if pos > chunk_chars:  # drop the consumed text so the buffer stays about one chunk
                line_at(pos)
                buf, line_pos, pos = buf[pos:], 0, 0


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    """Yield one record per non-blank line; an unparsable line is a Record whose value is the error."""
    with open(path, "rb") as f:
        index = 0
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                value: Any = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                value = _Invalid(f"invalid JSON ({getattr(e, 'msg', None) or e})")
            yield Record(index, line_no, value)
            index += 1


def iter_csv(path: str | Path) -> Iterator[Record]:
    """Yield one dict per CSV (or TSV) data row; ``line`` is the line the row starts on."""
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        index = 0
        start = 2  # line 1 is the header
        try:
            for row in reader:
                if None in row:
                    value: Any = _Invalid(f"{len(row[None])} more fields than the header")
                else:
                    value = row
                yield Record(index, start, value)
                start = reader.line_num + 1
                index += 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: line {reader.line_num + 1}: unreadable CSV ({e}); fix the file") from e


@dataclass
class _Invalid:
    reason: str


def iter_records(path: str | Path, fmt: Format | None = None) -> Iterator[Record]:
    """Records of a json/jsonl/csv file (parquet is read by :func:`iter_tables` in batches)."""
    fmt = fmt or detect_format(path)
    if fmt == "json":
        return iter_json_array(path)
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "csv":
        return iter_csv(path)
    raise ValueError(f"iter_records does not read {fmt}")


# ----------------------------------------------------------------------------- columns


def iter_parquet_batches(
    pf: pq.ParquetFile, batch_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``pf``, one row group at a time: ``ParquetFile.iter_batches`` over the
    whole file reads ahead several row groups (measured: ~200 MB of Arrow memory for a file of
    14 MB row groups, against ~36 MB this way)."""
    for rg in range(pf.metadata.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=columns)


def parquet_columns(path: str | Path) -> list[str]:
    """Column names of a parquet file (from its footer; nothing else is read)."""
    return open_parquet(str(path)).schema_arrow.names


def first_record_fields(path: str | Path, fmt: Format) -> list[str]:
    """Field names of the first well-formed record of a json/jsonl/csv file."""
    for rec in iter_records(path, fmt):
        if isinstance(rec.value, dict):
            return list(rec.value)
    return []


def resolve_text_column(path: str | Path, text_column: str | None, columns: Sequence[str]) -> str:
    """``text_column`` if the file has it, else the first of ``TEXT_COLUMN_CANDIDATES`` it has."""
    if text_column is not None:
        if text_column not in columns:
            raise DataError(
                f"{path}: no column {text_column!r} (columns: {', '.join(columns) or 'none'}); "
                "pass --text-column with one of them"
            )
        return text_column
    for name in TEXT_COLUMN_CANDIDATES:
        if name in columns:
            return name
    raise DataError(
        f"{path}: none of the columns {', '.join(columns) or '(none)'} looks like text; "
        "pass --text-column NAME"
    )


def source_columns(path: str | Path, fmt: Format | None = None) -> list[str]:
    """Column (or first-record field) names of any supported input."""
    fmt = fmt or detect_format(path)
    return parquet_columns(path) if fmt == "parquet" else first_record_fields(path, fmt)


# ----------------------------------------------------------------------------- tables


def iter_tables(
    path: str | Path,
    text_column: str | None = None,
    out_column: str = "text",
    keep_columns: Sequence[str] = (),
    batch_rows: int = 10_000,
    bad: BadRows | None = None,
) -> Iterator[pa.Table]:
    """Stream ``path`` as tables of columns ``doc_id`` (int64), ``out_column`` (string), ``keep_columns``.

    ``doc_id`` comes from the input's ``doc_id`` column when it has one, else it is the row's
    0-based position in the file (bad rows keep their position, so ids trace back to the input).
    """
    bad = bad if bad is not None else BadRows()
    path = Path(path)
    fmt = detect_format(path)
    columns = source_columns(path, fmt)
    text_column = resolve_text_column(path, text_column, columns)
    for name in keep_columns:
        if name not in columns:
            raise DataError(
                f"{path}: --keep-columns names {name!r}, which is not a column "
                f"(columns: {', '.join(columns)})"
            )
        if name in (out_column, DOC_ID):
            raise DataError(f"{path}: --keep-columns {name!r} clashes with an output column; drop it")
    has_doc_id = DOC_ID in columns
    if fmt == "parquet":
        yield from _parquet_tables(path, text_column, out_column, keep_columns, batch_rows, bad, has_doc_id)
    else:
        yield from _record_tables(
            path, fmt, text_column, out_column, keep_columns, batch_rows, bad, has_doc_id
        )


def _parquet_tables(path, text_column, out_column, keep_columns, batch_rows, bad, has_doc_id):
    pf = open_parquet(str(path))
    field_type = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise DataError(
            f"{path}: column {text_column!r} is {field_type}, not text; pass --text-column with a string column"
        )
    read = [text_column, *keep_columns] + ([DOC_ID] if has_doc_id else [])
    offset = 0
    for batch in iter_parquet_batches(pf, batch_rows, list(dict.fromkeys(read))):
        n = batch.num_rows
        text = batch.column(text_column)
        doc_id = (
            _as_int64(batch.column(DOC_ID), path)
            if has_doc_id
            else pa.array(range(offset, offset + n), pa.int64())
        )
        arrays = [doc_id, text.cast(pa.string())] + [batch.column(k) for k in keep_columns]
        table = pa.Table.from_arrays(arrays, names=[DOC_ID, out_column, *keep_columns])
        if text.null_count:
            valid = pc.is_valid(text)
            for i in pc.indices_nonzero(pc.invert(valid)).to_pylist():
                bad.add(f"{path}: row {offset + i}", f"column {text_column!r} is null")
            table = table.filter(valid)
        offset += n
        yield table


def _as_int64(array: pa.Array, path: Path) -> pa.Array:
    if not pa.types.is_integer(array.type) or array.null_count:
        raise DataError(f"{path}: column 'doc_id' must be non-null integers; drop or fix the column")
    return array.cast(pa.int64())


def _record_tables(path, fmt, text_column, out_column, keep_columns, batch_rows, bad, has_doc_id):
    doc_ids: list[int] = []
    texts: list[str] = []
    kept: list[list[Any]] = [[] for _ in keep_columns]
    types: list[pa.DataType | None] = [None] * len(keep_columns)

    def flush() -> pa.Table:
        arrays = [pa.array(doc_ids, pa.int64()), pa.array(texts, pa.string())]
        for j, (name, values) in enumerate(zip(keep_columns, kept, strict=True)):
            try:
                arr = pa.array(values, types[j]) if types[j] is not None else pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise DataError(
                    f"{path}: field {name!r} changes type near row {doc_ids[-1]} ({e}); "
                    "make the field one type or leave it out of --keep-columns"
                ) from e
            if types[j] is None and not pa.types.is_null(arr.type):
                types[j] = arr.type
            if pa.types.is_null(arr.type):  # all null so far: a string column, not a null one
                arr = arr.cast(pa.string())
            arrays.append(arr)
        table = pa.Table.from_arrays(arrays, names=[DOC_ID, out_column, *keep_columns])
        doc_ids.clear()
        texts.clear()
        for values in kept:
            values.clear()
        return table

    for rec in iter_records(path, fmt):
        where = f"{path}: line {rec.line}"
        value = rec.value
        if isinstance(value, _Invalid):
            bad.add(where, value.reason)
            continue
        if not isinstance(value, dict):
            bad.add(where, f"expected a JSON object, got {type(value).__name__}")
            continue
        text = value.get(text_column)
        if not isinstance(text, str):
            reason = "missing field" if text is None else f"non-text ({type(text).__name__}) field"
            bad.add(where, f"{reason} {text_column!r}")
            continue
        if has_doc_id:
            doc_id = value.get(DOC_ID)
            if isinstance(doc_id, str) and doc_id.strip().lstrip("-").isdigit():
                doc_id = int(doc_id)  # csv gives strings
            if not isinstance(doc_id, int) or isinstance(doc_id, bool):
                bad.add(where, f"field 'doc_id' is {doc_id!r}, not an integer")
                continue
        else:
            doc_id = rec.index
        doc_ids.append(doc_id)
        texts.append(text)
        for values, name in zip(kept, keep_columns, strict=True):
            values.append(value.get(name))
        if len(texts) >= batch_rows:
            yield flush()
    if texts:
        yield flush()


class RowGroupWriter:
    """Write tables to one parquet file in row groups of exactly ``row_group_size`` rows (the last may
    be short). The file appears under its name only when :meth:`close` succeeds (written to a
    temporary name, then renamed), so a crash never leaves a truncated file behind.
    """

    def __init__(
        self,
        path: str | Path,
        row_group_size: int,
        schema: pa.Schema | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if row_group_size < 1:
            raise DataError(f"--row-group-size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.row_group_size = row_group_size
        self.rows = 0
        self.row_groups = 0
        self._schema = schema
        self._metadata = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        """Buffer ``table`` and write every full row group."""
        if table.num_rows == 0:
            if self._schema is None:
                self._schema = table.schema
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush(final=False)

    def default_schema(self, schema: pa.Schema) -> None:
        """The schema to use if no rows were written (an empty file still has columns)."""
        if self._schema is None:
            self._schema = schema

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        full = table.num_rows if final else (table.num_rows // self.row_group_size) * self.row_group_size
        if full:
            self._write_rows(table.slice(0, full))
        rest = table.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _write_rows(self, table: pa.Table) -> None:
        if self._writer is None:
            schema = self._schema or table.schema
            if self._metadata:
                schema = schema.with_metadata({**(schema.metadata or {}), **self._metadata})
            self._schema = schema
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, schema)
        if table.schema != self._schema:
            try:
                table = table.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as e:
                raise DataError(
                    f"{self.path}: rows do not fit the file's schema ({e}); make each column one type"
                ) from e
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += table.num_rows
        self.row_groups += -(-table.num_rows // self.row_group_size)

    def close(self) -> None:
        """Write the last row group and move the file into place (an empty input gives an empty file)."""
        self._flush(final=True)
        if self._writer is None:
            if self._schema is None:
                raise DataError(f"{self.path}: nothing to write (no rows and no schema)")
            self._write_rows_empty()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def _write_rows_empty(self) -> None:
        schema = self._schema
        if self._metadata:
            schema = schema.with_metadata({**(schema.metadata or {}), **self._metadata})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
