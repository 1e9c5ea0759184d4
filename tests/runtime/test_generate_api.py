"""HF habits of `load(bundle).generate`: generation_config, streamer, and audio at any sample rate."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import el_export
from el_export.contract.cache import encoder_bytes
from el_export.errors import InputError, InvalidArgumentError, ResourceError
from el_export.runtime import memory, speech
from el_export.runtime.base import Backend

FOX = Path(el_export.__file__).parent / "clips" / "fox.wav"  # 16 kHz speech


@pytest.fixture
def no_graph_runs(monkeypatch):
    """Any graph run fails the test: a refusal must come before the first one."""

    def refuse(self, graph_name, feeds):
        raise AssertionError(f"graph {graph_name} ran")

    monkeypatch.setattr(Backend, "run", refuse)


class Recorder:
    """A streamer that records what HF's `generate` hands a `TextStreamer`."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.dtype, value.device.type, value.tolist()))

    def end(self):
        self.calls.append(("end",))


def _batch(family: str):
    """3 inputs, padded (decoder-only: on the left), and their mask."""
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if family == "gpt2":
        mask[1, :2] = 0
    else:
        mask[2, 5:] = 0
    return ids, mask


# generation_config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_generation_config_and_kwargs_over_it_give_hf_tokens(family, bundles, hf_models):
    from transformers import GenerationConfig

    hf, generator = hf_models(family), el_export.load(bundles(family, "el"))
    ids, mask = _batch(family)
    config = GenerationConfig(num_beams=3, max_new_tokens=6, no_repeat_ngram_size=2)
    results = {}
    for name, kwargs in (("config", {}), ("override", {"max_new_tokens": 3, "num_beams": 2})):
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, generation_config=config, **kwargs)
        ours = generator.generate(ids, mask, generation_config=config, **kwargs).sequences
        as_dict = generator.generate(ids, mask, generation_config=config.to_diff_dict(), **kwargs).sequences
        assert torch.equal(ours, ref) and torch.equal(as_dict, ref), name
        results[name] = ours
    prompt = ids.shape[1] if family == "gpt2" else 1  # decoder-only sequences start with the prompt
    assert results["config"].shape[1] == prompt + 6  # the config's max_new_tokens, not the default 20
    assert results["override"].shape[1] == prompt + 3  # the kwarg's


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (42, "`generation_config` must be a transformers GenerationConfig or a dict of its fields, got int"),
        ({"num_beam": 3}, "generation_config has no field `num_beam`; did you mean `num_beams`?"),
        ({"seed": 3}, "generation_config has no field `seed`; pass it to generate(seed=...)"),
        ({"typical_p": 0.5}, "generation_config sets `typical_p=0.5`, which el-export does not implement; unset it"),
        ({"num_beams": 0}, "`num_beams` must be an integer in [1, 2**63), got 0"),
    ],
)
def test_a_bad_generation_config_is_refused_before_anything_runs(bundles, no_graph_runs, config, fragment):
    ids, mask = _batch("bart")
    with pytest.raises(InvalidArgumentError) as error:
        el_export.load(bundles("bart", "el")).generate(ids, mask, generation_config=config)
    assert fragment in str(error.value) and "\n" not in str(error.value) and error.value.exit_code == 2


# streamer ------------------------------------------------------------------------------------------------------


GREEDY, SAMPLING = {"max_new_tokens": 5}, {"max_new_tokens": 5, "do_sample": True, "temperature": 1.0}
STREAMED = [
    ("bart", GREEDY), ("bart", {**SAMPLING, "num_return_sequences": 2}),
    ("gpt2", GREEDY), ("gpt2", {**SAMPLING, "num_return_sequences": 2}),
    # HF's Whisper samples only with a temperature given, and returns its first sequence per input twice.
    ("whisper-multilingual", GREEDY), ("whisper-multilingual", SAMPLING),
]  # fmt: skip


@pytest.mark.parametrize(("family", "kwargs"), STREAMED, ids=[f"{f}-{len(k)}" for f, k in STREAMED])
def test_streamer_gets_the_calls_hf_makes(family, kwargs, bundles, hf_models):
    hf, generator = hf_models(family), el_export.load(bundles(family, "el"))
    theirs, ours = Recorder(), Recorder()
    if family.startswith("whisper"):  # the language is detected first: nothing is streamed for it
        features = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(0))
        inputs, ours_inputs = {"input_features": features}, {"input_features": features}
    else:
        ids, mask = _batch(family)
        inputs, ours_inputs = {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(7)  # sampling draws from torch's global generator, in HF and here
    with torch.no_grad():
        ref = hf.generate(**inputs, streamer=theirs, **kwargs)
    torch.manual_seed(7)
    out = generator.generate(**ours_inputs, streamer=ours, **kwargs)
    assert ours.calls == theirs.calls and ours.calls[-1] == ("end",)
    assert len(ours.calls) == 1 + 5 + 1  # the prompt, each of 5 steps, the end
    if not family.startswith("whisper"):  # HF's Whisper returns the tokens after its prompt
        assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"num_beams": 2, "do_sample": True}], ids=["beams", "sample"])
