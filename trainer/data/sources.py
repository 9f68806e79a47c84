"""Sources: resolve paths to files, describe their row groups, and read rows back by position.

A file is a list of *groups*, the unit of I/O and of sharding:

- parquet: its row groups (from the footer; nothing else is read up front);
- jsonl / json: virtual groups of :data:`JSON_ROWS_PER_GROUP` records found by one streaming
  pass at start-up that records the byte offset of every group's first record. The pass holds one
  record at a time (a JSON array is parsed incrementally with ``json.JSONDecoder.raw_decode``),
  so a json file is never loaded whole; reading a group later seeks to its offset. Nothing is
  converted or written to disk. The pass costs one read of the file per process at start-up, so
  convert large json corpora to parquet (``dstrain data``) first.

Document ids: a ``doc_id`` integer column (field) is used when the file has one; otherwise the
id is the *global row index*: the row's position in the concatenation of all files in the
resolved file order (files in the order given; globs and directories expanded sorted).

Hugging Face ``datasets`` sources keep every guarantee above because they are read as files:
a directory written by ``Dataset.save_to_disk`` (it has a ``state.json``), or ``hf:ID[:split]``
(``datasets.load_dataset`` downloads and caches it as Arrow files, on machines with internet),
resolves to its Arrow cache files; each Arrow record batch is a group, read through a memory
map. Streaming hub datasets (``streaming=True``) are not used: they offer no row-level
sharding or O(1) resume, so download (or convert to parquet) first.

Pre-tokenized parquet (an ``input_ids`` list column, as written by :func:`write_tokenized_shard`
and ``dstrain data tokenize``) is read as token ids and skips tokenization.

Columns (:class:`Columns`, from the formatter): one string column whose values are handed out as
they are (``data.text_column``, the pretraining path), or several fields handed out as one dict
per row (templates, SFT records: nested lists and structs come back as Python lists and dicts).
Required columns must exist in every file (the parquet schema, or the first json record); an
optional column a file lacks reads as None.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.errors import DataError

FileKind = Literal["parquet", "jsonl", "json", "arrow"]

#: Records per virtual group of a json/jsonl file (the unit of sharding for those files).
JSON_ROWS_PER_GROUP = 1024
#: Rows per record batch read from a parquet row group.
READ_BATCH_ROWS = 512
#: Bytes read at a time while scanning json files.
_JSON_CHUNK_BYTES = 1 << 20
TOKENS_COLUMN = "input_ids"
DOC_ID_COLUMN = "doc_id"

SUFFIXES: dict[str, FileKind] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".arrow": "arrow",
}
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Group:
    """One row group (parquet) or block of records (json): ``rows`` rows from ``offset``."""

    rows: int
    offset: int = 0  # byte offset of the first record (json); row-group index is the list index
    first_row: int = 0  # row index within the file of the first row (for error messages)


@dataclass(frozen=True)
class Columns:
    """What to read from each row: ``names`` (``text``: one string column, read as its values; else
    read as one dict per row), of which ``required`` must be in every file. ``flags`` names the
    config key behind each name and ``context`` the format, for error messages."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    flags: tuple[str, ...]
    text: bool
    context: str = ""

    @classmethod
    def text_column(cls, name: str) -> Columns:
        return cls((name,), (name,), ("--data.text_column",), text=True)

    def read(self) -> str | tuple[str, ...]:
        """What :func:`read_group` takes: the column name (values) or the names (dicts)."""
        return self.names[0] if self.text else self.names

    def missing(self, path: Path, name: str, have: Sequence[str], what: str) -> DataError:
        flag = self.flags[self.names.index(name)]
        fix = (
            f"fix the {{{name}}} placeholder of {flag}"
            if flag.endswith("_template")
            else f"set {flag} to the one holding {'the text' if self.text else 'it'}"
        )
        context = f", or check {self.context}" if self.context else ""
        return DataError(f"{path} has no {what} {name!r} ({what}s: {', '.join(have)}); {fix}{context}")


