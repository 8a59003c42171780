"""What the MindFormers backend asks of a model, whichever device it runs on: the CPU model
(:mod:`.cpu_model`) and the Ascend model (:mod:`.ascend_model`) both satisfy
:class:`MindFormersModel`, so the backend never asks which one it holds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms

#: Shows a tensor (rows = the step's new positions) to the interceptors under a canonical name;
#: returns their replacement, if any (``SequentialBackend._emit``).
Emit = Callable[[str, "ms.Tensor"], "ms.Tensor | None"]


class MindFormersModel(Protocol):
    #: The MindFormers class that runs (recorded in ``meta/run.engine``).
    model_class: str
    num_layers: int

    def info(self) -> dict[str, Any]:
        """Model settings that change numerics (recorded in ``meta/run.engine``)."""

    def resolved_settings(self) -> dict[str, Any]:
        """The arithmetic settings the built model uses (``Backend.resolved_settings``)."""

    def check_length(self, longest: int) -> None:
        """Refuse requests of ``longest`` positions that the model (or its cache) cannot hold."""

    def start_request(self) -> None:
        """Forget the previous request's KV cache."""

    def forward(self, sequence: list[int], start: int) -> np.ndarray:
        """Logits (float32) of positions ``start:`` of ``sequence``: every prompt position at the
        prefill (``start == 0``), then the one new position."""

    def install_hooks(self, wanted: set[str], emit: Emit, hooks: ExitStack) -> None:
        """Hook the cells so that each tensor in ``wanted`` reaches ``emit``; every hook's
        removal goes onto ``hooks``."""


def hook_cell(hooks: ExitStack, cell: Any, function: Callable, pre: bool = False) -> None:
    """Register a forward hook (or pre-hook) on ``cell`` until ``hooks`` closes."""
    handle = cell.register_forward_pre_hook(function) if pre else cell.register_forward_hook(function)
    hooks.callback(handle.remove)


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """MindFormers reads some switches from the environment when a model is built or run."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
