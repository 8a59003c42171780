"""Where prompts come from: text, a file of prompts, or seeded random token ids
(a data set: :mod:`ptrace.capture.datasets`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptrace.bundle_spec.schema import PromptSource
from ptrace.errors import UsageError

#: ``--random-input-ids 128 --seed 42``: ``np.random.seed(42); np.random.randint(100, 2000, (1, 128))``.
RANDOM_ID_RANGE = (100, 2000)


@dataclass(frozen=True)
class Prompt:
    text: str | None
    ids: np.ndarray
    #: The data set records it was built from, when it came from one.
    source: PromptSource | None = None


def random_prompts(length: int, count: int, seed: int) -> list[Prompt]:
    """``count`` prompts of ``length`` ids, exactly ``np.random.seed(seed); np.random.randint(...)``."""
    if length < 1 or count < 1:
        raise UsageError("--random-input-ids and --num-requests must be at least 1")
    ids = np.random.RandomState(seed).randint(*RANDOM_ID_RANGE, size=(count, length))
    return [Prompt(None, row.astype(np.int64)) for row in ids]


def read_prompts_file(path: Path) -> list[str | list[int]]:
    """One prompt per line; in a ``.jsonl`` file, objects with ``prompt`` or ``prompt_token_ids``."""
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return lines
    prompts: list[str | list[int]] = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("prompt_token_ids"), list):
            prompts.append([int(t) for t in item["prompt_token_ids"]])
        else:
            raise UsageError(f"{path}:{number}: expected an object with 'prompt' or 'prompt_token_ids'")
    return prompts


def resolve_prompts(*, texts: tuple[str, ...], prompts_file: Path | None,
                    token_ids: tuple[tuple[int, ...], ...], random_input_ids: int | None,
                    num_requests: int, seed: int, tokenize: Callable[[str], list[int]]) -> list[Prompt]:
    """The prompts of the one source given (capture checks that there is one before the engine starts)."""
    if random_input_ids is not None:
        return random_prompts(random_input_ids, num_requests, seed)
    items: list[str | list[int]]
    if texts or token_ids:
        items = [*texts, *(list(ids) for ids in token_ids)]
    else:
        items = read_prompts_file(prompts_file)  # type: ignore[arg-type]
    if not items:
        raise UsageError("no prompts given")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(item, np.asarray(tokenize(item), dtype=np.int64)))
        else:
            prompts.append(Prompt(None, np.asarray(item, dtype=np.int64)))
    return prompts
