"""Per-row summary statistics (SPEC.md section 6).

Backends compute these inside the engine (on the engine's tensors, which is much cheaper than
converting to numpy first); this module names the columns and holds the numpy reference that
defines them, used by tests and by readers to summarise whole tensors.
"""

from __future__ import annotations

import numpy as np

COLUMNS: tuple[str, ...] = ("min", "max", "mean", "std", "abs_mean", "nan_count", "inf_count")


def row_stats(tensor: np.ndarray) -> np.ndarray:
    """Reference implementation: ``[rows, 7]`` float64 statistics over the finite values of each row."""
    with np.errstate(over="ignore", invalid="ignore"):  # extremes are data here, not bugs
        return _row_stats(np.asarray(tensor).reshape(tensor.shape[0], -1).astype(np.float64))


def _row_stats(rows: np.ndarray) -> np.ndarray:
    finite = np.isfinite(rows)
    out = np.full((rows.shape[0], len(COLUMNS)), np.nan)
    out[:, 5] = np.isnan(rows).sum(axis=1)
    out[:, 6] = np.isinf(rows).sum(axis=1)
    count = finite.sum(axis=1)
    has = count > 0
    safe = np.where(finite, rows, 0.0)
    mean = safe.sum(axis=1) / np.maximum(count, 1)
    out[has, 0] = np.where(finite, rows, np.inf).min(axis=1)[has]
    out[has, 1] = np.where(finite, rows, -np.inf).max(axis=1)[has]
    out[has, 2] = mean[has]
    var = (np.where(finite, rows - mean[:, None], 0.0) ** 2).sum(axis=1) / np.maximum(count, 1)
    out[has, 3] = np.sqrt(var)[has]
    out[has, 4] = (np.abs(safe).sum(axis=1) / np.maximum(count, 1))[has]
    return out


def summarize(stats: np.ndarray, row_size: int) -> dict[str, float]:
    """Whole-tensor statistics from per-row statistics of rows of ``row_size`` elements."""
    if stats.shape[0] == 0:
        return {c: float("nan") for c in COLUMNS}
    nonfinite = stats[:, 5] + stats[:, 6]
    count = row_size - nonfinite
    total = count.sum()
    mean = float(np.nansum(stats[:, 2] * count) / total) if total else float("nan")
    second = (stats[:, 3] ** 2 + stats[:, 2] ** 2) * count
    std = float(np.sqrt(max(np.nansum(second) / total - mean**2, 0.0))) if total else float("nan")
    return {
        "min": float(np.nanmin(stats[:, 0])) if total else float("nan"),
        "max": float(np.nanmax(stats[:, 1])) if total else float("nan"),
        "mean": mean,
        "std": std,
        "abs_mean": float(np.nansum(stats[:, 4] * count) / total) if total else float("nan"),
        "nan_count": int(stats[:, 5].sum()),
        "inf_count": int(stats[:, 6].sum()),
    }
