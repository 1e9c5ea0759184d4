"""In-flight batching in `BatchRunner`: concurrent model calls join one running batch, a short request is answered
before a long one it arrived during, a bad request fails alone, a failing step fails only the requests then in
flight, and the scheduler thread stops with the runner or the server. No Triton needed except where marked."""

import threading
import time

import numpy as np
import pytest

import el_export
from el_export.cli import main
from el_export.errors import ElExportError, InputError, InvalidArgumentError
from el_export.runtime.scheduler import BackgroundScheduler
from el_export.serving.batching import BatchRunner
from el_export.serving.server import ServeConfig

from .test_serve import TEXTS, _assert_answer_equals, _offline, _text_request
from .threads import run_in_threads

SCHEDULER_THREAD = "el-export-scheduler"


@pytest.fixture(scope="module")
def generator(cli_bundle):
    return el_export.load(cli_bundle)


def _fixed_length(n: int, **parameters) -> dict:
    """n new tokens exactly: the random tiny model would otherwise stop at a random eos."""
    return {"max_new_tokens": n, "min_new_tokens": n, **parameters}


def _concurrently(runner: BatchRunner, calls: list[list]) -> dict[int, list]:
    """Each call's answers, the calls released together from threads of their own (each a model call)."""
    barrier, answers = threading.Barrier(len(calls), timeout=30), {}

    def call(i: int) -> None:
        barrier.wait()
        answers[i] = runner(calls[i])

    run_in_threads(call, len(calls))
    assert len(answers) == len(calls), "a model call did not return"
    return answers


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SCHEDULER_THREAD]


def test_concurrent_model_calls_of_mixed_lengths_equal_generate_alone(generator):
    jobs = [(TEXTS[i % 4], _fixed_length(n, num_beams=1 + i % 3)) for i, n in enumerate((3, 17, 8, 30, 5, 12))]
    with BatchRunner(generator) as runner:
        answers = _concurrently(runner, [[(_text_request(text), parameters)] for text, parameters in jobs])
    for i, (text, parameters) in enumerate(jobs):
        _assert_answer_equals(answers[i][0], _offline(generator, text, parameters))
        assert answers[i][0]["sequences"].shape[-1] == parameters["max_new_tokens"] + 1
    assert not _scheduler_threads()


class SlowSteps:
    """The generator's backend, `seconds` slower per decoder step (a long search lasts long enough to overlap), with
    the rows of every step in `rows`."""

    def __init__(self, monkeypatch, generator, seconds: float):
        run, self.rows = generator.backend.run, []

        def slow_run(graph_name, feeds):
            if graph_name == "decoder_step":
                self.rows.append(feeds["input_ids"].shape[0])
                time.sleep(seconds)
            return run(graph_name, feeds)

        monkeypatch.setattr(generator.backend, "run", slow_run)


def test_a_short_request_sent_while_a_long_one_runs_comes_back_first(generator, monkeypatch):
    steps = SlowSteps(monkeypatch, generator, 0.01)  # the long one: 60 steps, >= 0.6 s
    long_parameters, short_parameters = _fixed_length(60, num_beams=2), _fixed_length(2, num_beams=2)
    done: dict[str, float] = {}
    with BatchRunner(generator) as runner:

        def send(name: str, text: str, parameters: dict) -> None:
            done[name + " answer"] = runner([(_text_request(text), parameters)])[0]
            done[name] = time.monotonic()

        long_call = threading.Thread(target=send, args=("long", TEXTS[1], long_parameters))
        long_call.start()
        time.sleep(0.15)  # the long one is decoding
        short_sent = time.monotonic()
        send("short", TEXTS[2], short_parameters)
        long_call.join(timeout=60)
    assert done["long"] - done["short"] > 0.2, done  # answered at least 20 of the long one's steps before it
    assert done["short"] - short_sent < 0.3, done
    assert 4 in steps.rows, steps.rows  # the short one's 2 beams joined the long one's 2 in one decoder step
    _assert_answer_equals(done["short answer"], _offline(generator, TEXTS[2], short_parameters))
    _assert_answer_equals(done["long answer"], _offline(generator, TEXTS[1], long_parameters))


