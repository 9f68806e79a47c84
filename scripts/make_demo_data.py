"""Build the demo's corpus and tokenizer from text every machine has: the Python stdlib sources.

    python scripts/make_demo_data.py --out runs/demo/data [--max-mb 6] [--vocab-size 8192]

Writes ``<out>/train.parquet`` (columns ``doc_id``, ``text``; one document per source file,
sorted by path so the corpus is the same on every run) and ``<out>/tokenizer/`` (byte-level BPE).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.tokenizer import train_bpe_tokenizer


def stdlib_documents(max_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo/data")
    parser.add_argument("--max-mb", type=float, default=6.0, help="corpus size in MB of source text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--row-group-size", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(int(args.max_mb * 1e6))
    table = pa.table({"doc_id": pa.array(range(len(docs)), pa.int64()), "text": pa.array(docs, pa.string())})
    pq.write_table(table, out / "train.parquet", row_group_size=args.row_group_size)
    train_bpe_tokenizer(docs, out / "tokenizer", vocab_size=args.vocab_size)
    print(f"demo corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M chars -> {out}")


if __name__ == "__main__":
    main()
