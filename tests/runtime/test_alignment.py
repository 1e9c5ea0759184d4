"""Word timestamps: the alignment heads' exported attention, token times equal to HF's, DTW, and words."""

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation import GenerateEncoderDecoderOutput
from transformers.models.whisper.generation_whisper import (
    WhisperGenerationMixin,
    _dynamic_time_warping,
    _median_filter,
)

import el_export
from el_export.errors import InvalidArgumentError
from el_export.runtime.alignment import (
    alignment_weights,
    dynamic_time_warping,
    median_filter,
    token_timestamps,
    words,
)
from el_export.runtime.audio import load_audio
from el_export.tolerance import REBATCHED_SCORE_TOLERANCE, graph_close

CLIPS = sorted((Path(el_export.__file__).parent / "clips").iterdir())
FRAME = 0.02  # seconds per encoder frame: HF's time_precision


def _context(generator, features):
    """One window's encoder outputs and mask, as the decoder step takes them."""
    encoded = generator.encode({"input_features": features})
    S = encoded["encoder_hidden"].shape[1]
    return {**encoded, "encoder_mask": torch.ones(1, S, dtype=torch.int64)}


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_alignment_output_equals_hf_cross_attention(mode, bundles, hf_models):
    hf = copy.deepcopy(hf_models("whisper"))
    hf.set_attn_implementation("eager")  # the attention HF returns with output_attentions
    generator = el_export.load(bundles("whisper", mode))
    heads = generator.manifest.alignment["heads"]
    assert heads == [[1, 2], [0, 1], [1, 0]]  # the tiny checkpoint's, in its order
    features = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids = hf.generate(features, max_new_tokens=10, return_dict_in_generate=True).sequences
        cross = hf(features, decoder_input_ids=ids, output_attentions=True).cross_attentions  # L x [2, h, T, S]
    for b in range(2):
        expected = torch.stack([cross[layer][b, head] for layer, head in heads])  # [A, T, S]
        ours = alignment_weights(generator.backend, _context(generator, features[b : b + 1]), ids[b])
        assert ours.shape == expected.shape
        close = graph_close(ours.numpy(), expected.numpy(), "float32", width=32)  # a wrong head or row: O(0.1)
        assert close.ok, str(close)
    one = alignment_weights(generator.backend, _context(generator, features[:1]), ids[0])
    together = alignment_weights(generator.backend, _context(generator, features[:1]), ids)  # [2, A, T, S]
    assert together.shape == (2, *one.shape)
    torch.testing.assert_close(together[0], one, atol=REBATCHED_SCORE_TOLERANCE, rtol=0)


def test_a_bundle_without_alignment_heads_says_so(bundles, hf_models, tmp_path):
    from el_export.export import export_model

    plain = copy.deepcopy(hf_models("whisper"))
    del plain.generation_config.alignment_heads
    export_model(plain, tmp_path / "plain", progress=False)
    generator = el_export.load(tmp_path / "plain")
    assert not generator.manifest.alignment
    assert [s.name for s in generator.manifest.graphs["decoder_step"].outputs][-1] == "present_hidden.1"
    features = torch.randn(1, 16, 80)
    with pytest.raises(InvalidArgumentError, match="no alignment heads"):
        alignment_weights(generator.backend, _context(generator, features), torch.tensor([90, 7]))


def _synthetic_outputs(weights: torch.Tensor, heads, num_input_ids: int, layers: int, n_heads: int):
    """What HF generate keeps (`cross_attentions` per step, prompt rows in the first) holding `weights` [A, T, S]
    at the alignment heads and noise elsewhere."""
    T, S = weights.shape[1:]
    full = torch.rand(layers, n_heads, T - 1, S, generator=torch.Generator().manual_seed(5))
    for a, (layer, head) in enumerate(heads):
        full[layer, head] = weights[a, : T - 1]  # HF has no attention for the last token
    bounds = [0, num_input_ids, *range(num_input_ids + 1, T)]
    steps = tuple(tuple(full[i, None, :, lo:hi] for i in range(layers)) for lo, hi in itertools.pairwise(bounds))
    return GenerateEncoderDecoderOutput(sequences=torch.zeros(1, T, dtype=torch.int64), cross_attentions=steps)


