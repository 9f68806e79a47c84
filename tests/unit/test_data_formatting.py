"""Formatting: records -> (ids, loss mask), per format, against the chat template's own answers.

The oracles are independent of how ``trainer.data.formatting`` finds assistant spans (prefix
rendering): ``tokenizer.apply_chat_template(..., tokenize=True)`` for the ids, and transformers'
``return_assistant_tokens_mask`` over a template with ``{% generation %}`` markers (which our code
never reads) for the mask. The tiny tokenizer and templates are built here, so CI without
``../shared`` checks all of it; the real Qwen2.5 tokenizer runs too when ``../shared`` is there.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CHATML, EOS, R1_TEMPLATE, R1_TOKENS, shared_path, train_tokenizer
from trainer.data.config import DataConfig
from trainer.data.formatting import Formatter, split_reasoning
from trainer.errors import ConfigError, DataError

# A Llama-2-like template: no end-of-turn marker after the text but EOS, with a space before it.
INST = (
    "{{ bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
    "{%- elif m.role == 'system' %}{{ '<<SYS>>' + m.content + '<</SYS>>' }}"
    "{%- else %}{% generation %}{{ ' ' + m.content + eos_token }}{% endgeneration %}{%- endif %}"
    "{%- endfor %}"
)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("fmt_tok"), vocab_size=400, seed=7) / "tokenizer.json"


def chat_tokenizer(
    tokenizer_file: Path,
    template: str | None = CHATML,
    pad_is_eos: bool = True,
    extra: list[str] | None = None,
):
    """The tiny BPE with turn markers as special tokens, a chat template and EOS; pad = EOS or its own token."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"pad_token": EOS} if pad_is_eos else {"pad_token": "<|pad|>"}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS, **kwargs)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *(extra or [])]})
    tok.chat_template = template
    return tok


def r1_tokenizer(tokenizer_file: Path):
    """The tiny BPE dressed as DeepSeek-R1-Distill-Qwen: its special tokens, BOS/EOS and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
    )
    tok.add_special_tokens({"additional_special_tokens": R1_TOKENS[2:]})
    tok.chat_template = R1_TEMPLATE.read_text(encoding="utf-8")
    return tok


def formatter(tok, fmt: str, **kw) -> Formatter:
    return Formatter(DataConfig(train=["unused"], format=fmt, **kw), tok)


def format_all(f: Formatter, records: list) -> list:
    return f.format_batch(records, lambda i: f"test.jsonl record {i}")


def supervised_text(tok, sample) -> str:
    ids = np.asarray(sample.ids)
    return tok.decode(ids[sample.mask.astype(bool)].tolist())


# The same two-turn conversation (with a system prompt) in each format's own shape.
SYSTEM, Q1, A1, Q2, A2 = "be brief", "the river", "stone light", "north garden?", "silver engine."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
RECORDS = {
    "alpaca": {"instruction": Q2, "input": "", "output": A2, "system": SYSTEM, "history": [[Q1, A1]]},
    "sharegpt": {
        "system": SYSTEM,
        "conversations": [
            {"from": "human", "value": Q1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2},
            {"from": "gpt", "value": A2},
        ],
    },
    "messages": {"messages": CONVERSATION},
}


# ------------------------------------------------------------------------ chat template: ids + mask


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_multi_turn_ids_and_mask_equal_the_chat_template(bpe_file, fmt, pad_is_eos):
    """ids == apply_chat_template; mask == transformers' assistant mask (from {% generation %})."""
    tok = chat_tokenizer(bpe_file, pad_is_eos=pad_is_eos)
    (sample,) = format_all(formatter(tok, fmt), [RECORDS[fmt]])
    ref = tok.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True)
    assert np.asarray(sample.ids).tolist() == ref["input_ids"]
    assert sample.mask.tolist() == ref["assistant_masks"]
    assert supervised_text(tok, sample) == f"{A1}<|im_end|>{A2}<|im_end|>"
    # The newline after each <|im_end|> is not a target (the model stops at <|im_end|>).
    ids = np.asarray(sample.ids)
    ends = np.flatnonzero(ids == tok.convert_tokens_to_ids("<|im_end|>"))
    assert [int(sample.mask[e]) for e in ends] == [0, 0, 1, 0, 1]  # system, user, asst, user, asst
    assert all(sample.mask[e + 1] == 0 for e in ends)