@dataclass(frozen=True)
class SourceFile:
    """A resolved data file: its kind, its groups and what identifies its contents."""

    path: str
    kind: FileKind
    tokenized: bool  # parquet with an input_ids column: no tokenization
    has_doc_id: bool
    groups: tuple[Group, ...]
    size: int
    mtime_ns: int
    fields: tuple[str, ...] = ()  # the requested columns this file has (parquet/arrow; json: all)

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this file in a resume state (path, size, mtime, rows)."""
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "rows": self.rows}


def resolve_paths(specs: Sequence[str], key: str) -> list[Path]:
    """Files named by paths, globs (``**`` allowed) or directories (their data files, recursively, sorted).

    Order is kept as given; duplicates are read once. ``key`` (``data.train``) names the flag in errors.
    """
    if not specs:
        raise DataError(f"--{key} is empty: give parquet/jsonl/json files, globs or directories")
    out: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if str(spec).startswith(HUB_PREFIX):
            out.extend(hub_dataset_files(str(spec), key))
        elif path.is_dir() and (path / "state.json").is_file():
            out.extend(saved_dataset_files(path, key))
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith((".", "_"))
            )
            if not found:
                raise DataError(f"--{key}: directory {path} holds no .parquet/.jsonl/.json files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(str(spec)):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"--{key}: glob {spec!r} matched no files; check the pattern")
            out.extend(matches)
        else:
            raise DataError(f"--{key}: {spec} does not exist; fix the path")
    seen: set[str] = set()
    unique = []
    for p in out:
        absolute = Path(os.path.abspath(p))  # the resume fingerprint must not depend on the cwd
        if str(absolute) not in seen:
            seen.add(str(absolute))
            unique.append(absolute)
    return unique


def saved_dataset_files(path: Path, key: str) -> list[Path]:
    """The Arrow files of a ``Dataset.save_to_disk`` directory, in the dataset's row order."""
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--{key}: {path}/state.json is not a datasets save_to_disk state ({exc})") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"--{key}: {path} lists {missing[0].name}, which is missing; re-save the dataset")
    return files


def hub_dataset_files(spec: str, key: str) -> list[Path]:
    """``hf:ID[:split]`` -> the Arrow cache files of ``datasets.load_dataset(ID, split=split)``."""
    name, _, split = spec[len(HUB_PREFIX) :].partition(":")
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split or "train")
    except Exception as exc:  # network, missing dataset, bad split: all the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--{key}: {spec} could not be loaded with datasets: {first}") from None
    return [Path(f["filename"]) for f in dataset.cache_files]


def open_arrow(path: str) -> pa.ipc.RecordBatchStreamReader:
    """A memory-mapped reader of a datasets Arrow file (IPC stream format)."""
    try:
        return pa.ipc.open_stream(pa.memory_map(path))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path} is not a readable Arrow stream file ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "re-save the dataset or convert it to parquet"
        ) from None


def file_kind(path: Path) -> FileKind:
    """parquet / jsonl / json from the suffix; a ``.json`` file starting with ``{`` is JSON lines."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .parquet, .jsonl or .json")
    return "jsonl" if kind == "json" and json_holds_lines(path) else kind


def json_holds_lines(path: Path) -> bool:
    """Whether a ``.json`` file is JSON lines (starts with ``{``) rather than one JSON array."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path} is not a readable parquet file ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "re-export it or remove it from the file list"
        ) from None


def describe_file(path: Path, columns: Columns | str) -> SourceFile:
    """Read a file's metadata (parquet footer, or one streaming pass over json) into a SourceFile.

    ``columns``: what will be read (a plain name is one text column)."""
    if isinstance(columns, str):
        columns = Columns.text_column(columns)
    kind = file_kind(path)
    stat = path.stat()
    if kind == "parquet":
        pf = open_parquet(str(path))
        names = pf.schema_arrow.names
        tokenized = TOKENS_COLUMN in names
        _check_columns(path, pf.schema_arrow, columns)
        has_doc_id = DOC_ID_COLUMN in names
        if has_doc_id and not pa.types.is_integer(pf.schema_arrow.field(DOC_ID_COLUMN).type):
            raise DataError(
                f"{path}: column {DOC_ID_COLUMN!r} has type {pf.schema_arrow.field(DOC_ID_COLUMN).type}, "
                "not integer; rename it or store integer ids"
            )
        groups, first = [], 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            groups.append(Group(rows=n, first_row=first))
            first += n
        present = tuple(c for c in columns.names if c in names)
        return SourceFile(
            str(path), kind, tokenized, has_doc_id, tuple(groups), stat.st_size, stat.st_mtime_ns, present
        )
    if kind == "arrow":
        reader = open_arrow(str(path))
        schema = reader.schema
        _check_columns(path, schema, columns)
        groups, first = [], 0
        for batch in reader:  # memory-mapped: only batch headers are touched
            groups.append(Group(rows=batch.num_rows, first_row=first))
            first += batch.num_rows
        tokenized = TOKENS_COLUMN in schema.names
        has_doc_id = DOC_ID_COLUMN in schema.names
        present = tuple(c for c in columns.names if c in schema.names)
        return SourceFile(
            str(path), kind, tokenized, has_doc_id, tuple(groups), stat.st_size, stat.st_mtime_ns, present
        )
    try:
        groups, has_doc_id = _index_json(path, kind, columns)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    return SourceFile(
        str(path), kind, False, has_doc_id, tuple(groups), stat.st_size, stat.st_mtime_ns, columns.names
    )


