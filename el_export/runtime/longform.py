"""Whisper long-form transcription: transformers 5.23's `WhisperGenerationMixin.generate` loop over the runtime's
search (DESIGN.md section 4).

Each recording is read in windows of 30 s starting at `seek`. A window is one search per temperature of the
fallback schedule: the first (temperature 0: greedy or beams) for every window, the next ones (sampling) only for
the windows whose result fails HF's checks (compression ratio over token ids, mean log-probability, no-speech
probability). Pairs of timestamp tokens close segments; `seek` moves to the last closed one (the rest of the
window is decoded again from there), or past the window when it ends on a single timestamp or none. With
`condition_on_prev_tokens`, each window's prompt starts with <|startofprev|> and the last 223 tokens of the
segments so far. Windows of all recordings run together, round after round as in HF's batch; each window's
search is a request of its own in the scheduler's running batch, so its result is HF's for that recording alone.

Where HF's batch differs from HF on each recording alone, a recording here gets what it gets alone: previous text
and <|startofprev|> follow the recording's own segments (HF's batch reads recording 0's), `max_length` grows with
its own prompts, a sampled retry turns only its own later windows greedy (HF: everyone's), and its no-speech
probability is its own (HF's batch indexes beam rows with the recording's position). Sampled retries of several
recordings without `seed` are the exception: they run as one batch, as HF's, so that torch's global generator is
drawn in HF's order and `torch.manual_seed` before both calls gives the same output.
"""

import math
import numbers
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from el_export.errors import InvalidArgumentError, first_line
from el_export.runtime import speech
from el_export.runtime.scheduler import Admission, Request
from el_export.search.options import NoSpeechRule, TimestampRules
from el_export.search.search import SearchOutput

TIME_PRECISION = 0.02  # seconds per timestamp token
TIME_PRECISION_FEATURES = 0.01  # seconds per feature frame
INPUT_STRIDE = 2  # feature frames per encoder position (Whisper's two convolutions)
PROMPT_CONDITION_TYPES = ("first-segment", "all-segments")

# `generate` arguments of HF's Whisper `generate` that this loop reads (the others are search options).
ARGUMENTS = (
    "return_timestamps", "condition_on_prev_tokens", "temperature", "compression_ratio_threshold",
    "logprob_threshold", "no_speech_threshold", "prompt_ids", "prompt_condition_type", "return_token_timestamps",
    "return_segments", "monitor_progress",
)  # fmt: skip
_SEARCH_SET_PER_ATTEMPT = ("do_sample", "temperature", "num_beams")  # HF drops them from the caller's kwargs


@dataclass
class LongFormOutput:
    """HF's long-form `generate` output (`return_segments=True`, `return_token_timestamps=True` as asked).

    Attributes:
        sequences: int64 [B, L], each recording's segment tokens one after another (no prompt, no eos), padded on
            the right with pad_token_id.
        segments: per recording, its segments: `start` and `end` in seconds, `tokens` (int64, timestamps
            included), `text` (when the bundle has a tokenizer), `token_timestamps` (with word timestamps); None
            unless `return_segments`.
        token_timestamps: float32 [B, L] beside `sequences`: each token's time in seconds from the start of its
            window, as HF returns them (segments' `token_timestamps` are from the start of the recording);
            None unless `return_token_timestamps`.
        durations: seconds of audio of each recording (not HF's: what a transcript reports).
    """

    sequences: torch.Tensor
    segments: list[list[dict]] | None = None
    token_timestamps: torch.Tensor | None = None
    durations: list[float] | None = None


@dataclass(frozen=True)
class Settings:
    """The long-form arguments of one call, with HF's defaults from the generation config."""

    return_timestamps: bool | None  # None: not set (long audio then turns it on, as HF)
    condition_on_prev_tokens: bool
    temperatures: tuple[float | None, ...]
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    prompt_ids: tuple[int, ...] | None
    prompt_condition_type: str
    return_token_timestamps: bool
    return_segments: bool
    monitor_progress: Any

    def search_kwargs(self, temperature) -> dict:
        """HF `generate_with_fallback`: a temperature above 0 samples, with one beam; 0 or None does not."""
        if temperature is not None and temperature > 0.0:
            return {"do_sample": True, "temperature": temperature, "num_beams": 1}
        return {"do_sample": False, "temperature": 1.0}

    @property
    def plain(self) -> bool:
        """Nothing HF's loop does differently from one short-form search: the call can take the direct path."""
        return (
            not self.return_timestamps and not self.condition_on_prev_tokens and len(self.temperatures) == 1
            and self.compression_ratio_threshold is None and self.logprob_threshold is None
            and self.no_speech_threshold is None and self.prompt_ids is None and not self.return_token_timestamps
            and not self.return_segments and self.monitor_progress is None
        )  # fmt: skip