def test_template_format_and_a_template_without_end_marker(bpe_file):
    """format template: prompt/response from {field}s; an INST-style template supervises ' answer' + EOS."""
    record = {"Question": Q1, "Response": A1, "extra": 5}
    conv = [{"role": "user", "content": f"Q: {Q1}"}, {"role": "assistant", "content": f"A: {A1}"}]
    for template in (CHATML, INST):
        tok = chat_tokenizer(bpe_file, template)
        f = formatter(tok, "template", prompt_template="Q: {Question}", response_template="A: {Response}")
        (sample,) = format_all(f, [record])
        ref = tok.apply_chat_template(conv, tokenize=True, return_assistant_tokens_mask=True)
        assert np.asarray(sample.ids).tolist() == ref["input_ids"]
        assert sample.mask.tolist() == ref["assistant_masks"]
    assert supervised_text(tok, sample) == f" A: {A1}{EOS}"  # INST: the space and EOS are the turn's


def test_alpaca_input_joins_instruction(bpe_file):
    tok = chat_tokenizer(bpe_file)
    (sample,) = format_all(formatter(tok, "alpaca"), [{"instruction": Q1, "input": Q2, "output": A1}])
    expected = [{"role": "user", "content": f"{Q1}\n{Q2}"}, {"role": "assistant", "content": A1}]
    assert np.asarray(sample.ids).tolist() == tok.apply_chat_template(expected, return_dict=False)


# ------------------------------------------------------------------------------- no chat template


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_no_chat_template_is_prompt_response_eos(bpe_file, pad_is_eos):
    """prompt + response + EOS per turn, prompt and response tokenized apart; EOS supervised even
    when it is also the pad token."""
    from tests.helpers import load_tokenizer_file

    for tok, setting in (
        (chat_tokenizer(bpe_file, pad_is_eos=pad_is_eos), "none"),
        (chat_tokenizer(bpe_file, template=None, pad_is_eos=pad_is_eos), "auto"),  # no template: none
    ):
        f = formatter(tok, "alpaca", chat_template=setting)
        (sample,) = format_all(f, [RECORDS["alpaca"]])
        enc = load_tokenizer_file(bpe_file)
        pieces = [(SYSTEM + Q1, 0), (A1, 1), (Q2, 0), (A2, 1)]
        expected_ids, expected_mask = [], []
        for text, target in pieces:
            ids = enc(text, add_special_tokens=False)["input_ids"]
            expected_ids += ids
            expected_mask += [target] * len(ids)
            if target:
                expected_ids.append(tok.eos_token_id)
                expected_mask.append(1)
        assert np.asarray(sample.ids).tolist() == expected_ids
        assert sample.mask.tolist() == expected_mask
        assert (tok.pad_token_id == tok.eos_token_id) is pad_is_eos


# ------------------------------------------------------------------------------------- reasoning


COT, ANSWER = "first the river then the stone", "the north garden."
THINK_RESPONSE = f"<think>\n{COT}\n</think>\n\n{ANSWER}"
MEDICAL = {"Question": Q1, "Complex_CoT": COT, "Response": ANSWER}
MEDICAL_KW = dict(
    prompt_template="{Question}", response_template="<think>\n{Complex_CoT}\n</think>\n\n{Response}"
)


def test_r1_template_dropping_reasoning_is_an_error_naming_it(bpe_file):
    tok = r1_tokenizer(bpe_file)
    for record in (MEDICAL, {**MEDICAL, "Complex_CoT": ""}):
        with pytest.raises(DataError) as err:
            format_all(formatter(tok, "template", **MEDICAL_KW), [record])
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("test.jsonl record 0: the chat template of tokenizer")
        assert "--data.reasoning keep" in msg
    # Without any reasoning in the data the generation prompt still opens <think>: same remedy.
    with pytest.raises(DataError, match=r"opens a <think> block.*--data.reasoning keep"):
        format_all(formatter(tok, "alpaca"), [{"instruction": Q1, "output": A1}])


