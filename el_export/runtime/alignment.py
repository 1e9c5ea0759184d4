"""Word timestamps: the alignment heads' cross-attention over the audio, median-filtered, aligned by DTW.

Computed as transformers' `WhisperGenerationMixin._extract_token_timestamps` computes `token_timestamps` (HF
reads the attention generate kept; here a teacher-forced pass over the finished sequence recomputes it, so the
search itself reads no extra output), and grouped into words as faster-whisper groups them.
"""

import string

import numpy as np
import torch

from el_export.contract.manifest import ALIGNMENT_OUTPUT
from el_export.errors import InvalidArgumentError
from el_export.runtime.base import Backend
from el_export.runtime.decoder import GraphDecoder
from el_export.runtime.transcripts import Word

# faster-whisper's `transcribe` defaults (openai-whisper's too)
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


class _RecordingDecoder(GraphDecoder):
    """A GraphDecoder that keeps each step's alignment-head attention [N, A, S]."""

    def __init__(self, backend: Backend, context: dict[str, torch.Tensor]):
        super().__init__(backend, context)
        self.attention: list[torch.Tensor] = []

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        outputs = self.step_outputs(input_ids)
        self.attention.append(outputs[ALIGNMENT_OUTPUT])
        return outputs["logits"]


def alignment_weights(backend: Backend, context: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The alignment heads' cross-attention of every position of a teacher-forced pass over `ids`.

    Args:
        backend: a backend of a bundle whose decoder step has the alignment output (`manifest.alignment`).
        context: one window's encoder outputs as the decoder step takes them (batch 1): `encoder_hidden`
            [1, S, d] (the kv baseline: and `cross_key.i` / `cross_value.i`) and `encoder_mask`.
        ids: int [T], the decoder prompt and the generated tokens; or [n, T], n sequences of that window in one
            pass (a shorter one padded with any token: rows past its end are not its own).

    Returns:
        float32 [A, T, S] (or [n, A, T, S]): row t is the attention of the query at position t.

    Raises:
        InvalidArgumentError: the bundle was exported without alignment heads.
    """
    if not backend.manifest.alignment:
        raise InvalidArgumentError(
            "this bundle has no alignment heads, which word timestamps need; re-export it from a checkpoint whose "
            "generation_config.json names alignment_heads"
        )
    rows = ids.reshape(-1, ids.shape[-1])  # [n, T]
    n = rows.shape[0]
    decoder = _RecordingDecoder(backend, {name: t.expand(n, *t.shape[1:]) for name, t in context.items()})
    decoder.start(rows, rows_per_input=1)  # the whole sequence as the prompt: one step per position
    weights = torch.stack(decoder.attention, dim=2).float().cpu()  # [n, A, T, S]
    return weights.reshape(*ids.shape[:-1], *weights.shape[1:])


def token_timestamps(
    weights: torch.Tensor,
    num_input_ids: int,
    num_frames: int | None,
    median_filter_width: int,
    time_precision: float = 0.02,
) -> torch.Tensor:
    """Seconds [T] of each token of one sequence, as HF's `_extract_token_timestamps` gives them.

    Rows kept: the generated tokens' (the `num_input_ids` prompt rows dropped) but the last token's, which HF
    never feeds; columns: the first `num_frames // 2` encoder frames (all when None). Normalised over tokens,
    median-filtered over frames, averaged over heads, aligned by DTW; a token's time is its row's first frame on
    the path. Prompt tokens get 0, the last token its predecessor's time.

    Args:
        weights: [A, T, S] from `alignment_weights`.
        num_input_ids: the decoder prompt's length.
        num_frames: the audio's mel frames in this window (HF's attention-mask sum), or None.
        median_filter_width: odd, from the manifest's `alignment`.
    """
    T = weights.shape[1]
    rows = weights[:, num_input_ids : T - 1]  # [A, T', S]
    if num_frames is not None:
        rows = rows[..., : num_frames // 2]
    times = torch.zeros(T, dtype=torch.float32)
    if rows.shape[1] == 0:
        return times
    std = torch.std(rows, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(rows, dim=-2, keepdim=True)
    matrix = median_filter((rows - mean) / std, median_filter_width).mean(dim=0)  # [T', F]
    text_indices, time_indices = dynamic_time_warping(-matrix.double().numpy())
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = torch.tensor(time_indices[jumps] * time_precision)  # float64, as HF's
    times[:] = torch.cat([torch.zeros(num_input_ids), jump_times, jump_times[-1:]])  # stored as float32, as HF's
    return times


def median_filter(inputs: torch.Tensor, filter_width: int) -> torch.Tensor:
    """HF's `_median_filter`: a median of width `filter_width` (odd) along the last axis, edges reflected."""
    pad_width = filter_width // 2
    if inputs.shape[-1] <= pad_width:
        return inputs
    inputs = torch.nn.functional.pad(inputs, (pad_width, pad_width, 0, 0), mode="reflect")
    return inputs.unfold(-1, filter_width, 1).sort()[0][..., pad_width]


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF's `_dynamic_time_warping` (the cheapest monotone path through a [tokens, frames] cost matrix), with its
    float32 cost table and its tie-breaking, computed one anti-diagonal at a time.

    Cell (i, j) of the cost table depends on (i-1, j-1), (i-1, j) and (i, j-1): every cell of one anti-diagonal
    i + j = a depends only on the two diagonals before it. Tables are stored skewed, by [a, i].

    Returns:
        text indices and time indices of the path, from (0, 0) on.
    """
    N, M = matrix.shape
    a, i = np.indices((N + M + 1, N + 1))  # diagonal, row
    j = a - i
    inside = (i >= 1) & (j >= 1) & (j <= M)
    skewed = np.zeros((N + M + 1, N + 1))  # skewed[i + j, i] = matrix[i - 1, j - 1]
    skewed[inside] = matrix[i[inside] - 1, j[inside] - 1]
    cost = np.full((N + M + 1, N + 1), np.inf, dtype=np.float32)  # cost[i + j, i], as HF's float32 table
    trace = np.full((N + M + 1, N + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for a in range(2, N + M + 1):
        lo, hi = max(1, a - M), min(N, a - 1) + 1  # rows i of this diagonal with 1 <= j = a - i <= M
        c0, c1, c2 = cost[a - 2, lo - 1 : hi - 1], cost[a - 1, lo - 1 : hi - 1], cost[a - 1, lo:hi]
        first = (c0 < c1) & (c0 < c2)
        second = (c1 < c0) & (c1 < c2)
        cost[a, lo:hi] = skewed[a, lo:hi] + np.where(first, c0, np.where(second, c1, c2))  # float64 sum, as HF's
        trace[a, lo:hi] = 2 - 2 * first - second
    i, j = N, M
    text_indices, time_indices = [], []
    while i > 0 or j > 0:
        text_indices.append(i - 1)
        time_indices.append(j - 1)
        step = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text_indices)[::-1], np.array(time_indices)[::-1]


def words(
    tokenizer,
    tokens,
    times,
    eot_token_id: int,
    offset: float = 0.0,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
) -> list[Word]:
    """A sequence's words with their times, as faster-whisper presents them.

    A word is a token that starts with a space (or is punctuation) and the tokens after it up to the next such;
    special and timestamp tokens (ids from <|endoftext|> on) are left out. Token i spans times[i-1] to times[i]
    (HF's pipeline: the time of a token is where its query sits in the audio); a word spans its tokens. Then
    faster-whisper's `merge_punctuations`: leading punctuation joins the next word, trailing punctuation the
    previous one, which keep their own times.

    Args:
        tokenizer: the bundle's `el_export.runtime.tokenizer.Tokenizer`.
        tokens, times: one sequence [T] and its `token_timestamps` [T].
        eot_token_id: <|endoftext|>'s id (the manifest's eos_token_id for Whisper).
        offset: seconds added to every time (the window's start in long-form audio); times are rounded to 10 ms.
    """
    tokens, times = [int(t) for t in tokens], [float(t) for t in times]
    text = [i for i, t in enumerate(tokens) if t < eot_token_id]
    pieces = []  # [word, [token indices]]
    for piece, indices in _split_on_unicode(tokenizer, tokens, text):
        if pieces and not piece.startswith(" ") and piece.strip() not in string.punctuation:
            pieces[-1][0] += piece
            pieces[-1][1].extend(indices)
        else:
            pieces.append([piece, indices])
    timed = [dict(word=w, start=times[i[0] - 1] if i[0] > 0 else 0.0, end=times[i[-1]]) for w, i in pieces]
    _merge_punctuations(timed, prepend_punctuations, append_punctuations)
    return [
        Word(start=round(offset + w["start"], 2), end=round(offset + w["end"], 2), word=w["word"])
        for w in timed
        if w["word"]
    ]


def _split_on_unicode(tokenizer, tokens: list[int], indices: list[int]) -> list[tuple[str, list[int]]]:
    """faster-whisper's `split_tokens_on_unicode` over tokens[indices]: pieces that decode to whole characters."""

    def decode(positions: list[int]) -> str:
        return tokenizer.decode(torch.tensor([[tokens[i] for i in positions]], dtype=torch.int64))[0]

    full = decode(indices) if indices else ""
    pieces, current, offset = [], [], 0
    for index in indices:
        current.append(index)
        decoded = decode(current)
        bad = decoded.find("\ufffd")
        if bad < 0 or (offset + bad < len(full) and full[offset + bad] == "\ufffd"):
            pieces.append((decoded, current))
            current, offset = [], offset + len(decoded)
    return pieces


def _merge_punctuations(alignment: list[dict], prepended: str, appended: str) -> None:
    """faster-whisper's `merge_punctuations`, in place (a merged word's text becomes empty)."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous["word"].startswith(" ") and previous["word"].strip() in prepended:
            following["word"], previous["word"] = previous["word"] + following["word"], ""
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous["word"].endswith(" ") and following["word"] in appended:
            previous["word"], following["word"] = previous["word"] + following["word"], ""
        else:
            i = j
        j += 1
