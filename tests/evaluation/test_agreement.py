"""Word errors, the word error rate (W7's normalised, compare's as written) and transcript agreement."""

import pytest

from el_export.evaluation.agreement import (
    TranscriptAgreement,
    normalise,
    transcript_agreement,
    word_error_rate,
    word_errors,
)


@pytest.mark.parametrize(
    ("reference", "hypothesis", "errors"),
    [
        ("the cat sat", "the cat sat", 0),
        ("the cat sat", "the bat sat", 1),  # substitution
        ("the cat sat", "the cat", 1),  # deletion
        ("the cat sat", "the big cat sat down", 2),  # insertions
        ("a b c d", "b c d a", 2),  # a moved word: one deletion, one insertion
        ("", "hello there", 2),
        ("hello there", "", 2),
    ],
)
def test_word_errors_is_the_word_level_levenshtein_distance(reference, hypothesis, errors):
    assert word_errors(reference.split(), hypothesis.split()) == errors


def test_normalise_ignores_case_punctuation_and_thousands_separators():
    assert normalise("Dr. Reyes sold 1,200 rolls in 1994, at 3.5 each!") == [
        "dr", "reyes", "sold", "1200", "rolls", "in", "1994", "at", "3.5", "each",
    ]  # fmt: skip
    assert normalise("Linda's well-known plan/idea") == ["lindas", "well", "known", "plan", "idea"]
    assert normalise("four") != normalise("4")  # numbers compared as written


def test_word_error_rate_is_over_all_texts_words():
    references = ["Good morning, Anna.", "The train leaves at 1,250 sharp."]
    assert word_error_rate(references, ["good morning anna", "The train leaves at 1250 sharp"], words=normalise) == 0
    hypotheses = ["Good evening, Anna.", "The train leaves at 1250."]
    assert word_error_rate(references, hypotheses, words=normalise) == 2 / 9
    assert word_error_rate(references, hypotheses, words=str.split) == 3 / 9  # as written: "1,250" is not "1250."
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(["..."], ["anything"], words=normalise)


def test_transcript_agreement_counts_hf_words_as_written():
    """HF's transcripts are the reference (11 words); ours: one identical, then an insertion, a deletion, and two
    words changed by case and punctuation alone (2 substitutions); leading spaces separate nothing."""
    hf = [" The cat sat.", " A dog ran", " Two birds", " Yes, it did."]
    ours = [" The cat sat.", " A big dog ran", "Two", " yes it did"]
    assert transcript_agreement(ours, hf) == TranscriptAgreement(4, 1, word_errors=4, reference_words=11)
    assert transcript_agreement(ours, hf).word_error_rate == 4 / 11
    assert transcript_agreement(["the bat sat"], ["the cat sat"]).word_error_rate == 1 / 3  # substitution


def test_transcript_agreement_with_an_empty_reference_has_no_rate():
    """Words against an empty reference are all insertions, but no rate exists over zero words."""
    empty = transcript_agreement(["hello there", ""], ["", ""])
    assert empty == TranscriptAgreement(2, 1, word_errors=2, reference_words=0)
    assert empty.word_error_rate is None
    assert transcript_agreement([""], [""]).identical == 1
