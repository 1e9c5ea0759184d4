"""How far two models' outputs agree: token sequences, transcripts, and the word error rate between texts.

compare and bench use these to measure what reduced precision (int8, float16) changes against HF in float32,
and W7 to score a transcript against the text it was spoken from.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

NO_TOKEN = -1  # a cell of a padded [N, L] id tensor that holds no token: a trailing pad, or past a row's end

NORMALISATION = (
    "lowercase; thousands separators and apostrophes dropped (1,200 -> 1200, Linda's -> lindas); words are runs of "
    "letters and digits (a decimal number is one word), anything else separates them; numbers are compared as "
    "written (the text writes them as Whisper does), not spelled out"
)


@dataclass(frozen=True)
class TokenAgreement:
    """Two [N, L] id tensors compared sequence by sequence and, past the prompt, position by position."""

    sequences: int
    sequences_differing: int
    first_differing_step: int | None  # generated tokens before the first difference (None: none differs)
    tokens_compared: int  # generated positions where either side has a token
    tokens_equal: int  # of those, the positions where both hold the same token

    @property
    def rate(self) -> float:
        """Tokens equal at equal positions over tokens compared (1.0 when nothing was generated)."""
        return self.tokens_equal / self.tokens_compared if self.tokens_compared else 1.0


def token_agreement(
    ours: torch.Tensor, reference: torch.Tensor, prompt_length: int, pad: int | None = None
) -> TokenAgreement:
    """How two [N, L] id tensors of generated sequences agree.

    Trailing `pad` tokens are not compared: a batch is as wide as its longest sequence, so one sequence that
    differs in length changes the width of every other. A sequence missing from one side, or longer on it,
    differs, and each token it has that the other lacks counts as compared and unequal.
    """
    a, b = _padded((ours, reference), pad)  # [N, L] each, NO_TOKEN where a side has no token
    different = a != b
    generated = (a[:, prompt_length:], b[:, prompt_length:])
    present = (generated[0] != NO_TOKEN) | (generated[1] != NO_TOKEN)
    compared, unequal = int(present.sum()), int(different[:, prompt_length:].sum())
    differing = int(different.any(dim=1).sum())
    step = max(0, int(different.any(dim=0).nonzero()[0]) - prompt_length) if differing else None
    return TokenAgreement(different.shape[0], differing, step, compared, compared - unequal)


def _padded(ids: tuple[torch.Tensor, ...], pad: int | None) -> list[torch.Tensor]:
    """The id tensors on one [N, L] grid (the largest), NO_TOKEN in trailing pads and past each one's shape."""
    rows, width = max(t.shape[0] for t in ids), max(t.shape[1] for t in ids)
    grids = []
    for t in ids:
        grid = torch.full((rows, width), NO_TOKEN, dtype=torch.int64)
        is_pad = t == pad if pad is not None else torch.zeros_like(t, dtype=torch.bool)
        trailing = is_pad.flip(1).int().cumprod(dim=1).flip(1).bool()  # [n, l]: pads after a row's last token
        grid[: t.shape[0], : t.shape[1]] = t.masked_fill(trailing, NO_TOKEN)
        grids.append(grid)
    return grids


def first_difference(ours: torch.Tensor, reference: torch.Tensor, pad: int | None) -> str:
    """The first sequence that differs, both sides' ids, for a person to read."""
    a, b = _padded((ours, reference), pad)
    row = int((a != b).any(dim=1).nonzero()[0])
    mine, theirs = (ids[row].tolist() if row < ids.shape[0] else "no sequence" for ids in (ours, reference))
    return f"row {row}: {mine} vs HF {theirs}"


@dataclass(frozen=True)
class TranscriptAgreement:
    """Our transcripts against a reference's, pair by pair, and the word errors between them."""

    transcripts: int
    identical: int
    word_errors: int
    reference_words: int

    @property
    def word_error_rate(self) -> float | None:
        """Word errors over the reference's words; None when the reference holds no words (no rate exists)."""
        return self.word_errors / self.reference_words if self.reference_words else None


def transcript_agreement(ours: list[str], reference: list[str]) -> TranscriptAgreement:
    """How our transcripts agree with the reference's (HF in float32) of the same inputs, in the same order.

    Nothing is normalised: words are whitespace-separated runs, case and punctuation as they are. Both sides are
    the same model's tokenizer writing, so a capital or a comma that changed is a change the precision made.
    """
    errors, words = _word_errors_over(reference, ours, str.split)
    identical = sum(a == b for a, b in zip(ours, reference, strict=True))
    return TranscriptAgreement(len(reference), identical, errors, words)


def normalise(text: str) -> list[str]:
    """`text` as the words W7's word error rate counts against written prose (NORMALISATION says how)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower()).replace("'", "").replace("\u2019", "")
    return re.findall(r"\d+(?:\.\d+)?|[a-z0-9]+", text)  # anything else separates words


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance: the fewest substitutions, deletions and insertions from one to the other."""
    previous = list(range(len(hypothesis) + 1))  # distances from an empty reference
    for i, word in enumerate(reference, 1):
        current = [i]
        for j, other in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def word_error_rate(references: list[str], hypotheses: list[str], *, words: Callable[[str], list[str]]) -> float:
    """Errors over all texts divided by the references' words (corpus WER), each text split by `words` first
    (`normalise`, or `str.split` for words as written).

    Raises:
        ValueError: the references hold no words.
    """
    errors, total = _word_errors_over(references, hypotheses, words)
    if total == 0:
        raise ValueError("the reference texts hold no words")
    return errors / total


def _word_errors_over(references: list[str], hypotheses: list[str], words: Callable[[str], list[str]]):
    """(word errors summed over the pairs, the references' words)."""
    pairs = [(words(r), words(h)) for r, h in zip(references, hypotheses, strict=True)]
    return sum(word_errors(r, h) for r, h in pairs), sum(len(r) for r, _ in pairs)
