"""vllm-ms cannot run without an Ascend NPU: it must say so in one clear line, whatever is installed."""

from __future__ import annotations

import pytest

from ptrace.backends.base import LoadOptions
from ptrace.backends.registry import backend_class, engine_python
from ptrace.backends.vllm import VllmMindSporeBackend
from ptrace.errors import BackendUnavailableError
from tests.conftest import without_ascend_npu

pytestmark = [pytest.mark.backend("vllm-ms"), without_ascend_npu]


def test_without_an_ascend_npu_it_refuses_before_importing_anything(example_model):
    with pytest.raises(BackendUnavailableError, match="needs an Ascend NPU") as error:
        VllmMindSporeBackend().load(LoadOptions(example_model, "float16", "npu"))
    assert "--backend vllm" in str(error.value)


def test_the_registry_refuses_it_before_looking_for_its_environment():
    """No engine environment can give a machine an NPU: say so, not "create its environment"."""
    for probe in (backend_class, engine_python):
        with pytest.raises(BackendUnavailableError, match="cannot run on this machine.*Ascend NPU"):
            probe("vllm-ms")
