"""Our logits processors against HF's `_get_logits_processor`, bit for bit, over random options and inputs."""

import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from el_export.errors import InvalidArgumentError
from el_export.search import resolve_options
from el_export.search.processors import build_processors

from .hf_reference import hf_generation_config, hf_processors

V = 16  # the tiny GPT-2's vocabulary
TOKEN = st.integers(0, V - 1)
TOKENS = st.lists(TOKEN, min_size=1, max_size=3)
PROCESSOR_OPTIONS = st.fixed_dictionaries(
    {"max_new_tokens": st.just(6), "eos_token_id": st.none() | TOKEN | TOKENS},
    optional={
        "repetition_penalty": st.sampled_from([0.5, 1.3, 2.0]),
        "no_repeat_ngram_size": st.integers(1, 3),
        "bad_words_ids": st.lists(TOKENS, min_size=1, max_size=4),
        "min_length": st.integers(0, 8),
        "min_new_tokens": st.integers(0, 4),
        "forced_bos_token_id": TOKEN,
        "forced_eos_token_id": TOKEN | TOKENS,
        "suppress_tokens": st.lists(st.integers(0, V + 2), max_size=3),
        "begin_suppress_tokens": st.lists(TOKEN, max_size=3),
        "do_sample": st.booleans(),
        "temperature": st.sampled_from([0.5, 1.0, 1.7]),
        "top_k": st.sampled_from([0, 1, 3, 50]),
        "top_p": st.sampled_from([0.0, 0.3, 0.9, 1.0]),
        "num_beams": st.integers(1, 3),
    },
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=PROCESSOR_OPTIONS, prompt_length=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_processors_match_hf(gpt2, kwargs, prompt_length, seed):
    """Same processed scores as HF for every length of a run, with left padding in the prompts."""
    generator = torch.Generator().manual_seed(seed)
    k = kwargs.get("num_beams", 1)
    prompt = torch.randint(0, V, (2, prompt_length), generator=generator).repeat_interleave(k, dim=0)
    mask = torch.ones_like(prompt)
    mask[:k, : prompt_length // 2] = 0  # the first input is left-padded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = hf_generation_config(gpt2.model, {}, prompt_length, **kwargs)
            theirs = hf_processors(gpt2.model, config, prompt, mask)
        except ValueError:
            theirs = None
    try:
        options = resolve_options(
            {}, prompt_length=prompt_length, is_encoder_decoder=False, max_position_embeddings=32, **kwargs
        )
        ignore_length = (mask != 0).int().argmax(dim=1)
        ours = build_processors(
            options, prompt_length=prompt_length, prompt_ignore_length=ignore_length, vocab_size=V, device="cpu"
        )
    except InvalidArgumentError:
        ours = None
    assert (ours is None) == (theirs is None)
    event(f"{len(ours or [])} processors")
    if ours is None:
        return
    ids = prompt
    for _ in range(prompt_length, options.max_length):
        scores = torch.randn((ids.shape[0], V), generator=generator) * 3
        expected = theirs(ids, scores.clone())
        actual = scores.clone()
        for processor in ours:
            actual = processor(ids, actual)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"length {ids.shape[1]}")
        ids = torch.cat([ids, torch.randint(0, V, (ids.shape[0], 1), generator=generator)], dim=1)


@pytest.mark.parametrize(
    "kwargs", [{"forced_bos_token_id": V}, {"forced_eos_token_id": [1, V + 3]}, {"bad_words_ids": [[1, V]]}]
)
def test_token_ids_outside_the_vocabulary_raise(kwargs):
    options = resolve_options({}, prompt_length=1, is_encoder_decoder=False, max_position_embeddings=None, **kwargs)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        build_processors(options, prompt_length=1, prompt_ignore_length=None, vocab_size=V, device="cpu")


def test_search_imports_without_transformers():
    """The runtime path must not pull in transformers."""
    code = "import sys, el_export.search; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
