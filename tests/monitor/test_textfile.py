"""``--metrics-file`` on replay and compare: the comparison in Prometheus's text format, for
node_exporter's textfile collector, replaced atomically."""

from __future__ import annotations

import json
import threading

from prometheus_client.parser import text_string_to_metric_families

from ptrace.bundle_spec import open_bundle
from ptrace.compare import compare
from ptrace.monitor.textfile import write_comparison_metrics
from tests.conftest import GOLDEN, one_line_error, run_cli


def samples(path) -> dict[tuple[str, tuple], float]:
    """``{(name, sorted labels): value}`` of a metrics file, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def by_name(parsed: dict, name: str) -> dict[tuple, float]:
    return {labels: value for (n, labels), value in parsed.items() if n == name}


def test_compare_writes_the_comparison_as_metrics(tmp_path):
    out, result = tmp_path / "compare.prom", tmp_path / "c.json"
    done = run_cli("compare", GOLDEN / "torch.zarr", GOLDEN / "replay.teacher.zarr", "--metrics-file", out,
                   "--json", result)
    assert done.returncode == 0, done.stderr
    expected = json.loads(result.read_text())
    parsed = samples(out)
    run = (("dtype", expected["b"]["dtype"]), ("engine", expected["b"]["backend"]))
    assert run == (("dtype", "bfloat16"), ("engine", "torch"))
    verdicts = by_name(parsed, "ptrace_comparison_verdict")
    assert verdicts == {run + (("verdict", v),): float(v == expected["verdict"]) for v in ("pass", "warn", "fail")}
    assert parsed[("ptrace_token_agreement_ratio", run)] == expected["token_match_rate"]
    assert parsed[("ptrace_first_divergence_step", run)] == -1
    layer_out = {t["name"]: t for t in expected["tensors"] if t["name"].endswith(".out")}
    assert by_name(parsed, "ptrace_layer_cosine_similarity") == {
        run + (("layer", name.split(".")[1]),): t["cos_sim"]
        for name, t in layer_out.items()}
    assert set(by_name(parsed, "ptrace_layer_mean_abs_error")) == set(by_name(parsed, "ptrace_layer_cosine_similarity"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "compare.prom"], "a temporary file was left"


def test_replay_writes_metrics_and_a_bad_path_is_one_line(tmp_path):
    out = tmp_path / "replay.prom"
    done = run_cli("replay", GOLDEN / "torch.zarr", "--backend", "torch", "-o", tmp_path / "r", "--metrics-file", out)
    assert done.returncode == 0, done.stderr
    parsed = samples(out)
    assert parsed[("ptrace_comparison_verdict", (("dtype", "float32"), ("engine", "torch"), ("verdict", "pass")))] == 1
    assert parsed[("ptrace_token_agreement_ratio", (("dtype", "float32"), ("engine", "torch")))] == 1.0

    missing = run_cli("compare", GOLDEN / "torch.zarr", GOLDEN / "torch.zarr", "--metrics-file",
                      tmp_path / "no" / "such" / "dir.prom")
    assert missing.returncode == 2
    assert "cannot write the metrics file" in one_line_error(missing)


def test_readers_never_see_a_partial_file(tmp_path):
    """The textfile collector may read at any moment: every read is a whole file, old or new."""
    with open_bundle(GOLDEN / "torch.zarr") as a, open_bundle(GOLDEN / "replay.teacher.zarr") as b:
        comparison = compare(a, b)
    out = tmp_path / "job.prom"
    write_comparison_metrics(comparison, out)
    done = threading.Event()

    def rewrite() -> None:
        for _ in range(300):
            write_comparison_metrics(comparison, out)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = 0
    while not done.is_set():
        parsed = samples(out)
        assert by_name(parsed, "ptrace_comparison_timestamp_seconds"), "a read saw a partial file"
        reads += 1
    writer.join()
    assert reads > 10
    assert [p.name for p in tmp_path.iterdir()] == ["job.prom"], "a temporary file was left behind"
