"""`load(bundle).generate(...)`: inputs in, HF-`generate`-shaped outputs out, from the bundle alone."""

import json
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from el_export.contract.files import read_file, read_manifest
from el_export.contract.manifest import Manifest
from el_export.errors import BundleError, InputError, InvalidArgumentError, ResourceError, first_line
from el_export.runtime import alignment, longform, make_backend, memory, speech
from el_export.runtime.scheduler import Admission, Request, Scheduler
from el_export.runtime.tokenizer import Tokenizer
from el_export.runtime.transcripts import Segment, Transcript
from el_export.search import SearchOutput, resolve_options
from el_export.search.options import merge_generation_config
from el_export.search.search import check_streamer

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True)
class _Call:
    """One generate call's generation arguments: the bundle's defaults under the caller's generation_config, the
    kwargs that override both, and the streamer fed each new token."""

    defaults: dict
    kwargs: dict
    streamer: Any
    on_input: Any = None


def _longest(attention_mask: torch.Tensor | None) -> int:
    """The index of the input with the most tokens (the one that sets the padded length)."""
    return 0 if attention_mask is None else int(attention_mask.sum(dim=1).argmax())


class Generator:
    """A loaded bundle: encoder + step decoder on a backend, search, and (if shipped) a tokenizer."""

    def __init__(self, manifest: Manifest, backend, tokenizer: Tokenizer | None = None, mel_filters=None):
        self.manifest, self.backend, self.tokenizer = manifest, backend, tokenizer
        self.mel_filters = mel_filters  # speech models: [n_freqs, n_mels] float32
        # Inputs per encoder call: the encoder's activations grow with batch x source^2, the decoder's
        # state only with batch x source, so large batches encode in chunks. None: all at once.
        self.encoder_batch_size: int | None = None
        # Bytes the decoder state of one call may take; batches that need more run in chunks that fit.
        # None: what the device reports available (see `memory.py`).
        self.memory_limit: int | None = None
        # Inputs and decoder rows in flight at most (None: as memory allows), and "continuous" (inputs join and
        # leave the running batch at step boundaries) or "static" (each batch runs until its longest member ends).
        self.max_batch: int | None = None
        self.max_rows: int | None = None
        self.batching = "continuous"

    @classmethod
    def from_bundle(
        cls, bundle_dir: str | os.PathLike, backend: str = "onnxruntime", verify: bool = True, **options
    ) -> "Generator":
        """Load a bundle. Each file used is read once and run from the bytes checked against its sha256 (with
        `verify`), so a file changed during the load is refused or never used; every listed file must be a
        plain file in the bundle.

        Raises:
            BundleError: the bundle is missing, changed, malformed, or does not match its graphs.
            BackendError: the backend is missing or cannot load the graphs.
        """
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir, verify=verify, hash_files=False)  # hashed below, as read
        backend = make_backend(backend, bundle_dir, manifest, verify=verify, **options)
        mel_filters = None
        if manifest.audio:  # JSON: a bundle holds nothing that can carry code (no pickle, no npy objects)
            name = manifest.audio["mel_filters"]
            try:
                values = json.loads(read_file(bundle_dir, manifest, name, verify))
                mel_filters = torch.tensor(values, dtype=torch.float32)
            except (ValueError, TypeError, RecursionError) as e:  # not JSON, not UTF-8, ragged, nested too deeply
                raise BundleError(f"{name} is not a matrix of numbers ({first_line(e)})") from None
            if mel_filters.dim() != 2 or mel_filters.shape[1] != manifest.audio["n_mels"]:
                raise BundleError(f"{name} has shape {list(mel_filters.shape)}, not [*, n_mels]")
        return cls(manifest, backend, Tokenizer.from_bundle(bundle_dir, manifest, verify), mel_filters)

    @classmethod
    def for_inputs(cls, bundle_dir: str | os.PathLike) -> "Generator":
        """A bundle's manifest and tokenizer without its graphs (no backend): what checking inputs needs where the
        graphs run on other machines (the driver of a Ray job). The tokenizer is checked against its sha256 (the
        graphs are not read).

        Raises:
            BundleError: the bundle is missing, changed or malformed.
        """
        manifest = read_manifest(bundle_dir, verify=True, hash_files=False)
        return cls(manifest, backend=None, tokenizer=Tokenizer.from_bundle(Path(bundle_dir), manifest, True))

    @property
    def max_source_positions(self) -> int | None:
        """The longest source: input tokens (a decoder-only prompt), or for speech the encoder's frames (Whisper's
        max_source_positions); None for relative positions (T5), which have no table to run past."""
        if self.manifest.audio:
            return self.manifest.graphs["encoder"].output("encoder_hidden").shape[1]
        return self.manifest.dims["max_positions"]

    @property
    def max_target_positions(self) -> int | None:
        """The decoder's position limit, which max_length may not pass (Whisper's max_target_positions; the
        shared table of the other families); None for relative positions."""
        return self.manifest.dims["max_positions"]

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        input_features=None,
        audio=None,
        language: str | None = None,
        task: str | None = None,
        sampling_rate: int | None = None,
        generation_config=None,
        streamer=None,
        **kwargs,
    ) -> SearchOutput:
        """Generate with the semantics and output layout of HF `generate` (`return_dict_in_generate`).

        Args:
            input_ids: int64 [B, S] source token ids (tensor or nested lists); for decoder-only
                models the (left-padded) prompt.
            attention_mask: int64 [B, S]; omitted, HF's default (all ones for encoder-decoders).
            decoder_input_ids: int64 [B, P] decoder prompt; decoder_start_token_id is prepended
                when it does not already start it.
            input_features, audio: speech models: log-mel features [B, mels, frames], or audio
                (WAV/FLAC paths, resampled to the model's rate when theirs differs, or mono float arrays), one
                of the two.
            language, task: multilingual Whisper ("en", "transcribe" / "translate"); detected if omitted.
            sampling_rate: the rate of the audio arrays (default: the model's, 16 kHz), resampled when it
                differs, as `sampling_rate` of HF's feature extractor (which refuses other rates).
            generation_config: a transformers `GenerationConfig` or a dict of its fields: the fields it sets
                replace the bundle's defaults, and kwargs override it, as in HF.
            streamer: greedy search and sampling: `put(prompt ids [N, P])` once, `put(new tokens [N])` each
                step, then `end()`, as HF calls a `TextStreamer`.
            **kwargs: HF generation arguments (num_beams, max_new_tokens, length_penalty, ...). Whisper also
                takes those of HF's Whisper `generate` (`return_timestamps`, `condition_on_prev_tokens`,
                `temperature` as a fallback schedule, `compression_ratio_threshold`, `logprob_threshold`,
                `no_speech_threshold`, `prompt_ids`, `prompt_condition_type`, `return_token_timestamps`,
                `return_segments`, `monitor_progress`; `attention_mask` is the frame mask of long input_features):
                audio longer than 30 s, or any of these, runs HF's long-form loop (see `longform.py`).

        Returns:
            SearchOutput with `.sequences`, `.sequences_scores` (beam search), `.scores`, `.beam_indices`; from
            Whisper's long-form loop, a `LongFormOutput` (`.sequences`, `.segments`, `.token_timestamps`).

        Raises:
            InputError: empty input, token ids outside the vocabulary, too long for the model, non-finite audio.
            InvalidArgumentError: invalid generation arguments, or a streamer with beam search.
            ResourceError: one input's encoder activations or decoder state cannot fit in memory, even alone (or,
                with output_scores or a streamer, the whole batch at once).
        """
        with self.backend.generating():
            if self.manifest.audio:
                call = _Call(merge_generation_config(self._defaults(), generation_config), kwargs, streamer)
                speech_call = self._speech(call, input_features, audio, sampling_rate, attention_mask, language, task)
                if isinstance(speech_call, longform.LongForm):
                    return speech_call.run(self.scheduler())
                return self._run([speech_call])[0]
            request = self.request(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                input_features=input_features, audio=audio, language=language, task=task,
                sampling_rate=sampling_rate, generation_config=generation_config, streamer=streamer, **kwargs,
            )  # fmt: skip
            return self._run([request])[0]

    def transcribe(self, audio, *, word_timestamps: bool = False, on_progress=None, **kwargs) -> list[Transcript]:
        """Whisper: recordings of any length in, their transcripts out (text, timed segments, and with
        `word_timestamps` the words of each segment), by HF's long-form loop with timestamps.

        Args:
            audio: WAV/FLAC paths or mono float arrays (one, or a list).
            word_timestamps: time each word (the alignment heads' attention and DTW, as faster-whisper groups words).
            on_progress: called as (seconds transcribed, seconds in all) after each round of windows.
            **kwargs: as `generate` (num_beams, condition_on_prev_tokens, temperature, thresholds, language, ...).

        Raises:
            as `generate`.
        """
        if not self.manifest.audio:
            raise InvalidArgumentError("transcribe() is for speech models; use generate_text() for text")
        if self.tokenizer is None:
            raise InvalidArgumentError("this bundle has no tokenizer (none was exported): transcripts need one")
        monitor = None
        if on_progress is not None:
            def monitor(progress: torch.Tensor) -> None:  # [B, 2]: seek, frames; frames of 10 ms
                seek, frames = progress[:, 0].clamp(max=progress[:, 1]), progress[:, 1]
                on_progress(float(seek.sum()) * longform.TIME_PRECISION_FEATURES,
                            float(frames.sum()) * longform.TIME_PRECISION_FEATURES)  # fmt: skip
        output = self.generate(audio=audio, return_timestamps=True, return_segments=True,
                               return_token_timestamps=word_timestamps, monitor_progress=monitor, **kwargs)  # fmt: skip
        return [self._transcript(segments, duration, kwargs.get("language"))
                for segments, duration in zip(output.segments, output.durations, strict=True)]  # fmt: skip

    def _transcript(self, segments: list[dict], duration: float, language) -> Transcript:
        eos = self.manifest.special_tokens["eos_token_id"]
        timed = []
        for i, s in enumerate(segments):
            words = None
            if "token_timestamps" in s:
                words = tuple(alignment.words(self.tokenizer, s["tokens"], s["token_timestamps"], eos))
            timed.append(Segment(i, round(s["start"], 3), round(s["end"], 3), s.get("text", ""),
                                 tuple(s["tokens"].tolist()), words))  # fmt: skip
        return Transcript("".join(s.text for s in timed), tuple(timed), duration, language)

    @property
    def can_align(self) -> bool:
        """Whether the bundle exports its alignment heads' attention (word timestamps)."""
        return bool(self.manifest.alignment)

    def token_timestamps(self, context: dict, ids: torch.Tensor, prompt_length: int, num_frames) -> torch.Tensor:
        """float32 [T]: HF's token times (seconds from the window's start) of one sequence `ids` [T] of a window
        whose encoder outputs are `context` (batch 1)."""
        weights = alignment.alignment_weights(self.backend, context, ids.to(self.backend.device))
        width = self.manifest.alignment["median_filter_width"]
        return alignment.token_timestamps(weights, prompt_length, num_frames, width)

    def generate_each(self, calls: list[dict]) -> list[SearchOutput]:
        """Several `generate` calls through one running batch: each dict holds one call's arguments (inputs and
        generation kwargs, which may differ between calls), and each result equals `generate(**call)` alone.
        Inputs join the batch as memory allows and leave it when their search ends.

        Raises:
            as `generate`, for the first call that fails; nothing runs if any call's arguments are invalid.
        """
        with self.backend.generating():
            return self._run([self.request(**call) for call in calls])

    def request(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        input_features=None,
        audio=None,
        language: str | None = None,
        task: str | None = None,
        sampling_rate: int | None = None,
        generation_config=None,
        streamer=None,
        on_input=None,
        **kwargs,
    ) -> Request:
        """A `generate` call's inputs, checked and ready for a `Scheduler` (see `scheduler`); nothing runs yet.
        `on_input(index, output)` is called as each input is answered. Arguments and errors as `generate`."""
        call = _Call(merge_generation_config(self._defaults(), generation_config), kwargs, streamer, on_input)
        speech_inputs = dict(input_features=input_features, audio=audio, sampling_rate=sampling_rate,
                             language=language, task=task)  # fmt: skip
        if self.manifest.audio:
            speech_call = self._speech(call, attention_mask=attention_mask, **speech_inputs)
            if isinstance(speech_call, longform.LongForm):
                raise InvalidArgumentError(
                    "long-form transcription (audio past 30 s, timestamps, fallback, prompts) runs many searches per "
                    "recording: call generate() or transcribe() (on the command line: el-export transcribe)"
                )
            return speech_call
        if any(value is not None for value in speech_inputs.values()):
            raise InvalidArgumentError(f"{', '.join(speech_inputs)} are for speech models")
        input_ids, attention_mask = self._check_source(input_ids, attention_mask)
        if self.manifest.kind == "decoder-only":
            if decoder_input_ids is not None:
                raise InvalidArgumentError(
                    "decoder_input_ids is for encoder-decoder models; put the prompt in input_ids"
                )
            return self._decoder_only_request(input_ids, attention_mask, call)
        B = input_ids.shape[0]
        defaults = call.defaults
        start = call.kwargs.get(
            "decoder_start_token_id", defaults.get("decoder_start_token_id", defaults.get("bos_token_id"))
        )
        if start is None:
            raise InvalidArgumentError("the bundle has no decoder_start_token_id; pass decoder_start_token_id=...")
        prompt = self._decoder_prompt(decoder_input_ids, B, start)
        options = self._options(call, prompt.shape[1], True)
        device = self.backend.device
        S, longest = input_ids.shape[1], _longest(attention_mask)

        def prepare(first: int, stop: int) -> Admission:
            mask = attention_mask[first:stop].to(device)
            feeds = {"input_ids": input_ids[first:stop].to(device), "attention_mask": mask}
            encoded = self._run_chunked("encoder", feeds, self._inputs_per_encoder_call(stop - first, S, longest))
            decoder = self.backend.make_decoder({**encoded, "encoder_mask": mask})
            return Admission(decoder, prompt[first:stop].to(device), options)

        return self._make_request(B, options, call, S, prepare, longest)

    def scheduler(self) -> Scheduler:
        """A scheduler over this generator's memory budget (`memory_limit`, or what the device has free) and caps
        (`max_batch` inputs, `max_rows` decoder rows in flight); `batching = "static"` makes it the static
        baseline."""
        budget, _ = memory.budget_bytes(self.memory_limit, self.backend.device)
        return Scheduler(budget, self.max_batch, self.max_rows, static=self.batching == "static")

    def _run(self, requests: list[Request]) -> list[SearchOutput]:
        scheduler = self.scheduler()
        for request in requests:
            scheduler.submit(request)
        scheduler.run()
        return [request.result() for request in requests]

    def _make_request(self, batch: int, options, call: _Call, source_len: int, prepare, longest: int = 0) -> Request:
        """A request over `batch` inputs whose decoder state, and encoder (or prefill) activations, fit one input at
        a time at least; a request that must run whole (output_scores, a streamer) must fit whole. Both are
        checked, and the streamer too, before any graph runs; `longest` is the input a refusal names."""
        check_streamer(call.streamer, options)
        rows_per_input = max(options.num_beams, options.num_return_sequences)
        per_input = memory.bytes_per_input(self.manifest, rows_per_input, source_len, options.max_length)
        chunk = memory.inputs_per_chunk(batch, per_input, self.memory_limit, self.backend.device)
        self._inputs_per_encoder_call(1, source_len, longest)  # refuses an input whose activations cannot fit
        if chunk < batch and (options.output_scores or call.streamer is not None):
            joined = "output_scores cannot be joined" if options.output_scores else "a streamer cannot be fed in parts"
            raise ResourceError(
                f"{batch} inputs do not fit in memory at once ({chunk} do) and {joined} across chunks; pass fewer "
                "inputs per call"
            )
        k = options.num_beams if options.num_beams > 1 else options.num_return_sequences
        request = Request(batch, k, per_input, prepare, options, call.streamer, call.on_input)
        if options.output_scores or call.streamer is not None:
            request.piece = batch
        elif options.do_sample:  # each piece draws from its own seeded generator: pieces sized by memory alone
            request.piece = chunk
        return request

    def _decoder_prompt(self, decoder_input_ids, batch: int, start) -> torch.Tensor:
        """int64 [B, P]: decoder_start_token_id, then decoder_input_ids unless they already start with it. The ids
        are checked here, as the decoder's embedding would read past its table (or wrap a negative id) unasked."""
        vocab = self.manifest.dims["vocab_size"]
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start < vocab:
            raise InvalidArgumentError(f"`decoder_start_token_id` must be a token id in [0, {vocab}), got {start!r}")
        prompt = torch.full((batch, 1), start, dtype=torch.int64)
        if decoder_input_ids is None:
            return prompt
        given = _array(decoder_input_ids, "decoder_input_ids", "ids")
        if given.dim() != 2 or given.shape[0] != batch or given.shape[1] == 0 or given.dtype not in _INTEGER_DTYPES:
            raise InputError(
                f"decoder_input_ids must be integer [{batch}, length >= 1], one row per input, got {given.dtype} "
                f"{list(given.shape)}"
            )
        given = given.to(torch.int64).cpu()
        if given.min() < 0 or given.max() >= vocab:
            raise InputError(f"decoder_input_ids holds ids outside the decoder's vocabulary [0, {vocab})")
        return given if (given[:, 0] == start).all() else torch.cat([prompt, given], dim=1)

    def _speech(self, call: _Call, input_features, audio, sampling_rate, attention_mask, language, task):
        """A Whisper call: a `LongForm` where HF's long-form loop would act differently from one short-form search
        (audio past 30 s, timestamps, fallback, prompts, word timestamps), else one short-form `Request`."""
        kwargs = dict(call.kwargs)
        settings = longform.settings(kwargs, call.defaults, self.manifest.dims["vocab_size"])
        recordings = speech.recordings(self.manifest, self.mel_filters, input_features, audio, sampling_rate,
                                       attention_mask)  # fmt: skip
        if settings.plain and not recordings.long:  # HF's Whisper samples only at a temperature > 0
            kwargs.update(settings.search_kwargs(settings.temperatures[0]))
            return self._speech_request(replace(call, kwargs=kwargs), recordings.stacked(), language, task)
        return longform.LongForm(self, replace(call, kwargs=kwargs), recordings, settings, language, task)

    def _speech_request(self, call: _Call, features: torch.Tensor, language, task) -> Request:
        """Whisper, short-form: the encoder over 30 s of features, then the decoder from HF's prompt."""
        defaults = call.defaults
        device = self.backend.device
        frames = self.manifest.graphs["encoder"].output("encoder_hidden").shape[1]
        longest_prompt = 4  # [sot, language, task, no_timestamps]: for the memory estimate

        def prepare(first: int, stop: int) -> Admission:
            chunk = self._inputs_per_encoder_call(stop - first, frames, 0)
            encoded = self._run_chunked("encoder", {"input_features": features[first:stop].to(device)}, chunk)
            B, S = encoded["encoder_hidden"].shape[:2]
            context = {**encoded, "encoder_mask": torch.ones(B, S, dtype=torch.int64, device=device)}
            sot = torch.full((B, 1), defaults["decoder_start_token_id"], device=device)
            prompt = speech.decoder_prompt(
                defaults, B, language, task, detect=lambda: self.backend.make_decoder(context).start(sot, 1)
            )
            options = self._options(call, prompt.shape[1], True)
            return Admission(self.backend.make_decoder(context), prompt.to(device), options)

        estimate = self._options(call, longest_prompt, True)
        return self._make_request(features.shape[0], estimate, call, frames, prepare)

    def _defaults(self) -> dict:
        defaults = {**self.manifest.special_tokens, **self.manifest.generation_defaults}
        return {k: v for k, v in defaults.items() if v is not None}

    def _decoder_only_request(self, input_ids, attention_mask, call: _Call) -> Request:
        """The prompt runs once (prefill); sequences include it, as HF returns them."""
        options = self._options(call, input_ids.shape[1], False)
        device = self.backend.device
        P, longest = input_ids.shape[1], _longest(attention_mask)

        def prepare(first: int, stop: int) -> Admission:
            ids, mask = input_ids[first:stop].to(device), attention_mask[first:stop].to(device)
            chunk = self._inputs_per_encoder_call(stop - first, P, longest)
            prefill = self._run_chunked("prefill", {"input_ids": ids, "attention_mask": mask}, chunk)
            next_position = mask.sum(dim=1, keepdim=True)  # HF: positions count attended tokens
            context = {**prefill, "prompt_mask": mask, "position_ids": next_position}
            return Admission(self.backend.make_decoder(context), ids, options, prompt_mask=mask)

        return self._make_request(input_ids.shape[0], options, call, P, prepare, longest)

    def _options(self, call: _Call, prompt_length: int, is_encoder_decoder: bool):
        options = resolve_options(
            call.defaults,
            prompt_length=prompt_length,
            is_encoder_decoder=is_encoder_decoder,
            max_position_embeddings=self.max_target_positions,
            **call.kwargs,
        )
        if self.max_target_positions is not None and options.max_length > self.max_target_positions:
            raise InvalidArgumentError(
                f"max_length {options.max_length} is past the decoder's {self.max_target_positions} positions; "
                "lower max_new_tokens / max_length"
            )
        return options

    def encode(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the encoder graph, in chunks of inputs whose activations fit in memory (and of at most
        `encoder_batch_size`, when set).

        Raises:
            ResourceError: one input's encoder activations cannot fit.
        """
        B = next(iter(feeds.values())).shape[0]
        if "input_features" in feeds:  # speech: the encoder attends over its fixed frames
            length, longest = self.manifest.graphs["encoder"].output("encoder_hidden").shape[1], 0
        else:
            length, longest = feeds["input_ids"].shape[1], _longest(feeds.get("attention_mask"))
        return self._run_chunked("encoder", feeds, self._inputs_per_encoder_call(B, length, longest))

    def _inputs_per_encoder_call(self, batch: int, source_len: int, longest: int) -> int:
        chunk = memory.inputs_per_encoder_call(
            self.manifest, batch, source_len, self.memory_limit, self.backend.device, longest
        )
        return min(chunk, self.encoder_batch_size or batch)

    def _run_chunked(self, graph_name: str, feeds: dict[str, torch.Tensor], chunk: int) -> dict[str, torch.Tensor]:
        """Run the encoder (or prefill) graph `chunk` inputs at a time; outputs joined along their batch axis."""
        B = next(iter(feeds.values())).shape[0]
        parts = [
            self.backend.run(graph_name, {name: t[i : i + chunk] for name, t in feeds.items()})
            for i in range(0, B, chunk)
        ]
        if len(parts) == 1:
            return parts[0]
        outputs = self.manifest.graphs[graph_name].outputs
        return {s.name: torch.cat([p[s.name] for p in parts], dim=s.shape.index("batch")) for s in outputs}

    def generate_text(self, texts, truncation: bool = False, **kwargs) -> list[str]:
        """Text in, text out (decoder-only models: the continuation alone; speech models: audio in, the
        transcript out). With num_return_sequences > 1 the outputs of one input are adjacent."""
        if self.tokenizer is None:
            raise InvalidArgumentError("this model has no tokenizer (none was exported); pass token ids to generate()")
        if self.manifest.audio:  # audio in: nothing to truncate
            return self.tokenizer.decode(self.generate(audio=texts, **kwargs).sequences)
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids, mask = self.tokenizer.encode(texts, max_length=self.max_source_positions, truncation=truncation)
        out = self.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        if self.manifest.kind == "decoder-only":  # the continuation, not the prompt it starts with
            return self.tokenizer.decode(out.sequences[:, input_ids.shape[1] :])
        return self.tokenizer.decode(out.sequences)

    def _check_source(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids is None:
            raise InputError("no input_ids were given")
        input_ids = _array(input_ids, "input_ids", "token ids")
        if input_ids.dim() != 2 or input_ids.dtype not in _INTEGER_DTYPES:
            raise InputError(
                f"input_ids must be integer [batch, length], got {input_ids.dtype} {list(input_ids.shape)}"
            )
        input_ids = input_ids.to(torch.int64).cpu()
        B, S = input_ids.shape
        if B == 0 or S == 0:
            raise InputError(f"input_ids is empty ({B} inputs of {S} tokens); give at least one token per input")
        if self.max_source_positions is not None and S > self.max_source_positions:
            raise InputError(
                f"inputs are {S} tokens but the model takes at most {self.max_source_positions}; truncate them"
            )
        vocab = self.manifest.source_vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise InputError(f"input_ids holds ids outside the vocabulary [0, {vocab})")
        if attention_mask is None:
            attention_mask = self._default_mask(input_ids)
        attention_mask = _array(attention_mask, "attention_mask", "0 and 1")
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {list(attention_mask.shape)} does not match input_ids {[B, S]}")
        if ((attention_mask != 0) & (attention_mask != 1)).any():  # HF masks any value but 1; the graphs differ
            raise InputError("attention_mask must hold only 0 (padding) and 1 (a token)")
        attention_mask = attention_mask.to(torch.int64).cpu()
        if (attention_mask.sum(dim=1) == 0).any():
            raise InputError("an input has an all-zero attention_mask (no tokens); remove it or give tokens")
        return input_ids, attention_mask

    def _default_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """HF's rule: encoder-decoders attend to every token, pads included; decoder-only prompts mask
        the pad token where it occurs and is not also an eos token."""
        pad = self.manifest.special_tokens.get("pad_token_id")
        eos = self.manifest.special_tokens.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else (eos or [])
        if self.manifest.kind == "decoder-only" and pad is not None and pad not in eos and (input_ids == pad).any():
            return input_ids.ne(pad).to(torch.int64)
        return torch.ones_like(input_ids)


def _array(value, name: str, what: str) -> torch.Tensor:
    """A tensor from a tensor or nested lists, a 1-D one as one input's row; InputError naming `name` when it is
    not a rectangular array of numbers."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:  # not numbers, ragged, or past int64
        raise InputError(f"{name} must be a rectangular [batch, length] array of {what} ({first_line(e)})") from None
    return tensor[None] if tensor.dim() == 1 else tensor
