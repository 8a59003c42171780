"""Model directories: checked before anything heavy starts, and fingerprinted for replay.

A replay must run the *same* weights; the sha256 of every weight file and tokenizer file is the
proof, cheap next to running the model and exact where names and versions are not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptrace.backends.model_dir import read_config
from ptrace.bundle_spec.schema import ModelInfo
from ptrace.errors import ModelError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json")


def _cache_file() -> Path:
    root = os.environ.get("PTRACE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ptrace")
    return Path(root) / "sha256.json"


def _stat_key(path: Path) -> str:
    """Identity of a file's current content as the file system sees it (like git's index)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode): real checkpoints are many GB,
    and re-hashing them on every capture would cost seconds to minutes."""
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = _stat_key(path)
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staged = cache_path.with_name(f"{cache_path.name}.{os.getpid()}")
        staged.write_text(json.dumps(cache))
        os.replace(staged, cache_path)
    except OSError:
        pass  # a read-only home only costs speed
    return cache[key]


def _combined(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}={h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()


def describe_model(model_dir: str | Path, config_overrides: Mapping[str, Any] | None = None) -> ModelInfo:
    """Check a model directory and fingerprint its weights and tokenizer. Its path is recorded
    absolute, so that a replay finds it from any directory, and as given. ``config_overrides``:
    config.json's keys as a config what-if changes them (the engine loads them so)."""
    given = str(model_dir)
    model_dir = Path(os.path.abspath(model_dir))  # like resolve(), but keeps the links people made
    config = {**read_config(model_dir), **(config_overrides or {})}
    weight_files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not weight_files:
        raise ModelError(f"{model_dir} has no weight files ({', '.join(WEIGHT_PATTERNS)})")
    weights = {p.name: sha256_file(p) for p in weight_files}
    tokenizer = {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES
                 if (model_dir / name).is_file()}
    architectures = config.get("architectures") or ["unknown"]
    return ModelInfo(
        model_path=str(model_dir), name=model_dir.resolve().name, architecture=str(architectures[0]),
        config=config, weights=weights, tokenizer=tokenizer, fingerprint=_combined(weights),
        tokenizer_fingerprint=_combined(tokenizer), model_path_given=given,
    )
