"""Optimization profiles from the manifest's contracts and the user's limits (no TensorRT needed)."""

import pytest

from el_export.errors import InvalidArgumentError
from el_export.export import describe
from el_export.export.graphs import graphs_for
from el_export.families import build_from_hf
from el_export.model.models import MODES
from el_export.testing.tiny import DECODER_ONLY, FAMILIES, SPEECH, tiny_model
from el_export.trt.profiles import Limits, axis_ranges, graph_profiles


def _manifest(family: str, mode: str):
    hf = tiny_model(family)
    model, fam = build_from_hf(hf)
    return describe(hf, graphs_for(model, mode), fam)


def test_encoder_decoder_axes():
    manifest = _manifest("bart", "el")  # 64 positions
    assert axis_ranges(manifest, Limits()) == {"batch": (1, 8, 8), "rows": (1, 32, 32), "source": (1, 33, 64),
                                              "past": (0, 32, 63)}  # fmt: skip
    limits = Limits(batch=2, beams=3, source=10, new_tokens=5)  # past: 4 prompt + 5 new tokens, all but the last
    assert axis_ranges(manifest, limits) == {"batch": (1, 2, 2), "rows": (1, 6, 6), "source": (1, 6, 10),
                                             "past": (0, 4, 8)}  # fmt: skip


def test_profiles_of_every_input():
    limits = Limits(batch=2, beams=3, source=10, new_tokens=5)
    profiles = graph_profiles(_manifest("bart", "el"), limits)
    assert profiles["encoder"]["input_ids"] == {"min": [1, 1], "opt": [2, 6], "max": [2, 10]}
    step = profiles["decoder_step"]
    assert step["input_ids"] == {"min": [1, 1], "opt": [6, 1], "max": [6, 1]}
    assert step["encoder_hidden"] == {"min": [1, 1, 32], "opt": [2, 6, 32], "max": [2, 10, 32]}
    assert step["past_hidden.0"] == {"min": [1, 0, 32], "opt": [6, 4, 32], "max": [6, 8, 32]}
    assert step["past_mask"] == {"min": [1, 0], "opt": [6, 4], "max": [6, 8]}  # per row, over the same cache
    kv = graph_profiles(_manifest("bart", "kv"), limits)["decoder_step"]
    assert kv["cross_key.1"] == {"min": [1, 4, 1, 8], "opt": [6, 4, 6, 8], "max": [6, 4, 10, 8]}
    assert kv["encoder_mask"]["max"] == [6, 10]


@pytest.mark.parametrize("mode", MODES)
def test_whisper_source_is_fixed_by_the_encoder(mode):
    manifest = _manifest("whisper", mode)  # 40 encoder positions, 80 frames
    ranges = axis_ranges(manifest, Limits(batch=2, source=7))  # --max-source cannot change 30 s of audio
    assert ranges["source"] == (40, 40, 40)
    profiles = graph_profiles(manifest, Limits(batch=2))
    assert profiles["encoder"]["input_features"] == {"min": [1, 16, 80], "opt": [2, 16, 80], "max": [2, 16, 80]}
    step = profiles["decoder_step"]
    if mode == "el":  # the encoder output, once per input
        assert step["encoder_hidden"] == {"min": [1, 40, 32], "opt": [2, 40, 32], "max": [2, 40, 32]}
    else:  # cross K/V, per row
        assert step["cross_value.0"] == {"min": [1, 4, 40, 8], "opt": [8, 4, 40, 8], "max": [8, 4, 40, 8]}


def test_decoder_only_prompt_past_and_context():
    el, kv = _manifest("gpt2", "el"), _manifest("gpt2", "kv")  # 64 positions
    limits = Limits(batch=2, beams=2, prompt=10, new_tokens=20)
    assert axis_ranges(el, limits) == {"batch": (1, 2, 2), "rows": (1, 4, 4), "prompt": (1, 6, 10),
                                       "past": (0, 10, 19)}  # fmt: skip
    assert axis_ranges(kv, limits)["context"] == (1, 15, 29)  # the prompt's K/V, then all new tokens but the last
    defaults = axis_ranges(el, Limits())  # 128 new tokens do not fit: the positions split, half for the prompt
    assert defaults["prompt"] == (1, 17, 32) and defaults["past"] == (0, 16, 31)


def test_relative_positions_have_no_limit():
    ranges = axis_ranges(_manifest("t5", "el"), Limits(new_tokens=100))
    assert ranges["source"] == (1, 257, 512) and ranges["past"] == (0, 52, 103)


@pytest.mark.parametrize(
    "family, limits, message",
    [
        ("bart", Limits(source=65), "--max-source 65 is past the model's 64 positions"),
        ("gpt2", Limits(prompt=60, new_tokens=20), "--max-prompt 60 plus --max-new-tokens 20"),
        ("gpt2", Limits(prompt=70, new_tokens=1), "--max-prompt 70 plus --max-new-tokens 1 is past"),
    ],
)
def test_limits_past_the_positions_are_refused(family, limits, message):
    with pytest.raises(InvalidArgumentError, match=message):
        axis_ranges(_manifest(family, "el"), limits)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_are_positive_integers(value):
    with pytest.raises(InvalidArgumentError, match="limit batch must be a positive integer"):
        Limits(batch=value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES + DECODER_ONLY + SPEECH)
def test_every_input_of_every_family_has_a_profile(family, mode):
    manifest = _manifest(family, mode)
    profiles = graph_profiles(manifest, Limits(batch=3, beams=2, new_tokens=16))
    for name, graph in manifest.graphs.items():
        assert set(profiles[name]) == {s.name for s in graph.inputs}
        for spec in graph.inputs:
            shapes = profiles[name][spec.name]
            for axis, low, opt, high in zip(spec.shape, shapes["min"], shapes["opt"], shapes["max"], strict=True):
                assert low <= opt <= high
                assert isinstance(axis, str) or low == high == axis