def test_r1_template_reasoning_keep(bpe_file):
    """keep: the prompt exactly as at inference (generation prompt included), then
    ``{reasoning}\\n</think>\\n\\n{answer}`` + EOS supervised, and nothing else."""
    tok = r1_tokenizer(bpe_file)
    (sample,) = format_all(formatter(tok, "template", reasoning="keep", **MEDICAL_KW), [MEDICAL])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": Q1}], add_generation_prompt=True, return_dict=False
    )
    ids = np.asarray(sample.ids).tolist()
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<｜Assistant｜><think>\n")
    assert sample.mask[: len(prompt)].sum() == 0 and sample.mask[len(prompt) :].all()
    assert tok.decode(ids[len(prompt) :]) == f"{COT}\n</think>\n\n{ANSWER}<｜end▁of▁sentence｜>"
    assert ids[-1] == tok.eos_token_id

    # Multi-turn: earlier assistant turns are context as the template renders them (reasoning
    # dropped, as at inference); only the last one is supervised.
    conv = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": f"<think>\nold thoughts\n</think>\n\n{A1}"},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": THINK_RESPONSE},
    ]
    (sample,) = format_all(formatter(tok, "messages", reasoning="keep"), [{"messages": conv}])
    text = tok.decode(np.asarray(sample.ids).tolist())
    assert "old thoughts" not in text and f"<｜Assistant｜>\n\n{A1}<｜end▁of▁sentence｜>" in text
    assert supervised_text(tok, sample) == f"{COT}\n</think>\n\n{ANSWER}<｜end▁of▁sentence｜>"


def test_reasoning_on_a_template_that_keeps_it(bpe_file):
    """ChatML renders <think>... as is: check passes and trains on it; drop trains on the answer;
    keep adds <think> itself since the generation prompt does not open it."""
    tok = chat_tokenizer(bpe_file)
    record = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": THINK_RESPONSE}]}
    (checked,) = format_all(formatter(tok, "messages"), [record])
    assert supervised_text(tok, checked) == f"{THINK_RESPONSE}<|im_end|>"
    (dropped,) = format_all(formatter(tok, "messages", reasoning="drop"), [record])
    assert supervised_text(tok, dropped) == f"{ANSWER}<|im_end|>"
    (kept,) = format_all(formatter(tok, "messages", reasoning="keep"), [record])
    assert supervised_text(tok, kept) == f"<think>\n{COT}\n</think>\n\n{ANSWER}<|im_end|>"


def test_split_reasoning():
    assert split_reasoning(THINK_RESPONSE) == (COT, ANSWER)
    assert split_reasoning("  just an answer \n") == ("", "just an answer")
    assert split_reasoning("a</think>b</think> c") == ("a</think>b", "c")


# ------------------------------------------------------------------------------- template errors


def test_template_whose_prefix_is_not_a_prefix_is_an_error(bpe_file, tmp_path):
    """A template that marks the last message differently cannot be masked turn by turn."""
    odd = tmp_path / "last-marker.jinja"
    odd.write_text(
        "{%- for m in messages %}{{ m.role + ': ' + m.content }}{% if loop.last %}{{ ' <END>' }}{% endif %}"
        "{{ '\\n' }}{%- endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = chat_tokenizer(bpe_file, template=None)
    with pytest.raises(DataError) as err:
        format_all(formatter(tok, "messages", chat_template=str(odd)), [RECORDS["messages"]])
    msg = str(err.value)
    assert "\n" not in msg and f"chat template {odd}" in msg and "not a prefix" in msg


def test_bad_template_file_and_render_errors(bpe_file, tmp_path):
    tok = chat_tokenizer(bpe_file)
    with pytest.raises(ConfigError, match=r"--data.chat_template .*nope\.jinja.* is not a file"):
        formatter(tok, "alpaca", chat_template=str(tmp_path / "nope.jinja"))
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{%- for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m.content }}{%- endfor %}"
    )
    with pytest.raises(
        DataError, match=r"record 0: chat template .*strict\.jinja failed to render it: no system role"
    ):
        format_all(formatter(tok, "messages", chat_template=str(strict)), [RECORDS["messages"]])


# ------------------------------------------------------------------------------------ bad records