def test_streamer_with_beam_search_is_refused_before_anything_runs(bundles, no_graph_runs, kwargs):
    ids, mask = _batch("bart")
    streamer = Recorder()
    with pytest.raises(InvalidArgumentError) as error:
        el_export.load(bundles("bart", "el")).generate(ids, mask, streamer=streamer, **kwargs)
    message = str(error.value)
    assert message.startswith("`streamer` cannot be used with beam search (num_beams=2)") and "\n" not in message
    assert streamer.calls == []


def test_streamer_without_put_and_end_is_refused_before_anything_runs(bundles, no_graph_runs):
    ids, mask = _batch("bart")
    with pytest.raises(InvalidArgumentError, match=r"^`streamer` must have put\(\) and end\(\) methods .* got str$"):
        el_export.load(bundles("bart", "el")).generate(ids, mask, streamer="print")


def test_text_streamer_refuses_a_batch_as_in_hf(bundles, hf_models):
    from transformers import TextStreamer

    from el_export.testing.tiny import tiny_tokenizer

    ids, mask = _batch("bart")
    for run in (
        lambda streamer: hf_models("bart").generate(ids, attention_mask=mask, streamer=streamer),
        lambda streamer: el_export.load(bundles("bart", "el")).generate(ids, mask, streamer=streamer),
    ):
        with pytest.raises(ValueError, match="^TextStreamer only supports batch size 1$"):
            run(TextStreamer(tiny_tokenizer()))


def test_streamer_is_refused_when_the_batch_must_run_in_chunks(bundles, no_graph_runs):
    generator = el_export.load(bundles("bart", "el"))
    ids, mask = _batch("bart")
    manifest, S = generator.manifest, ids.shape[1]
    decoder = memory.bytes_per_input(manifest, 1, S, 1 + 40)
    generator.memory_limit = max(decoder, encoder_bytes(manifest.dims, 1, S, manifest.dtype))
    assert generator.memory_limit < 2 * decoder  # one input at a time
    streamer = Recorder()
    with pytest.raises(ResourceError) as error:
        generator.generate(ids, mask, streamer=streamer, max_new_tokens=40)
    assert str(error.value) == (
        "3 inputs do not fit in memory at once (1 do) and a streamer cannot be fed in parts across chunks; "
        "pass fewer inputs per call"
    )
    assert streamer.calls == []


# audio at another sample rate ----------------------------------------------------------------------------------


