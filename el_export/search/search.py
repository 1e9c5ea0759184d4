"""Greedy, sampling, beam search and beam sampling over a `StepDecoder`, as transformers 5.23 runs them.

`Sampling` and `BeamSearch` are ports of HF's `_sample` and vectorized `_beam_search`: the same tensor
operations in the same order, so the same logits give the same tokens and bit-identical scores. Each is a
search over one cohort (inputs that started together with the same options) advanced one step at a time, so
a scheduler can run several cohorts over one running batch of decoder rows. An input leaves its cohort at the
step its own search is over, as HF `generate` on that input alone would stop (compaction): its rows are
dropped and it is answered. All state lives on the device the logits come back on; the only host
synchronisation per step is the stop check, as in HF.
"""

from dataclasses import dataclass
from typing import Any

import torch

from el_export.errors import InvalidArgumentError
from el_export.search.decoder import StepDecoder
from el_export.search.options import GenerationOptions, check_prompt_length
from el_export.search.processors import NoSpeech, Processor, build_processors


@dataclass
class SearchOutput:
    """Laid out as HF's `generate(..., return_dict_in_generate=True, output_scores=True)` output.

    Attributes:
        sequences: int64 [B * num_return_sequences, L], prompt included.
        sequences_scores: float32 [B * num_return_sequences], length-penalised log-probabilities
            (beam methods; None for greedy and sampling, as HF). Unlike HF, given even without
            `output_scores`: it is free, and callers rank hypotheses with it.
        scores: per generated step, the processed scores [B * k, V] (only with `output_scores`).
        beam_indices: int32 [B * num_return_sequences, L - P], the global row each token came from
            (-1 past the end; beam methods only).
        token_logprobs: float32 [B * num_return_sequences, L - P], each generated token's log-probability under
            its step's processed scores (rescaled by `token_logprobs_rescale`): what HF's Whisper fallback reads
            from `scores` and `beam_indices`, kept without the [V]-wide scores (only when that option is set).
        no_speech_prob: float32 [B], the no-speech token's probability at the first step (option `no_speech`).
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None
    no_speech_prob: torch.Tensor | None = None


@dataclass
class Advance:
    """What one search step asks of the decoder.

    Attributes:
        tokens: int64 [n, 1], the next input of each row still searching.
        rows: int64 [n], the cohort's rows (before this step) those rows continue, in order: beams reorder, and
            the rows of inputs whose search just ended are dropped. None: every row, unchanged.
        inputs: int64 [b], the cohort's inputs (before this step) still searching. None: every input.
    """

    tokens: torch.Tensor
    rows: torch.Tensor | None = None
    inputs: torch.Tensor | None = None


class Search:
    """One cohort's search. `advance(logits)` takes the logits of the cohort's current rows (input-major, k per
    input) and returns what the decoder must do next; `finished` collects (first input, output) as inputs end.

    With `compact`, each input ends at its own stop; without it (sampling, whose random draws depend on the
    rows drawn together; `output_scores`; a streamer) the cohort runs until all its inputs are over and ends as
    one output, exactly as HF's batch.
    """

    def __init__(self, inputs: int, rows_per_input: int, compact: bool):
        self.k = rows_per_input
        self.compact = compact
        self.origin = torch.arange(inputs)  # the cohort index of each input still searching
        self.finished: list[tuple[int, SearchOutput]] = []

    @property
    def inputs(self) -> int:
        return len(self.origin)

    @property
    def rows(self) -> int:
        return self.inputs * self.k

    @property
    def done(self) -> bool:
        return self.inputs == 0

    def advance(self, logits: torch.Tensor) -> Advance:
        raise NotImplementedError

    def _end(self, over: torch.Tensor) -> torch.Tensor | None:
        """Answer the inputs whose search is `over` (bool [b]) and drop them; the kept inputs, or None if all are.
        Without compaction, nothing ends until every input is over."""
        if not self.compact:
            if not bool(over.all()):
                return None
            self.finished.append((0, self._output(torch.arange(self.inputs))))
            self.origin = self.origin[:0]
            return torch.zeros(0, dtype=torch.long)
        if not bool(over.any()):
            return None
        for b in over.nonzero().flatten().tolist():
            self.finished.append((int(self.origin[b]), self._output(torch.tensor([b]))))
        keep = (~over).nonzero().flatten().cpu()
        self.origin = self.origin[keep]
        self._keep(keep.to(over.device))
        return keep

    def _output(self, inputs: torch.Tensor) -> SearchOutput:
        raise NotImplementedError

    def _keep(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def _rows_of(self, inputs: torch.Tensor) -> torch.Tensor:
        """The rows of `inputs`, input-major."""
        return (inputs[:, None] * self.k + torch.arange(self.k, device=inputs.device)).flatten()


def make_search(
    prompt_ids: torch.Tensor,
    options: GenerationOptions,
    vocab_size: int,
    device: torch.device,
    prompt_mask: torch.Tensor | None = None,
    streamer: Any = None,
    compact: bool = True,
) -> Search:
    """The search `options` ask for over B inputs starting from their decoder prompts.

    Args:
        prompt_ids: int64 [B, P], the decoder prompt of each input.
        options: resolved options (see `resolve_options`, called with this P).
        vocab_size, device: the logits' width and device.
        prompt_mask: int64 [B, P], 0 on the left padding of decoder-only prompts; the repetition penalty ignores
            padding as HF does. None when there is no padding (and for encoder-decoder).
        streamer: greedy and sampling only, as in HF (see `check_streamer`).
        compact: let each input end at its own stop (unless sampling, `output_scores` or a streamer need the
            cohort whole); False keeps every row until the last input ends, as a static batch.

    Raises:
        InvalidArgumentError: the prompt leaves no room to generate, a forced or banned id is outside the
            vocabulary, or a streamer with beam search.
    """
    P = prompt_ids.shape[1]
    check_prompt_length(options, P)
    check_streamer(streamer, options)
    compact = compact and not options.do_sample and not options.output_scores and streamer is None
    if options.num_beams == 1:
        return Sampling(prompt_ids, options, vocab_size, device, prompt_mask, streamer, compact)
    return BeamSearch(prompt_ids, options, vocab_size, device, prompt_mask, compact)


def generate_ids(
    decoder: StepDecoder,
    prompt_ids: torch.Tensor,
    options: GenerationOptions,
    prompt_mask: torch.Tensor | None = None,
    streamer: Any = None,
) -> SearchOutput:
    """Generate token ids with HF `generate` semantics for B inputs on one decoder (one cohort, no admission).

    Args:
        decoder: a decoder whose encoder (if any) has already run for the B inputs.
        prompt_ids, options, prompt_mask, streamer: as `make_search`.

    Returns:
        A `SearchOutput` on the decoder's device.

    Raises:
        InvalidArgumentError: as `make_search`.
    """
    check_prompt_length(options, prompt_ids.shape[1])
    check_streamer(streamer, options)
    k = options.num_beams if options.num_beams > 1 else options.num_return_sequences
    if streamer is not None:  # HF: the expanded prompt, once, before the first step
        streamer.put(prompt_ids.repeat_interleave(k, dim=0).cpu())  # [B * k, P]
    logits = decoder.start(prompt_ids, k)  # [B * k, V]
    search = make_search(prompt_ids, options, logits.shape[-1], logits.device, prompt_mask, streamer)
    while True:
        advance = search.advance(logits)
        if search.done:
            break
        if advance.rows is not None:
            decoder.reorder(advance.rows, advance.inputs)
        logits = decoder.step(advance.tokens)
    return join_outputs(search.finished, options)


def check_streamer(streamer: Any, options: GenerationOptions) -> None:
    """HF `generate` calls `streamer.put(prompt ids [N, P])` once, `put(new tokens [N])` after each step and `end()`
    at the end, in greedy search and sampling only. HF refuses a streamer with beam search; with beam sampling it
    puts the prompt and then nothing (no `end()`): both are refused here, before anything runs.

    Raises:
        InvalidArgumentError: the streamer lacks `put` or `end`, or num_beams > 1.
    """
    if streamer is None:
        return
    if not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise InvalidArgumentError(
            f"`streamer` must have put() and end() methods (a transformers TextStreamer, say), got "
            f"{type(streamer).__name__}"
        )
    if options.num_beams > 1:
        raise InvalidArgumentError(
            f"`streamer` cannot be used with beam search (num_beams={options.num_beams}); set num_beams=1 or drop "
            "the streamer"
        )


def _process(processors: list[Processor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(ids, scores)
    return scores


def _eos_tensor(options: GenerationOptions, device: torch.device) -> torch.Tensor | None:
    return None if options.eos_token_id is None else torch.tensor(options.eos_token_id, device=device)


class _Processed(Search):
    """The logits processors of one cohort; rebuilt when inputs leave, as the repetition penalty's prompt padding
    is per row."""

    def __init__(self, prompt_ids, options, vocab_size, device, prompt_mask, rows_per_input, compact):
        super().__init__(prompt_ids.shape[0], rows_per_input, compact)
        self.options, self.P, self.V, self.device = options, prompt_ids.shape[1], vocab_size, device
        self.ignore_length = None
        if prompt_mask is not None:  # HF: index of the first attended position
            first = (prompt_mask.to(device) != 0).int().argmax(dim=1)
            self.ignore_length = first.repeat_interleave(rows_per_input)  # [B * k]
        self._build()

    def _build(self) -> None:
        self.processors = build_processors(
            self.options, prompt_length=self.P, prompt_ignore_length=self.ignore_length, vocab_size=self.V,
            device=self.device,
        )  # fmt: skip
        no_speech = [p for p in self.processors if isinstance(p, NoSpeech)]
        if no_speech and getattr(self, "no_speech", None) is not None:
            no_speech[0].probs = self.no_speech.probs  # recorded at the first step: carried into the rebuilt one
        self.no_speech = no_speech[0] if no_speech else None

    def _keep_processors(self, inputs: torch.Tensor) -> None:
        rows = self._rows_of(inputs)
        if self.no_speech is not None and self.no_speech.probs is not None:
            self.no_speech.probs = self.no_speech.probs[rows]
        if self.ignore_length is not None:
            self.ignore_length = self.ignore_length[rows]
            self._build()

    def _no_speech_prob(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The recorded probability of each input among `rows` (their first row: one input's rows share the
        prompt, so the first step's scores are the same for all of them)."""
        if self.no_speech is None or self.no_speech.probs is None:
            return None
        return self.no_speech.probs[rows[:: self.k]]

    def _token_logprobs(self, scores: torch.Tensor) -> torch.Tensor:
        """float32 [N, V]: HF `_retrieve_avg_logprobs`'s log-softmax over a step's processed scores."""
        rescale = self.options.token_logprobs_rescale
        return torch.nn.functional.log_softmax((scores * rescale).float(), dim=-1)


