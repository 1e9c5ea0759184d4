"""HF's logits processors as plain torch callables, built in the order `_get_logits_processor` builds them.

Each one is written to give bit-identical results to its transformers 5.23 counterpart (same ops in the
same order), because "same tokens as HF on the same logits" is the bar. Run time never imports
transformers; the tests compare against it.
"""

from collections.abc import Callable, Sequence

import torch

from el_export.errors import InvalidArgumentError
from el_export.search.options import GenerationOptions, TimestampRules

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(ids int64 [N, T], scores float32 [N, V]) -> processed scores [N, V]. T is the current length. A processor may
write into `scores` (the search hands it scores it owns, as HF's loop does): at Whisper's vocabulary a full copy
per step and processor is measurable."""

_NEG_INF = -float("inf")


def repetition_penalty(penalty: float, prompt_ignore_length: torch.Tensor | None) -> Processor:
    """Divide positive / multiply negative scores of tokens already in the row (left padding excluded)."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        if prompt_ignore_length is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(positions[None, :] < prompt_ignore_length[:, None], V)
        ids = ids.clamp(max=V)  # ids past the head go to a spare column that is dropped below
        padded = torch.nn.functional.pad(scores, (0, 1))  # [N, V + 1]
        picked = torch.gather(padded, 1, ids)  # [N, T]
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        return padded.scatter(1, ids, picked)[..., :V]

    return apply


def no_repeat_ngram(ngram_size: int) -> Processor:
    """Ban every token that would complete an n-gram already present in the row."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        T = ids.shape[-1]
        if T < ngram_size:
            return scores
        prefix = ids[:, T + 1 - ngram_size :]  # [N, n - 1]
        windows = ids.unfold(dimension=1, size=ngram_size, step=1)  # [N, T - n + 1, n]
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # [N, T - n + 1]
        V = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)  # spare column: no ban
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
        return scores.masked_fill(banned[:, :V], _NEG_INF)

    return apply


def bad_words(words: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Processor:
    """Ban single tokens always, and a sequence's last token when the row ends with the rest of it."""
    too_large = sorted({token for word in words for token in word if token >= vocab_size})
    if too_large:
        raise InvalidArgumentError(
            f"`bad_words_ids` has ids {too_large} outside the vocabulary of {vocab_size}; remove them."
        )
    single_bias = torch.zeros(vocab_size, device=device)  # [V]
    single_bias[[word[0] for word in words if len(word) == 1]] = _NEG_INF
    by_prefix_length: dict[int, list[tuple[int, ...]]] = {}
    for word in dict.fromkeys(tuple(word) for word in words if len(word) > 1):
        by_prefix_length.setdefault(len(word) - 1, []).append(word)
    groups = [
        (
            torch.tensor([word[:-1] for word in group], device=device),  # [G, L]
            torch.tensor([word[-1] for word in group], device=device),  # [G]
            torch.full((len(group),), _NEG_INF, device=device),  # [G]
        )
        for group in by_prefix_length.values()
    ]

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        bias += single_bias
        for prefixes, last_tokens, ban in groups:
            L = prefixes.shape[1]
            if L > ids.shape[1]:
                continue
            matching = (ids[:, None, -L:] == prefixes).all(dim=-1)  # [N, G]
            bias.index_add_(1, last_tokens, torch.where(matching, ban, 0.0))
        return scores + bias

    return apply


def suppress(token_mask: torch.Tensor, when: Callable[[int], bool]) -> Processor:
    """Set the masked tokens to -inf at the lengths `when` accepts (min length, suppress, begin-suppress): in place,
    on their columns only (HF's `torch.where` gives the same values over the whole tensor)."""
    columns = token_mask.nonzero().flatten()

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill_(1, columns, _NEG_INF) if when(ids.shape[-1]) else scores

    return apply


def force(token_ids: Sequence[int], at_length: int, device: torch.device) -> Processor:
    """At one length, leave only the given tokens possible (score 0, all others -inf)."""
    token_ids = torch.tensor(token_ids, device=device)

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] != at_length:
            return scores
        forced = torch.full_like(scores, _NEG_INF)
        forced[:, token_ids] = 0
        return forced

    return apply


