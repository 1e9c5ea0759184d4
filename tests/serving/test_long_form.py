"""Long audio through serving: Whisper's long-form loop answers a request with its transcript (`segments`, JSON)
equal to `Generator.transcribe` on that recording alone, beside short requests of the same batch and while the
running batch goes on; the audio cap, from an upload's header; the speech parameters refused for text bundles;
`segments` in the Triton config of speech bundles only.

The real tiny.en reads tests/data/meeting-31s.flac (31 s: two windows); each of its runs takes about 5 s.
"""

import io
import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import el_export
from el_export.cli import main
from el_export.errors import InputError, InvalidArgumentError
from el_export.runtime.audio import load_audio
from el_export.serving.batching import SPEECH_PARAMETERS, BatchRunner, RequestCaps
from el_export.serving.process import free_ports
from el_export.serving.server import ServeConfig
from el_export.serving.triton_repo import TritonPythonModel, write_repository

from .test_serve import REQUEST_TIMEOUT, Counting, ServeProcess, _assert_answer_equals, _client, _triton_or_skip

MEETING = Path(__file__).parent.parent / "data" / "meeting-31s.flac"
RATE = 16000
SHORT_SECONDS = 6  # the short request: the meeting's first seconds, one window


def _audio_request(data: bytes) -> dict:
    return {"audio": np.array([[data]], dtype=np.object_)}


