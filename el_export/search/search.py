"""Greedy, sampling, beam search and beam sampling over a `StepDecoder`, as transformers 5.23 runs them.

`_sample` and `_beam_search` are ports of HF's `_sample` and vectorized `_beam_search`: the same tensor
operations in the same order, so the same logits give the same tokens and bit-identical scores. All
state lives on the device the decoder's logits come back on; the only host synchronisation per step
is the stop check, as in HF.
"""

from dataclasses import dataclass
from typing import Any

import torch

from el_export.errors import InvalidArgumentError
from el_export.search.decoder import StepDecoder
from el_export.search.options import GenerationOptions, check_prompt_length
from el_export.search.processors import Processor, build_processors


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
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None


def generate_ids(
    decoder: StepDecoder,
    prompt_ids: torch.Tensor,
    options: GenerationOptions,
    prompt_mask: torch.Tensor | None = None,
    streamer: Any = None,
) -> SearchOutput:
    """Generate token ids with HF `generate` semantics (greedy, sampling, beam search, beam sampling).

    Args:
        decoder: a decoder whose encoder (if any) has already run for the B inputs.
        prompt_ids: int64 [B, P], the decoder prompt of each input.
        options: resolved options (see `resolve_options`, called with this P).
        prompt_mask: int64 [B, P], 0 on the left padding of decoder-only prompts; the repetition
            penalty ignores padding as HF does. None when there is no padding (and for encoder-decoder).
        streamer: greedy and sampling only, as in HF: an object with `put(ids)` and `end()` (a transformers
            `TextStreamer`, say), called as HF calls it (see `check_streamer`).

    Returns:
        A `SearchOutput` on the decoder's device.

    Raises:
        InvalidArgumentError: the prompt leaves no room to generate, a forced or banned id is outside the
            vocabulary, or a streamer with beam search.
    """
    P = prompt_ids.shape[1]
    check_prompt_length(options, P)
    check_streamer(streamer, options)
    k = options.num_beams if options.num_beams > 1 else options.num_return_sequences  # rows per input
    if streamer is not None:  # HF: the expanded prompt, once, before the first step
        streamer.put(prompt_ids.repeat_interleave(k, dim=0).cpu())  # [B * k, P]
    logits = decoder.start(prompt_ids, k)  # [B * k, V]
    device = logits.device
    ids = prompt_ids.to(device).repeat_interleave(k, dim=0)  # [B * k, P]
    ignore_length = None
    if prompt_mask is not None:  # HF: index of the first attended position
        ignore_length = (prompt_mask.to(device) != 0).int().argmax(dim=1).repeat_interleave(k)  # [B * k]
    processors = build_processors(
        options, prompt_length=P, prompt_ignore_length=ignore_length, vocab_size=logits.shape[-1], device=device
    )
    generator = None  # None draws from torch's global generator, as HF does
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    if options.num_beams == 1:
        return _sample(decoder, ids, logits, options, processors, generator, streamer)
    return _beam_search(decoder, ids, logits, options, processors, generator)


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