def temperature(value: float) -> Processor:
    return lambda ids, scores: scores / value


def top_k(k: int, min_tokens_to_keep: int) -> Processor:
    """Keep the k best tokens (ties with the k-th are kept too)."""
    k = max(k, min_tokens_to_keep)

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth_best = torch.topk(scores, min(k, scores.size(-1)))[0][..., -1, None]  # [N, 1]
        return scores.masked_fill(scores < kth_best, _NEG_INF)

    return apply


def top_p(p: float, min_tokens_to_keep: int) -> Processor:
    """Keep the smallest set of best tokens whose probability mass exceeds p."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)  # [N, V] ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - p)
        sorted_remove[..., -min_tokens_to_keep:] = 0
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        return scores.masked_fill(remove, _NEG_INF)

    return apply


def whisper_timestamps(rules: TimestampRules) -> Processor:
    """HF's `WhisperTimeStampLogitsProcessor`, vectorised over rows: timestamps come in pairs and never go back,
    the first token is a timestamp (at most `max_initial_timestamp_index` in), and text is banned wherever all
    timestamps together are likelier than the best text token."""
    begin, tb, eos = rules.begin_index, rules.timestamp_begin, rules.eos_token_id

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, rules.no_timestamps_token_id] = _NEG_INF
        seq = ids[:, begin:]
        n = seq.shape[1]
        last_was_timestamp = seq[:, -1] >= tb if n >= 1 else torch.zeros_like(ids[:, 0], dtype=torch.bool)
        penultimate_was_timestamp = seq[:, -2] >= tb if n >= 2 else torch.ones_like(last_was_timestamp)
        pair_closed = last_was_timestamp & penultimate_was_timestamp  # has to be text next
        pair_open = last_was_timestamp & ~penultimate_was_timestamp  # has to be a timestamp (or eos) next
        scores[:, tb:] = scores[:, tb:].masked_fill(pair_closed[:, None], _NEG_INF)
        scores[:, :eos] = scores[:, :eos].masked_fill(pair_open[:, None], _NEG_INF)
        timestamp_last = torch.full_like(ids[:, 0], tb)  # no timestamp is forbidden until one is sampled
        if n:
            is_timestamp = seq >= tb
            positions = torch.arange(n, device=ids.device).expand_as(seq)
            last_index = torch.where(is_timestamp, positions, -1).max(dim=1).values
            last = seq.gather(1, last_index.clamp(min=0)[:, None])[:, 0]
            timestamp_last = torch.where(
                last_index >= 0, torch.where(pair_open, last, last + 1), timestamp_last
            )
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        scores.masked_fill_((vocab >= tb) & (vocab < timestamp_last[:, None]), _NEG_INF)
        if ids.shape[1] == begin:
            scores[:, :tb] = _NEG_INF
            if rules.max_initial_timestamp_index is not None:
                scores[:, tb + rules.max_initial_timestamp_index + 1 :] = _NEG_INF
        logprobs = torch.nn.functional.log_softmax(scores.float(), dim=-1)
        timestamp_logprob = logprobs[:, tb:].logsumexp(dim=-1)
        max_text_token_logprob = logprobs[:, :tb].max(dim=-1).values
        sample_timestamp = (timestamp_logprob > max_text_token_logprob).unsqueeze(-1)
        scores[:, :tb].masked_fill_(sample_timestamp, _NEG_INF)
        return scores

    return apply


class NoSpeech:
    """HF's `WhisperNoSpeechDetection` where the first generated step is the one after <|startoftranscript|>
    (English-only models): the probability of the no-speech token at that step, per row, from the scores it is
    handed (log-probabilities under beam search). Changes nothing."""

    def __init__(self, token_id: int, begin_index: int, scores_are_logprobs: bool):
        self.token_id, self.begin_index, self.scores_are_logprobs = token_id, begin_index, scores_are_logprobs
        self.probs: torch.Tensor | None = None  # float32 [N], once the first step ran

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == self.begin_index:
            probs = scores.exp() if self.scores_are_logprobs else scores.float().softmax(dim=-1)
            self.probs = probs[:, self.token_id]
        return scores


def _token_mask(token_ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [V]; ids outside the vocabulary are ignored, as `torch.isin` over the vocab ignores them in HF."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[[token for token in token_ids if token < vocab_size]] = True
    return mask


def build_processors(
    options: GenerationOptions,
    *,
    prompt_length: int,
    prompt_ignore_length: torch.Tensor | None,
    vocab_size: int,
    device: torch.device,
) -> list[Processor]:
    """The processors HF `_get_logits_processor` builds for these options, in HF's order.

    Args:
        options: resolved options.
        prompt_length: P, the decoder prompt length.
        prompt_ignore_length: int64 [N], left-padding length of each row's prompt, which the repetition
            penalty skips (decoder-only prompts; None for encoder-decoder, as HF).
        vocab_size: V, the width of the logits.
        device: where the logits live; constant tensors are put there once.

    Returns:
        Processors to apply in order.

    Raises:
        InvalidArgumentError: a forced or banned token id is outside the vocabulary.
    """
    for name in ("forced_bos_token_id", "forced_eos_token_id"):
        forced = getattr(options, name)
        if forced is not None and max(forced if isinstance(forced, tuple) else (forced,)) >= vocab_size:
            raise InvalidArgumentError(f"`{name}` {forced} is outside the vocabulary of {vocab_size}.")
    processors: list[Processor] = []
    if options.repetition_penalty != 1.0:
        processors.append(repetition_penalty(options.repetition_penalty, prompt_ignore_length))
    if options.no_repeat_ngram_size > 0:
        processors.append(no_repeat_ngram(options.no_repeat_ngram_size))
    if options.bad_words_ids is not None:
        processors.append(bad_words(options.bad_words_ids, vocab_size, device))
    eos = options.eos_token_id
    if eos is not None and options.min_length > 0:
        # HF's MinLength and MinNewTokens processors: min_length already includes min_new_tokens + P.
        min_length = options.min_length
        processors.append(suppress(_token_mask(eos, vocab_size, device), lambda T: T < min_length))
    if options.forced_bos_token_id is not None:
        processors.append(force([options.forced_bos_token_id], 1, device))
    if options.forced_eos_token_id is not None:
        processors.append(force(options.forced_eos_token_id, options.max_length - 1, device))
    if options.no_speech is not None:  # HF's Whisper order: no-speech, begin-suppress, suppress, timestamps
        processors.append(NoSpeech(options.no_speech.token_id, prompt_length, options.no_speech.scores_are_logprobs))
    if options.suppress_tokens is not None:
        processors.append(suppress(_token_mask(options.suppress_tokens, vocab_size, device), lambda T: True))
    if options.begin_suppress_tokens is not None:
        begin = prompt_length + (1 if prompt_length <= 1 and options.forced_bos_token_id is not None else 0)
        mask = _token_mask(options.begin_suppress_tokens, vocab_size, device)
        processors.append(suppress(mask, lambda T: T == begin))
    if options.timestamps is not None:
        processors.append(whisper_timestamps(options.timestamps))
    if options.do_sample:
        # Beams keep one more token than there are eos ids, so a beam can always continue.
        min_keep = (len(eos) if eos else 1) + 1 if options.num_beams > 1 else 1
        if options.temperature != 1.0:
            processors.append(temperature(options.temperature))
        if options.top_k != 0:
            processors.append(top_k(options.top_k, min_keep))
        if options.top_p < 1.0:
            processors.append(top_p(options.top_p, min_keep))
    return processors
