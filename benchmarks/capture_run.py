"""One timed run of one tool, in a fresh process: ``bench_msprobe.py`` starts it in the tool's own
environment (ptrace in the main one, msprobe in ``.venvs/msprobe``), so each tool is measured
against plain ``generate`` in *its* environment, and no run inherits another's caches.

    python capture_run.py plain   MODEL PROMPT.json NEW_TOKENS DTYPE
    python capture_run.py ptrace  MODEL PROMPT.json NEW_TOKENS DTYPE OUT.zarr {stats|full}
    python capture_run.py msprobe MODEL PROMPT.json NEW_TOKENS DTYPE DUMP_DIR {statistics|tensor}

Imports are not timed (each tool's start-up is measured apart), nor is one untimed load and
short ``generate`` first: transformers imports the model's code and generation's on first use,
and msprobe's import does part of that, which would bill plain runs for it. What is timed is
what a user waits for once the libraries are loaded: load the model, run greedy ``generate``,
record:

- plain:   ``from_pretrained`` + ``generate``;
- ptrace:  ``ptrace.capture`` end to end (fingerprint, load, generate, record, commit), the
           decoder layers' outputs (``layers.*.out``) at every position, no prompt logprobs;
- msprobe: ``from_pretrained`` + ``PrecisionDebugger`` (level L0: module outputs, restricted to
           the decoder layers by ``list``) + ``start`` + ``generate`` + ``stop`` + ``step``
           (``dump.json`` is written by then).

Prints one JSON line: seconds, and the process's peak RSS.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

#: msprobe's L0 ``list`` matches module names by substring: every HF decoder layer's forward.
MSPROBE_LAYERS = "DecoderLayer.forward"


def peak_rss_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def msprobe_config(dump_dir: Path, task: str) -> Path:
    """msprobe's documented config.json: L0 (module level), forward outputs of the decoder layers."""
    task_config = {"scope": [], "list": [MSPROBE_LAYERS], "data_mode": ["output"]}
    if task == "statistics":
        task_config["summary_mode"] = "statistics"
    config = {"task": task, "dump_path": str(dump_dir), "rank": [], "step": [], "level": "L0", task: task_config}
    path = dump_dir.with_name(dump_dir.name + ".config.json")
    path.write_text(json.dumps(config, indent=1))
    return path


def main() -> None:
    tool, model_dir, prompt_file, new_tokens, dtype_name, *rest = sys.argv[1:]
    prompt = json.loads(Path(prompt_file).read_text())
    new_tokens = int(new_tokens)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, dtype_name)

    def generate() -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        if tool == "msprobe":
            debugger = PrecisionDebugger(config_path=str(config))
            debugger.start(model=model)
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
        if tool == "msprobe":
            debugger.stop()
            debugger.step()

    if tool == "ptrace":
        from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

        output, mode = rest
        config = CaptureConfig(
            backend="torch", model=model_dir, output=output, dtype=dtype_name, prompt_token_ids=(tuple(prompt),),
            overwrite=True, command=("bench",),
            sampling=SamplingParams(seed=42, max_new_tokens=new_tokens, prompt_logprobs=False),
            settings=CaptureSettings(mode=mode, tensors=("layers.*.out",)))
        run = lambda: capture(config)  # noqa: E731
    elif tool == "msprobe":
        from msprobe.pytorch import PrecisionDebugger

        dump_dir, task = rest
        config = msprobe_config(Path(dump_dir), task)
        run = generate
    else:
        run = generate
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():  # the untimed warm-up: lazy imports
        model.generate(torch.tensor([prompt[:4]]), max_new_tokens=2, do_sample=False)
    del model
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
