"""Whisper long-form transcription against HF's long-form `generate`: tokens and segment times identical.

The real tiny.en reads two recordings we made (tests/data/make-meeting.sh): 31 s, and 55 s with pauses of 2 and
3 s. Their lengths are whole hops with digital silence at the end, so HF's batched features (padded with zeros
to the longest) equal each recording's own: a recording here is always read alone, as HF reads it alone.
"""

from pathlib import Path

import pytest
import torch

import el_export
from el_export.errors import InvalidArgumentError
from el_export.testing.tiny import tiny_model

DATA = Path(__file__).parent.parent / "data"
SHORT, LONG = str(DATA / "meeting-31s.flac"), str(DATA / "meeting-55s.flac")


def _hf_long(model, paths, **kwargs):
    """HF's long-form call, as its docs make it: the whole recordings' features, padded to the longest, and the
    frame mask."""
    from transformers import WhisperFeatureExtractor

    from el_export.runtime.audio import load_audio

    waves = [load_audio(p, 16000) for p in paths]
    inputs = WhisperFeatureExtractor()(waves, sampling_rate=16000, return_tensors="pt", truncation=False,
                                       padding="longest", return_attention_mask=True)  # fmt: skip
    with torch.no_grad():
        return model.generate(inputs.input_features, attention_mask=inputs.attention_mask, return_timestamps=True,
                              return_segments=True, **kwargs)  # fmt: skip


def _assert_equal(ours, ref):
    assert torch.equal(ours.sequences, ref["sequences"])
    assert len(ours.segments) == len(ref["segments"])
    for mine, theirs in zip(ours.segments, ref["segments"], strict=True):
        assert [s["tokens"].tolist() for s in mine] == [s["tokens"].tolist() for s in theirs]
        assert [(s["start"], s["end"]) for s in mine] == [(s["start"].item(), s["end"].item()) for s in theirs]


@pytest.fixture(scope="module")
def real(tiny_en):
    hf, _, generator = tiny_en
    return hf, generator


def test_greedy_batch_of_two_recordings_of_different_lengths(real):
    hf, generator = real
    ours = generator.generate(audio=[SHORT, LONG], return_timestamps=True, return_segments=True)
    _assert_equal(ours, _hf_long(hf, [SHORT, LONG]))
    assert len(ours.segments[1]) > len(ours.segments[0]) > 3 and ours.segments[1][-1]["end"] > 50
    text = " ".join(s["text"] for s in ours.segments[1])
    assert "Tuesday" in text and "piano" in text
    alone = generator.generate(audio=[LONG], return_timestamps=True, return_segments=True)
    assert torch.equal(alone.sequences[0], ours.sequences[1, : alone.sequences.shape[1]])  # batching: speed only


@pytest.mark.parametrize("kwargs", [{"num_beams": 4}, {"condition_on_prev_tokens": True}])
def test_beams_and_previous_text_over_pauses(real, kwargs):
    hf, generator = real
    _assert_equal(generator.generate(audio=[LONG], return_timestamps=True, return_segments=True, **kwargs),
                  _hf_long(hf, [LONG], **kwargs))  # fmt: skip


def test_temperature_fallback_draws_as_hf(real):
    """Thresholds strict enough that windows are retried by sampling: with torch's global generator seeded the
    same, the same draws."""
    hf, generator = real
    kwargs = dict(temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold=1.35,
                  logprob_threshold=-0.2, no_speech_threshold=0.6)  # fmt: skip
    torch.manual_seed(0)
    ref = _hf_long(hf, [SHORT], **kwargs)
    torch.manual_seed(0)
    ours = generator.generate(audio=[SHORT], return_timestamps=True, return_segments=True, **kwargs)
    _assert_equal(ours, ref)
    seeded = [generator.generate(audio=[SHORT], return_timestamps=True, seed=7, **kwargs).sequences for _ in "ab"]
    assert torch.equal(*seeded)  # a private generator: reruns repeat


