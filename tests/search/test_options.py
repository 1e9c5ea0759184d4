"""resolve_options: HF's precedence and length rules, and a one-line error for every invalid argument."""

import warnings

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from el_export.errors import InvalidArgumentError
from el_export.search import GenerationOptions, resolve_options
from el_export.search import options as options_module

from .hf_reference import hf_generation_config


def resolve(model_defaults=None, prompt_length=1, is_encoder_decoder=True, max_position_embeddings=None, **kw):
    return resolve_options(
        {"bos_token_id": 0, "eos_token_id": 2, **(model_defaults or {})},
        prompt_length=prompt_length,
        is_encoder_decoder=is_encoder_decoder,
        max_position_embeddings=max_position_embeddings,
        **kw,
    )


def test_user_kwargs_beat_the_checkpoint_which_beats_hf_defaults():
    options = resolve({"num_beams": 4, "length_penalty": 2.0, "no_repeat_ngram_size": 3}, num_beams=2)
    assert (options.num_beams, options.length_penalty, options.no_repeat_ngram_size) == (2, 2.0, 3)
    assert (options.top_k, options.early_stopping, options.max_length) == (50, False, 21)


def test_explicit_none_unsets_a_checkpoint_value_as_in_hf():
    options = resolve({"forced_eos_token_id": 2, "pad_token_id": 1, "top_k": 10}, eos_token_id=None, top_k=None)
    assert options.eos_token_id is None and options.pad_token_id == 1 and options.top_k == 0
    assert options.forced_eos_token_id == (2,)


def test_special_token_fallbacks():
    options = resolve({"eos_token_id": [5, 2]})
    assert options.eos_token_id == (5, 2) and options.pad_token_id == 5  # pad falls back to eos[0]
    assert options.decoder_start_token_id == 0  # decoder start falls back to bos
    assert resolve(pad_token_id=0).pad_token_id == 0


LENGTH_CASES = [
    # (checkpoint, user kwargs, prompt length, max_position_embeddings) -> (max_length, min_length)
    ({}, {}, 3, None, 23, 0),
    ({}, {}, 3, 16, 16, 0),  # default 20 + P, capped by the positions
    ({"max_length": 40}, {}, 3, 16, 40, 0),  # set by the checkpoint: used as is
    ({}, {"max_length": 30}, 3, 16, 30, 0),
    ({"max_length": 40}, {"max_new_tokens": 5}, 3, None, 8, 0),
    ({}, {"max_new_tokens": 5, "max_length": 30}, 3, None, 8, 0),  # max_new_tokens wins
    ({"max_new_tokens": 5}, {}, 3, None, 8, 0),
    ({}, {"min_new_tokens": 2, "min_length": 10}, 3, None, 23, 5),  # min_new_tokens wins
    ({"min_length": 4}, {}, 3, None, 23, 4),
]


@pytest.mark.parametrize(("model", "user", "prompt_length", "positions", "max_length", "min_length"), LENGTH_CASES)
def test_length_rules(model, user, prompt_length, positions, max_length, min_length):
    options = resolve(model, prompt_length=prompt_length, max_position_embeddings=positions, **user)
    assert (options.max_length, options.min_length) == (max_length, min_length)


def test_bad_words_drop_single_eos_entries():
    assert resolve(bad_words_ids=[[2], [3, 2], [4]]).bad_words_ids == ((3, 2), (4,))
    assert resolve(bad_words_ids=[[2]]).bad_words_ids is None  # HF then bans nothing


def test_ignored_and_inert_hf_fields_are_accepted():
    options = resolve({"output_attentions": False, "use_cache": True}, return_dict_in_generate=True, typical_p=1.0)
    assert options == resolve()


def test_every_hf_generation_field_is_known():
    known = options_module._FIELDS | options_module._IGNORED | options_module._INERT.keys()
    assert set(GenerationConfig().to_dict()) <= known


INVALID = [
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_return_sequences": 2}, "greedy"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"min_length": -2}, "min_length"),
    ({"max_length": -1}, "max_length"),
    ({"max_length": 1}, "prompt"),
    ({"max_length": None}, "max_length"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": None}, "num_beams"),
    ({"num_beams": 1.5}, "num_beams"),
    ({"num_beams": True}, "num_beams"),
    ({"length_penalty": None}, "length_penalty"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"max_new_token": 5}, "did you mean `max_new_tokens`"),
    ({"bad_words_ids": []}, "bad_words_ids"),
    ({"bad_words_ids": [1, 2]}, "bad_words_ids"),
    ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"bad_words_ids": [[-1]]}, "bad_words_ids"),
    ({"early_stopping": "always"}, "early_stopping"),
    ({"early_stopping": 1}, "early_stopping"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"suppress_tokens": [2], "forced_eos_token_id": 2}, "suppress_tokens"),
    ({"seed": -(2**63) - 1}, "[-2**63, 2**64)"),
    ({"seed": 2**64}, "[-2**63, 2**64)"),
    ({"seed": 1.0}, "seed"),
    ({"max_new_tokens": 2**63}, "2**63"),
    ({"eos_token_id": 2**70}, "eos_token_id"),
    ({"pad_token_id": 2**63}, "pad_token_id"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "finite float > 0"),
    ({"repetition_penalty": 2}, "pass 2.0"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "finite float"),
    ({"do_sample": True, "temperature": 1e-45}, "below 1e-30"),
    ({"do_sample": True, "temperature": 2}, "pass 2.0"),
    ({"top_p": float("nan")}, "[0, 1]"),
    ({"length_penalty": float("nan")}, "length_penalty"),
    ({"length_penalty": float("-inf")}, "length_penalty"),
    ({"typical_p": 0.9}, "typical_p"),
    ({"output_attentions": True}, "output_attentions"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), INVALID, ids=[str(kwargs) for kwargs, _ in INVALID])
