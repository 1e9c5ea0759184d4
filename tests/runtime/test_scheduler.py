"""In-flight batching: inputs join a running batch at different steps and leave it when their search ends, with
mixed options, and every answer equals HF `generate` on that input alone (every family, both modes, the ONNX
Runtime and torch backends)."""

import pytest
import torch

import el_export
from el_export.runtime.torch import load_torch
from el_export.testing.tiny import FAMILIES
from el_export.tolerance import SCORE_TOLERANCE

# One running batch per rows-per-input (3 beams; 1 row), options mixed within each.
OPTIONS = [
    dict(num_beams=3, max_new_tokens=12, length_penalty=0.6, early_stopping=True),
    dict(num_beams=3, max_new_tokens=4),
    dict(num_beams=3, max_new_tokens=9, min_new_tokens=6, no_repeat_ngram_size=2, early_stopping="never"),
    dict(max_new_tokens=10),
    dict(num_beams=3, max_new_tokens=14, repetition_penalty=1.3, length_penalty=1.5),
    dict(max_new_tokens=3, repetition_penalty=1.2),
    dict(num_beams=3, num_return_sequences=2, max_new_tokens=8),
    dict(max_new_tokens=13, no_repeat_ngram_size=3),
]
LENGTHS = (11, 3, 7, 5, 9, 2, 6, 4)  # source (or prompt) lengths


def _inputs(model, speech: bool):
    """One input per OPTIONS entry, each of its own length (Whisper: its own features)."""
    g = torch.Generator().manual_seed(5)
    if speech:
        frames = 2 * model.config.max_source_positions
        return [{"input_features": torch.randn(1, model.config.num_mel_bins, frames, generator=g)} for _ in OPTIONS]
    return [{"input_ids": torch.randint(3, model.config.vocab_size, (1, n), generator=g)} for n in LENGTHS]


def _run(generator, calls, max_batch):
    """The calls through one scheduler whose batch cap forces admissions while others decode."""
    generator.max_batch = max_batch
    scheduler = generator.scheduler()
    requests = [generator.request(**call) for call in calls]
    for request in requests:
        scheduler.submit(request)
    scheduler.run()
    return [request.result() for request in requests], scheduler


def _check_alone(hf, calls, outputs):
    for call, ours in zip(calls, outputs, strict=True):
        with torch.no_grad():
            ref = hf.generate(**call, return_dict_in_generate=True, output_scores=True)
        assert torch.equal(ours.sequences, ref.sequences), call
        if ref.get("sequences_scores") is not None:
            assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= SCORE_TOLERANCE, call
            assert torch.equal(ours.beam_indices, ref.beam_indices), call


def _calls(model, speech=False):
    options = OPTIONS
    if speech:  # HF's Whisper generate returns its best hypothesis num_return_sequences times: not this test's point
        options = [{k: v for k, v in o.items() if k != "num_return_sequences"} for o in OPTIONS]
    return [{**inputs, **o} for inputs, o in zip(_inputs(model, speech), options, strict=True)]


def _assert_in_flight(scheduler):
    """Admission into a running batch and compaction both happened: the test exercised what it claims."""
    assert scheduler.stats["joined_running"] > 0, scheduler.stats
    assert scheduler.stats["left_early"] > 0, scheduler.stats


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2", "whisper"])
def test_inputs_joining_and_leaving_match_hf_alone(family, mode, bundles, hf_models):
    hf = hf_models(family)
    calls = _calls(hf, speech=family == "whisper")
    outputs, scheduler = _run(el_export.load(bundles(family, mode)), calls, max_batch=3)
    _assert_in_flight(scheduler)
    _check_alone(hf, calls, outputs)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2", "whisper"])
def test_int8_in_flight_answers_equal_each_input_alone(family, bundles, hf_models):
    """int8 with row scales: an input's numbers do not depend on the rows beside it (each activation row, each
    encoder position has its own scale), so in-flight batching gives every input what the int8 bundle gives it
    alone, token for token."""
    hf = hf_models(family)
    calls = _calls(hf, speech=family == "whisper")
    generator = el_export.load(bundles(family, "el", "int8"))
    outputs, scheduler = _run(generator, calls, max_batch=3)
    _assert_in_flight(scheduler)
    for call, ours in zip(calls, outputs, strict=True):
        alone = generator.generate(**call)
        assert torch.equal(ours.sequences, alone.sequences), call


