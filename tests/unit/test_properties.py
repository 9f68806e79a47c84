"""Property-based tests (hypothesis) of the override parser, the sharding arithmetic and the packer.

Each property is one test over generated inputs (no files), small enough to run in a few seconds.
The packer's properties are written as ``assert_*`` functions over (chunks, rows) so a new field
of a chunk (a loss mask) adds one function and one test, not a rewrite.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from launcher import cli
from trainer.config import SECTIONS, JobConfig, build_config, deep_merge, parse_overrides, set_dotted
from trainer.data.packing import IGNORE_INDEX, Chunk, Packer, Row, chunk_document, collate
from trainer.data.sharding import (
    Unit,
    deal_ranges,
    epoch_order,
    held_out,
    merge_ranges,
    ranges_after,
    row_position,
    shard_bounds,
    shard_segments,
)
from trainer.errors import ConfigError

FAST = settings(max_examples=60, deadline=None, database=None)

# ============================================================================ override parser

names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
# What users type: printable text without control characters or lone surrogates.
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)
scalars = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.none(),
    texts,
)
values = st.one_of(scalars, st.lists(scalars, max_size=4))
# A nested override tree: top-level leaves and sections of leaves (the recipe's shape).
trees = st.dictionaries(
    names, st.one_of(values, st.dictionaries(names, values, min_size=1, max_size=4)), max_size=5
)


def as_typed(value: object) -> str:
    """``value`` as a user would type it on the command line: one line of YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip("\n ")  # str.strip() would eat U+00A0


def leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf of a nested dict."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def as_argv(tree: dict, equals: bool) -> list[str]:
    """``--a.b value`` (or ``--a.b=value``) for every leaf."""
    argv = []
    for key, value in leaves(tree):
        typed = as_typed(value)
        argv += [f"--{key}={typed}"] if equals else [f"--{key}", typed]
    return argv


def expected_tree(tree: dict) -> dict:
    """The tree as parse_overrides builds it: leaves set one by one (empty dicts stay leaves)."""
    out: dict = {}
    for key, value in leaves(tree):
        set_dotted(out, key, value)
    return out


@FAST
@given(trees, st.booleans())
def test_overrides_round_trip_into_the_nested_dict(tree: dict, equals: bool) -> None:
    argv = as_argv(tree, equals)
    if not equals:
        # A value typed as "--x" is read as the next flag: the documented limit of the
        # space-separated form (write --k=--x); every other value pairs with its key.
        assume(all(not token.startswith("--") for token in argv[1::2]))
    assert parse_overrides(argv) == expected_tree(tree)


@FAST
@given(trees, trees)
def test_a_later_override_list_merges_over_an_earlier_one(first: dict, second: dict) -> None:
    """Overrides given in two lists parse as deep_merge of the two parses (the last one wins on a
    key both set), as long as no key is a section in one and a value in the other."""
    keys = {k for k, _ in leaves(first)} | {k for k, _ in leaves(second)}
    assume(not any(a != b and b.startswith(a + ".") for a in keys for b in keys))
    argv_first, argv_second = as_argv(first, equals=True), as_argv(second, equals=True)
    merged = deep_merge(parse_overrides(argv_first), parse_overrides(argv_second))
    assert parse_overrides(argv_first + argv_second) == merged


@FAST
@given(names, names, values, values, st.booleans())
def test_the_last_of_two_overrides_of_one_key_wins(
    section: str, key: str, a: object, b: object, equals: bool
) -> None:
    argv = as_argv({section: {key: a}}, equals) + as_argv({section: {key: b}}, equals)
    assume(equals or not any(t.startswith("--") for t in argv[1::2]))
    assert parse_overrides(argv) == {section: {key: b}}


def number_texts() -> st.SearchStrategy[str]:
    """Floats written the ways people write them: repr, exponent, %g, negative ones included."""
    formats = st.sampled_from(["{!r}", "{:e}", "{:g}", "{:.3e}", "{:.12f}"])
    return st.builds(lambda x, f: f.format(x), st.floats(-1e6, 1e6, allow_nan=False), formats)


