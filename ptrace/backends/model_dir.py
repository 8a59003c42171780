"""A Hugging Face model directory as every engine reads it: ``config.json`` first.

Engines and the capture layer both check a model directory before anything heavy starts; the
reading lives here, below both, so that no backend imports upward.
"""

from __future__ import annotations

import json
from pathlib import Path

from ptrace.errors import ModelError, ModelNotFoundError


def read_config(model_dir: Path) -> dict:
    """``config.json`` of a model directory, or a :class:`ModelError` saying what is wrong."""
    if not model_dir.exists():
        raise ModelNotFoundError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a directory",
                         hint="--model takes a directory with config.json, weights and tokenizer")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("num_hidden_layers"), int):
        raise ModelError(f"{config_path} lacks num_hidden_layers: not a decoder-only LM config")
    return config