TORCH_CASES = [
    *((family, cache) for family in ("bart", "t5", "whisper") for cache in (False, True)),
    *((family, False) for family in FAMILIES if family not in ("bart", "t5")),  # growing caches: every family
]


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family, static_cache", TORCH_CASES)
def test_torch_backend_joins_and_leaves(family, mode, static_cache, hf_models):
    hf = hf_models(family)
    calls = _calls(hf, speech=family == "whisper")
    outputs, scheduler = _run(load_torch(hf, mode=mode, static_cache=static_cache), calls, max_batch=3)
    _assert_in_flight(scheduler)
    _check_alone(hf, calls, outputs)


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_torch_backend_decoder_only_joins_and_leaves(mode, hf_models):
    hf = hf_models("gpt2")
    calls = _calls(hf)
    outputs, scheduler = _run(load_torch(hf, mode=mode), calls, max_batch=3)
    _assert_in_flight(scheduler)
    _check_alone(hf, calls, outputs)


def test_generate_each_and_static_batching_give_the_same_answers(bundles, hf_models):
    """`generate_each` (continuous) and the static baseline answer alike; static admits nobody into a running batch
    and drops nobody early."""
    hf = hf_models("bart")
    calls = _calls(hf)
    generator = el_export.load(bundles("bart", "el"))
    continuous = generator.generate_each(calls)
    generator.batching = "static"
    static, scheduler = _run(generator, calls, max_batch=3)
    assert scheduler.stats["joined_running"] == 0 and scheduler.stats["left_early"] == 0
    assert scheduler.stats["peak_inputs"] == 3  # the calls formed static batches of 3 (the cap), not of 1
    for a, b in zip(continuous, static, strict=True):
        assert torch.equal(a.sequences, b.sequences)
    _check_alone(hf, calls, continuous)


def test_a_large_batch_runs_as_one_running_batch_with_hf_batch_output(bundles, hf_models, padded_batch):
    """generate on more inputs than fit at once: they stream through one running batch, and the output is HF's
    batch output (padding included)."""
    hf = hf_models("bart")
    generator = el_export.load(bundles("bart", "el"))
    ids, mask = padded_batch(hf, lengths=(11, 7, 3, 9, 2, 5, 8))
    kwargs = dict(num_beams=3, max_new_tokens=12, no_repeat_ngram_size=2)
    generator.max_batch = 2
    ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                          **kwargs)  # fmt: skip
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.beam_indices, ref.beam_indices)
    assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= SCORE_TOLERANCE


def test_a_sampled_request_is_one_cohort_as_hf_batch(bundles, hf_models, padded_batch):
    """Sampling draws for the rows of a batch together: a seeded sampled call still equals HF's batch with that
    seed while a greedy call shares the running batch."""
    hf = hf_models("bart")
    generator = el_export.load(bundles("bart", "el"))
    ids, mask = padded_batch(hf)
    sampled = dict(input_ids=ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=10, seed=7)
    greedy = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6)
    ours = generator.generate_each([greedy, sampled])[1]
    alone = generator.generate(**sampled)
    assert torch.equal(ours.sequences, alone.sequences)


def test_the_job_with_in_flight_batching_writes_what_static_batches_write(tmp_path, cli_bundle, capsys):
    """`generate --input-file --output` streams records through one running batch (written as each ends);
    `--batching static` and `--max-batch` change when, never what."""
    import json

    from el_export.cli import main

    inputs = tmp_path / "in.jsonl"
    texts = ["a fox", "the quick brown fox jumps over the lazy dog again and again", "foxes", "dog and fox run"]
    inputs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    records = {}
    for name, flags in (("continuous", ["--max-batch", "2"]), ("static", ["--batching", "static"])):
        out = tmp_path / f"{name}.jsonl"
        argv = ["generate", str(cli_bundle), "--input-file", str(inputs), "--output", str(out), "--num-beams", "2",
                "--max-new-tokens", "12", "--batch-size", "3", *flags]  # fmt: skip
        assert main(argv) == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()[1:]]
        records[name] = {r["id"]: [o["token_ids"] for o in r["outputs"]] for r in lines}
    assert records["continuous"] == records["static"] and sorted(records["static"]) == [0, 1, 2, 3]
    for flag in ("--max-batch", "--max-rows"):
        assert main(["generate", str(cli_bundle), "a fox", flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_forced_varied_lengths_match_hf_alone(batching, bundles, hf_models):
    """W6's shape: beam search with each input forced to its own length (min_new_tokens = max_new_tokens), so
    inputs end at different steps; a static batch keeps the ended ones' rows until its longest ends."""
    hf = hf_models("bart")
    g = torch.Generator().manual_seed(11)
    calls = []
    for _ in range(6):
        length = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(3, hf.config.vocab_size, (1, 6), generator=g)
        calls.append(dict(input_ids=ids, num_beams=4, max_new_tokens=length, min_new_tokens=length))
    generator = el_export.load(bundles("bart", "el"))
    generator.batching = batching
    _check_alone(hf, calls, generator.generate_each(calls))