@pytest.mark.parametrize("num_frames", [None, 60])
def test_token_timestamps_are_hfs_op_for_op(num_frames):
    """Bit for bit on the same attention: rows, cropping, normalisation, median filter, heads' mean, DTW."""
    heads, width = [[1, 0], [0, 2], [1, 3]], 7
    g = torch.Generator().manual_seed(0)
    weights = torch.softmax(4 * torch.randn(3, 23, 100, generator=g), dim=-1)
    outputs = _synthetic_outputs(weights, heads, num_input_ids=3, layers=2, n_heads=4)
    hf = type("Whisper", (), {"config": type("Config", (), {"decoder_layers": 2, "median_filter_width": width})})
    frames = None if num_frames is None else torch.tensor([num_frames])
    expected = WhisperGenerationMixin._extract_token_timestamps(hf, outputs, heads, num_frames=frames, num_input_ids=3)[
        0
    ]
    ours = token_timestamps(weights, 3, num_frames, width)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    x = torch.randn(3, 5, 40, generator=g)
    assert torch.equal(median_filter(x, 7), _median_filter(x, 7))


def test_dtw_equals_hf_including_ties():
    rng = np.random.default_rng(0)
    matrices = [
        rng.standard_normal((7, 30)),
        rng.integers(0, 3, (12, 40)).astype(np.float64),  # integer costs: ties on every diagonal
        np.zeros((5, 9)),  # every path ties
        rng.integers(0, 2, (30, 8)).astype(np.float64),  # more tokens than frames
        rng.standard_normal((1, 6)),
        rng.standard_normal((6, 1)),
        -rng.random((20, 50)).astype(np.float32).astype(np.float64),  # float32 values, as attention gives
    ]
    for matrix in matrices:
        for ours, expected in zip(dynamic_time_warping(matrix), _dynamic_time_warping(matrix), strict=True):
            np.testing.assert_array_equal(ours, expected)


def _hf_timestamps(hf, wave, num_beams):
    from transformers import WhisperFeatureExtractor

    inputs = WhisperFeatureExtractor()([wave], sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    with torch.no_grad():
        out = hf.generate(inputs.input_features, attention_mask=inputs.attention_mask, return_token_timestamps=True,
                          num_beams=num_beams)  # fmt: skip
    return inputs.input_features, int(inputs.attention_mask.sum()), out["sequences"][0], out["token_timestamps"][0]


def _our_timestamps(generator, features, num_frames, sequence):
    """HF's short-form output drops the decoder prompt and the final <|endoftext|>; the times were computed with
    both (the prompt's rows dropped, the last token's absent)."""
    prompt = torch.tensor([generator.manifest.special_tokens["decoder_start_token_id"], 50362])  # <|notimestamps|>
    eot = torch.tensor([generator.manifest.special_tokens["eos_token_id"]])
    ids = torch.cat([prompt, sequence, eot])
    weights = alignment_weights(generator.backend, _context(generator, features), ids)
    width = generator.manifest.alignment["median_filter_width"]
    return ids, token_timestamps(weights, len(prompt), num_frames, width)


@pytest.fixture(scope="module")
def hf_tiny_en(tiny_en):
    """tiny.en's HF model, copied: return_token_timestamps switches a model to eager attention for good."""
    return copy.deepcopy(tiny_en[0])


@pytest.mark.parametrize("num_beams", [1, 4])
def test_real_tiny_en_token_times_within_one_frame_of_hf(tiny_en, hf_tiny_en, num_beams):
    generator = tiny_en[2]
    equal = total = 0
    for clip in CLIPS:
        features, num_frames, sequence, expected = _hf_timestamps(hf_tiny_en, load_audio(clip, 16000), num_beams)
        _, ours = _our_timestamps(generator, features, num_frames, sequence)
        ours = ours[2 : 2 + len(sequence)]
        assert ours.shape == expected.shape and (ours - expected).abs().max() <= FRAME + 1e-6, clip.name
        equal, total = equal + int((ours == expected).sum()), total + len(sequence)
    print(f"num_beams={num_beams}: {equal} of {total} token times equal HF's exactly")
    assert equal >= 0.8 * total


def test_words_of_a_real_transcript(tiny_en, hf_tiny_en):
    _, _, generator = tiny_en
    features, num_frames, sequence, _ = _hf_timestamps(hf_tiny_en, load_audio(CLIPS[1], 16000), 1)  # fox.wav
    ids, times = _our_timestamps(generator, features, num_frames, sequence)
    found = words(generator.tokenizer, ids, times, eot_token_id=generator.manifest.special_tokens["eos_token_id"])
    text = generator.tokenizer.decode(sequence[None])[0]
    assert "".join(w.word for w in found) == text
    assert all(w.word.startswith(" ") for w in found)  # punctuation merged into its word, never alone
    assert found[-1].word.endswith(".") and "dog" in found[-1].word
    assert all(0 <= w.start <= w.end <= num_frames / 100 for w in found)
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(found))
    assert found[-1].end > found[0].start
    shifted = words(generator.tokenizer, ids, times, generator.manifest.special_tokens["eos_token_id"], offset=30.0)
    assert [w.start for w in shifted] == [round(30.0 + w.start, 2) for w in found]
