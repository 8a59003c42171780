"""Why two runs differ, not only where: their arithmetic settings side by side.

Each bundle says which arithmetic settings its engine used (``meta/settings``; a bundle
without it, what its config.json says, marked "as read"). :func:`differences` holds the two
runs' values against the vocabulary (``bundle_spec.settings``) and the comparison's localized
first divergent tensor; :func:`clauses` turns them into the summary's sentences.
"""

from __future__ import annotations

from typing import Any

from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.settings import (
    AS_READ,
    Difference,
    as_written,
    complete,
    settings_diff,
)
from ptrace.compare.results import Comparison


def recorded(bundle: Bundle) -> dict[str, Any]:
    """``{"values": {key: value}, "source": "resolved" | "as read"}`` of one bundle."""
    info = bundle.settings_info()
    if info is None:
        return {"values": as_written(bundle.model.config), "source": AS_READ}
    return {"values": complete(info.values), "source": info.source}


def _values(run: dict[str, Any]) -> dict[str, Any]:
    return (run.get("settings") or {}).get("values") or {}


def differences(c: Comparison) -> list[Difference]:
    """The arithmetic settings whose values differ between the comparison's two runs."""
    return settings_diff(_values(c.a), _values(c.b), compared=[t.name for t in c.tensors],
                         first_tensor=c.first_divergent_tensor, first_position_seen=c.first_divergent_position)


def clauses(c: Comparison) -> list[str]:
    """The summary's sentences on settings: every model-level difference; the numerics ones,
    those that are just the two runs' dtypes (``--dtype``) folded into one; engine ones where
    the runs part ways at their tensor (engines always schedule differently: naming each
    difference would bury the one that matters)."""
    found = [Difference(**{k: d[k] for k in ("key", "group", "a", "b", "acts_at", "from_position", "consistent")})
             for d in c.settings_diff]
    dtypes = (c.a.get("dtype"), c.b.get("dtype"))
    folded = [d for d in found if d.group == "numerics" and (d.a, d.b) == dtypes]
    sentences = []
    if len(folded) > 1:
        keys = ", ".join(d.key for d in folded)
        sentences.append(f"the runs compute in {dtypes[0]} vs {dtypes[1]} ({keys})")
    else:
        folded = []
    for d in found:
        if d in folded or (d.group == "engine" and not d.consistent):
            continue
        sentences.append(d.sentence(c.first_divergent_tensor))
    return sentences