@pytest.mark.parametrize(
    "fmt,record,pattern",
    [
        ("alpaca", {"instruction": "x"}, r"missing field 'output' \(set --data.output_column"),
        ("alpaca", {"instruction": "x", "output": 3}, r"field 'output' is int, not a string"),
        ("alpaca", {"instruction": "x", "output": "y", "history": [["a"]]}, r"history\[0\] is not an"),
        ("sharegpt", {"conversations": []}, r"empty conversation"),
        ("sharegpt", {"other": 1}, r"missing field 'conversations'"),
        ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, r"unknown role 'robot'"),
        ("messages", {"messages": [{"role": "user", "content": ["x"]}]}, r"messages\[0\].content is list"),
        ("messages", {"messages": [{"role": "user", "text": "x"}]}, r"--data.content_key; keys: role, text"),
        ("messages", {"messages": [{"role": "user", "content": "x"}]}, r"no assistant turn"),
        ("messages", {"messages": [{"role": "assistant", "content": "x"}]}, r"starts with an assistant turn"),
        ("messages", ["not", "a", "record"], r"expected a record"),
        ("template", {"Question": "q"}, r"missing field 'Response'"),
    ],
)
def test_bad_records_are_one_line_errors_naming_the_row(bpe_file, fmt, record, pattern):
    tok = chat_tokenizer(bpe_file)
    kw = {"prompt_template": "{Question}", "response_template": "{Response}"} if fmt == "template" else {}
    good = {"alpaca": RECORDS["alpaca"], "sharegpt": RECORDS["sharegpt"], "messages": RECORDS["messages"]}
    good["template"] = {"Question": "q", "Response": "r"}
    with pytest.raises(DataError, match=r"^test\.jsonl record 1: .*" + pattern) as err:
        format_all(formatter(tok, fmt, **kw), [good[fmt], record])
    assert "\n" not in str(err.value)


def test_trailing_user_turns_are_dropped(bpe_file):
    tok = chat_tokenizer(bpe_file)
    conv = [*CONVERSATION, {"role": "user", "content": "unanswered"}]
    (sample,) = format_all(formatter(tok, "messages"), [{"messages": conv}])
    assert np.asarray(sample.ids).tolist() == tok.apply_chat_template(CONVERSATION, return_dict=False)


# ----------------------------------------------------------------------------------- text formats


def test_text_and_text_template(bpe_file):
    from tests.helpers import load_tokenizer_file

    tok = load_tokenizer_file(bpe_file)
    plain = format_all(formatter(tok, "text"), ["the river", "", None, 7])
    assert (
        plain[0].mask is None
        and list(plain[0].ids) == tok("the river", add_special_tokens=False)["input_ids"]
    )
    assert plain[1:] == [None, None, None]  # skipped (and counted by the stream)
    f = formatter(tok, "text", text_template="{prompt}\n{response}")
    assert f.columns == ("prompt", "response") and f.single_column is None
    out = format_all(f, [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}])
    assert list(out[0].ids) == tok("a\nb", add_special_tokens=False)["input_ids"] and out[1] is None


def test_formatter_pickles_and_describes_its_settings(bpe_file):
    tok = chat_tokenizer(bpe_file)
    f = formatter(tok, "alpaca")
    g = pickle.loads(pickle.dumps(f))
    assert (
        format_all(g, [RECORDS["alpaca"]])[0].mask.tolist()
        == format_all(f, [RECORDS["alpaca"]])[0].mask.tolist()
    )
    seen = {
        f.describe(),
        formatter(tok, "alpaca", reasoning="drop").describe(),
        formatter(tok, "alpaca", output_column="answer").describe(),
        formatter(tok, "alpaca", chat_template="none").describe(),
        formatter(chat_tokenizer(bpe_file, INST), "alpaca").describe(),  # same name, other template text
        formatter(tok, "sharegpt").describe(),
        formatter(tok, "text").describe(),
        formatter(tok, "text", text_template="{a}").describe(),
    }
    assert len(seen) == 8


