"""The canary under load (``--load``), against a real HTTP server that streams the fillers and
counts them: every canary request is sent while all N filler streams are generating, the fillers
are seeded prompts of mixed lengths that never repeat, and nothing of theirs reaches the
comparison. (Against a real vLLM server: test_live.py.)"""

from __future__ import annotations

import json

from ptrace.monitor.canary import load_golden
from tests.conftest import GOLDEN, one_line_error, run_cli
from tests.monitor.servers import misbehaving_server
from tests.monitor.test_faults import _golden_completion
from tests.monitor.test_textfile import samples


def test_each_load_level_is_a_cycle_of_its_own_beside_all_its_filler_streams(tmp_path):
    golden = load_golden(GOLDEN / "torch.zarr")
    with misbehaving_server("golden") as server:
        server.completion = _golden_completion(golden)
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", server.url, "--once", "--load", "0,4",
                       "--json", "--metrics-file", tmp_path / "canary.prom")
        beside, streamed = list(server.streams_beside), list(server.streamed)
    assert done.returncode == 0, done.stderr
    cycles = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(c["load"], c["result"], c["token_match_rate"], c["kl_max"]) for c in cycles] == \
        [(0, "pass", 1.0, 0.0), (4, "pass", 1.0, 0.0)], "the fillers' answers never reach the comparison"
    assert beside == [0, 4], "load 0's request alone, load 4's beside 4 generating streams"
    assert cycles[0]["fillers_answered"] == 0 and cycles[1]["fillers_failed"] == 0
    assert len(streamed) >= 4 and len({tuple(prompt) for prompt in streamed}) == len(streamed), "no filler repeats"
    assert len({len(prompt) for prompt in streamed}) > 1, "fillers of mixed lengths"
    longest = max(r.prompt_ids.size for r in golden.requests)
    assert all(1 <= len(prompt) <= longest and max(prompt) < golden.vocab_size for prompt in streamed)
    progress = [line for line in done.stderr.splitlines() if line.startswith("canary: load ")]
    assert [line.split(":")[1] for line in progress] == [" load 0 (1 of 2)", " load 4 (2 of 2)"], done.stderr

    metrics = samples(tmp_path / "canary.prom")
    for load in ("0", "4"):
        assert metrics[("ptrace_token_agreement_ratio", (("load", load),))] == 1.0
        assert metrics[("ptrace_canary_runs_total", (("load", load), ("result", "pass")))] == 1
        assert metrics[("ptrace_canary_up", (("load", load),))] == 1
    assert not [key for key in metrics if key[0] != "ptrace_build_info" and "load" not in dict(key[1])]


def test_fillers_refused_or_not_streamed_are_the_cycles_problem_and_bad_levels_one_line(tmp_path):
    with misbehaving_server("error") as server:
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", server.url, "--once", "--load", "2",
                       "--json", "--metrics-file", tmp_path / "canary.prom")
        assert not server.streams_beside, "no canary request is sent without its load"
    assert done.returncode == 3, done.stderr
    cycle = json.loads(done.stdout)
    assert cycle["result"] == "http_error" and cycle["load"] == 2
    assert cycle["message"].startswith("a filler stream failed: ") and "HTTP 500" in cycle["message"]
    assert samples(tmp_path / "canary.prom")[("ptrace_canary_up", (("load", "2"),))] == 0

    with misbehaving_server("unstreamed") as server:  # a server that ignores "stream": true
        server.completion = _golden_completion(load_golden(GOLDEN / "torch.zarr"))
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", server.url, "--once", "--load", "2", "--json")
    cycle = json.loads(done.stdout)
    assert done.returncode == 3 and cycle["result"] == "bad_response", done.stderr
    assert "without server-sent events" in cycle["message"] and cycle["duration_seconds"] < 10

    for levels in ("8,x", "-1", "0,8,0", ""):
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", server.url, "--once", "--load", levels)
        assert "is not a list of distinct numbers of filler streams" in one_line_error(done), levels
