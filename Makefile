# The two commands of the README:  `make demo` (the main job end to end)  and  `make test`.
# Each sets up what it needs first, from nothing but Python >= 3.11 and a package index:
# the main environment (.venv: ptrace + torch) and one environment per engine (.venvs/vllm,
# .venvs/ms), because vLLM and MindSpore pin versions that exclude each other.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PTRACE := $(VENV)/bin/ptrace
# torch's CPU build, the pin the engines' own environments share (read from ptrace, its one home).
TORCH  ?= $(shell PYTHONPATH=. $(PYTHON) -c "from ptrace.backends.environments import TORCH; print(TORCH)")
# The HF transformers version the torch backend is tested with (the [torch] extra allows >= 4.57.1).
TRANSFORMERS ?= transformers==5.19.0
MODEL  ?= examples/tiny-qwen2
DEMO   ?= demo
ENVS   := .venvs
# msprobe (Ascend's precision debugger), the tool the benchmark measures ptrace against: a benchmark
# dependency, not an engine, in its own environment (its pins are not ptrace's).
MSPROBE_VENV ?= $(ENVS)/msprobe
MSPROBE      ?= mindstudio-probe==26.2.0

.PHONY: setup demo browser prometheus lint test bench clean

setup: $(VENV)/.installed $(ENVS)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[torch,test,datasets]" "$(TORCH)" "$(TRANSFORMERS)"
	touch $@

# Every engine environment the backends declare for ordinary machines (`ptrace envs list`; vllm-ms
# needs an Ascend NPU: `ptrace envs create vllm-ms`), with pytest for the engines' own tests.
$(ENVS)/.installed: $(VENV)/.installed
	$(PTRACE) envs create --all --with pytest
	touch $@

demo: setup
	$(PTRACE) capture --backend ms --model $(MODEL) --random-input-ids 128 --seed 42 \
		--max-new-tokens 20 --tensors '*' --output $(DEMO)/ms-fp32.zarr --overwrite
	$(PTRACE) inspect $(DEMO)/ms-fp32.zarr
	$(PTRACE) validate $(DEMO)/ms-fp32.zarr
	$(PTRACE) replay $(DEMO)/ms-fp32.zarr --backend vllm --output $(DEMO)/vllm-fp32 \
		--report $(DEMO)/ms-vs-vllm.html --json $(DEMO)/ms-vs-vllm.json --overwrite
	$(PTRACE) replay $(DEMO)/ms-fp32.zarr --backend vllm --dtype bfloat16 --output $(DEMO)/vllm-bf16 \
		--localize --report $(DEMO)/ms-vs-vllm-bf16.html --json $(DEMO)/ms-vs-vllm-bf16.json --overwrite
	$(PTRACE) replay $(DEMO)/ms-fp32.zarr --backend torch --output $(DEMO)/torch-fp32 \
		--report $(DEMO)/ms-vs-torch.html --overwrite
	$(PTRACE) pack $(DEMO)/ms-fp32.zarr --overwrite
	# Noise in the KV cache of the first 100 positions: how often do generations diverge? 4 levels, 8 prompts.
	$(PTRACE) capture --backend vllm --model $(MODEL) --random-input-ids 128 --num-requests 8 --seed 7 \
		--max-new-tokens 32 --tensors 'layers.*.out,layers.*.k,logits' --output $(DEMO)/vllm-8.zarr --overwrite
	$(PTRACE) whatif $(DEMO)/vllm-8.zarr --backend vllm --output $(DEMO)/kv-noise --overwrite \
		--inject 'noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99' --sweep std=1e-3,1e-2,1e-1,1 \
		--report $(DEMO)/kv-noise.html --json $(DEMO)/kv-noise.json
	@echo "open $(DEMO)/ms-vs-vllm.html, $(DEMO)/ms-vs-vllm-bf16.html and $(DEMO)/kv-noise.html"

# The report test opens the HTML report in real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	{ echo "Chromium is needed by the report test: sudo apt-get install chromium" >&2; exit 1; }

# The monitoring tests run a real Prometheus and promtool (Debian's package; only their own
# instance on 127.0.0.1, never the system service).
prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	{ echo "Prometheus is needed by the monitoring tests: sudo apt-get install prometheus" >&2; exit 1; }

# ruff's lint, and ARCHITECTURE.md's layers and no import circles (the contracts in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ptrace tests benchmarks examples
	$(VENV)/bin/lint-imports

# Everything from the main environment (the engines through their environments), then the
# backend tests inside each engine environment (there, the tests of the engines that run there).
test: setup browser prometheus lint
	PTRACE_REQUIRE_ENGINES=1 $(PY) -m pytest -q
	$(PTRACE) envs list --pythons | while read -r env python; do \
		PTRACE_TEST_ENVIRONMENT=$$env $$python -m pytest -q -p no:cacheprovider tests/backends || exit 1; done

$(MSPROBE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(MSPROBE_VENV)
	$(MSPROBE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(MSPROBE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" "$(TRANSFORMERS)" "$(MSPROBE)"
	touch $@

bench: setup $(MSPROBE_VENV)/.installed
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_compare.py
	$(PY) benchmarks/bench_writer.py
	$(PY) benchmarks/bench_msprobe.py --msprobe-python $(MSPROBE_VENV)/bin/python
	$(ENVS)/ms/bin/python benchmarks/bench_ms_decode.py --dtypes float32,float16
	$(ENVS)/ms/bin/python benchmarks/bench_ms_kernels.py
	$(ENVS)/vllm/bin/python benchmarks/bench_tp.py

clean:
	rm -rf $(VENV) $(ENVS) $(DEMO) .pytest_cache