def settings(kwargs: dict, defaults: dict, vocab_size: int) -> Settings:
    """Pop the long-form arguments out of a `generate` call's kwargs (the rest are search options) and check them.

    Raises:
        InvalidArgumentError: a value HF refuses (or crashes on), named with the fix.
    """
    given = {name: kwargs.pop(name) for name in ARGUMENTS if name in kwargs}

    def pick(name: str, default: Any = None) -> Any:
        value = given.get(name)
        return defaults.get(name, default) if value is None else value

    temperature = given.get("temperature")
    temperatures = tuple(temperature) if isinstance(temperature, list | tuple) else (temperature,)
    if not temperatures:
        raise InvalidArgumentError("`temperature` is an empty list; pass 0.0, or a schedule such as (0.0, 0.2, 0.4)")
    for t in temperatures:
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t)):
            raise InvalidArgumentError(f"`temperature` must be a finite number or a list of them, got {temperature!r}")
    thresholds = {}
    for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
        value = pick(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):  # fmt: skip
            raise InvalidArgumentError(f"`{name}` must be a finite number or None, got {value!r}")
        thresholds[name] = None if value is None else float(value)
    if thresholds["no_speech_threshold"] is not None and thresholds["logprob_threshold"] is None:
        raise InvalidArgumentError(  # HF fails on it: the no-speech check reads the mean log-probability
            "`no_speech_threshold` needs `logprob_threshold` (a window is skipped as silence only when its mean "
            "log-probability is below it too); pass logprob_threshold=-1.0, say"
        )
    flags = {}
    for name, default in (("return_timestamps", None), ("condition_on_prev_tokens", False),
                          ("return_token_timestamps", False), ("return_segments", False)):  # fmt: skip
        value = pick(name, default)
        if not isinstance(value, bool) and not (name == "return_timestamps" and value is None):
            raise InvalidArgumentError(f"`{name}` must be True or False, got {value!r}")
        flags[name] = value
    condition_type = given.get("prompt_condition_type") or PROMPT_CONDITION_TYPES[0]
    if condition_type not in PROMPT_CONDITION_TYPES:
        raise InvalidArgumentError(
            f"`prompt_condition_type` must be one of {', '.join(PROMPT_CONDITION_TYPES)}, got {condition_type!r}"
        )
    if condition_type == "all-segments" and not flags["condition_on_prev_tokens"]:
        raise InvalidArgumentError("prompt_condition_type='all-segments' needs condition_on_prev_tokens=True")
    prompt_ids = given.get("prompt_ids")
    if prompt_ids is not None:
        try:
            prompt_ids = tuple(int(t) for t in torch.as_tensor(prompt_ids).flatten().tolist())
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidArgumentError(f"`prompt_ids` must be a list of token ids ({first_line(e)})") from None
        if not prompt_ids or min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
            raise InvalidArgumentError(
                f"`prompt_ids` must be token ids in [0, {vocab_size}) (the tokenizer's prompt_ids(text) makes them)"
            )
    monitor = given.get("monitor_progress")
    if monitor is not None and not callable(monitor):
        raise InvalidArgumentError("`monitor_progress` must be callable (it gets a [B, 2] tensor of seek, frames)")
    return Settings(
        return_timestamps=flags["return_timestamps"], condition_on_prev_tokens=flags["condition_on_prev_tokens"],
        temperatures=temperatures, prompt_ids=prompt_ids, prompt_condition_type=condition_type,
        return_token_timestamps=flags["return_token_timestamps"], return_segments=flags["return_segments"],
        monitor_progress=monitor, **thresholds,
    )  # fmt: skip