@FAST
@given(number_texts(), st.integers(-(2**40), 2**40))
def test_numbers_that_look_like_flags_are_values(eps: str, seed: int) -> None:
    """``--optim.eps -1e-3`` and ``--seed -5`` reach the config as numbers, through the launcher's
    and the doctor's argument splitters alike (YAML reads 1e-3 as a string; the config coerces)."""
    argv = ["recipe.yaml", "--optim.eps", eps, "--zero", "2", "--seed", str(seed)]
    parser = cli.build_parser()[1]["ds-config"]
    own, overrides = cli.split_overrides(parser, argv)
    assert own == ["recipe.yaml", "--zero", "2"]
    assert overrides == ["--optim.eps", eps, "--seed", str(seed)]
    cfg = build_config(base={"tokenizer": "unused"}, overrides=overrides)
    assert cfg.optim.eps == float(eps) and cfg.seed == seed


@FAST
@given(
    st.lists(st.from_regex(r"[a-z0-9_/]{1,10}\.parquet", fullmatch=True), min_size=1, max_size=5),
    st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2),
)
def test_a_yaml_list_value_is_a_list(files: list[str], betas: list[float]) -> None:
    argv = ["--data.train", as_typed(files), f"--optim.betas={as_typed(betas)}"]
    cfg = build_config(base={"tokenizer": "unused"}, overrides=argv)
    assert cfg.data.train == files and cfg.optim.betas == betas


def valid_keys(section: str | None) -> list[str]:
    cls = JobConfig if section is None else SECTIONS[section]
    return list(cls.__dataclass_fields__)


@FAST
@given(st.sampled_from([None, *SECTIONS]), names)
def test_an_unknown_key_names_a_valid_key_or_lists_them(section: str | None, key: str) -> None:
    valid = valid_keys(section)
    assume(key not in valid)
    dotted = key if section is None else f"{section}.{key}"
    with pytest.raises(ConfigError) as caught:
        build_config(base={"tokenizer": "unused"}, overrides=[f"--{dotted}", "1"])
    message = str(caught.value)
    prefix = "" if section is None else f"{section}."
    hint = re.search(rf"did you mean --{re.escape(prefix)}(\w+)\?", message)
    if hint:
        assert hint.group(1) in valid, message
    else:
        assert f"valid keys here: {', '.join(valid)}" in message, message
    assert f"--{dotted}" in message


own_items = st.sampled_from(
    [["recipe.yaml"], ["--zero", "3"], ["--offload-optimizer"], ["--precision", "bf16"]]
)
override_items = st.builds(
    lambda key, value: [f"--{key}", value],
    st.builds(lambda a, b: f"{a}.{b}", names, names),
    st.one_of(number_texts(), texts.filter(lambda t: not t.startswith("--"))),
)


def is_override(item: list[str]) -> bool:
    return item[0].startswith("--") and "." in item[0]


@FAST
@given(st.lists(st.one_of(own_items, override_items), max_size=8))
def test_split_overrides_keeps_both_sides_in_order(items: list[list[str]]) -> None:
    """Own options and ``--section.key value`` pairs, interleaved any way: each side keeps its
    tokens in order, and an override's value is never taken for a positional."""
    argv = [token for item in items for token in item]
    own = [token for item in items if not is_override(item) for token in item]
    overrides = [token for item in items if is_override(item) for token in item]
    parser = cli.build_parser()[1]["ds-config"]
    assert cli.split_overrides(parser, argv) == (own, overrides)


# ============================================================================ sharding


def expand(ranges: list[list[int]]) -> list[int]:
    """The row positions the ranges hold, in order."""
    return [row for lo, hi in ranges for row in range(lo, hi)]


@st.composite
def disjoint_ranges(draw: st.DrawFn, max_rows: int = 200) -> list[list[int]]:
    """Disjoint row ranges in a random order, touching ones and empty ones included."""
    cuts = sorted(draw(st.sets(st.integers(0, max_rows), min_size=2, max_size=12)))
    ranges = [[a, b] for a, b in zip(cuts, cuts[1:], strict=False) if draw(st.booleans())]
    ranges += [[c, c] for c in draw(st.lists(st.sampled_from(cuts), max_size=2))]
    return draw(st.permutations(ranges))


