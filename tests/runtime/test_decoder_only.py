"""GPT-2: the prompt's hidden states shared by all beams of an input (EL), HF's tokens at batch > 1."""

import pytest
import torch

import el_export
from el_export.contract.cache import Workload, cache_bytes
from el_export.tolerance import SCORE_TOLERANCE


@pytest.fixture
def left_padded(hf_models):
    """3 prompts of different lengths, left-padded (GPT-2 has no pad: eos stands in, as in HF)."""
    hf = hf_models("gpt2")
    g = torch.Generator().manual_seed(3)
    lengths, P = (9, 6, 2), 9
    ids = torch.randint(3, hf.config.vocab_size, (3, P), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, P - n :] = 1
    ids[mask == 0] = hf.config.eos_token_id
    return hf, ids, mask


def _hf(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
        )


SETTINGS = [
    {"max_new_tokens": 12},
    {"max_new_tokens": 12, "repetition_penalty": 1.4},
    *(
        {"num_beams": 4, "num_return_sequences": 2, "no_repeat_ngram_size": 2, "max_new_tokens": 12, **s}
        for s in (
            {"early_stopping": True, "length_penalty": 0.6},
            {"early_stopping": False, "length_penalty": 1.7},
            {"early_stopping": "never", "length_penalty": 0.6},
        )
    ),
]


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_gpt2_generate_matches_hf(mode, bundles, left_padded):
    hf, ids, mask = left_padded
    generator = el_export.load(bundles("gpt2", mode))
    for kwargs in SETTINGS:
        ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ref = _hf(hf, ids, mask, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), kwargs  # the prompt included, as HF returns it
        if ref.get("sequences_scores") is not None:
            assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= SCORE_TOLERANCE, kwargs


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_gpt2_torch_backend_matches_hf(mode, left_padded):
    from el_export.runtime.torch import load_torch

    hf, ids, mask = left_padded
    generator = load_torch(hf, mode=mode)
    for kwargs in (SETTINGS[0], SETTINGS[2]):
        assert torch.equal(generator.generate(input_ids=ids, attention_mask=mask, **kwargs).sequences,
                           _hf(hf, ids, mask, **kwargs).sequences), kwargs  # fmt: skip


def test_prompt_hidden_states_are_passed_once_per_input(bundles, monkeypatch):
    from el_export.runtime.onnxruntime import OnnxRuntimeBackend

    seen = []
    original = OnnxRuntimeBackend._run_impl

    def spy(self, graph_name, feeds, axes):
        if graph_name == "decoder_step":
            seen.append(
                (feeds["prompt_hidden.0"].shape[0], feeds["input_ids"].shape[0], feeds["past_hidden.1"].shape[0])
            )
        return original(self, graph_name, feeds, axes)

    monkeypatch.setattr(OnnxRuntimeBackend, "_run_impl", spy)
    el_export.load(bundles("gpt2", "el")).generate(input_ids=[[5, 6, 7], [8, 9, 10]], num_beams=4, max_new_tokens=3)
    assert seen and all(batch == 2 and rows == 8 == past_rows for batch, rows, past_rows in seen)


def test_cache_model_holds_the_prompt_once_per_input_and_generated_tokens_at_half():
    dims = {"decoder_layers": 12, "d_model": 768, "heads": 12, "d_head": 64}
    work = Workload(batch_size=8, num_beams=4, source_len=256, new_tokens=64)
    el, kv = (cache_bytes(m, dims, work, kind="decoder-only") for m in ("el", "kv"))
    assert el.context == 12 * 8 * 256 * 768 * 4  # L B P d: once per input, not per beam
    assert kv.context == el.context * 2 * 4  # K and V, per beam
    assert kv.generated == 2 * el.generated


def test_static_cache_is_refused_for_decoder_only(hf_models):
    from el_export.errors import InvalidArgumentError
    from el_export.runtime.torch import load_torch

    with pytest.raises(InvalidArgumentError, match="encoder-decoder models only"):
        load_torch(hf_models("gpt2"), static_cache=True)