def test_config_validation_names_the_flag():
    cases = [
        (dict(format="template"), r"--data.format template needs --data.prompt_template"),
        (dict(format="template", prompt_template="{q}"), r"needs --data.response_template"),
        (
            dict(format="alpaca", prompt_template="{q}"),
            r"--data.prompt_template is for --data.format template",
        ),
        (dict(format="alpaca", text_template="{q}"), r"--data.text_template is for --data.format text"),
        (dict(format="alpaca", messages_column="c"), r"--data.messages_column is for --data.format sharegpt"),
        (dict(chat_template="none"), r"--data.chat_template 'none' needs an SFT --data.format"),
        (dict(reasoning="keep"), r"--data.reasoning keep needs an SFT --data.format"),
    ]
    for kw, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            DataConfig(train=["x"], **kw)
    with pytest.raises(ConfigError, match=r"positional placeholder \{0\}"):
        Formatter(DataConfig(train=["x"], format="text", text_template="{0} and {b}"), None)
    from trainer.config import build_config

    with pytest.raises(ConfigError, match=r"--data.format must be one of text, alpaca"):
        build_config(overrides=["--data.format", "alpaka"])


# --------------------------------------------------------------------------- real Qwen2.5 tokenizer


@pytest.mark.shared_data
def test_qwen_tokenizer_every_format_and_real_rows():
    """The real Qwen2.5 tokenizer and chat template: ids == apply_chat_template on the shared alpaca
    rows; each target run is one assistant text + <|im_end|>, right after '<|im_start|>assistant\\n'."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_path("qwen2.5-0.5b"))
    assert tok.pad_token_id == tok.eos_token_id  # Qwen: pad == eos == <|endoftext|>
    rows = json.loads(shared_path("llamafactory-alpaca-zh-demo", "alpaca_zh_demo.json").read_text())[::10]
    samples = format_all(formatter(tok, "alpaca"), rows)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, sample in zip(rows, samples, strict=True):
        prompt = f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        ids = np.asarray(sample.ids)
        assert ids.tolist() == tok.apply_chat_template(conv, return_dict=False)
        targets = np.flatnonzero(sample.mask)
        a, b = int(targets[0]), int(targets[-1]) + 1
        assert len(targets) == b - a and ids[b - 1] == im_end and ids[a - len(header) : a].tolist() == header
        assert tok.decode(ids[a:b].tolist()) == row["output"] + "<|im_end|>"
    for fmt in ("sharegpt", "messages"):
        (sample,) = format_all(formatter(tok, fmt), [RECORDS[fmt]])
        assert np.asarray(sample.ids).tolist() == tok.apply_chat_template(CONVERSATION, return_dict=False)
        assert supervised_text(tok, sample) == f"{A1}<|im_end|>{A2}<|im_end|>"
    # No chat template: the response ends with <|endoftext|>, which is also the pad token, and is a target.
    (plain,) = format_all(formatter(tok, "alpaca", chat_template="none"), [RECORDS["alpaca"]])
    assert plain.ids[-1] == tok.pad_token_id and plain.mask[-1] == 1


@pytest.mark.shared_data
def test_medical_rows_through_the_r1_template_with_qwen_vocab():
    """medical-o1 (Question / Complex_CoT / Response) with the R1-distill template on the real Qwen
    vocabulary (R1-distill is Qwen2.5 with these tokens added): check fails naming the template,
    keep supervises reasoning + answer + EOS after the inference prompt."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_path("qwen2.5-0.5b"))
    tok.add_special_tokens(
        {"bos_token": R1_TOKENS[0], "eos_token": R1_TOKENS[1], "additional_special_tokens": R1_TOKENS[2:]}
    )
    tok.chat_template = R1_TEMPLATE.read_text(encoding="utf-8")
    rows = json.loads(shared_path("medical-o1-huatuogpt-demo", "demo_data.json").read_text())[:20]
    with pytest.raises(DataError, match=r"--data.reasoning keep"):
        format_all(formatter(tok, "template", **MEDICAL_KW), rows)
    samples = format_all(formatter(tok, "template", reasoning="keep", **MEDICAL_KW), rows)
    for row, sample in zip(rows, samples, strict=True):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["Question"]}], add_generation_prompt=True, return_dict=False
        )
        ids = np.asarray(sample.ids).tolist()
        assert ids[: len(prompt)] == prompt and sample.mask[: len(prompt)].sum() == 0
        expected = f"{row['Complex_CoT'].strip()}\n</think>\n\n{row['Response'].strip()}<｜end▁of▁sentence｜>"
        assert tok.decode(ids[len(prompt) :]) == expected and sample.mask[len(prompt) :].all()