def _wav(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(scope="module")
def meeting(tiny_en):
    """tiny.en, the requests (the 31 s file's bytes, its first seconds as samples) and what the library returns for
    each alone."""
    generator = tiny_en[2]
    short = load_audio(MEETING, RATE)[: SHORT_SECONDS * RATE]
    return SimpleNamespace(
        generator=generator,
        long_request=_audio_request(MEETING.read_bytes()),
        short_request={"samples": short[None]},
        transcript=generator.transcribe([str(MEETING)])[0],
        sequences=generator.generate(audio=[str(MEETING)], return_timestamps=True).sequences[0],
        short=generator.generate(audio=[short]),
    )


def _assert_long_form_answer(answer: dict, meeting) -> None:
    assert json.loads(answer["segments"][0, 0]) == meeting.transcript.to_json()
    assert len(meeting.transcript.segments) > 3 and meeting.transcript.segments[-1].end > 28
    assert torch.equal(torch.tensor(answer["sequences"][0, 0]), meeting.sequences)
    assert answer["text"][0, 0].decode() == meeting.transcript.text
    assert answer["scores"].shape == (1, 1) and np.isnan(answer["scores"]).all()


def _assert_short_answer(answer: dict, meeting) -> None:
    _assert_answer_equals(answer, meeting.short)
    assert answer["segments"].tolist() == [[b"[]"]]  # not timed


@pytest.mark.parametrize("batching", ["inflight", "group"])
def test_a_long_and_a_short_request_in_one_batch_equal_the_library_alone(meeting, batching):
    with BatchRunner(meeting.generator, batching=batching) as runner:
        long_answer, short_answer = runner([(meeting.long_request, {}), (meeting.short_request, {})])
    _assert_long_form_answer(long_answer, meeting)
    _assert_short_answer(short_answer, meeting)


def test_a_short_request_is_answered_while_a_long_form_one_runs(meeting, monkeypatch):
    """The long-form loop runs on its model call's thread: the scheduler thread goes on with the other calls. The
    long one is held inside `transcribe` until the short one is answered (it would wait forever were they
    serialised: the hold times out and the test fails)."""
    answers: dict[str, dict] = {}
    short_answered, long_started = threading.Event(), threading.Event()
    generator = meeting.generator
    transcribe = generator.transcribe

    def held(*args, **kwargs):
        long_started.set()
        assert short_answered.wait(timeout=60), "the short request waited for the long-form one"
        return transcribe(*args, **kwargs)

    monkeypatch.setattr(generator, "transcribe", held)
    with BatchRunner(generator) as runner:

        def send(name: str, request: dict) -> None:
            answers[name] = runner([(request, {})])[0]

        long_call = threading.Thread(target=send, args=("long", meeting.long_request))
        long_call.start()
        assert long_started.wait(timeout=60)
        send("short", meeting.short_request)
        short_answered.set()
        long_call.join(timeout=120)
    _assert_long_form_answer(answers["long"], meeting)
    _assert_short_answer(answers["short"], meeting)


def test_long_audio_is_transcribed_through_the_triton_server(meeting, tmp_path):
    """`el-export serve` on tiny.en: the `segments` output over HTTP."""
    _triton_or_skip()
    import tritonclient.http as http

    serving = ServeProcess(Path(meeting.generator.backend.bundle_dir), tmp_path, free_ports(3))
    try:
        client = _client(serving.url)
        tensor = http.InferInput("audio", [1, 1], "BYTES")
        tensor.set_data_from_numpy(meeting.long_request["audio"])
        result = client.infer("tiny", [tensor], timeout=int(REQUEST_TIMEOUT * 1e6))
        answer = {name: result.as_numpy(name) for name in ("text", "sequences", "scores", "segments")}
        client.close()
    finally:
        serving.stop()
    _assert_long_form_answer(answer, meeting)


def test_audio_over_the_cap_is_refused_from_its_header(whisper_bundle):
    """A WAV whose header says 2 hours (7200 samples at 1 Hz: decoded and resampled, 115 M samples) against the
    default cap of 1 hour; samples over a lower cap. Nothing is searched."""
    generator = Counting(el_export.load(whisper_bundle))
    two_hours = _wav(np.zeros(7200, np.float32), 1)
    answers = BatchRunner(generator)([(_audio_request(two_hours), {})])
    assert isinstance(answers[0], InputError) and "\n" not in str(answers[0])
    assert str(answers[0]) == ("the audio bytes is 7200.0 s; this server takes up to 3600 s (start it with a higher "
                               "--max-audio-seconds for more): split it")  # fmt: skip
    capped = BatchRunner(generator, RequestCaps(max_audio_seconds=2))
    over = np.zeros(2 * RATE + 1, np.float32)
    answers = capped([({"samples": over[None]}, {}), (_audio_request(_wav(over, RATE)), {})])
    assert str(answers[0]).startswith("a samples input is 2.0001 s; this server takes up to 2 s")
    assert str(answers[1]).startswith("the audio bytes is 2.0001 s; this server takes up to 2 s")
    assert generator.calls == 0


def test_long_form_parameters_are_checked_before_any_search(whisper_bundle):
    generator = Counting(el_export.load(whisper_bundle))
    long = {"samples": np.zeros((1, 31 * RATE), np.float32)}
    answers = BatchRunner(generator)([
        (long, {"temperature": "0.0,0.2,0.4"}),
        (long, {"return_timestamps": False}),
        (long, {"no_speech_threshold": 0.6}),
        (long, {"word_timestamps": 1}),
    ])  # fmt: skip
    expected = [
        "parameter temperature must be one number: a schedule of fallback temperatures (a list) is not a Triton "
        "parameter type",
        "audio past 30 s is transcribed long-form, with timestamps: drop return_timestamps=false",
        "`no_speech_threshold` needs `logprob_threshold`",
        "parameter word_timestamps must be bool",
    ]
    for answer, message in zip(answers, expected, strict=True):
        assert isinstance(answer, InvalidArgumentError) and str(answer).startswith(message), answer
    assert generator.calls == 0


def test_text_bundles_refuse_the_speech_parameters(cli_bundle):
    generator = Counting(el_export.load(cli_bundle))
    values = {"return_timestamps": True, "condition_on_prev_tokens": True, "compression_ratio_threshold": 2.4,
              "logprob_threshold": -1.0, "no_speech_threshold": 0.6, "word_timestamps": True}  # fmt: skip
    assert set(values) == set(SPEECH_PARAMETERS)
    text = {"text": np.array([[b"Short."]], dtype=np.object_)}
    answers = BatchRunner(generator)([(text, {name: value}) for name, value in values.items()])
    for name, answer in zip(values, answers, strict=True):
        assert isinstance(answer, InvalidArgumentError)
        assert (
            str(answer) == f"parameter {name}: for speech bundles (Whisper transcription) only; this bundle takes text"
        )
    assert generator.calls == 0


def test_segments_is_an_output_of_speech_bundles_only(whisper_bundle, cli_bundle, tmp_path):
    for bundle, has_segments in ((whisper_bundle, True), (cli_bundle, False)):
        out = tmp_path / f"speech-{has_segments}"
        assert main(["triton-repo", str(bundle), "--out", str(out), "--model-name", "m"]) == 0
        config = (out / "m" / "config.pbtxt").read_text()
        assert 'name: "sequences" data_type: TYPE_INT64 dims: [-1, -1]' in config
        assert ('name: "segments" data_type: TYPE_STRING dims: [1]' in config) == has_segments


def test_the_triton_repository_model_reads_the_audio_cap(whisper_bundle, tmp_path):
    """A float cap, through config.pbtxt's string parameters, into the model Triton loads; its outputs by bundle."""
    model_dir = write_repository(
        whisper_bundle, tmp_path / "repo", ServeConfig(caps=RequestCaps(max_audio_seconds=90.5))
    )
    config = (model_dir / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', config))
    assert parameters["el_export_max_audio_seconds"] == "90.5"
    model = TritonPythonModel()
    model_config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model.initialize(
        {"model_config": json.dumps(model_config), "model_repository": str(model_dir), "model_version": "1"}
    )
    try:
        assert model.runner.caps.max_audio_seconds == 90.5
        assert model.outputs == ["text", "sequences", "scores", "segments"]
    finally:
        model.finalize()
