"""`generate_ids` through a HF-backed decoder must reproduce HF `generate` token for token."""

import copy

import pytest
import torch

from el_export.search import SearchOutput, generate_ids, resolve_options
from el_export.tolerance import SEARCH_SCORE_TOLERANCE

from .conftest import TinyModel
from .hf_decoder import HFStepDecoder


def generate_both(tiny: TinyModel, seed: int | None = None, **kwargs) -> tuple[SearchOutput, dict]:
    """Run HF `generate` and ours on the same model and inputs; returns (ours, HF's output)."""
    model, config = tiny.model, tiny.model.config
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(
        tiny.inputs, attention_mask=tiny.mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    if config.is_encoder_decoder:
        prompt, prompt_mask = torch.full((tiny.inputs.shape[0], 1), config.decoder_start_token_id), None
    else:
        prompt, prompt_mask = tiny.inputs, tiny.mask
    options = resolve_options(
        tiny.defaults,
        prompt_length=prompt.shape[1],
        is_encoder_decoder=config.is_encoder_decoder,
        max_position_embeddings=config.max_position_embeddings,
        output_scores=True,
        seed=seed,
        **kwargs,
    )
    ours = generate_ids(HFStepDecoder(model, tiny.inputs, tiny.mask), prompt, options, prompt_mask=prompt_mask)
    return ours, ref


def assert_same(ours: SearchOutput, ref) -> None:
    torch.testing.assert_close(ours.sequences, ref.sequences, rtol=0, atol=0)
    assert len(ours.scores) == len(ref.scores)
    for step, (mine, theirs) in enumerate(zip(ours.scores, ref.scores, strict=True)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"scores of step {step}")
    if ref.get("beam_indices") is None:
        assert ours.sequences_scores is None and ours.beam_indices is None
    else:
        torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=0, atol=SEARCH_SCORE_TOLERANCE)
        torch.testing.assert_close(ours.beam_indices, ref.beam_indices, rtol=0, atol=0)


BEAMS = {"num_beams": 4, "num_return_sequences": 2}

BART_CASES = {
    "greedy": {},
    "greedy_max_new_tokens": {"max_new_tokens": 6},
    "greedy_repetition_penalty": {"repetition_penalty": 1.3},
    "beams": BEAMS,
    **{
        f"beams_ngram_early_{early}_lp_{lp}": {
            **BEAMS, "no_repeat_ngram_size": 2, "early_stopping": early, "length_penalty": lp
        }
        for early in (True, False, "never")
        for lp in (0.6, 2.0)
    },
    "beams_min_new_tokens": {**BEAMS, "length_penalty": 0.6, "min_new_tokens": 5},
    "beams_repetition_penalty": {**BEAMS, "repetition_penalty": 1.3},
    "beams_forced_bos_eos": {**BEAMS, "forced_bos_token_id": 0, "forced_eos_token_id": [2, 5]},
    "beams_bad_words": {**BEAMS, "bad_words_ids": [[16], [13, 13], [4, 22, 16], [2]]},
    "beams_two_eos": {**BEAMS, "eos_token_id": [2, 16]},
    "beams_no_eos": {**BEAMS, "eos_token_id": None, "forced_eos_token_id": None, "max_new_tokens": 5},
    "beams_suppress": {**BEAMS, "suppress_tokens": [13, 16], "begin_suppress_tokens": [4, 22]},
    "beams_max_new_tokens": {**BEAMS, "max_new_tokens": 4, "early_stopping": True},
    "greedy_max_length_min_length": {"max_length": 9, "min_length": 4},
}  # fmt: skip


@pytest.mark.parametrize("kwargs", BART_CASES.values(), ids=BART_CASES.keys())
def test_bart_matches_hf(bart, kwargs):
    assert_same(*generate_both(bart, **kwargs))


SAMPLING_CASES = {
    "sample": {"do_sample": True, "num_return_sequences": 2},
    "sample_warpers": {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.8},
    "beam_sample": {"do_sample": True, **BEAMS},
    "beam_sample_warpers": {"do_sample": True, "num_beams": 3, "temperature": 1.5, "top_k": 4, "top_p": 0.9},
}