@FAST
@given(st.integers(0, 10**7), st.integers(1, 64))
def test_shard_bounds_are_contiguous_complete_and_balanced(total: int, num_shards: int) -> None:
    bounds = [shard_bounds(total, s, num_shards) for s in range(num_shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0


@FAST
@given(disjoint_ranges())
def test_merge_ranges_keeps_the_rows_sorted_and_joined(ranges: list[list[int]]) -> None:
    merged = merge_ranges([list(r) for r in ranges])
    assert expand(merged) == sorted(expand(ranges))
    assert all(lo < hi for lo, hi in merged)
    assert all(
        a[1] < b[0] for a, b in zip(merged, merged[1:], strict=False)
    )  # neither touching nor overlapping
    assert merge_ranges([list(r) for r in merged]) == merged


@FAST
@given(disjoint_ranges(), st.integers(0, 250))
def test_ranges_after_drops_exactly_the_first_rows(ranges: list[list[int]], offset: int) -> None:
    assert expand(ranges_after(ranges, offset)) == expand(ranges)[offset:]


@FAST
@given(disjoint_ranges(), st.integers(0, 250))
def test_row_position_is_the_offset_th_row(ranges: list[list[int]], offset: int) -> None:
    rows = expand(ranges)
    if offset < len(rows):
        assert row_position(ranges, offset) == rows[offset]
    else:
        assert row_position(ranges, offset) == (ranges[-1][1] if ranges else 0)


@FAST
@given(disjoint_ranges(), st.integers(1, 16))
def test_deal_ranges_is_disjoint_complete_in_order_and_balanced(
    ranges: list[list[int]], num_shards: int
) -> None:
    parts = deal_ranges(ranges, num_shards)
    assert len(parts) == num_shards
    assert [row for part in parts for row in expand(part)] == expand(ranges)
    sizes = [len(expand(part)) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(st.integers(0, 300), st.integers(0, 2**63 - 1), st.integers(0, 1000))
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(num_units: int, seed: int, epoch: int) -> None:
    order = epoch_order(num_units, seed, epoch)
    assert sorted(order.tolist()) == list(range(num_units))
    assert np.array_equal(order, epoch_order(num_units, seed, epoch))
    if num_units >= 12:  # 12! orders: two epochs in the same order would mean the epoch is ignored
        assert not np.array_equal(order, epoch_order(num_units, seed, epoch + 1))


@FAST
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.integers(0, 2**32),
    st.integers(0, 5),
    st.integers(1, 12),
)
def test_shard_segments_cover_every_row_once_and_balance(
    group_rows: list[int], seed: int, epoch: int, num_shards: int
) -> None:
    units, base = [], 0
    for i, rows in enumerate(group_rows):
        units.append(Unit(file=i % 3, group=i, rows=rows, row_base=base))
        base += rows
    order = epoch_order(len(units), seed, epoch)
    seen: list[tuple[int, int]] = []
    per_shard = []
    for shard in range(num_shards):
        segments = shard_segments(units, order, shard, num_shards)
        assert all(0 <= s.start < s.stop <= units[s.unit].rows for s in segments)
        rows = [(s.unit, r) for s in segments for r in range(s.start, s.stop)]
        per_shard.append(len(rows))
        seen += rows
    assert sorted(seen) == [(u, r) for u, unit in enumerate(units) for r in range(unit.rows)]
    assert max(per_shard) - min(per_shard) <= 1


@FAST
@given(
    st.integers(0, 2**40),
    st.integers(1, 3000),
    st.integers(1, 2999),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32),
)
def test_held_out_is_a_per_row_test(first: int, count: int, cut: int, a: float, b: float, seed: int) -> None:
    """The train stream and the eval stream test rows in different batches: a row's verdict
    depends on its index, the fraction and the seed alone, and grows with the fraction."""
    rows = np.arange(first, first + count, dtype=np.int64)
    mask = held_out(rows, a, seed)
    cut = min(cut, count)
    assert np.array_equal(
        mask, np.concatenate([held_out(rows[:cut], a, seed), held_out(rows[cut:], a, seed)])
    )
    low, high = sorted((a, b))
    assert not (held_out(rows, low, seed) & ~held_out(rows, high, seed)).any()
    assert not held_out(rows, 0.0, seed).any() and held_out(rows, 1.0, seed).all()


@FAST
@given(st.integers(0, 2**40), st.floats(0.01, 0.99), st.integers(0, 2**32))
def test_held_out_fraction_is_close_to_the_requested_one(first: int, fraction: float, seed: int) -> None:
    rows = np.arange(first, first + 20_000, dtype=np.int64)
    # 20k rows: one standard deviation is at most 0.0036, so 0.02 is over 5 of them.
    assert abs(held_out(rows, fraction, seed).mean() - fraction) < 0.02


# ============================================================================ packer

PAD_ID = 0  # generated tokens start at 1, so every token value is unique and never the pad


@st.composite
def chunk_streams(draw: st.DrawFn) -> tuple[list[Chunk], int]:
    """Documents cut by chunk_document, in a shuffled order (as the shuffle buffer yields them),
    with globally unique token values; returns (chunks, max_seq_len)."""
    seq_len = draw(st.integers(1, 24))
    lengths = draw(st.lists(st.integers(1, 3 * seq_len + 2), min_size=1, max_size=12))
    chunks: list[Chunk] = []
    next_token = 1
    for doc_id, length in enumerate(lengths):
        tokens = np.arange(next_token, next_token + length, dtype=np.int32)
        next_token += length
        chunks += chunk_document(100 + doc_id, tokens, seq_len)
    return draw(st.permutations(chunks)), seq_len


def puller(chunks: list[Chunk]) -> Callable[[], Chunk | None]:
    stream = iter(chunks)
    return lambda: next(stream, None)


def pack_all(chunks: list[Chunk], seq_len: int) -> list[Row]:
    packer, pull, rows = Packer(seq_len, PAD_ID), puller(chunks), []
    while (row := packer.next_row(pull)) is not None:
        rows.append(row)
    assert packer.carry is None  # the stream's end drains the carry into the last row
    return rows


def token_owner(chunks: list[Chunk]) -> dict[int, tuple[int, int, int]]:
    """token value -> (chunk index, offset in the chunk, doc id)."""
    return {int(t): (c, i, doc) for c, (doc, tokens, _) in enumerate(chunks) for i, t in enumerate(tokens)}


def pieces(row: Row, owner: dict[int, tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The row's [start, stop) runs of one chunk's consecutive tokens (padding is one run too),
    found from the token values alone, not from the packer's bookkeeping."""
    keys = [
        owner[int(t)][0] if d != -1 else -1 for t, d in zip(row["input_ids"], row["doc_ids"], strict=True)
    ]
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[i - 1]:
            runs.append((start, i))
            start = i
    return runs


def assert_every_token_lands_once(chunks: list[Chunk], rows: list[Row]) -> None:
    owner = token_owner(chunks)
    placed = [
        (int(t), int(d)) for r in rows for t, d in zip(r["input_ids"], r["doc_ids"], strict=True) if d != -1
    ]
    assert sorted(t for t, _ in placed) == sorted(owner)
    assert all(owner[t][2] == d for t, d in placed)  # each token keeps its document id


def assert_rows_are_full_but_the_last(chunks: list[Chunk], rows: list[Row], seq_len: int) -> None:
    assert all(len(r["input_ids"]) == seq_len for r in rows)  # never longer than max_seq_len
    for r in rows[:-1]:
        assert (r["doc_ids"] != -1).all()  # only the stream's last row is padded
    padding = rows[-1]["doc_ids"] == -1
    assert not padding.any() or padding[int(np.argmax(padding)) :].all()  # padding only at the end
    assert (rows[-1]["input_ids"][padding] == PAD_ID).all()


def assert_positions_restart_at_each_piece(chunks: list[Chunk], rows: list[Row]) -> None:
    owner = token_owner(chunks)
    for r in rows:
        for start, stop in pieces(r, owner):
            assert r["position_ids"][start:stop].tolist() == list(range(stop - start))


def assert_labels_are_ids_but_boundaries_and_padding(chunks: list[Chunk], rows: list[Row]) -> None:
    owner = token_owner(chunks)
    for r in rows:
        expected = r["input_ids"].copy()
        for start, stop in pieces(r, owner):
            if r["doc_ids"][start] == -1:
                expected[start:stop] = IGNORE_INDEX
            elif start > 0:
                expected[start] = IGNORE_INDEX  # predicting it would cross a document boundary
        assert r["labels"].tolist() == expected.tolist()


@FAST
@given(chunk_streams())
def test_chunk_document_cuts_into_full_pieces(stream: tuple[list[Chunk], int]) -> None:
    chunks, seq_len = stream
    by_doc: dict[int, list[np.ndarray]] = {}
    for doc, tokens, _ in sorted(chunks, key=lambda c: int(c[1][0])):
        by_doc.setdefault(doc, []).append(tokens)
    for pieces_of_doc in by_doc.values():
        joined = np.concatenate(pieces_of_doc)
        assert joined.tolist() == list(range(int(joined[0]), int(joined[0]) + len(joined)))  # nothing lost
        assert all(len(p) == seq_len for p in pieces_of_doc[:-1]) and 1 <= len(pieces_of_doc[-1]) <= seq_len


@FAST
@given(chunk_streams())
def test_packer_places_every_token_exactly_once(stream: tuple[list[Chunk], int]) -> None:
    chunks, seq_len = stream
    assert_every_token_lands_once(chunks, pack_all(chunks, seq_len))


@FAST
@given(chunk_streams(), st.integers(0, 40))
def test_packer_carry_holds_what_the_rows_do_not(stream: tuple[list[Chunk], int], num_rows: int) -> None:
    """Stopped after any number of rows (a checkpoint), rows + carry + unread chunks hold every token once."""
    chunks, seq_len = stream
    packer, read = Packer(seq_len, PAD_ID), [0]

    def pull() -> Chunk | None:
        if read[0] == len(chunks):
            return None
        read[0] += 1
        return chunks[read[0] - 1]

    rows = [row for _ in range(num_rows) if (row := packer.next_row(pull)) is not None]
    rest = ([packer.carry] if packer.carry is not None else []) + chunks[read[0] :]
    resumed = rows + pack_all(rest, seq_len) if rest else rows
    assert_every_token_lands_once(chunks, resumed)


@FAST
@given(chunk_streams())
def test_packed_rows_are_full_except_the_last(stream: tuple[list[Chunk], int]) -> None:
    chunks, seq_len = stream
    assert_rows_are_full_but_the_last(chunks, pack_all(chunks, seq_len), seq_len)


@FAST
@given(chunk_streams())
def test_position_ids_restart_at_each_document_piece(stream: tuple[list[Chunk], int]) -> None:
    chunks, seq_len = stream
    assert_positions_restart_at_each_piece(chunks, pack_all(chunks, seq_len))


@FAST
@given(chunk_streams())
def test_labels_are_the_ids_except_piece_starts_and_padding(stream: tuple[list[Chunk], int]) -> None:
    chunks, seq_len = stream
    assert_labels_are_ids_but_boundaries_and_padding(chunks, pack_all(chunks, seq_len))


@FAST
@given(chunk_streams(), st.integers(1, 5))
def test_collate_stacks_rows_and_fills_with_loss_free_rows(
    stream: tuple[list[Chunk], int], micro_batch: int
) -> None:
    chunks, seq_len = stream
    rows = pack_all(chunks, seq_len)[:micro_batch]
    batch = collate(rows, micro_batch, PAD_ID, pack=True, seq_len=seq_len)
    assert "attention_mask" not in batch  # packed: restarting position_ids delimit the documents
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert tuple(batch[key].shape) == (micro_batch, seq_len)
        for i, row in enumerate(rows):
            assert batch[key][i].tolist() == row[key].tolist()
    fillers = slice(len(rows), micro_batch)
    assert (batch["labels"][fillers] == IGNORE_INDEX).all() and (batch["doc_ids"][fillers] == -1).all()


@FAST
@given(chunk_streams(), st.integers(1, 5))
def test_collate_pads_unpacked_rows_with_a_mask(stream: tuple[list[Chunk], int], micro_batch: int) -> None:
    from trainer.data.packing import chunk_row

    chunks, _ = stream
    rows = [chunk_row(c) for c in chunks[:micro_batch]]
    batch = collate(rows, micro_batch, PAD_ID, pack=False, seq_len=0)
    width = max(len(r["input_ids"]) for r in rows)
    assert tuple(batch["input_ids"].shape) == (micro_batch, width)
    for i in range(micro_batch):
        n = len(rows[i]["input_ids"]) if i < len(rows) else 0
        if i < len(rows):
            assert batch["input_ids"][i, :n].tolist() == rows[i]["input_ids"].tolist()
            assert batch["labels"][i, :n].tolist() == rows[i]["input_ids"].tolist()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        # 1 on the row's tokens; a filler row sees its first position, so no attention row is empty.
        assert batch["attention_mask"][i].tolist() == [1] * max(n, 1) + [0] * (width - max(n, 1))
