"""The HTML diff report: one self-contained file (inline CSS and SVG, no script, no network).

It renders a :class:`~ptrace.compare.Comparison` and never recomputes a metric: this package
only turns numbers into geometry (plot coordinates, colours: ``plots``, and the panels
``whatifs``, ``stability``, ``localization``, ``heatmap``) and hands everything to a jinja2 template with
autoescaping on, so any string that came from a bundle (a prompt holding ``<script>``, a path,
an environment value) is shown as text, never run. The same comparison renders the same bytes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import jinja2

from ptrace.bundle_spec.summary import parallel_summary
from ptrace.compare import Comparison
from ptrace.reports import heatmap, localization, routing, schedule, stability, whatifs
from ptrace.reports.plots import number

#: A prompt longer than this (characters) or with more lines is folded under a preview.
FOLD_CHARS, FOLD_LINES, PREVIEW_CHARS = 320, 6, 160


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ptrace.reports", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = number
    env.filters["shell"] = shlex.join  # a command line as a shell would need it typed
    return env


def _verdict(summary: str) -> dict[str, Any]:
    """The summary as the banner shows it: the what-ifs' sentences first when there are any (one
    line each), then the verdict word and one line per clause (tokens; where the runs part ways;
    the size judgement naming the limit that tripped)."""
    *whatif_lines, verdict = summary.split("\n")
    found = re.match(r"(.*?)\b(PASS|WARN|FAIL): (.*)", verdict, re.S)
    if found is None:
        return {"whatifs": whatif_lines, "word": "", "lead": "", "clauses": [verdict]}
    lead, word, rest = found.groups()
    return {"whatifs": whatif_lines, "word": word, "lead": lead.strip(),
            "clauses": [clause for clause in rest.split("; ") if clause]}


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        flat = {}
        for i, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{i}]"))
        return flat
    return {prefix: "" if value is None else str(value)}


def _side_by_side(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [{"key": k, "a": fa.get(k, "—"), "b": fb.get(k, "—"), "differs": fa.get(k) != fb.get(k)}
            for k in keys]


def _shown(text: str | None) -> str | None:
    """A token's text as one visible line (a newline token would break the box)."""
    return None if text is None else text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")


def _texts(run: Mapping[str, Any], key: str, request: int) -> list[str]:
    texts = run.get(key) or []
    return texts[request] if request < len(texts) else []


def _at(values: list[Any], step: int) -> Any:
    return values[step] if step < len(values) else None


def _prompt(text: str | None) -> dict[str, Any] | None:
    """The prompt, with a preview when it is long enough to push the report down (it is folded)."""
    if not text:
        return None
    long = len(text) > FOLD_CHARS or text.count("\n") >= FOLD_LINES
    preview = " ".join(text[:PREVIEW_CHARS].split()) + "…" if long else text
    return {"text": text, "folded": long, "preview": preview}


def _timeline(comparison: Comparison, b_mode: str) -> list[dict[str, Any]]:
    """Per request, per step: A's token, B's token (its own, or its choice fed A's tokens:
    ``b_mode``), B's choice in the teacher-forced run where the tokens came from a free-running
    one, and the KL of that step."""
    a, b = comparison.a, comparison.b
    prompts = a.get("prompts") or []
    timelines = []
    for request in comparison.requests:
        forced = request.teacher_forced
        texts_a = _texts(a, "output_tokens", request.index)
        texts_b = _texts(b, "output_tokens", request.index)
        texts_f = _texts(b, "teacher_output_tokens", request.index)
        kl = forced.kl if forced is not None else request.kl
        diverged = request.first_divergent_step
        own_context = b_mode != "teacher-forced" and diverged is not None
        steps = []
        for s in range(max(len(request.tokens_a), len(request.tokens_b))):
            token_a, token_b = _at(request.tokens_a, s), _at(request.tokens_b, s)
            token_f = _at(forced.tokens_b, s) if forced is not None else None
            steps.append({
                "step": s, "a": token_a, "b": token_b, "f": token_f,
                "text_a": _shown(_at(texts_a, s)), "text_b": _shown(_at(texts_b, s)),
                "text_f": _shown(_at(texts_f, s)),
                # fed its own tokens, B sees another context after its first divergence: later
                # differences follow from that one
                "b_state": "same" if token_a == token_b else "after" if own_context and s > diverged else "diff",
                "f_state": "same" if token_f == token_a else "diff",
                "alt_a": (_at(request.topk_a, s) or [])[:5], "alt_b": (_at(request.topk_b, s) or [])[:5],
                "kl": _at(kl, s)})
        differs = any(s["b_state"] != "same" or (forced is not None and s["f_state"] != "same") for s in steps)
        timelines.append({"request": request, "steps": steps, "forced": forced is not None, "differs": differs,
                          "prompt": _prompt(_at(prompts, request.index)),
                          "kl_source": forced.kl_source if forced is not None else request.kl_source})
    return timelines


def _b_mode(comparison: Comparison) -> str:
    """What B's token row is: its own tokens (free-running), or its choices fed A's tokens."""
    if "token_run_path" in comparison.b:
        return "free-running"
    return (comparison.b.get("replay") or {}).get("mode") or ""


def _title(c: Comparison) -> str:
    """A replay is named by what changed (engine, dtype); two other bundles by their files."""
    replay = c.b["replay"]
    if replay is not None and replay["source_bundle_id"] == c.a["bundle_id"]:
        return f"ptrace: {c.a['backend']} {c.a['dtype']} vs {c.b['backend']} {c.b['dtype']}"
    return f"ptrace: {PurePath(c.a['path']).name} vs {PurePath(c.b['path']).name}"


def _commands(c: Comparison) -> list[str]:
    """The comparisons that reproduce this report from the bundles (two for a replay that ran
    in both modes: tensors from one run, tokens from the other)."""
    others = [c.b["path"], *([c.b["token_run_path"]] if "token_run_path" in c.b else [])]
    return [shlex.join(["ptrace", "compare", c.a["path"], other]) for other in others]


def render(comparison: Comparison) -> str:
    """The report as one HTML string, from the comparison alone (it may come from JSON)."""
    c = comparison
    b_mode = _b_mode(c)
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=_title(c), c=c, verdict=_verdict(c.summary), whatifs=whatifs.section(c.whatifs, c),
        stability=stability.section(c.stability), routing=routing.section(c),
        error_chart=localization.error_chart(c), calibration_rows=localization.calibration_rows(c),
        local_chart=localization.local_error_chart(c.local_errors, c.local_error_source),
        heatmaps=heatmap.heatmaps(c), timelines=_timeline(c, b_mode), b_mode=b_mode,
        run_rows=_side_by_side(c.a["run"], c.b["run"]), env_rows=_side_by_side(c.a["environment"], c.b["environment"]),
        commands=_commands(c), schedules=schedule.section(c.a, c.b, c.whatifs), parallels=_parallel_layouts(c),
    )


def _parallel_layouts(c: Comparison) -> list[dict[str, Any]]:
    """Each run that was split over ranks: its layout and its replicas' disagreements."""
    return [{"run": name, **parallel_summary(run["parallel"])}
            for name, run in (("A", c.a), ("B", c.b)) if run.get("parallel")]


def write_report(comparison: Comparison, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(comparison), encoding="utf-8")
    return path
