"""The eval samples a person reads (trainer.generate): a model stuck in the newline loop of a
tiny, briefly trained model still writes visible text, and the demo's closing printout shows
the prompt and the sample; the import seam between the callbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from trainer.generate import MAX_NEWLINES, blank_tokens, generate, main


@pytest.fixture(scope="module")
def newline_loop(tiny_tokenizer_dir):
    """A real Qwen2 model whose head favours the whitespace-only tokens by 12 logits: sampled
    as before (top-k 40, temperature 0.8 and nothing else) it writes only blank lines."""
    from transformers import AutoTokenizer

    from tests.helpers import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_model(seed=0, vocab_size=len(tokenizer)).eval()
    bias = torch.zeros(len(tokenizer))
    bias[list(blank_tokens(tokenizer))] = 12.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model, tokenizer


def test_the_blank_table_holds_exactly_the_whitespace_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    blank = blank_tokens(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    word = tokenizer("river", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and blank[newline[0]] == 1
    assert len(space) == 1 and blank[space[0]] == 0
    assert not set(word) & set(blank)


def test_a_newline_loop_model_still_writes_visible_text(newline_loop):
    model, tokenizer = newline_loop
    with torch.no_grad():  # what the old sampler got from this model: blank lines only
        ids = tokenizer("def read_file(path):\n", return_tensors="pt")
        torch.manual_seed(0)
        plain = model.generate(**ids, max_new_tokens=24, do_sample=True, top_k=40, temperature=0.8)
    assert not tokenizer.decode(plain[0, ids["input_ids"].shape[1] :]).strip(), "the model must loop"
    for seed in range(3):
        text = generate(model, tokenizer, "def read_file(path):\n", 24, seed=seed, synced=False)
        assert len(text.strip()) >= 3, repr(text)
        assert "\n" * (MAX_NEWLINES + 1) not in "".join(c for c in text if c == "\n" or c.strip()), repr(text)
    again = generate(model, tokenizer, "def read_file(path):\n", 24, seed=0, synced=False)
    assert again == generate(model, tokenizer, "def read_file(path):\n", 24, seed=0, synced=False)


def test_the_demo_ends_with_the_prompt_and_the_newest_sample(tmp_path, capsys):
    import json

    rows = [
        {"step": 80, "prompt": "def read_file(path):\n", "text": "old"},
        {"step": 160, "prompt": "def read_file(path):\n", "text": "    with open(path) as f:"},
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16')
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 160" in out and "def read_file(path):" in out and "    with open(path) as f:" in out
    assert "old" not in out
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("dstrain: error: ")


def test_metrics_and_generate_do_not_import_each_other():
    """Each imports alone in a fresh interpreter, and neither names the other at import time."""
    code = (
        "import sys, trainer.generate as g; assert 'trainer.metrics' not in sys.modules, 'generate imports metrics';"
        "import trainer.metrics"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