def _check_columns(path: Path, schema: pa.Schema, columns: Columns) -> None:
    names = schema.names
    if TOKENS_COLUMN in names:
        return
    for name in columns.required:
        if name not in names:
            raise columns.missing(path, name, names, "column")
    if not columns.text:
        return
    text_column = columns.names[0]
    col_type = schema.field(text_column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(
            f"{path}: column {text_column!r} has type {col_type}, not string; "
            "set --data.text_column to the column holding the text"
        )


# ----------------------------------------------------------------------------------------- json


def _iter_jsonl(path: str, offset: int = 0, first_line: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, line number, raw line) of every non-blank line from ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos, line_no = offset, first_line
        for line in f:
            if line.strip():
                yield pos, line_no, line
                line_no += 1
            pos += len(line)


def _iter_json_array(path: str, offset: int | None = None) -> Iterator[tuple[int, Any]]:
    """(byte offset, value) of each element of a top-level JSON array, holding one chunk at a time.

    ``offset`` (of an element, from an earlier pass) resumes there; None starts at the ``[``.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        eof = False

        def more() -> str:
            nonlocal eof
            chunk = f.read(_JSON_CHUNK_BYTES)
            if not chunk:
                eof = True
            return utf8.decode(chunk, final=not chunk)

        if offset is None:
            buf = more().lstrip("\ufeff \t\r\n")
            byte_pos = f.tell() - len(buf.encode("utf-8")) - len(utf8.getstate()[0])
            if not buf.startswith("["):
                raise DataError(f"{path}: a .json file must hold a JSON array of records or JSON lines")
            i = 1
            byte_pos += 1
        else:
            f.seek(offset)
            buf, i, byte_pos = more(), 0, offset
        while True:
            # Skip separators; need at least one non-space char or the end of the file.
            while True:
                j = i
                while j < len(buf) and buf[j] in " \t\r\n,":
                    j += 1
                byte_pos += j - i  # separators are ASCII: one byte per char
                i = j
                if i < len(buf) or eof:
                    break
                buf, i = more(), 0
            if i >= len(buf) or buf[i] == "]":
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, i)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError:
                    if eof:
                        raise DataError(
                            f"{path}: invalid JSON at byte {byte_pos}; fix or re-export the file"
                        ) from None
                # The element may continue in the next chunk: keep the unread tail and read more.
                buf, i = buf[i:] + more(), 0
            yield byte_pos, value
            byte_pos += len(buf[i:end].encode("utf-8"))
            i = end


def _record_keys(path: str, value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        raise DataError(f"{path} {where}: expected a JSON object per record, got {type(value).__name__}")
    return list(value)


def _index_json(path: Path, kind: FileKind, columns: Columns) -> tuple[list[Group], bool]:
    """Groups of JSON_ROWS_PER_GROUP records with byte offsets; checks the required fields exist
    (in the first record)."""
    groups: list[Group] = []
    first_keys: list[str] | None = None
    has_doc_id = False
    n = 0
    start_offset = 0
    if kind == "jsonl":
        records: Iterator[tuple[int, Any]] = ((pos, line) for pos, _, line in _iter_jsonl(str(path)))
    else:
        records = _iter_json_array(str(path))
    for pos, value in records:
        if n % JSON_ROWS_PER_GROUP == 0:
            if n:
                groups.append(
                    Group(rows=JSON_ROWS_PER_GROUP, offset=start_offset, first_row=n - JSON_ROWS_PER_GROUP)
                )
            start_offset = pos
        if first_keys is None:
            if kind == "jsonl":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:  # (not UTF-8: describe_file reports it)
                    raise DataError(
                        f"{path} line 1: invalid JSON ({exc.msg}); fix or re-export the file"
                    ) from None
            first_keys = _record_keys(str(path), value, "record 0")
            for name in columns.required:
                if name not in first_keys:
                    raise columns.missing(path, name, first_keys, "field")
            has_doc_id = DOC_ID_COLUMN in first_keys
        n += 1
    if n == 0:
        raise DataError(f"{path} holds no records; remove it from the file list")
    rest = n - (len(groups) * JSON_ROWS_PER_GROUP)
    groups.append(Group(rows=rest, offset=start_offset, first_row=n - rest))
    return groups, has_doc_id


def _json_records(src: SourceFile, group: Group) -> Iterator[tuple[int, Any]]:
    """(row within file, record) of one json group."""
    if src.kind == "jsonl":
        for k, (_, line_no, line) in enumerate(_iter_jsonl(src.path, group.offset, group.first_row)):
            if k >= group.rows:
                return
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{src.path} record {line_no} (non-blank line): invalid JSON ({exc.msg}); fix the line"
                ) from None
            except UnicodeDecodeError as exc:
                raise not_utf8(Path(src.path), exc, f" record {line_no} (non-blank line)") from None
    else:
        try:
            for k, (_, value) in enumerate(_iter_json_array(src.path, group.offset)):
                if k >= group.rows:
                    return
                yield group.first_row + k, value
        except UnicodeDecodeError as exc:
            raise not_utf8(Path(src.path), exc) from None


def not_utf8(path: Path, exc: UnicodeDecodeError, where: str = "") -> DataError:
    return DataError(
        f"{path}{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk); re-export it as "
        "UTF-8 (e.g. iconv -f GBK -t UTF-8 IN > OUT)"
    )


def first_record(path: Path) -> Any:
    """The first record of a json (array) or jsonl file, reading no further (a pre-flight check)."""
    try:
        if file_kind(path) == "jsonl":
            for _, line_no, line in _iter_jsonl(str(path)):
                try:
                    return json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path} line {line_no + 1}: invalid JSON ({exc.msg}); fix the line"
                    ) from None
        else:
            for _, value in _iter_json_array(str(path)):
                return value
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    raise DataError(f"{path} holds no records; remove it from the file list")


# ---------------------------------------------------------------------------------------- reading


@dataclass
class RowBatch:
    """Rows read from one group: their doc ids and either texts or token-id lists."""

    doc_ids: np.ndarray  # int64
    values: list[Any]  # str | None | other (text), or list[int] | None (tokenized)


def read_group(
    src: SourceFile,
    group_index: int,
    row_base: int,
    start: int,
    stop: int,
    columns: str | Sequence[str],
    pf: pq.ParquetFile | None = None,
) -> Iterator[RowBatch]:
    """Rows ``[start, stop)`` of one group, in record batches of at most READ_BATCH_ROWS.

    ``row_base`` is the global row index of the group's first row (the doc id fallback).
    ``columns``: one name (values are that column's values) or several (values are dicts, None
    for a column the file lacks); pre-tokenized files give their token ids either way.
    """
    group = src.groups[group_index]
    if src.kind == "arrow":
        yield from _read_arrow_group(src, group_index, row_base, start, stop, columns)
        return
    if src.kind == "parquet":
        pf = pf or open_parquet(src.path)
        if src.tokenized or isinstance(columns, str):
            value_cols = [TOKENS_COLUMN if src.tokenized else str(columns)]
        else:
            value_cols = [c for c in columns if c in src.fields]
        read = value_cols + ([DOC_ID_COLUMN] if src.has_doc_id else [])
        seen = 0  # rows of the group before the current record batch
        try:
            batches = pf.iter_batches(
                batch_size=READ_BATCH_ROWS, row_groups=[group_index], columns=read, use_threads=False
            )
            for rb in batches:
                lo, hi = max(start - seen, 0), min(stop - seen, rb.num_rows)
                batch_start, seen = seen, seen + rb.num_rows
                if hi <= lo:
                    if seen >= stop:
                        return
                    continue
                rb = rb.slice(lo, hi - lo)
                values = _row_values(rb, src, value_cols, columns)
                if src.has_doc_id:
                    ids_col = rb.column(len(value_cols))
                    if ids_col.null_count:
                        raise DataError(
                            f"{src.path}: column {DOC_ID_COLUMN!r} has nulls in row group {group_index} "
                            f"(file rows {group.first_row + batch_start + lo}..{group.first_row + batch_start + hi - 1}); "
                            "fill them or drop the column"
                        )
                    doc_ids = _int_numpy(ids_col, np.int64)
                else:
                    doc_ids = np.arange(
                        row_base + batch_start + lo, row_base + batch_start + hi, dtype=np.int64
                    )
                yield RowBatch(doc_ids, values)
                if seen >= stop:
                    return
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{src.path}: row group {group_index} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); the file is corrupted: re-export it or remove it"
            ) from None
        return
    values, ids = [], []
    for k, (_, record) in enumerate(_json_records(src, group)):
        if k < start:
            continue
        if k >= stop:
            break
        if isinstance(columns, str):
            value = record.get(columns) if isinstance(record, dict) else None
        else:
            value = {c: record.get(c) for c in columns} if isinstance(record, dict) else record
        doc_id = record.get(DOC_ID_COLUMN) if isinstance(record, dict) and src.has_doc_id else None
        values.append(value)
        ids.append(doc_id if isinstance(doc_id, int) else row_base + k)
        if len(values) == READ_BATCH_ROWS:
            yield RowBatch(np.asarray(ids, dtype=np.int64), values)
            values, ids = [], []
    if values:
        yield RowBatch(np.asarray(ids, dtype=np.int64), values)


def _row_values(
    rb: pa.RecordBatch, src: SourceFile, value_cols: list[str], columns: str | Sequence[str]
) -> list[Any]:
    """The values of a record batch: token arrays, one column's values, or one dict per row."""
    if src.tokenized:
        return _token_lists(rb.column(0))
    if isinstance(columns, str):
        return rb.column(0).to_pylist()
    read = {name: rb.column(j).to_pylist() for j, name in enumerate(value_cols)}
    missing = [None] * rb.num_rows
    table = [read.get(c, missing) for c in columns]
    return [dict(zip(columns, row, strict=True)) for row in zip(*table, strict=True)] if columns else []


def _int_numpy(arr: pa.Array, dtype: type) -> np.ndarray:
    """A null-free integer arrow array as numpy, without ``to_numpy`` (which imports pandas:
    ~1 s in every fresh dataloader worker)."""
    target = pa.from_numpy_dtype(dtype)
    if arr.type != target:
        arr = arr.cast(target)  # imports pyarrow.compute (~0.3 s per fresh process): only when needed
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def _token_lists(arr: pa.Array) -> list[np.ndarray | None]:
    """A list<int> arrow array as numpy int32 arrays (None for null rows)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_large_list(arr.type):
        arr = arr.cast(pa.list_(pa.int32()))
    offsets = _int_numpy(arr.offsets, np.int32)
    values = _int_numpy(arr.values, np.int32) if len(arr.values) else np.zeros(0, dtype=np.int32)
    nulls = arr.is_null().to_pylist() if arr.null_count else [False] * len(arr)
    return [None if nulls[i] else values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def write_tokenized_shard(
    path: str | Path,
    input_ids_list: Sequence[Sequence[int]] | Iterator[Sequence[int]],
    doc_ids: Sequence[int] | np.ndarray,
    row_group_size: int = 1024,
) -> Path:
    """Write a pre-tokenized parquet shard that the loader reads without tokenizing.

    Columns: ``input_ids`` (list<int32>: the document's tokens, *no* special tokens and no EOS;
    the loader appends EOS when packing, exactly as for raw text) and ``doc_id`` (int64).
    Written to ``<path>.tmp`` then renamed, so a reader never sees a half-written shard.
    Produce ``input_ids`` with :func:`trainer.data.tokenize.encode_texts` so both paths agree.
    """
    path = Path(path)
    input_ids_list = list(input_ids_list)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if len(input_ids_list) != len(doc_ids):
        raise DataError(f"{path}: {len(input_ids_list)} token lists but {len(doc_ids)} doc ids")
    table = pa.table(
        {
            TOKENS_COLUMN: pa.array([list(x) for x in input_ids_list], type=pa.list_(pa.int32())),
            DOC_ID_COLUMN: pa.array(doc_ids, type=pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def _read_arrow_group(
    src: SourceFile, group_index: int, row_base: int, start: int, stop: int, columns: str | Sequence[str]
) -> Iterator[RowBatch]:
    """Rows ``[start, stop)`` of one Arrow record batch (memory-mapped; earlier batches are skipped
    by their headers, so no data before the group is copied)."""
    reader = open_arrow(src.path)
    for index, batch in enumerate(reader):
        if index < group_index:
            continue
        rb = batch.slice(start, stop - start)
        if src.tokenized or isinstance(columns, str):
            value_cols = [TOKENS_COLUMN if src.tokenized else str(columns)]
        else:
            value_cols = [c for c in columns if c in src.fields]
        values = _row_values(rb.select(value_cols), src, value_cols, columns)
        if src.has_doc_id:
            doc_ids = _int_numpy(rb.column(rb.schema.get_field_index(DOC_ID_COLUMN)), np.int64)
        else:
            first = row_base + start
            doc_ids = np.arange(first, first + rb.num_rows, dtype=np.int64)
        for lo in range(0, rb.num_rows, READ_BATCH_ROWS):
            yield RowBatch(doc_ids[lo : lo + READ_BATCH_ROWS], values[lo : lo + READ_BATCH_ROWS])
        return
