"""Formatting: a record -> ``(ids, loss_mask)``, the one step between reading rows and chunking them.

One :class:`Formatter` is built from the :class:`~trainer.data.config.DataConfig` and the tokenizer
(it is pickled to the dataloader workers). It names the columns the sources must read and turns
a batch of records into :class:`Sample` s. ``mask`` 1 marks a *target* token (its label is its id);
labels are ``-100`` (``packing.IGNORE_INDEX``) elsewhere. Labels are not shifted: the model predicts
token ``t`` from the tokens before it.

Formats (``data.format``):

- ``text`` (pretrain/cpt): one string column, or ``data.text_template`` (``{column}``
  placeholders, ``str.format``) built from several. Every token is a target, so the mask is
  ``None`` (no array is made: the hot path is the batched ``encode_texts`` call, nothing more).
  A null or empty value, or a template with a null field, is skipped and counted, as before.
- ``alpaca`` (instruction, input, output, optional system and history), ``sharegpt``
  (``conversations`` of ``{from, value}``), ``messages`` (``{role, content}`` lists) and
  ``template`` (``data.prompt_template`` / ``data.response_template``): a conversation of
  system / user / assistant messages whose assistant messages are the targets. A bad row
  (missing field, unknown role, empty conversation, non-string content) is a one-line
  :class:`DataError` naming the file and row. Messages after the last assistant turn are
  dropped (they could only add prompt tokens).

With a chat template (``data.chat_template: auto`` and a tokenizer that has one, or a ``.jinja``
file) the ids are exactly ``tokenizer.apply_chat_template(conversation)``: the conversation is
rendered once and tokenized once (with offsets). Each assistant turn's span is found by rendering
prefixes: the text up to turn ``k`` with the generation prompt (unsupervised: it is what the model
is given at inference) and up to turn ``k`` included; both must be prefixes of the whole rendering,
else the template cannot be trained turn by turn and that is an error naming it. Every assistant
turn is supervised (multi-turn, as LLaMA-Factory does), including its end-of-turn token(s), e.g.
Qwen's ``<|im_end|>``. Whitespace the template puts *after* that end token (Qwen's ``\\n``) is
not supervised: generation stops at the end token, so the model never produces it, and the next
turn's prompt supplies it. A token that straddles a span edge is a target (the rule
``apply_chat_template(return_assistant_tokens_mask=True)`` uses). The first sample a formatter
makes is checked against ``apply_chat_template(..., tokenize=True)``.

Templates that drop what we train on: DeepSeek-R1's (and its distills') keeps only the text after
``</think>`` of an assistant message, and its generation prompt ends in ``<think>\\n``. With
``data.reasoning: check`` (the default) every supervised message's text must survive rendering,
else the row fails naming the template. ``keep`` renders the conversation before the last
assistant turn with the generation prompt and supervises ``{reasoning}\\n</think>\\n\\n{answer}``
plus the template's end of turn after it (``<think>\\n`` is added first when the generation prompt
does not open the block), so training matches how the model is prompted at inference; earlier
assistant turns are context as the template renders them (unsupervised). ``drop`` trains on the
answer after ``</think>`` only.

Without a chat template (``none``, or ``auto`` with a tokenizer that has none): each turn is
``prompt + response + EOS``, the prompt being the system and user texts before the response,
joined as they are (put separators in ``data.prompt_template``). Prompt and response are
tokenized separately and concatenated, so the ids are what inference sees (the prompt tokenized
alone, then generated tokens) and the mask is exact by construction; only ``response + EOS`` is
supervised, so with pad == eos the EOS is still a target and padding is not.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trainer.data.config import DataConfig
from trainer.data.sources import Columns
from trainer.data.tokenize import encode_texts
from trainer.errors import ConfigError, DataError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: Role names accepted in sharegpt and messages records (LLaMA-Factory's and OpenAI's), mapped to ours.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}

Message = dict[str, str]


class Sample(NamedTuple):
    """One formatted record: token ids and which of them are targets."""

    ids: Sequence[int] | np.ndarray
    mask: np.ndarray | None  # uint8, 1 = target; None = every token is a target (pretraining)


class RowError(Exception):
    """A record cannot be formatted; :meth:`Formatter.format_batch` adds the file and row."""


def template_fields(template: str, key: str) -> list[str]:
    """The ``{field}`` names a ``str.format`` template uses (the part before ``.`` or ``[``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"--data.{key} is not a valid {{field}} template ({exc}): {template!r}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ConfigError(
                f"--data.{key} uses a positional placeholder {{{name}}}; name the field, e.g. {{prompt}}"
            )
        if root not in fields:
            fields.append(root)
    return fields


def split_reasoning(content: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of an assistant text: around its last ``</think>`` (an opening
    ``<think>`` and surrounding whitespace removed); ``("", text)`` when it has none."""
    if THINK_CLOSE not in content:
        return "", content.strip()
    head, _, answer = content.rpartition(THINK_CLOSE)
    head = head.strip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN) :].strip()
    return head, answer.strip()


class Formatter:
    """Turns records into :class:`Sample` s for one ``DataConfig`` and tokenizer (see the module docstring).

    ``columns`` are the fields the sources read (``single_column``: one string column whose values
    are passed as they are, the pretraining fast path); ``required`` must exist in every file,
    ``column_flags`` names the config key of each for error messages. ``supervised`` says whether
    samples carry a mask (SFT) and are kept whole (truncated, never split across rows).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any) -> None:
        self.format = cfg.format
        self.tokenizer = tokenizer
        self.supervised = cfg.supervised
        self.reasoning = cfg.reasoning
        self.text_template = cfg.text_template
        self.prompt_template = cfg.prompt_template
        self.response_template = cfg.response_template
        self.cfg_columns = {
            "text": cfg.text_column,
            "instruction": cfg.instruction_column,
            "input": cfg.input_column,
            "output": cfg.output_column,
            "system": cfg.system_column,
            "history": cfg.history_column,
            "messages": cfg.messages_column or ("conversations" if cfg.format == "sharegpt" else "messages"),
        }
        self.role_key = cfg.role_key or ("from" if cfg.format == "sharegpt" else "role")
        self.content_key = cfg.content_key or ("value" if cfg.format == "sharegpt" else "content")
        self.single_column: str | None = None
        self.column_flags: dict[str, str] = {}
        self.required: tuple[str, ...] = ()
        self._template_fields: list[str] = []
        self._setup_columns(cfg)
        self.columns = tuple(self.column_flags)
        self.chat_template: str | None = None
        self.template_name = "no chat template"
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        self._end_markers: tuple[str, ...] = ()
        self._turn_end: str | None = None
        self._verified = False
        if self.supervised and tokenizer is not None:  # None: only the columns (a pre-flight)
            self._setup_chat(cfg)

    # -- set-up ------------------------------------------------------------------------------------
    def _setup_columns(self, cfg: DataConfig) -> None:
        fmt, c = cfg.format, self.cfg_columns
        if fmt == "text" and cfg.text_template is None:
            self.single_column = c["text"]
            self.column_flags = {c["text"]: "--data.text_column"}
            self.required = (c["text"],)
        elif fmt == "text":
            self._template_fields = template_fields(cfg.text_template or "", "text_template")
            self.column_flags = {f: "--data.text_template" for f in self._template_fields}
            self.required = tuple(self._template_fields)
        elif fmt == "template":
            fields = template_fields(cfg.prompt_template or "", "prompt_template")
            for f in template_fields(cfg.response_template or "", "response_template"):
                if f not in fields:
                    fields.append(f)
            self._template_fields = fields
            self.column_flags = {f: "--data.prompt_template/--data.response_template" for f in fields}
            self.required = tuple(fields)
        elif fmt == "alpaca":
            keys = ("instruction", "input", "output", "system", "history")
            self.column_flags = {c[k]: f"--data.{k}_column" for k in keys}
            self.required = (c["instruction"], c["output"])
        else:  # sharegpt, messages
            self.column_flags = {c["messages"]: "--data.messages_column", c["system"]: "--data.system_column"}
            self.required = (c["messages"],)

    def _setup_chat(self, cfg: DataConfig) -> None:
        tok = self.tokenizer
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        setting = cfg.chat_template
        if setting == "auto":
            try:
                template = tok.get_chat_template() if getattr(tok, "chat_template", None) else None
            except ValueError:  # several named templates and no default
                template = None
            if template:
                self.chat_template, self.template_name = template, f"the chat template of tokenizer {name!r}"
            else:
                self.template_name = f"no chat template (tokenizer {name!r} has none)"
        elif setting != "none":
            path = Path(setting).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"--data.chat_template {setting!r} is not a file; give a .jinja file, auto or none"
                )
            self.chat_template, self.template_name = path.read_text(encoding="utf-8"), f"chat template {path}"
        if self.chat_template is None:
            if self.eos_id is None:
                raise ConfigError(
                    f"tokenizer {name!r} has no eos_token; without a chat template each response ends "
                    "with EOS: set eos_token in tokenizer_config.json or give --data.chat_template a .jinja file"
                )
            return
        if not getattr(tok, "is_fast", False):
            raise ConfigError(
                f"tokenizer {name!r} is not a fast tokenizer; chat-template SFT needs token offsets: "
                "save a tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained)"
            )
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        markers = {str(getattr(t, "content", t)) for t in added.values()}
        self._end_markers = tuple(m for m in sorted(markers, key=len, reverse=True) if m.strip())

    def source_columns(self) -> Columns:
        """What the sources read for this formatter, and what every file must have."""
        return Columns(
            self.columns,
            self.required,
            tuple(self.column_flags[c] for c in self.columns),
            text=self.single_column is not None,
            context="" if self.format == "text" else f"--data.format {self.format}",
        )

    def describe(self) -> str:
        """What the token stream depends on besides the files and tokenizer (for the resume fingerprint)."""
        if not self.supervised:
            return "text" if self.text_template is None else f"text, text_template {self.text_template!r}"
        blob = "|".join(
            str(x)
            for x in (
                self.chat_template,
                self.prompt_template,
                self.response_template,
                self.role_key,
                self.content_key,
                [(key, name) for key, name in self.cfg_columns.items() if name in self.column_flags],
            )
        )
        digest = hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]
        return f"{self.format}, {self.template_name}, reasoning {self.reasoning}, settings {digest}"

    # -- records -> samples ------------------------------------------------------------------------------
    def format_batch(self, values: Sequence[Any], locate: Callable[[int], str]) -> list[Sample | None]:
        """One Sample per value, or None for a value to skip (text formats: null/empty).

        ``values`` are strings (``single_column``) or records (dicts of ``columns``; a column a file
        lacks is None). ``locate(i)`` names value ``i``'s file and row in error messages.
        """
        if self.single_column is not None:
            idx = [i for i, v in enumerate(values) if isinstance(v, str) and v]
            return self._encoded_text(len(values), idx, [values[i] for i in idx])
        if not self.supervised:
            texts = [self._text_from_template(v) for v in values]
            idx = [i for i, t in enumerate(texts) if t]
            return self._encoded_text(len(values), idx, [texts[i] for i in idx])
        conversations = []
        for i, value in enumerate(values):
            try:
                conversations.append(self._conversation(value))
            except RowError as exc:
                raise DataError(f"{locate(i)}: {exc}") from None
        if self.chat_template is None:
            return self._plain_samples(conversations)
        return self._chat_samples(conversations, locate)

    def _encoded_text(self, n: int, idx: list[int], texts: list[str]) -> list[Sample | None]:
        out: list[Sample | None] = [None] * n
        for i, ids in zip(idx, encode_texts(self.tokenizer, texts), strict=True):
            out[i] = Sample(ids, None)
        return out

    def _text_from_template(self, record: Any) -> str | None:
        if not isinstance(record, dict) or any(record.get(f) is None for f in self._template_fields):
            return None  # skipped and counted, like a null text
        return (self.text_template or "").format_map(record)

    # -- records -> conversations --------------------------------------------------------------------
    def _field(self, record: dict[str, Any], key: str, required: bool) -> str | None:
        column = self.cfg_columns[key]
        value = record.get(column)
        if value is None:
            if required:
                raise RowError(
                    f"missing field {column!r} (set {self.column_flags[column]} to the field holding it)"
                )
            return None
        if not isinstance(value, str):
            raise RowError(f"field {column!r} is {type(value).__name__}, not a string")
        return value

    def _conversation(self, record: Any) -> list[Message]:
        """The record as system/user/assistant messages ending with an assistant turn (RowError if bad)."""
        if not isinstance(record, dict):
            raise RowError(f"expected a record with fields, got {type(record).__name__}")
        if self.format == "alpaca":
            messages = self._alpaca(record)
        elif self.format == "template":
            messages = [
                {"role": "user", "content": self._fill(self.prompt_template or "", record)},
                {"role": "assistant", "content": self._fill(self.response_template or "", record)},
            ]
        else:
            messages = self._turns(record)
        assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise RowError("the conversation has no assistant turn to train on")
        if assistant[0] == 0:
            raise RowError("the conversation starts with an assistant turn; it needs a prompt before it")
        last = assistant[-1]
        messages = messages[: last + 1]
        if self.reasoning == "drop":
            messages = [
                {"role": "assistant", "content": split_reasoning(m["content"])[1]}
                if m["role"] == "assistant"
                else m
                for m in messages
            ]
        return messages

    def _alpaca(self, record: dict[str, Any]) -> list[Message]:
        instruction = self._field(record, "instruction", required=True) or ""
        extra = self._field(record, "input", required=False)
        output = self._field(record, "output", required=True) or ""
        system = self._field(record, "system", required=False)
        history = record.get(self.cfg_columns["history"])
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        if history is not None:
            if not isinstance(history, list):
                raise RowError(
                    f"field {self.cfg_columns['history']!r} must be a list of [instruction, response] pairs"
                )
            for j, pair in enumerate(history):
                if not (
                    isinstance(pair, (list, tuple))
                    and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)
                ):
                    raise RowError(
                        f"{self.cfg_columns['history']}[{j}] is not an [instruction, response] pair of strings"
                    )
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = f"{instruction}\n{extra}" if extra else instruction
        return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]

    def _turns(self, record: dict[str, Any]) -> list[Message]:
        column = self.cfg_columns["messages"]
        turns = record.get(column)
        if turns is None:
            raise RowError(
                f"missing field {column!r} (set --data.messages_column to the field holding the turns)"
            )
        if not isinstance(turns, list):
            raise RowError(f"field {column!r} is {type(turns).__name__}, not a list of turns")
        if not turns:
            raise RowError(f"empty conversation in field {column!r}")
        system = self._field(record, "system", required=False)
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(
                    f"{column}[{j}] is {type(turn).__name__}, not a {{{self.role_key}, {self.content_key}}} object"
                )
            role = turn.get(self.role_key)
            if role not in ROLES:
                raise RowError(
                    f"{column}[{j}] has unknown role {role!r} under {self.role_key!r} "
                    "(expected human/user, gpt/assistant or system)"
                )
            content = turn.get(self.content_key)
            if not isinstance(content, str):
                raise RowError(
                    f"{column}[{j}].{self.content_key} is {type(content).__name__}, not a string"
                    + (
                        ""
                        if self.content_key in turn
                        else f" (set --data.content_key; keys: {', '.join(turn)})"
                    )
                )
            messages.append({"role": ROLES[role], "content": content})
        return messages

    def _fill(self, template: str, record: dict[str, Any]) -> str:
        for field in self._template_fields:
            if record.get(field) is None:
                raise RowError(
                    f"missing field {field!r} used by --data.prompt_template/--data.response_template"
                )
        try:
            return template.format_map(record)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
            raise RowError(
                f"the prompt/response template cannot be filled from this record ({exc!r})"
            ) from None

    # -- conversations -> samples, no chat template -------------------------------------------------------
    def _plain_samples(self, conversations: list[list[Message]]) -> list[Sample | None]:
        """``prompt + response + EOS`` per turn; prompt and response tokenized separately (see above)."""
        pieces: list[str] = []
        layout: list[list[tuple[int, int]]] = []  # per sample: (prompt piece, response piece) indices
        for messages in conversations:
            turns, prompt = [], ""
            for m in messages:
                if m["role"] == "assistant":
                    turns.append((len(pieces), len(pieces) + 1))
                    pieces += [prompt, m["content"]]
                    prompt = ""
                else:
                    prompt += m["content"]
            layout.append(turns)
        encoded = encode_texts(self.tokenizer, pieces)
        eos = np.asarray([self.eos_id], dtype=np.int32)
        out: list[Sample | None] = []
        for turns in layout:
            ids, mask = [], []
            for p, r in turns:
                prompt_ids = np.asarray(encoded[p], dtype=np.int32)
                response_ids = np.concatenate([np.asarray(encoded[r], dtype=np.int32), eos])
                ids += [prompt_ids, response_ids]
                mask += [np.zeros(len(prompt_ids), np.uint8), np.ones(len(response_ids), np.uint8)]
            out.append(Sample(np.concatenate(ids), np.concatenate(mask)))
        return out

    # -- conversations -> samples, chat template --------------------------------------------------------
    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _chat_samples(
        self, conversations: list[list[Message]], locate: Callable[[int], str]
    ) -> list[Sample | None]:
        from jinja2 import TemplateError

        texts, spans, prompts = [], [], []
        for i, messages in enumerate(conversations):
            try:
                text, text_spans, prompt = (
                    self._keep_text(messages) if self.reasoning == "keep" else self._chat_text(messages)
                )
            except RowError as exc:
                raise DataError(f"{locate(i)}: {exc}") from None
            except TemplateError as exc:
                raise DataError(f"{locate(i)}: {self.template_name} failed to render it: {exc}") from None
            texts.append(text)
            spans.append(text_spans)
            prompts.append(prompt)
        out: list[Sample | None] = []
        for i, (ids, offsets) in enumerate(self._encode_with_offsets(texts)):
            out.append(Sample(ids, _span_mask(offsets, spans[i])))
            if not self._verified:
                self._verify(conversations[i], ids, prompts[i], locate(i))
        return out

    def _chat_text(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]], None]:
        """The rendered conversation and the character span of every assistant turn."""
        full = self._render(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], True)
            upto = full if k + 1 == len(messages) else self._render(messages[: k + 1], False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise RowError(self._not_a_prefix(messages, k, prompt))
            start, end = len(prompt), self._turn_stop(upto, len(prompt))
            wanted = m["content"].strip()
            if wanted not in full[start:end]:
                raise RowError(
                    f"{self.template_name} drops part of assistant turn {k} from its rendering "
                    f"({'its reasoning before </think>' if THINK_CLOSE in wanted else 'its text changes'}), so "
                    "training on it would train the model without it; set --data.reasoning keep to supervise "
                    "the reasoning after the generation prompt, drop to train on the answer only, or use "
                    "another --data.chat_template"
                )
            spans.append((start, end))
        return full, spans, None

    def _keep_text(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]], str]:
        """``data.reasoning: keep``: the prompt as at inference, then reasoning + answer + end of turn."""
        k = len(messages) - 1  # the last assistant turn (later turns were dropped)
        prompt = self._render(messages[:k], True)
        reasoning, answer = split_reasoning(messages[k]["content"])
        opener = "" if prompt.rstrip().endswith(THINK_OPEN) else f"{THINK_OPEN}\n"
        text = f"{prompt}{opener}{reasoning}\n{THINK_CLOSE}\n\n{answer}{self._template_turn_end()}"
        return text, [(len(prompt), self._turn_stop(text, len(prompt)))], prompt

    def _template_turn_end(self) -> str:
        """What the chat template writes after an assistant message's text (e.g. ``<|im_end|>\\n``)."""
        if self._turn_end is None:
            sentinel = "\u2063dstrain-answer\u2063"
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}]
            rendered = self._render(probe, False)
            if sentinel not in rendered:
                raise RowError(
                    f"{self.template_name} does not render an assistant message's text; cannot keep reasoning"
                )
            self._turn_end = rendered[rendered.rindex(sentinel) + len(sentinel) :]
        return self._turn_end

    def _turn_stop(self, text: str, start: int) -> int:
        """End of the supervised span of the turn ending ``text``: whitespace after a final special
        token (the template's separator, never generated) is left out."""
        stripped = text.rstrip()
        if len(stripped) > start and stripped.endswith(self._end_markers):
            return len(stripped)
        return len(text)

    def _not_a_prefix(self, messages: list[Message], k: int, prompt: str) -> str:
        opens = prompt[len(self._render(messages[:k], False)) :] if k else prompt
        hint = (
            "its generation prompt opens a <think> block that the rendered turn does not have: set "
            "--data.reasoning keep to train after the generation prompt"
            if THINK_OPEN in opens
            else "use another --data.chat_template"
        )
        return (
            f"{self.template_name} renders the conversation up to assistant turn {k} differently from the "
            f"start of the whole conversation (a prefix is not a prefix), so its turns cannot be masked; {hint}"
        )

    def _encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Ids and character offsets of each text, no special tokens added (what apply_chat_template does)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [
                (np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encodings
            ]
        out = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
        )
        return [
            (np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64).reshape(-1, 2))
            for ids, offs in zip(out["input_ids"], out["offset_mapping"], strict=True)
        ]

    def _verify(self, messages: list[Message], ids: np.ndarray, prompt: str | None, where: str) -> None:
        """The first sample's ids against transformers' own rendering + tokenization."""
        self._verified = True
        if prompt is None:
            reference = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=True, return_dict=False
            )
            same = list(reference) == ids.tolist()
        else:  # keep: the inference prompt must be the head of the sample
            reference = self.tokenizer.apply_chat_template(
                messages[:-1],
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=False,
                add_generation_prompt=True,
            )
            same = list(reference) == ids[: len(reference)].tolist()
        if not same:
            raise DataError(
                f"{where}: the token ids of {self.template_name} differ from tokenizer.apply_chat_template's "
                "(a tokenizer whose call adds or changes tokens); report it with the tokenizer name"
            )


def _span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token that overlaps a character span (a zero-width token: that starts in one)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts < b) & ((ends > a) | ((ends == starts) & (starts >= a)))
    return mask.astype(np.uint8)


__all__ = ["Formatter", "RowError", "Sample", "split_reasoning", "template_fields"]