def test_invalid_arguments_raise_one_line(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=None) as error:
        resolve(**kwargs)
    message = str(error.value)
    assert fragment in message and "\n" not in message


def test_checkpoint_with_unimplemented_feature_raises():
    with pytest.raises(InvalidArgumentError, match="checkpoint's generation config sets `num_beam_groups"):
        resolve({"num_beam_groups": 2})


def test_encoder_decoder_needs_a_decoder_start():
    with pytest.raises(InvalidArgumentError, match="decoder_start_token_id"):
        resolve({"bos_token_id": None})
    assert resolve({"bos_token_id": None}, is_encoder_decoder=False).decoder_start_token_id is None


def test_values_hf_takes_are_kept():
    """The edges of what HF and torch accept stay accepted: seeds over torch's whole range, a temperature or
    penalty that is an integer 1 (HF builds no processor for it), temperature unused when not sampling."""
    for seed in (-(2**63), -1, 2**64 - 1):
        assert resolve(seed=seed, do_sample=True).seed == seed
    assert resolve(repetition_penalty=1, temperature=1, do_sample=True).temperature == 1.0
    assert resolve(temperature=1e-45).temperature == 1e-45
    assert resolve(do_sample=True, temperature=1e-30).temperature == 1e-30


def test_direct_construction_validates():
    with pytest.raises(InvalidArgumentError, match="num_return_sequences"):
        GenerationOptions(num_beams=2, num_return_sequences=3)


# Differential check against HF's own resolution, over random checkpoint configs and user kwargs.
TOKEN = st.sampled_from([0, 1, 2, 5])
VALUES = {
    "max_length": st.integers(2, 30),
    "max_new_tokens": st.integers(1, 8),
    "min_length": st.none() | st.integers(0, 10),
    "min_new_tokens": st.integers(0, 5),
    "num_beams": st.integers(1, 4),
    "num_return_sequences": st.integers(1, 3),
    "length_penalty": st.sampled_from([-1.0, 0.6, 2.0]),
    "early_stopping": st.sampled_from([True, False, "never"]),
    "do_sample": st.booleans(),
    "temperature": st.none() | st.sampled_from([0.5, 1.0, 2.0]),
    "top_k": st.none() | st.sampled_from([0, 5, 50]),
    "top_p": st.none() | st.sampled_from([0.5, 1.0]),
    "repetition_penalty": st.none() | st.sampled_from([1.0, 1.3]),
    "no_repeat_ngram_size": st.none() | st.integers(0, 3),
    "bos_token_id": st.none() | TOKEN,
    "eos_token_id": st.none() | TOKEN | st.lists(TOKEN, min_size=1, max_size=2),
    "pad_token_id": st.none() | TOKEN,
    "decoder_start_token_id": st.none() | TOKEN,
    "forced_bos_token_id": st.none() | TOKEN,
    "forced_eos_token_id": st.none() | TOKEN,
}
NONE_MEANS = {"min_length": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
NONE_MEANS |= {"no_repeat_ngram_size": 0}
CONFIGS = st.fixed_dictionaries({}, optional=VALUES)


def _token_tuple(value):
    return None if value is None else tuple(value if isinstance(value, list) else [value])


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(model_defaults=CONFIGS, user=CONFIGS, prompt_length=st.integers(1, 4), encoder_decoder=st.booleans())
def test_resolution_matches_hf(bart, gpt2, model_defaults, user, prompt_length, encoder_decoder):
    try:  # HF cannot load a checkpoint whose generation config is invalid on its own
        GenerationConfig(**model_defaults)
    except ValueError:
        assume(False)
    model = (bart if encoder_decoder else gpt2).model
    positions = model.config.max_position_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hf = hf_generation_config(model, model_defaults, prompt_length, **user)
        except ValueError:
            hf = None
    try:
        ours = resolve_options(
            model_defaults,
            prompt_length=prompt_length,
            is_encoder_decoder=encoder_decoder,
            max_position_embeddings=positions,
            **user,
        )
    except InvalidArgumentError:
        ours = None
    assert (ours is None) == (hf is None)
    event("valid" if ours else "invalid")
    if ours is None:
        return
    for name in VALUES.keys() - {"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id"}:
        expected = getattr(hf, name)
        expected = NONE_MEANS.get(name) if expected is None else expected
        if name == "forced_eos_token_id":
            expected = _token_tuple(expected)
        if name == "decoder_start_token_id" and encoder_decoder:
            expected = int(hf._decoder_start_token_tensor)
        assert getattr(ours, name) == expected, name
    assert ours.eos_token_id == (None if hf._eos_token_tensor is None else tuple(hf._eos_token_tensor.tolist()))
    assert ours.pad_token_id == (None if hf._pad_token_tensor is None else int(hf._pad_token_tensor))