@pytest.mark.parametrize("kwargs", SAMPLING_CASES.values(), ids=SAMPLING_CASES.keys())
@pytest.mark.parametrize("seed", [0, 7])
def test_bart_sampling_matches_hf_with_seed(bart, kwargs, seed):
    assert_same(*generate_both(bart, seed=seed, **kwargs))


GPT2_CASES = {
    "greedy": {"max_new_tokens": 10},
    "beams": {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 10},
    "greedy_repetition_penalty": {"repetition_penalty": 1.3, "max_new_tokens": 10},
    "beams_repetition_penalty": {"num_beams": 3, "repetition_penalty": 1.3, "length_penalty": 0.6},
    "beams_ngram": {"num_beams": 2, "no_repeat_ngram_size": 2, "max_new_tokens": 12},
    "sample": {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": 8},
}


@pytest.mark.parametrize("kwargs", GPT2_CASES.values(), ids=GPT2_CASES.keys())
def test_gpt2_left_padded_matches_hf(gpt2, kwargs):
    seed = 3 if kwargs.get("do_sample") else None
    assert_same(*generate_both(gpt2, seed=seed, **kwargs))


def test_beam_output_fill_is_eos_when_pad_id_is_zero(gpt2):
    """HF fills ended beams with `pad_token_id or eos_token_id[0]`: pad 0 is falsy, so eos (1) fills."""
    ours, _ = generate_both(gpt2, num_beams=3, num_return_sequences=3, max_new_tokens=10)
    generated = ours.sequences[:, gpt2.inputs.shape[1] :]
    ended = (ours.beam_indices == -1).any(dim=1)
    assert ended.any()
    assert (generated[ours.beam_indices == -1] == 1).all()


def test_greedy_pads_finished_rows_with_pad_id(gpt2):
    ours, _ = generate_both(gpt2, max_new_tokens=10)
    generated = ours.sequences[:, gpt2.inputs.shape[1] :]
    after_eos = (generated == 1).long().cumsum(dim=1) - (generated == 1).long() > 0
    assert after_eos.any() and (generated[after_eos] == 0).all()


def test_models_have_no_near_ties(bart, gpt2):
    """The parity cases rely on separated candidates: the best two greedy scores differ clearly."""
    for tiny in (bart, gpt2):
        ours, _ = generate_both(tiny, max_new_tokens=10)
        for scores in ours.scores:
            finite = scores.nan_to_num(neginf=-1e9)
            best_two = finite.topk(2, dim=-1).values
            assert ((best_two[:, 0] - best_two[:, 1]) > 1e-3).all()


def test_without_output_scores_there_are_no_scores(bart):
    options = resolve_options(
        bart.defaults, prompt_length=1, is_encoder_decoder=True, max_position_embeddings=64, num_beams=2
    )
    out = generate_ids(HFStepDecoder(bart.model, bart.inputs, bart.mask), torch.full((3, 1), 2), options)
    assert out.scores is None and out.sequences_scores is not None


def on_cuda(tiny: TinyModel) -> TinyModel:
    return TinyModel(copy.deepcopy(tiny.model).cuda(), tiny.inputs.cuda(), tiny.mask.cuda())


CUDA_CASES = {
    "bart_greedy": ("bart", BART_CASES["greedy_repetition_penalty"]),
    "bart_beams": ("bart", BART_CASES["beams_ngram_early_never_lp_2.0"]),
    "bart_beams_bad_words": ("bart", BART_CASES["beams_bad_words"]),
    "bart_beams_two_eos": ("bart", BART_CASES["beams_two_eos"]),
    "bart_sample": ("bart", {"seed": 5, **SAMPLING_CASES["sample_warpers"]}),
    "bart_beam_sample": ("bart", {"seed": 5, **SAMPLING_CASES["beam_sample"]}),
    "gpt2_beams": ("gpt2", GPT2_CASES["beams_repetition_penalty"]),
    "gpt2_greedy": ("gpt2", GPT2_CASES["greedy_repetition_penalty"]),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("model", "kwargs"), CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_matches_hf_on_cuda(request, model, kwargs):
    """All search state follows the decoder onto the GPU, and HF's GPU run is matched there too."""
    ours, ref = generate_both(on_cuda(request.getfixturevalue(model)), **kwargs)
    assert ours.sequences.is_cuda and all(scores.is_cuda for scores in ours.scores)
    assert_same(ours, ref)
