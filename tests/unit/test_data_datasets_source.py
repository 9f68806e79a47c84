"""A Hugging Face ``datasets`` source (save_to_disk dir) streams with the parquet guarantees."""

from __future__ import annotations

import pytest

from tests.helpers import make_docs
from trainer.data import build_train_data
from trainer.data.config import DataConfig
from trainer.data.sources import resolve_paths
from trainer.dist import DistInfo
from trainer.errors import DataError
from trainer.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    from datasets import Dataset

    out = tmp_path_factory.mktemp("hfds") / "ds"
    docs = make_docs(300, seed=5, max_words=20)
    Dataset.from_dict({"text": docs, "doc_id": list(range(5000, 5300))}).save_to_disk(
        str(out), max_shard_size="20KB"
    )
    return out


def doc_ids_of(batches) -> list[int]:
    ids: set[int] = set()
    for batch in batches:
        ids |= {int(i) for i in batch["doc_ids"].unique() if i >= 0}
    return sorted(ids)


def test_save_to_disk_dir_resolves_to_its_arrow_files_in_order(saved_dataset):
    files = resolve_paths([str(saved_dataset)], "data.train")
    assert len(files) >= 2 and all(f.suffix == ".arrow" for f in files)


def test_every_document_once_and_exact_resume(saved_dataset, tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    cfg = DataConfig(
        train=[str(saved_dataset)], max_seq_len=64, buffer_size=16, num_workers=0, validation_fraction=0.0
    )
    data = build_train_data(cfg, tok, DistInfo(), seed=3, micro_batch_size=4)
    stream = iter(data)
    head = [next(stream) for _ in range(5)]
    state = data.state_dict()
    tail = list(stream)
    assert doc_ids_of(head + tail) == list(range(5000, 5300))
    again = build_train_data(cfg, tok, DistInfo(), seed=3, micro_batch_size=4)
    again.load_state_dict(state)
    resumed = list(again)
    assert len(resumed) == len(tail)
    assert all((a["doc_ids"] == b["doc_ids"]).all() for a, b in zip(resumed, tail, strict=True))


def test_unreadable_arrow_file_is_a_one_line_error(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "ds"
    bad.mkdir()
    (bad / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (bad / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    cfg = DataConfig(train=[str(bad)], max_seq_len=64, num_workers=0)
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow is not a readable Arrow") as info:
        build_train_data(cfg, load_tokenizer(str(tiny_tokenizer_dir)), DistInfo(), seed=0, micro_batch_size=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["tiny", pytest.param("qwen", marks=pytest.mark.shared_data)])
def test_backend_encoding_equals_the_tokenizer_call(which, tiny_tokenizer_dir):
    import json

    from tests.helpers import shared_path
    from trainer.data.tokenize import encode_texts

    if which == "qwen":
        tok = load_tokenizer(str(shared_path("qwen2.5-0.5b")))
        rows = json.loads(shared_path("zhwiki-sample", "wikipedia-cn-sample.json").read_text())[:200]
        texts = [r["completion"] for r in rows] + ["<|endoftext|> mixed 特殊 <|im_start|>x"]
    else:
        tok = load_tokenizer(str(tiny_tokenizer_dir))
        texts = make_docs(50) + ["", " leading space", "<|endoftext|>inside"]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert encode_texts(tok, texts) == want
