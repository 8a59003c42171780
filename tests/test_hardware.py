"""The machine probes the backends refuse on and the tests skip on (ptrace.hardware)."""

from __future__ import annotations

from ptrace import hardware
from tests.conftest import lacks_fp8_kv_cache, run_cli
from tests.replay.test_cross_engine import vllm_env

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\nmodel name\t: AMD EPYC\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\nCPU implementer\t: 0x41\n"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert hardware.parse_cpu_flags(X86) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert "asimd" in hardware.parse_cpu_flags(ARM)
    assert hardware.parse_cpu_flags("") == frozenset()


def test_an_fp8_kv_cache_needs_avx512_or_amx():
    reason = hardware.missing_fp8_kv_cache(hardware.parse_cpu_flags(X86))
    assert reason is not None and "AVX-512 or AMX" in reason
    assert hardware.missing_fp8_kv_cache({"avx2", "avx512f"}) is None
    assert hardware.missing_fp8_kv_cache({"avx2", "amx_tile"}) is None


def test_this_machine_is_probed_consistently():
    npus = hardware.ascend_npus()
    assert (hardware.missing_ascend_npu() is None) == bool(npus)
    assert all(name.startswith("davinci") for name in npus)
    assert hardware.cpu_model()


@vllm_env
@lacks_fp8_kv_cache
def test_an_fp8_kv_cache_is_refused_before_the_engine_starts_where_the_cpu_lacks_it(example_model, tmp_path):
    out = tmp_path / "fp8.zarr"
    done = run_cli("capture", "-b", "vllm", "-m", example_model, "--random-input-ids", "8",
                   "--max-new-tokens", "2", "-E", "kv_cache_dtype=fp8", "-o", out)
    assert done.returncode != 0
    assert "AVX-512 or AMX" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()