def _sample(
    decoder: StepDecoder,
    ids: torch.Tensor,
    logits: torch.Tensor,
    options: GenerationOptions,
    processors: list[Processor],
    generator: torch.Generator | None,
    streamer: Any,
) -> SearchOutput:
    """HF `_sample`: greedy (argmax) or multinomial sampling; finished rows are padded with pad_token_id. The
    streamer gets each step's tokens [N] (finished rows' padding included) as HF's `StopCheck` hands them out."""
    eos = _eos_tensor(options, ids.device)
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)  # [N]
    scores: list[torch.Tensor] = []
    while True:
        # A copy, as HF makes: a backend may hand out the same logits buffer every step.
        step_scores = _process(processors, ids, logits.to(dtype=torch.float32, copy=True))  # [N, V]
        if options.output_scores:
            scores.append(step_scores)
        if options.do_sample:
            probs = torch.nn.functional.softmax(step_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # [N]
        else:
            next_tokens = torch.argmax(step_scores, dim=-1)  # [N]
        if eos is not None:
            next_tokens = next_tokens * unfinished + options.pad_token_id * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(next_tokens, eos)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)  # [N, T + 1]
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if ids.shape[1] >= options.max_length or unfinished.max() == 0:
            break
        logits = decoder.step(next_tokens[:, None])
    if streamer is not None:
        streamer.end()
    return SearchOutput(sequences=ids, scores=tuple(scores) if options.output_scores else None)


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """[B, beams, ...] gathered along dim 1 by int [B, K] -> [B, K, ...]."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _beam_search(
    decoder: StepDecoder,
    ids: torch.Tensor,
    logits: torch.Tensor,
    options: GenerationOptions,
    processors: list[Processor],
    generator: torch.Generator | None,
) -> SearchOutput:
    """HF vectorized `_beam_search` (with `do_sample`, beam sampling).

    Each step keeps the best `beams_to_keep` continuations so that `num_beams` of them are still running
    after some hit eos; finished hypotheses are merged into a fixed-size set of `num_beams` per input.
    """
    device = ids.device
    num_beams, max_length = options.num_beams, options.max_length
    length_penalty, early_stopping = options.length_penalty, options.early_stopping
    N, P = ids.shape
    B = N // num_beams
    eos = _eos_tensor(options, device)
    beams_to_keep = max(2, 1 + (0 if eos is None else eos.shape[0])) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams  # [K]
    # HF: `pad_token_id or eos_token_id[0]` -- a pad id of 0 is falsy there, so eos fills instead.
    fill = -1 if eos is None else (options.pad_token_id or options.eos_token_id[0])

    running_sequences = torch.full((B, num_beams, max_length), fill, dtype=torch.int64, device=device)
    running_sequences[:, :, :P] = ids.view(B, num_beams, P)
    sequences = running_sequences.detach().clone()  # finished hypotheses, [B, num_beams, max_length]
    running_beam_scores = torch.zeros((B, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9  # only the first beam's tokens are candidates at the first step
    beam_scores = torch.full((B, num_beams), fill_value=-1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((B, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)  # HF: is_early_stop_heuristic_unsatisfied
    running_beam_indices = torch.full((B, num_beams, max_length - P), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.detach().clone()
    batch_offset = torch.arange(B, device=device).view(-1, 1) * num_beams  # [B, 1]
    all_scores: list[torch.Tensor] = []
    flat_running_sequences = ids  # [N, cur_len]
    cur_len = P

    while True:
        log_probs = torch.nn.functional.log_softmax(logits.to(torch.float32), dim=-1)  # [N, V]
        log_probs = _process(processors, flat_running_sequences, log_probs)
        if options.output_scores:
            all_scores.append(log_probs.clone())
        V = log_probs.shape[-1]
        log_probs = log_probs.view(B, num_beams, V) + running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (B, -1))  # [B, num_beams * V]

        # HF `_get_top_k_continuations`
        if options.do_sample:
            probs = torch.nn.functional.softmax(log_probs, dim=-1)
            topk_indices = torch.multinomial(probs, num_samples=beams_to_keep, generator=generator)
            topk_log_probs = torch.gather(log_probs, dim=1, index=topk_indices)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)  # [B, K]
        topk_current_beam_indices = topk_indices // V
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_current_beam_indices)
        topk_running_sequences = _gather_beams(running_sequences, topk_current_beam_indices)
        topk_ids = topk_indices % V
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - P] = topk_current_beam_indices + batch_offset

        # HF stopping criteria on the K candidates: max length, or the new token is an eos.
        hits = torch.full((B, beams_to_keep), cur_len + 1 >= max_length, dtype=torch.bool, device=device)
        if eos is not None:
            hits = hits | torch.isin(topk_ids, eos)

        # HF `_get_running_beams_for_next_iteration`
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk_indices = torch.topk(topk_running_log_probs, k=num_beams)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk_indices)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk_indices)

        # HF `_update_finished_beams`
        did_top_num_beams_just_finish = hits & top_num_beam_mask[None, :]
        topk_log_probs = topk_log_probs / ((cur_len + 1 - P) ** length_penalty)
        beams_in_batch_are_full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        topk_log_probs += beams_in_batch_are_full.to(torch.float32) * -1.0e9
        topk_log_probs += (~improvable).to(torch.float32) * -1.0e9
        topk_log_probs += (~did_top_num_beams_just_finish) * -1.0e9
        merged_scores = torch.cat((beam_scores, topk_log_probs), dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]  # [B, num_beams]
        sequences = _gather_beams(torch.cat((sequences, topk_running_sequences), dim=1), keep)
        beam_scores = _gather_beams(merged_scores, keep)
        beam_indices = _gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), keep)
        is_sent_finished = _gather_beams(torch.cat((is_sent_finished, did_top_num_beams_just_finish), 1), keep)

        reorder = running_beam_indices[..., cur_len - P].flatten()  # [N] global rows
        cur_len += 1

        # HF `_check_early_stop_heuristic`: with "never" and a positive penalty, the best score may come at max_length
        best_length = max_length - P if early_stopping == "never" and length_penalty > 0.0 else cur_len - P
        best_running = running_beam_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        # HF `_beam_search_has_unfinished_sequences`
        exists_open_beam = ~(torch.all(is_sent_finished) & (early_stopping is True))
        if not (torch.any(improvable) & exists_open_beam & ~torch.all(hits)):
            break
        decoder.reorder(reorder.long())
        flat_running_sequences = running_sequences[:, :, :cur_len].reshape(N, cur_len)
        logits = decoder.step(flat_running_sequences[:, -1:])

    R = options.num_return_sequences
    sequences = sequences[:, :R].reshape(B * R, max_length)
    sequences_scores = beam_scores[:, :R].reshape(B * R)
    beam_indices = beam_indices[:, :R].reshape(B * R, max_length - P)
    # Crop to the longest kept hypothesis: beam_indices is -1 past each hypothesis' end.
    generated = int((beam_indices + 1).bool().sum(dim=1).max())
    return SearchOutput(
        sequences=sequences[:, : P + generated],
        sequences_scores=sequences_scores,
        scores=tuple(all_scores) if options.output_scores else None,
        beam_indices=beam_indices[:, :generated],
    )


def concat_outputs(outputs: list[SearchOutput], options: GenerationOptions) -> SearchOutput:
    """Join the outputs of consecutive input chunks as one batch would have returned them.

    Each input's result does not depend on its batch neighbours; only the padding does: HF pads a
    finished greedy row with pad_token_id and beam hypotheses with its output fill value (see
    `_beam_search`), up to the batch's longest row. Per-step `scores` cannot be joined (their step
    counts differ), so chunked runs do not return them.
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
        for o in outputs:  # beam indices are global rows (input x num_beams + beam): shift by earlier chunks
            shifted = torch.where(o.beam_indices >= 0, o.beam_indices + rows_before, o.beam_indices)
            indices.append(_pad_to(shifted, steps, -1))
            rows_before += o.sequences.shape[0] // options.num_return_sequences * options.num_beams
        result.beam_indices = torch.cat(indices)
    return result


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)