def test_a_bad_request_among_concurrent_good_ones_fails_alone(generator):
    good = _fixed_length(6)
    calls = [
        [(_text_request(TEXTS[0]), good), ({"input_ids": np.array([[5, 6, 10**6]])}, good)],  # one group: at fault
        [(_text_request(TEXTS[1]), {"num_beams": "two"})],
        [(_text_request(TEXTS[2]), good)],
        [(_text_request(TEXTS[3]), _fixed_length(9, num_beams=2))],
    ]
    with BatchRunner(generator) as runner:
        answers = _concurrently(runner, calls)
    assert isinstance(answers[0][1], InputError) and "outside the vocabulary" in str(answers[0][1])
    assert isinstance(answers[1][0], InvalidArgumentError) and "num_beams must be int" in str(answers[1][0])
    _assert_answer_equals(answers[0][0], _offline(generator, TEXTS[0], good))
    _assert_answer_equals(answers[2][0], _offline(generator, TEXTS[2], good))
    _assert_answer_equals(answers[3][0], _offline(generator, TEXTS[3], _fixed_length(9, num_beams=2)))


def test_a_failing_step_fails_the_requests_in_flight_in_one_line_and_serving_goes_on(generator, monkeypatch, capsys):
    run, failures = generator.backend.run, []

    def fail_once(graph_name, feeds):
        """Fails the first step that runs both requests' rows (slowed, so that the second joins the first)."""
        if graph_name == "decoder_step":
            time.sleep(0.01)
            if feeds["input_ids"].shape[0] == 2 and not failures:
                failures.append(graph_name)
                raise RuntimeError("injected backend failure")
        return run(graph_name, feeds)

    monkeypatch.setattr(generator.backend, "run", fail_once)
    ids, mask = generator.tokenizer.encode(list(TEXTS[:2]))
    background = BackgroundScheduler(generator.scheduler, around=generator.backend.generating)
    try:
        in_flight = [
            background.submit(generator.request(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **p))
            for i, p in enumerate((_fixed_length(30), _fixed_length(25)))
        ]
        for request in in_flight:
            with pytest.raises(ElExportError) as failed:
                background.wait(request)
            assert str(failed.value) == "generation failed: injected backend failure"
        after = background.submit(generator.request(input_ids=ids[:1], attention_mask=mask[:1], **_fixed_length(4)))
        output = background.wait(after)
    finally:
        background.stop()
    assert failures and "RuntimeError: injected backend failure" in capsys.readouterr().err  # the traceback, logged
    reference = generator.generate(input_ids=ids[:1], attention_mask=mask[:1], **_fixed_length(4))
    assert np.array_equal(output.sequences.numpy(), reference.sequences.numpy())


def test_the_scheduler_thread_starts_on_first_use_and_stops_on_close(generator):
    runner = BatchRunner(generator)
    assert not _scheduler_threads()  # a runner that never searched in flight starts none
    runner([(_text_request(TEXTS[0]), _fixed_length(3))])
    assert len(_scheduler_threads()) == 1
    runner.close()
    assert not _scheduler_threads()
    with BatchRunner(generator, batching="group") as grouped:
        _assert_answer_equals(grouped([(_text_request(TEXTS[0]), _fixed_length(3))])[0],
                              _offline(generator, TEXTS[0], _fixed_length(3)))  # fmt: skip
        assert not _scheduler_threads()
    with pytest.raises(InvalidArgumentError, match="batching 'static' is not one of inflight, group"):
        BatchRunner(generator, batching="static")


def test_instances_default_to_8_in_flight_and_1_grouped():
    assert ServeConfig().model_instances == 8
    assert ServeConfig(batching="group").model_instances == 1
    assert ServeConfig(batching="group", instances=3).model_instances == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-rows", "-2"], "--max-rows must be at least 1, got -2"),
        (["--instances", "0"], "instances must be at least 1"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "triton-repo"])
def test_running_batch_flags_are_refused_in_one_line(cli_bundle, tmp_path, capsys, command, argv, message):
    out = ["--out", str(tmp_path / "repo")] if command == "triton-repo" else []
    assert main([command, str(cli_bundle), *out, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_triton_repo_records_batching_and_the_running_batch_caps(cli_bundle, tmp_path):
    argv = ["triton-repo", str(cli_bundle), "--out", str(tmp_path / "repo"), "--model-name", "tiny",
            "--max-batch", "6", "--max-rows", "12"]  # fmt: skip
    assert main(argv) == 0
    config = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'key: "el_export_batching" value: { string_value: "inflight" }' in config
    assert 'key: "el_export_max_batch" value: { string_value: "6" }' in config
    assert 'key: "el_export_max_rows" value: { string_value: "12" }' in config
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in config  # each instance: a process of its own
    assert main([*argv[:3], str(tmp_path / "grouped"), *argv[4:6], "--batching", "group", "--instances", "2"]) == 0
    config = (tmp_path / "grouped" / "tiny" / "config.pbtxt").read_text()
    assert 'key: "el_export_batching" value: { string_value: "group" }' in config
    assert 'key: "el_export_max_batch" value: { string_value: "" }' in config
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
