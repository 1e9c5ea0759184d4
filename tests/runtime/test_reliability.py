"""Reliability: hostile manifests and arguments, concurrency, long resumable runs, bounded memory, the memory guard."""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import el_export
from el_export.cli import main
from el_export.contract.manifest import Manifest
from el_export.errors import BundleError, InputError, ResourceError
from el_export.tolerance import REBATCHED_SCORE_TOLERANCE

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def manifest_json(bundles):
    return json.loads((bundles("bart", "el") / "manifest.json").read_text())


def _paths(data, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*prefix, i))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_is_read_or_refused_with_bundle_error(manifest_json, data):
    document = copy.deepcopy(manifest_json)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(document))[1:]
        path = data.draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    with contextlib.suppress(BundleError):  # refused with the one error type, or read
        Manifest.from_json(document)


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_any_json_document_is_refused_cleanly(document):
    with pytest.raises(BundleError):
        Manifest.from_json(document)


OPTIONS = ["--num-beams", "--max-new-tokens", "--num-return-sequences", "--length-penalty", "--early-stopping",
           "--no-repeat-ngram-size", "--batch-size", "--json", "--memory-limit", "--top-k", "--do-sample", "--seed",
           "--source-len", "--backend", "--output", "--input-file", "--truncate", "--help-me"]  # fmt: skip
VALUES = ["0", "1", "2", "-3", "1e9", "nan", "never", "true", "x", "", "/dev/null", "3.5", "onnxruntime", "tensorrt"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["generate", "inspect"]), st.lists(st.sampled_from(OPTIONS + VALUES), max_size=6))
def test_fuzzed_command_lines_end_in_a_clean_exit(bundles, capsys, command, tokens):
    """Any argument soup: argparse's usage error (exit 2) or el-export's one-line error, never a traceback."""
    capsys.readouterr()  # hypothesis reuses the fixture across examples: start each with empty streams
    argv = [command, str(bundles("bart", "el")), *tokens]
    if command == "generate":
        argv.insert(2, "hello")
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert isinstance(code, int)
    if code not in (0, 2):  # argparse reports its own errors; ours are one line
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_one_generator_from_eight_threads_equals_serial(bundles):
    generator = el_export.load(bundles("bart", "el"))
    g = torch.Generator().manual_seed(5)
    jobs = [
        (torch.randint(3, 96, (1 + i % 3, 4 + i), generator=g), {"num_beams": 1 + i % 4, "max_new_tokens": 6 + i})
        for i in range(16)
    ]
    serial = [generator.generate(input_ids=ids, **kw).sequences for ids, kw in jobs]
    results, errors = [None] * len(jobs), []

    def work(worker: int):
        try:
            for j in range(worker, len(jobs), 8):
                ids, kw = jobs[j]
                results[j] = generator.generate(input_ids=ids, **kw).sequences
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(results, serial, strict=True))


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_does_not_grow_over_many_batches(bundles):
    generator = el_export.load(bundles("bart", "el"))
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(15):  # warm-up: allocator and ORT arenas settle
        generator.generate(input_ids=ids, num_beams=4, max_new_tokens=12)
    before = _rss_bytes()
    for _ in range(80):
        generator.generate(input_ids=ids, num_beams=4, max_new_tokens=12)
    assert _rss_bytes() - before < 25 * 2**20


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_memory_guard_splits_a_batch_into_chunks_with_the_same_result(family, bundles, monkeypatch):
    from el_export.runtime import memory

    generator = el_export.load(bundles(family, "el"))
    ids = torch.randint(3, 90, (5, 7), generator=torch.Generator().manual_seed(2))
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 9, "no_repeat_ngram_size": 2}
    whole = generator.generate(input_ids=ids, **kwargs)
    per_input = memory.bytes_per_input(generator.manifest, 3, 7, 7 + 9 + 1)
    generator.memory_limit = 2 * per_input + 1  # two inputs per chunk: 2 + 2 + 1
    calls = []
    original = generator.backend.run
    monkeypatch.setattr(generator.backend, "run", lambda name, feeds: calls.append(name) or original(name, feeds))
    chunked = generator.generate(input_ids=ids, **kwargs)
    assert calls.count("encoder" if family == "bart" else "prefill") == 3
    assert torch.equal(chunked.sequences, whole.sequences)
    assert torch.equal(chunked.beam_indices, whole.beam_indices)
    assert torch.allclose(chunked.sequences_scores, whole.sequences_scores)
    generator.memory_limit = per_input // 2
    with pytest.raises(ResourceError, match="one input needs about"):
        generator.generate(input_ids=ids, **kwargs)


def test_memory_limit_on_the_command_line(cli_bundle, capsys):
    assert main(["generate", str(cli_bundle), "some text", "--memory-limit", "0.000001"]) == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one input needs about" in err[0] and "--memory-limit" in err[0]


def test_unknown_token_ids_are_refused(bundles):
    with pytest.raises(InputError, match="outside the vocabulary"):
        el_export.load(bundles("bart", "el")).generate(input_ids=[[5, 6, 960]])


def _write_inputs(path: Path, n: int) -> None:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": f"input number {i} about foxes"}) + "\n" for i in range(n))
    )


def test_streamed_run_survives_a_kill_and_resumes_without_loss_or_duplicates(tmp_path, cli_bundle):
    inputs, output, clean = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "clean.jsonl"
    _write_inputs(inputs, 40)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "el_export.cli", "generate", str(cli_bundle), "--input-file", str(inputs),
                "--output", str(out), "--batch-size", "1", "--num-beams", "2", "--max-new-tokens", "40"]  # fmt: skip

    argv = command(output)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = output.read_text().count("\n")
    assert 5 <= written < 40, "the run should have been cut off part-way"
    with open(output, "a") as f:  # a record half-written when the process died
        f.write('{"id": "r999", "inp')
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    header, *records = [json.loads(line) for line in output.read_text().splitlines()]
    assert header["el_export_job"]["generation"]["max_new_tokens"] == 40  # the job header, written once
    ids = [r["id"] for r in records]  # written as each input ends: in the order they finish
    assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and len(set(ids)) == 40  # each exactly once
    subprocess.run(command(clean), check=True, capture_output=True, timeout=300)
    clean_header, *clean_records = [json.loads(line) for line in clean.read_text().splitlines()]
    assert header == clean_header
    by_id = {r["id"]: r for r in clean_records}
    for record in records:  # the same answers; scores as close as other batch-mates allow (padding reorders sums)
        expected = by_id[record["id"]]
        assert record["input"] == expected["input"] and record["input_sha256"] == expected["input_sha256"]
        for got, want in zip(record["outputs"], expected["outputs"], strict=True):
            assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
            assert abs(got["score"] - want["score"]) <= REBATCHED_SCORE_TOLERANCE
