"""End to end: `load(bundle).generate` gives HF `generate`'s tokens for every family and mode."""

import pytest
import torch

import el_export
from el_export.testing.tiny import FAMILIES
from el_export.tolerance import SCORE_TOLERANCE

BEAM_SETTINGS = [
    {"early_stopping": True, "length_penalty": 0.6},
    {"early_stopping": False, "length_penalty": 1.7},
    {"early_stopping": "never", "length_penalty": 0.6},
]


def _hf(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
        )


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_hf(family, mode, bundles, hf_models, padded_batch):
    hf = hf_models(family)
    generator = el_export.load(bundles(family, mode))
    ids, mask = padded_batch(hf)
    for setting in BEAM_SETTINGS:
        kwargs = dict(num_beams=4, num_return_sequences=2, no_repeat_ngram_size=2, max_new_tokens=14, **setting)
        ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ref = _hf(hf, ids, mask, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), setting
        assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= SCORE_TOLERANCE, setting


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(family, mode, bundles, hf_models, padded_batch):
    hf = hf_models(family)
    generator = el_export.load(bundles(family, mode))
    ids, mask = padded_batch(hf)
    ours = generator.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14)
    ref = _hf(hf, ids, mask, max_new_tokens=14)
    assert torch.equal(ours.sequences, ref.sequences)
    assert ours.sequences_scores is None and ref.get("sequences_scores") is None


def test_default_length_and_processors_follow_the_checkpoint(bundles, hf_models, padded_batch):
    """No max_new_tokens: HF's default max_length, the checkpoint's forced_eos, min_new_tokens, penalties."""
    hf = hf_models("bart")
    generator = el_export.load(bundles("bart", "el"))
    ids, mask = padded_batch(hf)
    for kwargs in (
        {},
        {"num_beams": 3, "min_new_tokens": 5, "repetition_penalty": 1.3},
        {"bad_words_ids": [[7], [9, 10]]},
    ):
        ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ref = _hf(hf, ids, mask, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), kwargs


def test_missing_mask_defaults_as_hf_does(bundles, hf_models, padded_batch):
    hf = hf_models("bart")
    ids, _ = padded_batch(hf)
    ours = el_export.load(bundles("bart", "el")).generate(input_ids=ids, num_beams=2, max_new_tokens=6)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, num_beams=2, max_new_tokens=6)
    assert torch.equal(ours.sequences, ref)


def test_encoder_output_is_shared_not_repeated_per_beam(bundles, monkeypatch):
    """EL: the step graph receives H once per input ([B, S, d]) whatever the beam count; the decoder prompt (here
    the start token) runs once per input, and every later step on the B x 4 beam rows."""
    from el_export.runtime.onnxruntime import OnnxRuntimeBackend

    seen = []
    original = OnnxRuntimeBackend._run_impl

    def spy(self, graph_name, feeds, axes):
        if graph_name == "decoder_step":
            seen.append((feeds["encoder_hidden"].shape[0], feeds["input_ids"].shape[0]))
        return original(self, graph_name, feeds, axes)

    monkeypatch.setattr(OnnxRuntimeBackend, "_run_impl", spy)
    el_export.load(bundles("bart", "el")).generate(
        input_ids=[[5, 6, 7, 2], [8, 9, 10, 2]], num_beams=4, max_new_tokens=3
    )
    assert seen[0] == (2, 2) and len(seen) == 3 and all(step == (2, 8) for step in seen[1:])


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_matches_hf(family, mode, hf_models, padded_batch):
    """The same step modules, run by PyTorch instead of ONNX Runtime, under the same search."""
    from el_export.runtime.torch import load_torch

    hf = hf_models(family)
    generator = load_torch(hf, mode=mode)
    ids, mask = padded_batch(hf)
    for kwargs in (
        {"max_new_tokens": 12},
        {**BEAM_SETTINGS[0], "num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 12},
    ):
        ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ref = _hf(hf, ids, mask, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), kwargs


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_torch_static_cache_matches_hf_across_buckets(mode, hf_models, padded_batch):
    """Preallocated caches (the CUDA-graph path, here without graphs): same tokens, growing past a bucket."""
    from el_export.runtime.torch import StaticCacheDecoder, load_torch

    hf = hf_models("bart")
    generator = load_torch(hf, mode=mode, static_cache=True)
    assert StaticCacheDecoder.CAPACITY < 40  # so the cache grows into a second bucket below
    ids, mask = padded_batch(hf)
    for kwargs in (
        {"max_new_tokens": 40, "min_new_tokens": 40},
        {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 40},
    ):
        ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ref = _hf(hf, ids, mask, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), kwargs


def test_onnxruntime_on_cpu_generates_with_torch_at_one_thread(bundles, monkeypatch):
    """torch's OpenMP threads would compete with ONNX Runtime's for the cores; the setting comes back after."""
    generator = el_export.load(bundles("bart", "el"))
    seen, run = [], generator.backend.run
    monkeypatch.setattr(generator.backend, "run", lambda *args: seen.append(torch.get_num_threads()) or run(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator.generate(input_ids=[[5, 6, 7, 2]], num_beams=2, max_new_tokens=3)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