class _Recording:
    """One recording's place in the loop: where its next window starts, its segments, its prompt's state."""

    def __init__(self, index: int, features: torch.Tensor, frames: int, num_frames: int | None, init: list[int]):
        self.index, self.features, self.frames, self.num_frames, self.init = index, features, frames, num_frames, init
        self.seek = 0
        self.segments: list[dict] = []
        self.condition = False
        self.max_length: int | None = None  # HF raises its generation config's max_length window after window
        self.num_beams: int | None = None  # HF's: 1 for good once a window was retried by sampling
        # this window's
        self.window_frames = 0
        self.time_offset = 0.0
        self.prompt: list[int] = []
        self.sequence: list[int] = []  # the generated tokens of the attempt kept (eos removed)
        self.output: SearchOutput | None = None
        self.skip = False
        self.context: dict | None = None  # the window's encoder output, for word timestamps

    @property
    def active(self) -> bool:
        return self.seek < self.frames


class LongForm:
    """One `generate` call's recordings through HF's long-form loop, on a generator's scheduler.

    Args:
        generator: the `Generator` (its backend, scheduler, options and memory guard).
        call: the call's defaults, kwargs (long-form arguments removed) and streamer.
        recordings: the call's `speech.Recordings`.
        settings: its `Settings`.
        language, task: as `generate`'s.
    """

    def __init__(self, generator, call, recordings: speech.Recordings, settings: Settings, language, task):
        self.generator, self.call, self.settings = generator, call, settings
        defaults = call.defaults
        self.window = recordings.window
        self.max_target = generator.max_target_positions
        self.cut_off = self.max_target // 2 - 1  # HF: previous tokens kept in a prompt
        if recordings.long and settings.return_timestamps is False:  # HF's rule (the bundle's config may set it)
            raise InvalidArgumentError(
                "audio longer than 30 s is transcribed long-form, which predicts timestamps: pass "
                "return_timestamps=True (or use transcribe()), or give at most 30 s"
            )
        self.timestamps = bool(settings.return_timestamps) or recordings.long
        if call.streamer is not None:
            raise InvalidArgumentError("a streamer follows one search; long-form and timestamped calls run many")
        self.no_timestamps = defaults.get("no_timestamps_token_id")
        if self.timestamps and self.no_timestamps is None:
            raise InvalidArgumentError("the bundle's generation config has no no_timestamps_token_id: no timestamps")
        self.timestamp_begin = None if self.no_timestamps is None else self.no_timestamps + 1
        vocab = generator.manifest.dims["vocab_size"]
        if self.timestamps and self.timestamp_begin >= vocab:
            raise InvalidArgumentError(
                f"the model has no timestamp tokens (its vocabulary ends at <|notimestamps|>, id {self.no_timestamps})"
                ": it transcribes at most 30 s at once, without timestamps"
            )
        eos = defaults.get("eos_token_id")
        self.eos = eos[0] if isinstance(eos, list | tuple) else eos
        self.pad = defaults.get("pad_token_id", self.eos)
        kwargs = call.kwargs
        if kwargs.get("num_return_sequences", 1) != 1:
            raise InvalidArgumentError("long-form and timestamped transcription return one sequence per recording; "
                                       "drop num_return_sequences")  # fmt: skip
        if kwargs.get("decoder_input_ids") is not None:
            raise InvalidArgumentError("long-form transcription builds each window's prompt; pass prompt_ids instead")
        prev = defaults.get("prev_sot_token_id")
        suppress = defaults.get("suppress_tokens") or []
        self.prev_sot = prev if prev is not None else (suppress[-2] if len(suppress) >= 2 else None)
        if settings.prompt_ids is not None and self.prev_sot is None:
            raise InvalidArgumentError("the bundle has no <|startofprev|> token: prompts need a Whisper vocabulary")
        if settings.return_token_timestamps and not generator.can_align:
            raise InvalidArgumentError(
                "the bundle has no alignment heads (its generation config had no alignment_heads): no word "
                "timestamps; re-export from a checkpoint that has them"
            )
        inits = self._init_tokens(recordings, language, task)
        self.recordings = [
            _Recording(i, f, frames, None if recordings.num_frames is None else recordings.num_frames[i], init)
            for i, (f, frames, init) in enumerate(zip(recordings.features, recordings.frames, inits, strict=True))
        ]
        for r in self.recordings:
            r.condition = settings.condition_on_prev_tokens
            if settings.prompt_ids is not None and settings.prompt_condition_type == "first-segment":
                prompt = list(settings.prompt_ids)
                r.segments.append({"tokens": prompt[1:] if prompt[0] == self.prev_sot else prompt, "prompt": True})
        self.user_num_beams = kwargs.get("num_beams", defaults.get("num_beams", 1)) or 1
        self.max_new_tokens = kwargs.get("max_new_tokens", defaults.get("max_new_tokens"))
        self.batch_max_length: int | None = None

    # ---- prompts ---------------------------------------------------------------------------------------------

    def _init_tokens(self, recordings: speech.Recordings, language, task) -> list[list[int]]:
        """HF `_retrieve_init_tokens`, the language detected once per recording from its first 30 s."""
        generator, defaults = self.generator, self.call.defaults
        B = len(recordings.features)

        def detect() -> torch.Tensor:
            first = torch.stack([f[:, : self.window] for f in recordings.features]).to(generator.backend.device)
            context = self._context(first)
            sot = torch.full((B, 1), defaults["decoder_start_token_id"], device=generator.backend.device)
            return generator.backend.make_decoder(context).start(sot, 1)

        return speech.decoder_prompt(defaults, B, language, task, detect, timestamps=self.timestamps).tolist()

    def _prompt(self, r: _Recording) -> list[int]:
        """HF `_prepare_decoder_input_ids` for one recording alone."""
        settings = self.settings
        if r.condition and r.segments:
            all_segments = settings.prompt_ids is not None and settings.prompt_condition_type == "all-segments"
            start = list(settings.prompt_ids) if all_segments else [self.prev_sot]
            previous = []
            for segment in r.segments:  # a segment closed by two timestamps gives the first of them
                tokens = segment["tokens"]
                closed = len(tokens) > 2 and tokens[-2] >= self.timestamp_begin
                previous += tokens[:-1] if closed else tokens
            return start + previous[-self.cut_off :] + r.init
        if settings.prompt_ids is not None:
            return list(settings.prompt_ids) + r.init
        return list(r.init)

    def _max_length(self, prompt_length: int, max_length: int | None) -> int | None:
        """HF `_set_max_new_tokens_and_length`: without max_new_tokens, the generation config's max_length grows by
        each window's prompt (up to 223 tokens) and stays grown; None with max_new_tokens (which HF checks)."""
        if (self.max_new_tokens or 0) + prompt_length > self.max_target:
            raise InvalidArgumentError(
                f"a window's prompt ({prompt_length} tokens: start tokens, prompt and previous text) plus "
                f"max_new_tokens {self.max_new_tokens} is past the decoder's {self.max_target} positions; lower "
                "max_new_tokens or shorten the prompt"
            )
        if self.max_new_tokens is not None:
            return None
        if max_length is None:
            max_length = self._initial_max_length()
        return min(max_length + min(self.cut_off, prompt_length), self.max_target)

    def _initial_max_length(self) -> int:
        return self.call.kwargs.get("max_length", self.call.defaults.get("max_length", 20))

    def _lengths(self, max_length: int | None) -> dict:
        return {"max_new_tokens": self.max_new_tokens} if max_length is None else {"max_length": max_length}

    # ---- the loop --------------------------------------------------------------------------------------------

    def run(self, scheduler) -> LongFormOutput:
        """HF's `while (seek < max_frames).any()` loop; each search a request on `scheduler`."""
        while any(r.active for r in self.recordings):
            if self.settings.monitor_progress is not None:
                self.settings.monitor_progress(torch.tensor([[r.seek, r.frames] for r in self.recordings]))
            active = [r for r in self.recordings if r.active]
            for r in active:
                r.window_frames = min(r.frames - r.seek, self.window)
                r.time_offset = r.seek * TIME_PRECISION / INPUT_STRIDE
                r.prompt = self._prompt(r)
            if self.max_new_tokens is None:  # HF's batch: one generation config, grown by the padded prompt
                longest = min(self.cut_off, max(len(r.prompt) for r in active))
                start = self.batch_max_length or self._initial_max_length()
                self.batch_max_length = min(start + longest, self.max_target)
            self._fallback(active, scheduler)
            for r in active:
                if r.skip:
                    r.seek += r.window_frames
                    continue
                segments, offset = self._segments(r)
                r.seek += offset
                r.segments += segments
        return self._output()

    def _fallback(self, active: list[_Recording], scheduler) -> None:
        """HF `generate_with_fallback`: each temperature in turn for the windows still failing the checks."""
        settings = self.settings
        pending = active
        lengths = {}
        for r in active:
            r.max_length = self._max_length(len(r.prompt), r.max_length)
            lengths[r.index] = self._lengths(r.max_length)
        for attempt, temperature in enumerate(settings.temperatures):
            do_sample = temperature is not None and temperature > 0.0
            if do_sample:
                for r in pending:
                    r.num_beams = 1
            outputs = self._search(pending, temperature, lengths, scheduler)
            failing = []
            for r, output in zip(pending, outputs, strict=True):
                sequence = self._generated(output, r)
                needs_fallback, r.skip = self._needs_fallback(sequence, output, temperature)
                if sequence and sequence[-1] == self.eos:
                    sequence = sequence[:-1]
                r.sequence, r.output = sequence, output
                r.condition = settings.condition_on_prev_tokens and (temperature is None or temperature < 0.5)
                if needs_fallback:
                    failing.append(r)
            pending = failing
            if not pending or attempt == len(settings.temperatures) - 1:
                return

    def _generated(self, output: SearchOutput, r: _Recording) -> list[int]:
        """The window's new tokens, padding removed but for the eos that ends them (HF keeps it for the mean)."""
        sequence = output.sequences[output.prompt_length :].tolist()
        if sequence and sequence[-1] == self.pad:
            paddings = sum(1 for t in sequence if t == self.pad) - (1 if self.pad == self.eos else 0)
            if paddings:
                sequence = sequence[:-paddings]
        return sequence

    def _needs_fallback(self, sequence: list[int], output, temperature) -> tuple[bool, bool]:
        """HF `_need_fallback`: (retry at the next temperature, skip the window as silence)."""
        settings = self.settings
        needs_fallback = skip = False
        vocab = self.generator.manifest.dims["vocab_size"]
        threshold = settings.compression_ratio_threshold
        if threshold is not None and compression_ratio(sequence, vocab) > threshold:
            needs_fallback = True
        if settings.logprob_threshold is not None:
            low = bool(mean_logprob(output.token_logprobs, len(sequence)) < settings.logprob_threshold)
            needs_fallback |= low
            silent = settings.no_speech_threshold is not None and output.no_speech_prob > settings.no_speech_threshold
            if low and silent:
                needs_fallback, skip = False, True
        return needs_fallback, skip

    # ---- one attempt: the searches -----------------------------------------------------------------------------

    def _search(self, pending: list[_Recording], temperature, lengths: dict, scheduler) -> list["_Window"]:
        """One search per pending window at `temperature`, run to the end on `scheduler`; their outputs in order."""
        do_sample = temperature is not None and temperature > 0.0
        if do_sample and self.call.kwargs.get("seed") is None and len(pending) > 1:
            groups = [pending]  # one batch, as HF's: torch's global generator drawn for all rows at once
        else:
            groups = [[r] for r in pending]
        windows: list[list[_Window]] = []
        requests = []
        for group in groups:
            results: list = [None] * len(group)
            request = self._request(group, temperature, lengths, results)
            requests.append(request)
            windows.append(results)
            scheduler.submit(request)
        while not all(request.done for request in requests):
            scheduler.step()
        for request in requests:
            request.result()  # raises the request's error, if any
        return [w for group in windows for w in group]

    def _request(self, group: list[_Recording], temperature, lengths: dict, results: list) -> Request:
        generator, settings = self.generator, self.settings
        prompts = [r.prompt for r in group]
        P = max(len(p) for p in prompts)
        prompt = torch.full((len(group), P), self.pad, dtype=torch.int64)
        padding = torch.zeros((len(group), P), dtype=torch.int64)
        for i, p in enumerate(prompts):
            prompt[i, P - len(p) :] = torch.tensor(p)
            padding[i, P - len(p) :] = 1
        length = lengths[group[0].index] if len(group) == 1 else self._lengths(self.batch_max_length)
        kwargs = {k: v for k, v in self.call.kwargs.items()
                  if k not in _SEARCH_SET_PER_ATTEMPT and k not in ("max_length", "max_new_tokens")}  # fmt: skip
        kwargs.update(length, num_beams=group[0].num_beams or self.user_num_beams)
        kwargs.update(settings.search_kwargs(temperature))
        options = generator._options(replace(self.call, kwargs=kwargs), P, True)
        init_length = len(group[0].init)
        no_speech = None
        if settings.no_speech_threshold is not None and init_length == 1:
            no_speech = NoSpeechRule(self.no_timestamps - 1, self.user_num_beams > 1)
        options = replace(
            options,
            timestamps=None if not self.timestamps else TimestampRules(
                self.no_timestamps, P, self.call.defaults.get("max_initial_timestamp_index"), self.eos),
            no_speech=no_speech,
            token_logprobs_rescale=None if settings.logprob_threshold is None else (
                temperature if temperature is not None and temperature > 0.0 else 1.0),
        )  # fmt: skip
        device = generator.backend.device

        def prepare(first: int, stop: int) -> Admission:
            windows = torch.stack([self._window(r) for r in group[first:stop]]).to(device)
            context = self._context(windows)
            if settings.return_token_timestamps:
                for i, r in enumerate(group[first:stop]):
                    r.context = {name: t[i : i + 1] for name, t in context.items()}
            no_speech_probs = None
            if settings.no_speech_threshold is not None and init_length > 1:  # HF: the logits after <|startoft...|>
                sot = P - init_length + 1
                logits = generator.backend.make_decoder(context).start(
                    prompt[first:stop, :sot].to(device), 1, padding[first:stop, :sot].to(device)
                )
                no_speech_probs = logits.float().softmax(dim=-1)[:, self.no_timestamps - 1]
            for i in range(first, stop):
                results[i] = _Window(P, no_speech_probs[i - first] if no_speech_probs is not None else None)
            return Admission(generator.backend.make_decoder(context), prompt[first:stop].to(device), options,
                             prompt_padding=None if padding.all() else padding[first:stop].to(device))  # fmt: skip

        def on_input(first: int, output: SearchOutput) -> None:
            for j in range(output.sequences.shape[0]):
                results[first + j].fill(output, j)

        return generator._make_request(len(group), options, replace(self.call, on_input=on_input, streamer=None),
                                       self.window // INPUT_STRIDE, prepare)  # fmt: skip

    def _window(self, r: _Recording) -> torch.Tensor:
        """HF `_get_input_segment`: the frames from seek, zero-padded (in feature space) to a whole window."""
        frames = r.features[:, r.seek : r.seek + r.window_frames]
        return F.pad(frames, (0, self.window - frames.shape[-1]))

    def _context(self, windows: torch.Tensor) -> dict:
        """The encoder's outputs over windows [b, n_mels, window], as the decoder takes them."""
        generator = self.generator
        chunk = generator._inputs_per_encoder_call(windows.shape[0], self.window // INPUT_STRIDE, 0)
        encoded = generator._run_chunked("encoder", {"input_features": windows}, chunk)
        B, S = encoded["encoder_hidden"].shape[:2]
        return {**encoded, "encoder_mask": torch.ones(B, S, dtype=torch.int64, device=windows.device)}

    # ---- segments ----------------------------------------------------------------------------------------------

    def _segments(self, r: _Recording) -> tuple[list[dict], int]:
        """HF `_retrieve_segment`: the window's segments and how far seek moves."""
        sequence, tb, offset = r.sequence, self.timestamp_begin, r.time_offset
        is_timestamp = [tb is not None and t >= tb for t in sequence]
        single_ending = is_timestamp[-2:] == [False, True]
        closes = [i + 1 for i in range(len(is_timestamp) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
        times = self._token_times(r) if self.settings.return_token_timestamps else None
        P = r.output.prompt_length
        segments = []
        if closes:
            slices = closes
            if single_ending:
                slices.append(len(sequence))
            else:
                slices[-1] += 1  # the last segment keeps its closing pair
            last = 0
            for i, current in enumerate(slices):
                tokens = sequence[last:current]
                end_at = -1 if i < len(slices) - 1 or single_ending else -2
                segments.append(self._segment(r, tokens, offset + (tokens[0] - tb) * TIME_PRECISION,
                                              offset + (tokens[end_at] - tb) * TIME_PRECISION,
                                              (P + last, P + current), times))  # fmt: skip
                last = current
            if single_ending:  # no speech after the last timestamp
                return segments, r.window_frames
            return segments, (sequence[last - 2] - tb) * INPUT_STRIDE  # decode again from the last closed pair
        end = int(r.window_frames * TIME_PRECISION_FEATURES / TIME_PRECISION)
        stamps = [t for t, ts in zip(sequence, is_timestamp, strict=True) if ts]
        if stamps and stamps[-1] != tb:  # no pair, but a timestamp: the segment ends there
            end = float(stamps[-1] - tb)
        segments.append(self._segment(r, sequence, offset, offset + end * TIME_PRECISION,
                                      (P, P + len(sequence)), times))  # fmt: skip
        return segments, r.window_frames

    def _segment(self, r: _Recording, tokens: list[int], start: float, end: float, idxs, times) -> dict:
        segment = {"start": start, "end": end, "tokens": tokens, "idxs": idxs}
        if times is not None:
            segment["window_token_timestamps"] = times[idxs[0] : idxs[1]]
            segment["token_timestamps"] = times[idxs[0] : idxs[1]] + r.time_offset
        return segment

    def _token_times(self, r: _Recording) -> torch.Tensor:
        """float32 [P + T]: the window's token times in seconds from its start (HF `_extract_token_timestamps`)."""
        output = r.output
        padding = output.prompt_length - len(r.prompt)  # a batch's left padding: HF's times there are 0
        num_frames = None if r.num_frames is None else r.num_frames - r.seek
        times = self.generator.token_timestamps(r.context, output.sequences[padding:], len(r.prompt), num_frames)
        return F.pad(times, (padding, 0))

    # ---- the output --------------------------------------------------------------------------------------------

    def _output(self) -> LongFormOutput:
        """HF's `_pad_to_max_length` over each recording's segments (the prompt's stand-in segment dropped)."""
        tokenizer = self.generator.tokenizer
        per_recording = [[s for s in r.segments if not s.get("prompt")] for r in self.recordings]
        rows = [[t for s in segments for t in s["tokens"]] for segments in per_recording]
        length = max((len(row) for row in rows), default=0)
        sequences = torch.full((len(rows), length), self.pad, dtype=torch.int64)
        for i, row in enumerate(rows):
            sequences[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        token_timestamps = None
        if self.settings.return_token_timestamps:
            token_timestamps = torch.zeros((len(rows), length), dtype=torch.float32)
            for i, segments in enumerate(per_recording):
                times = [s["window_token_timestamps"] for s in segments]
                row = torch.cat(times) if times else torch.zeros(0)
                token_timestamps[i, : len(row)] = row
                token_timestamps[i, len(row) :] = row[-1] if len(row) else 0.0
        segments = None
        if self.settings.return_segments:
            segments = []
            for recording in per_recording:
                segments.append([])
                for s in recording:
                    out = {"start": s["start"], "end": s["end"], "tokens": torch.tensor(s["tokens"], dtype=torch.int64)}
                    if tokenizer is not None:
                        out["text"] = tokenizer.decode(out["tokens"][out["tokens"] < self.eos][None])[0]
                    if "token_timestamps" in s:
                        out["token_timestamps"] = s["token_timestamps"]
                    segments[-1].append(out)
        durations = [(r.frames if r.num_frames is None else r.num_frames) * TIME_PRECISION_FEATURES
                     for r in self.recordings]  # fmt: skip
        return LongFormOutput(sequences, segments, token_timestamps, durations)


class _Window:
    """One window's search result for one recording (its row of the request's output)."""

    def __init__(self, prompt_length: int, no_speech_prob: torch.Tensor | None):
        self.prompt_length, self.no_speech_prob = prompt_length, no_speech_prob
        self.sequences: torch.Tensor | None = None
        self.token_logprobs: torch.Tensor | None = None

    def fill(self, output: SearchOutput, row: int) -> None:
        self.sequences = output.sequences[row].cpu()
        if output.token_logprobs is not None:
            self.token_logprobs = output.token_logprobs[row].cpu()
        if output.no_speech_prob is not None:
            self.no_speech_prob = output.no_speech_prob[row].cpu()


def compression_ratio(tokens: list[int], vocab_size: int) -> float:
    """HF `_retrieve_compression_ratio`: raw bytes of the token ids over their zlib-compressed bytes."""
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


def mean_logprob(token_logprobs: torch.Tensor, length: int) -> torch.Tensor:
    """HF `_retrieve_avg_logprobs` from each step's log-probability of its token: the first `length` steps (the
    tokens, eos included) summed one by one in float32, over `length`."""
    steps = token_logprobs.shape[0]
    values = token_logprobs[: min(steps, length)]
    total = 0
    for value in values:  # HF's Python sum, in this order
        total = total + value
    return total / (length if steps > length else steps)