@pytest.mark.parametrize("family", ["whisper-multilingual", "whisper"])
def test_tiny_seeded_whisper_long_form(family, tmp_path):
    """A random tiny Whisper with timestamp tokens (0.8 s windows): greedy, beams, a sampled fallback of two
    recordings at once (one batch, HF's draw order), language detected per recording."""
    from el_export.export import export_model

    hf = tiny_model(family, seed=0, vocab_size=140)
    export_model(hf, tmp_path / "bundle", progress=False)
    generator = el_export.load(tmp_path / "bundle")
    features = torch.randn(2, 16, 230, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 230, dtype=torch.int64)
    mask[1, 150:] = 0
    features[1, :, 150:] = 0
    fallback = dict(temperature=(0.0, 0.5, 1.0), compression_ratio_threshold=1.2, logprob_threshold=-2.0,
                    no_speech_threshold=0.5)  # fmt: skip
    for kwargs in ({}, {"num_beams": 3}, fallback):
        torch.manual_seed(0)
        with torch.no_grad():
            ref = hf.generate(features, attention_mask=mask, return_timestamps=True, return_segments=True, **kwargs)
        torch.manual_seed(0)
        ours = generator.generate(input_features=features, attention_mask=mask, return_timestamps=True,
                                  return_segments=True, **kwargs)  # fmt: skip
        _assert_equal(ours, ref)
    for i, frames in ((0, 230), (1, 150)):  # previous text, each recording alone (see longform.py on HF's batch)
        one = features[i : i + 1, :, :frames]
        with torch.no_grad():
            ref = hf.generate(one, return_timestamps=True, return_segments=True, condition_on_prev_tokens=True)
        _assert_equal(generator.generate(input_features=one, return_timestamps=True, return_segments=True,
                                         condition_on_prev_tokens=True), ref)  # fmt: skip


def test_long_form_arguments_are_checked(bundles, tiny_en):
    _, _, generator = tiny_en
    wave = torch.zeros(31 * 16000).numpy()
    cases = [
        ({"return_timestamps": False}, "audio longer than 30 s is transcribed long-form"),
        ({"no_speech_threshold": 0.6}, "`no_speech_threshold` needs `logprob_threshold`"),
        ({"prompt_condition_type": "all-segments"}, "needs condition_on_prev_tokens=True"),
        ({"prompt_condition_type": "some"}, "`prompt_condition_type` must be one of first-segment, all-segments"),
        ({"temperature": ()}, "`temperature` is an empty list"),
        ({"temperature": (0.0, float("nan"))}, "`temperature` must be a finite number"),
        ({"num_beams": 2, "num_return_sequences": 2}, "return one sequence per recording"),
        ({"prompt_ids": [10**6]}, "`prompt_ids` must be token ids in [0, 51864)"),
        ({"streamer": object()}, "a streamer follows one search"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[")):  # fmt: skip
            generator.generate(audio=[wave], **{"return_timestamps": True, **kwargs})
    with pytest.raises(InvalidArgumentError, match="runs many searches per recording: call generate"):
        generator.request(audio=[wave], return_timestamps=True)
    with pytest.raises(InvalidArgumentError, match="no timestamp tokens"):
        el_export.load(bundles("whisper", "el")).generate(input_features=torch.zeros(1, 16, 90),
                                                          return_timestamps=True)  # fmt: skip


def test_word_timestamps_equal_hf(real):
    """HF's `token_timestamps` (from the start of each token's window, beside `sequences`) and each segment's
    (from the start of the recording): the same times, to the 20 ms frame."""
    hf, generator = real
    ref = _hf_long(hf, [SHORT], return_token_timestamps=True)
    ours = generator.generate(audio=[SHORT], return_timestamps=True, return_segments=True,
                              return_token_timestamps=True)  # fmt: skip
    _assert_equal(ours, ref)
    assert ours.token_timestamps.shape == ref["token_timestamps"].shape
    assert (ours.token_timestamps - ref["token_timestamps"]).abs().max() <= 0.02
    for mine, theirs in zip(ours.segments[0], ref["segments"][0], strict=True):
        assert (mine["token_timestamps"] - theirs["token_timestamps"]).abs().max() <= 0.02
    transcript = generator.transcribe([SHORT], word_timestamps=True)[0]
    words = [w for s in transcript.segments for w in s.words]
    assert [w.start for w in words] == sorted(w.start for w in words) and words[-1].end <= transcript.duration
    assert "".join(w.word for w in words).strip() == transcript.text.strip()