class Sampling(_Processed):
    """HF `_sample`: greedy (argmax) or multinomial sampling; finished rows are padded with pad_token_id. The
    streamer gets each step's tokens [N] (finished rows' padding included) as HF's `StopCheck` hands them out."""

    def __init__(self, prompt_ids, options, vocab_size, device, prompt_mask=None, streamer=None, compact=True):
        k = options.num_return_sequences
        super().__init__(prompt_ids, options, vocab_size, device, prompt_mask, k, compact)
        self.ids = prompt_ids.to(device).repeat_interleave(k, dim=0)  # [N, P]
        self.eos = _eos_tensor(options, device)
        self.unfinished = torch.ones(self.ids.shape[0], dtype=torch.long, device=device)  # [N]
        self.scores: list[torch.Tensor] = []
        self.token_logprobs: list[torch.Tensor] = []  # [N] per step, with `token_logprobs_rescale`
        self.streamer = streamer
        self.generator = None  # None draws from torch's global generator, as HF does
        if options.do_sample and options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)

    def advance(self, logits: torch.Tensor) -> Advance:
        options, ids = self.options, self.ids
        # A copy, as HF makes: a backend may hand out the same logits buffer every step.
        step_scores = _process(self.processors, ids, logits.to(dtype=torch.float32, copy=True))  # [N, V]
        if options.output_scores:
            self.scores.append(step_scores)
        if options.do_sample:
            probs = torch.nn.functional.softmax(step_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)  # [N]
        else:
            next_tokens = torch.argmax(step_scores, dim=-1)  # [N]
        if self.eos is not None:
            next_tokens = next_tokens * self.unfinished + options.pad_token_id * (1 - self.unfinished)
            self.unfinished = self.unfinished & ~torch.isin(next_tokens, self.eos)
        if options.token_logprobs_rescale is not None:
            self.token_logprobs.append(self._token_logprobs(step_scores).gather(1, next_tokens[:, None])[:, 0])
        self.ids = torch.cat([ids, next_tokens[:, None]], dim=-1)  # [N, T + 1]
        if self.streamer is not None:
            self.streamer.put(next_tokens.cpu())
        if self.ids.shape[1] >= options.max_length:
            over = torch.ones(self.inputs, dtype=torch.bool)
        else:
            over = (self.unfinished.view(self.inputs, self.k).max(dim=1).values == 0).cpu()
        kept = self._end(over)
        if self.done and self.streamer is not None:
            self.streamer.end()
        if kept is None:
            return Advance(next_tokens[:, None])
        rows = self._rows_of(kept.to(next_tokens.device))
        return Advance(next_tokens[rows, None], rows, kept)

    def _output(self, inputs: torch.Tensor) -> SearchOutput:
        rows = self._rows_of(inputs.to(self.ids.device))
        scores = token_logprobs = None
        if self.options.output_scores:
            scores = tuple(s[rows] for s in self.scores)
        if self.options.token_logprobs_rescale is not None:
            token_logprobs = torch.stack(self.token_logprobs, dim=1)[rows]
        return SearchOutput(sequences=self.ids[rows], scores=scores, token_logprobs=token_logprobs,
                            no_speech_prob=self._no_speech_prob(rows))  # fmt: skip

    def _keep(self, inputs: torch.Tensor) -> None:
        rows = self._rows_of(inputs.to(self.ids.device))
        self.ids, self.unfinished = self.ids[rows], self.unfinished[rows]
        self.scores = [s[rows] for s in self.scores]
        self.token_logprobs = [t[rows] for t in self.token_logprobs]
        self._keep_processors(inputs)


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """[B, beams, ...] gathered along dim 1 by int [B, K] -> [B, K, ...]."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


class BeamSearch(_Processed):
    """HF vectorized `_beam_search` (with `do_sample`, beam sampling).

    Each step keeps the best `beams_to_keep` continuations so that `num_beams` of them are still running
    after some hit eos; finished hypotheses are merged into a fixed-size set of `num_beams` per input. Beam
    indices are kept per input (0..num_beams-1) and made global (input x num_beams + beam) in the output, so an
    input answered alone reads as HF's answer to it alone.
    """

    def __init__(self, prompt_ids, options, vocab_size, device, prompt_mask=None, compact=True):
        super().__init__(prompt_ids, options, vocab_size, device, prompt_mask, options.num_beams, compact)
        num_beams, max_length = options.num_beams, options.max_length
        B, P = prompt_ids.shape
        self.eos = eos = _eos_tensor(options, device)
        self.beams_to_keep = max(2, 1 + (0 if eos is None else eos.shape[0])) * num_beams
        self.top_num_beam_mask = torch.arange(self.beams_to_keep, device=device) < num_beams  # [K]
        # HF: `pad_token_id or eos_token_id[0]` -- a pad id of 0 is falsy there, so eos fills instead.
        fill = -1 if eos is None else (options.pad_token_id or options.eos_token_id[0])
        ids = prompt_ids.to(device).repeat_interleave(num_beams, dim=0)
        self.running_sequences = torch.full((B, num_beams, max_length), fill, dtype=torch.int64, device=device)
        self.running_sequences[:, :, :P] = ids.view(B, num_beams, P)
        self.sequences = self.running_sequences.detach().clone()  # finished hypotheses, [B, num_beams, max_length]
        self.running_beam_scores = torch.zeros((B, num_beams), dtype=torch.float, device=device)
        self.running_beam_scores[:, 1:] = -1e9  # only the first beam's tokens are candidates at the first step
        self.beam_scores = torch.full((B, num_beams), fill_value=-1e9, dtype=torch.float, device=device)
        self.is_sent_finished = torch.zeros((B, num_beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((B, 1), dtype=torch.bool, device=device)  # HF: is_early_stop_heuristic_unsatisfied
        self.running_beam_indices = torch.full((B, num_beams, max_length - P), -1, dtype=torch.int32, device=device)
        self.beam_indices = self.running_beam_indices.detach().clone()
        self.tracks_logprobs = options.token_logprobs_rescale is not None  # kept beside beam_indices, gathered alike
        if self.tracks_logprobs:
            self.running_token_logprobs = torch.zeros((B, num_beams, max_length - P), device=device)
            self.token_logprobs = self.running_token_logprobs.clone()
        self.all_scores: list[torch.Tensor] = []
        self.flat_running_sequences = ids  # [N, cur_len]
        self.cur_len = P
        self.generator = None
        if options.do_sample and options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)

    def advance(self, logits: torch.Tensor) -> Advance:
        options, device = self.options, self.device
        num_beams, max_length, P = options.num_beams, options.max_length, self.P
        length_penalty, early_stopping = options.length_penalty, options.early_stopping
        B, cur_len, beams_to_keep = self.inputs, self.cur_len, self.beams_to_keep
        log_probs = torch.nn.functional.log_softmax(logits.to(torch.float32), dim=-1)  # [N, V]
        log_probs = _process(self.processors, self.flat_running_sequences, log_probs)
        if options.output_scores:
            self.all_scores.append(log_probs.clone())
        if self.tracks_logprobs:
            candidate_logprobs = self._token_logprobs(log_probs).view(B, -1)  # [B, num_beams * V]
        V = log_probs.shape[-1]
        log_probs = log_probs.view(B, num_beams, V) + self.running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (B, -1))  # [B, num_beams * V]

        # HF `_get_top_k_continuations`
        if options.do_sample:
            probs = torch.nn.functional.softmax(log_probs, dim=-1)
            topk_indices = torch.multinomial(probs, num_samples=beams_to_keep, generator=self.generator)
            topk_log_probs = torch.gather(log_probs, dim=1, index=topk_indices)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)  # [B, K]
        topk_current_beam_indices = topk_indices // V
        topk_running_beam_indices = _gather_beams(self.running_beam_indices, topk_current_beam_indices)
        topk_running_sequences = _gather_beams(self.running_sequences, topk_current_beam_indices)
        topk_ids = topk_indices % V
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - P] = topk_current_beam_indices.to(torch.int32)
        if self.tracks_logprobs:
            topk_running_logprobs = _gather_beams(self.running_token_logprobs, topk_current_beam_indices)
            topk_running_logprobs[:, :, cur_len - P] = candidate_logprobs.gather(1, topk_indices)

        # HF stopping criteria on the K candidates: max length, or the new token is an eos.
        hits = torch.full((B, beams_to_keep), cur_len + 1 >= max_length, dtype=torch.bool, device=device)
        if self.eos is not None:
            hits = hits | torch.isin(topk_ids, self.eos)

        # HF `_get_running_beams_for_next_iteration`
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk_indices = torch.topk(topk_running_log_probs, k=num_beams)[1]
        self.running_sequences = _gather_beams(topk_running_sequences, next_topk_indices)
        self.running_beam_scores = _gather_beams(topk_running_log_probs, next_topk_indices)
        self.running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk_indices)
        if self.tracks_logprobs:
            self.running_token_logprobs = _gather_beams(topk_running_logprobs, next_topk_indices)

        # HF `_update_finished_beams`
        did_top_num_beams_just_finish = hits & self.top_num_beam_mask[None, :]
        topk_log_probs = topk_log_probs / ((cur_len + 1 - P) ** length_penalty)
        beams_in_batch_are_full = torch.all(self.is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        topk_log_probs += beams_in_batch_are_full.to(torch.float32) * -1.0e9
        topk_log_probs += (~self.improvable).to(torch.float32) * -1.0e9
        topk_log_probs += (~did_top_num_beams_just_finish) * -1.0e9
        merged_scores = torch.cat((self.beam_scores, topk_log_probs), dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]  # [B, num_beams]
        self.sequences = _gather_beams(torch.cat((self.sequences, topk_running_sequences), dim=1), keep)
        self.beam_scores = _gather_beams(merged_scores, keep)
        self.beam_indices = _gather_beams(torch.cat((self.beam_indices, topk_running_beam_indices), dim=1), keep)
        if self.tracks_logprobs:
            self.token_logprobs = _gather_beams(torch.cat((self.token_logprobs, topk_running_logprobs), dim=1), keep)
        self.is_sent_finished = _gather_beams(
            torch.cat((self.is_sent_finished, did_top_num_beams_just_finish), 1), keep
        )

        beams = self.running_beam_indices[..., cur_len - P].long()  # [B, num_beams], each input's own beams
        self.cur_len = cur_len = cur_len + 1

        # HF `_check_early_stop_heuristic`: with "never" and a positive penalty, the best score may come at max_length
        best_length = max_length - P if early_stopping == "never" and length_penalty > 0.0 else cur_len - P
        best_running = self.running_beam_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(self.is_sent_finished, torch.min(self.beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        # HF `_beam_search_has_unfinished_sequences`, per input: what HF checks for that input alone
        exists_open_beam = ~(torch.all(self.is_sent_finished, dim=1) & (early_stopping is True))
        running = self.improvable[:, 0] & exists_open_beam & ~torch.all(hits, dim=1)  # [B]
        batch_offset = torch.arange(B, device=device)[:, None] * num_beams
        rows = (beams + batch_offset).flatten()  # [N] the rows each continues
        self.flat_running_sequences = self.running_sequences[:, :, :cur_len].reshape(B * num_beams, cur_len)
        kept = self._end(~running.cpu())
        if kept is not None:
            kept_rows = self._rows_of(kept.to(device))
            rows = rows[kept_rows]
            return Advance(self.flat_running_sequences[:, -1:], rows, kept)
        return Advance(self.flat_running_sequences[:, -1:], rows)

    def _output(self, inputs: torch.Tensor) -> SearchOutput:
        R, max_length, P = self.options.num_return_sequences, self.options.max_length, self.P
        inputs = inputs.to(self.device)
        b, num_beams = inputs.shape[0], self.options.num_beams
        sequences = self.sequences[inputs, :R].reshape(b * R, max_length)
        sequences_scores = self.beam_scores[inputs, :R].reshape(b * R)
        offset = (torch.arange(b, device=self.device) * num_beams).to(torch.int32)[:, None, None]
        local = self.beam_indices[inputs, :R]
        beam_indices = torch.where(local >= 0, local + offset, local).reshape(b * R, max_length - P)
        # Crop to the longest kept hypothesis: beam_indices is -1 past each hypothesis' end.
        generated = int((beam_indices + 1).bool().sum(dim=1).max())
        scores = token_logprobs = None
        if self.options.output_scores:
            scores = tuple(s[self._rows_of(inputs)] for s in self.all_scores)
        if self.tracks_logprobs:
            token_logprobs = self.token_logprobs[inputs, :R].reshape(b * R, max_length - P)[:, :generated]
        return SearchOutput(
            sequences=sequences[:, : P + generated],
            sequences_scores=sequences_scores,
            scores=scores,
            beam_indices=beam_indices[:, :generated],
            token_logprobs=token_logprobs,
            no_speech_prob=self._no_speech_prob(self._rows_of(inputs)),
        )

    def _keep(self, inputs: torch.Tensor) -> None:
        inputs = inputs.to(self.device)
        for name in ("running_sequences", "sequences", "running_beam_scores", "beam_scores", "is_sent_finished",
                     "improvable", "running_beam_indices", "beam_indices") + (
                     ("running_token_logprobs", "token_logprobs") if self.tracks_logprobs else ()):  # fmt: skip
            setattr(self, name, getattr(self, name)[inputs])
        rows = self._rows_of(inputs)
        self.flat_running_sequences = self.flat_running_sequences[rows]
        self.all_scores = [s[rows] for s in self.all_scores]
        self._keep_processors(inputs)


def join_outputs(parts: list[tuple[int, SearchOutput]], options: GenerationOptions) -> SearchOutput:
    """One output for the inputs of `parts` ((first input, output) each, covering the inputs without gaps, in any
    order), as one batch would have returned them."""
    return concat_outputs([output for _, output in sorted(parts, key=lambda part: part[0])], options)


def concat_outputs(outputs: list[SearchOutput], options: GenerationOptions) -> SearchOutput:
    """Join the outputs of consecutive inputs as one batch would have returned them.

    Each input's result does not depend on its batch neighbours; only the padding does: HF pads a
    finished greedy row with pad_token_id and beam hypotheses with its output fill value (see
    `BeamSearch`), up to the batch's longest row. Per-step `scores` cannot be joined (their step
    counts differ), so joined outputs do not return them.
    """
    if len(outputs) == 1:
        return outputs[0]
    beams = options.num_beams > 1
    eos = options.eos_token_id
    fill = (-1 if eos is None else (options.pad_token_id or eos[0])) if beams else options.pad_token_id
    length = max(o.sequences.shape[1] for o in outputs)
    sequences = torch.cat([_pad_to(o.sequences, length, fill) for o in outputs])
    result = SearchOutput(sequences=sequences)
    if beams:
        result.sequences_scores = torch.cat([o.sequences_scores for o in outputs])
        steps, rows_before, indices = max(o.beam_indices.shape[1] for o in outputs), 0, []
        for o in outputs:  # beam indices are global rows (input x num_beams + beam): shift by earlier outputs
            shifted = torch.where(o.beam_indices >= 0, o.beam_indices + rows_before, o.beam_indices)
            indices.append(_pad_to(shifted, steps, -1))
            rows_before += o.sequences.shape[0] // options.num_return_sequences * options.num_beams
        result.beam_indices = torch.cat(indices)
    return result


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)