def _fft_resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling by the FFT: independent of soxr, which the runtime uses."""
    n = round(samples.size * new_rate / rate)
    spectrum = np.zeros(n // 2 + 1, dtype=np.complex128)
    kept = min(spectrum.size, samples.size // 2 + 1)
    spectrum[:kept] = np.fft.rfft(samples)[:kept]
    return (np.fft.irfft(spectrum, n) * (n / samples.size)).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_30s(tmp_path_factory):
    """A tiny Whisper whose encoder takes 30 s of audio (3000 frames), so real clips go in whole."""
    from el_export.export import export_model
    from el_export.testing.tiny import tiny_model

    out = tmp_path_factory.mktemp("whisper") / "bundle"
    export_model(tiny_model("whisper", seed=0, max_source_positions=1500), out, mode="el", progress=False)
    return out


@pytest.fixture(scope="module")
def fox_files(tmp_path_factory):
    """The 16 kHz clip, and the same speech as a 22050 Hz and a 44100 Hz WAV and a 22050 Hz FLAC."""
    root = tmp_path_factory.mktemp("rates")
    samples, rate = soundfile.read(FOX, dtype="float32")
    files = {"16000.wav": FOX}
    for name, new_rate in (("22050.wav", 22050), ("44100.wav", 44100), ("22050.flac", 22050)):
        files[name] = root / name
        soundfile.write(files[name], _fft_resample(samples, rate, new_rate), new_rate)
    return files


def test_audio_files_at_other_rates_are_resampled_and_transcribed(whisper_30s, fox_files, caplog):
    generator, paths = el_export.load(whisper_30s), [str(path) for path in fox_files.values()]
    with caplog.at_level(logging.WARNING, logger="el_export"):
        features = speech.features(generator.manifest, generator.mel_filters, audio=paths)
    assert [r.getMessage() for r in caplog.records] == [
        f"el-export: note: {fox_files[name]} resampled from {name[:5]} Hz to 16000 Hz"
        for name in ("22050.wav", "44100.wav", "22050.flac")
    ]
    difference = (features[1:] - features[:1]).abs()  # log-mel units: the features span about 2
    assert difference.max() < 0.05 and difference.mean() < 1e-3
    other = speech.features(generator.manifest, generator.mel_filters, audio=[str(FOX.parent / "speech.wav")])
    assert (other - features[:1]).abs().mean() > 0.05  # another clip is 50 times further
    sequences = generator.generate(audio=paths, max_new_tokens=10).sequences
    assert (sequences == sequences[:1]).all()
    assert not torch.equal(generator.generate(input_features=other, max_new_tokens=10).sequences, sequences[:1])


def test_arrays_take_sampling_rate_as_hf_feature_extractor_does(whisper_30s, caplog):
    generator = el_export.load(whisper_30s)
    samples, rate = soundfile.read(FOX, dtype="float32")
    at_16k = generator.generate(audio=[samples], max_new_tokens=10).sequences
    with caplog.at_level(logging.WARNING, logger="el_export"):  # the caller named the rate: no note
        at_44k = generator.generate(audio=[_fft_resample(samples, rate, 44100)], sampling_rate=44100,
                                      max_new_tokens=10).sequences  # fmt: skip
    assert torch.equal(at_44k, at_16k) and caplog.records == []


def test_the_note_is_one_line_on_stderr(whisper_30s, fox_files):
    """Outside pytest's log capture, with no logging set up: the note is the only line on stderr."""
    script = (
        "import sys, el_export\n"
        "el_export.load(sys.argv[1]).generate(audio=[sys.argv[2]], max_new_tokens=2)\n"
        "print('done')"
    )
    bundle, path = str(whisper_30s), str(fox_files["44100.wav"])
    run = subprocess.run([sys.executable, "-c", script, bundle, path], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == "done\n"
    assert run.stderr == f"el-export: note: {path} resampled from 44100 Hz to 16000 Hz\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"sampling_rate": 0}, InvalidArgumentError, "`sampling_rate` must be a positive integer (Hz), got 0"),
        ({"sampling_rate": 44100.0}, InvalidArgumentError, "`sampling_rate` must be a positive integer (Hz)"),
        ({"sampling_rate": True}, InvalidArgumentError, "`sampling_rate` must be a positive integer (Hz), got True"),
        ({"sampling_rate": 1, "samples": 14401}, InputError,
         "audio 0 is 14401.0 s; el-export transcribes recordings of up to 14400 s (4 hours): split it"),
        ({"sampling_rate": 8000, "nan": True}, InputError, "audio 0 has 2 NaN or infinite samples"),
    ],
)
def test_bad_sampling_rates_are_refused_before_anything_runs(bundles, no_graph_runs, kwargs, error, fragment):
    wave = np.full(kwargs.pop("samples", 1600), 0.1, dtype=np.float32)
    if kwargs.pop("nan", False):
        wave[[3, 9]] = [np.nan, np.inf]
    with pytest.raises(error) as raised:
        el_export.load(bundles("whisper", "el")).generate(audio=[wave], **kwargs)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_sampling_rate_belongs_to_audio_arrays(bundles, no_graph_runs):
    with pytest.raises(InvalidArgumentError, match="^sampling_rate is the rate of audio arrays; pass it with audio="):
        el_export.load(bundles("whisper", "el")).generate(input_features=torch.zeros(1, 16, 80), sampling_rate=8000)
    ids, mask = _batch("bart")
    with pytest.raises(InvalidArgumentError, match="^input_features, audio, sampling_rate, language, task are for spe"):
        el_export.load(bundles("bart", "el")).generate(ids, mask, sampling_rate=16000)


def test_files_at_other_rates_are_checked_before_resampling(bundles, tmp_path, no_graph_runs, caplog):
    """A header claiming 1 Hz would resample 14401 samples to 230 million; NaN would spread through the filter."""
    generator = el_export.load(bundles("whisper", "el"))
    slow, bad = tmp_path / "1hz.wav", tmp_path / "nan.wav"
    soundfile.write(slow, np.zeros(14401, dtype=np.float32), 1)
    wave = np.full(4410, 0.1, dtype=np.float32)
    wave[[3, 9]] = [np.nan, np.inf]
    soundfile.write(bad, wave, 44100, subtype="FLOAT")
    with pytest.raises(InputError, match=rf"^{re.escape(str(slow))} is 14401.0 s; el-export transcribes recordings of"):
        generator.generate(audio=[str(slow)])
    with pytest.raises(InputError, match=rf"^{re.escape(str(bad))} has 2 NaN or infinite samples; give finite"):
        generator.generate(audio=[str(bad)])
    assert caplog.records == []  # refused before any note
