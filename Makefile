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

.PHONY: setup demo test bench clean

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
	$(PTRACE) pack $(DEMO)/torch-fp32.zarr --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_capture.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
