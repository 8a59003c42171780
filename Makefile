# The two commands of the README:  `make demo` (the main job end to end)  and  `make test`.
# Each sets up what it needs first, from nothing but Python >= 3.11 and a package index.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PTRACE := $(VENV)/bin/ptrace
# torch 2.13.0 CPU build; the engines' own environments (vLLM, MindSpore) pin the same version.
TORCH  ?= torch==2.13.0
# The HF transformers version the torch backend is tested with (the [torch] extra allows >= 4.57.1).
TRANSFORMERS ?= transformers==5.19.0
MODEL  ?= examples/tiny-qwen2
DEMO   ?= demo

.PHONY: setup demo browser test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[torch,test]" "$(TORCH)" "$(TRANSFORMERS)"
	touch $@

demo: setup
	$(PTRACE) capture --backend torch --model $(MODEL) --random-input-ids 128 --seed 42 \
		--max-new-tokens 20 --tensors '*' --output $(DEMO)/torch-fp32.zarr --overwrite
	$(PTRACE) inspect $(DEMO)/torch-fp32.zarr
	$(PTRACE) validate $(DEMO)/torch-fp32.zarr
	$(PTRACE) replay $(DEMO)/torch-fp32.zarr --backend torch --dtype bfloat16 --output $(DEMO)/bf16 \
		--report $(DEMO)/report.html --json $(DEMO)/result.json --overwrite
	$(PTRACE) pack $(DEMO)/torch-fp32.zarr --overwrite
	@echo "open $(DEMO)/report.html"

# The report test opens the HTML report in real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	{ echo "Chromium is needed by the report test: sudo apt-get install chromium" >&2; exit 1; }

test: setup browser
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_compare.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
