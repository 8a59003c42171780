"""A bundle must be safe to attach to a public bug report: no secret ends up in it."""

from __future__ import annotations

import zipfile

from ptrace.bundle_spec import open_bundle
from ptrace.capture.environment import REDACTED, Redactor, numerics_env
from tests.conftest import run_cli

SECRETS = {
    "HF_TOKEN": "hf_TopSecretTokenValue123",
    "MY_SERVICE_API_KEY": "sk-live-0123456789abcdef",
    "VLLM_API_KEY": "vllm-key-zyxwvu987",
    "DB_PASSWORD": "correct-horse-battery",
}


def test_secrets_are_nowhere_in_the_bundle(tmp_path, example_model):
    out = tmp_path / "b.zarr"
    # The token also appears on the command line, as a user might paste it into a prompt.
    result = run_cli("capture", "-b", "torch", "-m", example_model, "--prompt", f"my token is {SECRETS['HF_TOKEN']}",
                     "--max-new-tokens", "2", "-o", out,
                     env={**SECRETS, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    run_cli("pack", out)
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    with zipfile.ZipFile(f"{out}.zip") as archive:
        blobs += [archive.read(name) for name in archive.namelist()]
    for secret in SECRETS.values():
        assert not any(secret.encode() in blob for blob in blobs), secret
    with open_bundle(out) as bundle:
        env = bundle.environment.env
        assert env["HF_TOKEN"] == REDACTED and env["VLLM_API_KEY"] == REDACTED
        assert env["OMP_NUM_THREADS"] == "2", "numerics variables are recorded"
        assert "DB_PASSWORD" not in env, "unrelated variables are not recorded at all"
        assert REDACTED in " ".join(bundle.manifest.command)


def test_numerics_env_keeps_only_relevant_prefixes():
    env = numerics_env({"CUDA_VISIBLE_DEVICES": "0", "HOME": "/root", "MS_AUTH_TOKEN": "x"})
    assert env == {"CUDA_VISIBLE_DEVICES": "0", "MS_AUTH_TOKEN": REDACTED}


def test_redactor_scrubs_nested_values_and_option_values():
    redactor = Redactor.from_environment({"GITHUB_TOKEN": "ghp_abcdefgh"}, ["x", "--api-key", "k3y-value-1"])
    scrubbed = redactor.scrub({"a": ["see ghp_abcdefgh", ("k3y-value-1",)], "n": 3})
    assert scrubbed == {"a": [f"see {REDACTED}", (REDACTED,)], "n": 3}
