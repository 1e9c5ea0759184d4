"""Requests -> answers: the requests that arrive together become as few searches as possible.

Triton's dynamic batcher hands the model the requests that arrived within `max_queue_delay_us` (up to
`max_batch_size` inputs). `BatchRunner` merges those with the same generation parameters (and the same
kind of input) into one group, so the EL decoder's one-encoder-copy-per-input is shared across users;
requests with different parameters form separate groups. With "inflight" batching every group is one
request to a scheduler thread shared by all model instances: the groups of every model call in flight join
one running batch at step boundaries and leave it when their search ends, so a short request is not held by
a long one. With "group" batching each group is one blocking `generate` call (the model call is answered
when its last group ends, and nothing joins meanwhile). Search treats every input on its own (only padding
depends on the neighbours), so each answer equals `generate` on that input alone: the runner crops each
input's rows back to what that call would return. A refused request gets its own one-line error; its
neighbours in the batch get their answers.

Speech requests that Whisper's long-form loop answers (audio past 30 s, timestamps, previous text, thresholds, word
timestamps: where `generate` itself would take that loop) run many searches per recording on a scheduler of their
own (`LongForm.run`), so they cannot be one request of the shared running batch: each such group is one
`Generator.transcribe` call, on the thread of the model call that brought it (with "inflight" batching the
scheduler thread goes on stepping the other groups meanwhile; both use the backend at once, as the concurrent
`generate` calls of several "group" instances do). Their answers carry the transcript as JSON (`segments`).
"""

import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from el_export.errors import ElExportError, InputError, InvalidArgumentError
from el_export.runtime import longform
from el_export.runtime.audio import load_audio, too_long
from el_export.runtime.scheduler import BackgroundScheduler, Request
from el_export.runtime.tokenizer import pad_ids, padding
from el_export.runtime.transcripts import Transcript, to_json_text


@dataclass(frozen=True)
class ServingTensor:
    """One model input or output, per input of the batch (Triton adds the batch axis in front)."""

    name: str
    dtype: str  # numpy name: "bytes", "int64", "float32"
    shape: tuple[int, ...]  # -1: any length
    ragged: bool = False  # lengths may differ between the requests of one batch


TEXT_INPUTS = (
    ServingTensor("text", "bytes", (1,)),  # UTF-8 text (text bundles with a tokenizer)
    ServingTensor("input_ids", "int64", (-1,), ragged=True),
    ServingTensor("attention_mask", "int64", (-1,), ragged=True),  # optional, with input_ids: 0 on padding
)
SPEECH_INPUTS = (
    ServingTensor("audio", "bytes", (1,)),  # the bytes of a WAV or FLAC file at the model's sample rate
    ServingTensor("samples", "float32", (-1,), ragged=True),  # mono samples at the model's sample rate
)
OUTPUTS = (
    ServingTensor("text", "bytes", (-1,)),  # [R]: decoded (decoder-only: the continuation)
    ServingTensor("sequences", "int64", (-1, -1)),  # [R, T]: token ids as `generate` returns them
    ServingTensor("scores", "float32", (-1,)),  # [R]: beam search's sequences_scores; NaN for greedy and sampling
)
# [1]: UTF-8 JSON, a long-form request's transcript (`Transcript.to_json`: openai-whisper's layout), else "[]"
SEGMENTS = ServingTensor("segments", "bytes", (1,))
NO_SEGMENTS = b"[]"  # the segments of a short-form answer: it was not timed

# Whisper's long-form arguments a request may set: refused for text bundles.
SPEECH_PARAMETERS: dict[str, tuple[type, ...]] = {
    "return_timestamps": (bool,), "condition_on_prev_tokens": (bool,), "compression_ratio_threshold": (float, int),
    "logprob_threshold": (float, int), "no_speech_threshold": (float, int), "word_timestamps": (bool,),
}  # fmt: skip
# Generation arguments a request may set (as Triton request parameters), with the types accepted.
PARAMETERS: dict[str, tuple[type, ...]] = {
    "num_beams": (int,), "num_return_sequences": (int,), "max_new_tokens": (int,), "min_new_tokens": (int,),
    "length_penalty": (float, int), "early_stopping": (bool, str), "no_repeat_ngram_size": (int,),
    "repetition_penalty": (float, int), "do_sample": (bool,), "temperature": (float, int), "top_k": (int,),
    "top_p": (float, int), "seed": (int,), "language": (str,), "task": (str,), "truncation": (bool,),
    **SPEECH_PARAMETERS,
}  # fmt: skip


BATCHING = ("inflight", "group")  # `BatchRunner`'s modes; the first is the default


def model_inputs(manifest) -> tuple[ServingTensor, ...]:
    """The inputs a bundle's model takes: audio for speech bundles, text or token ids otherwise."""
    return SPEECH_INPUTS if manifest.audio else TEXT_INPUTS


def model_outputs(manifest) -> tuple[ServingTensor, ...]:
    """The outputs a bundle's model answers with: speech bundles add `segments`."""
    return (*OUTPUTS, SEGMENTS) if manifest.audio else OUTPUTS


@dataclass(frozen=True)
class RequestCaps:
    """The most one request may ask for, so that no client makes the server search or tokenize without bound.
    Each is refused in one line that names its flag (`serve` and `triton-repo` take the same ones)."""

    max_num_beams: int = 16  # num_beams and num_return_sequences: rows per input
    max_new_tokens: int = 512
    max_text_bytes: int = 262_144  # per text input, UTF-8, checked before tokenizing
    max_audio_seconds: float = 3600.0  # per audio input (an upload: from its header, before decoding) or samples

    FLAGS: ClassVar[dict[str, str]] = {"max_num_beams": "--max-num-beams", "max_new_tokens": "--max-new-tokens-limit",
                                       "max_text_bytes": "--max-text-bytes",
                                       "max_audio_seconds": "--max-audio-seconds"}  # fmt: skip

    def check(self) -> None:
        """Raises InvalidArgumentError for a cap below 1, or not finite (NaN would refuse nothing)."""
        for name, flag in self.FLAGS.items():
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidArgumentError(f"{flag} must be a finite number, got {value}")
            if value < 1:
                raise InvalidArgumentError(f"{flag} must be at least 1, got {value}")

    def refuse(self, name: str, value: int, cap_name: str) -> InvalidArgumentError:
        """The one-line error for `name` = `value` over the cap `cap_name`."""
        cap, flag = getattr(self, cap_name), self.FLAGS[cap_name]
        return InvalidArgumentError(f"{name} {value} is over this server's limit of {cap}; ask for at most {cap}, "
                                    f"or start the server with a higher {flag}")  # fmt: skip

    @property
    def audio_limit(self) -> str:
        """What the refusal of audio past `max_audio_seconds` says the limit is (`too_long` adds ": split it")."""
        return (f"this server takes up to {self.max_audio_seconds:g} s (start it with a higher --max-audio-seconds "
                "for more)")  # fmt: skip


@dataclass
class _Request:
    items: list  # per input: token ids (list[int]) or mono float32 samples
    kwargs: dict  # the arguments of `generate`, or of `transcribe` for a long-form request
    key: tuple  # requests with equal keys share one search
    long_form: bool = False  # answered by `Generator.transcribe`


@dataclass
class _Search:
    """One group's search: the `generate` arguments over every input of its requests, and how wide the decoder
    prompt of its sequences is (what cropping skips)."""

    requests: list[_Request]
    call: dict
    prompt_width: int
    long_form: bool = False


class BatchRunner:
    """Requests -> answers, with one search per group of requests that can share it.

    Args:
        generator: a loaded `Generator` (thread-safe: one runner may serve several model instances).
        caps: the most one request may ask for (default: `RequestCaps()`).
        batching: "inflight" (each group joins the running batch of every model call in flight, on a scheduler
            thread started on first use: `close()` stops it) or "group" (one blocking `generate` per group).

    Raises:
        InvalidArgumentError: an unknown `batching`.
    """

    def __init__(self, generator, caps: RequestCaps | None = None, batching: str = BATCHING[0]):
        if batching not in BATCHING:
            raise InvalidArgumentError(f"batching {batching!r} is not one of {', '.join(BATCHING)}")
        self.generator, self.batching = generator, batching
        self.caps = caps or RequestCaps()
        manifest = generator.manifest
        self.speech = bool(manifest.audio)
        self.decoder_only = manifest.kind == "decoder-only"
        pad, self.padding_side = padding(manifest)
        self.pad_token_id = 0 if pad is None else pad
        defaults = {**manifest.special_tokens, **manifest.generation_defaults}
        self.defaults = {k: v for k, v in defaults.items() if v is not None}  # as `generate` reads them
        eos = defaults.get("eos_token_id")
        self.eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else eos, dtype=torch.int64)
        self._scheduler: BackgroundScheduler | None = None
        self._scheduler_lock = threading.Lock()

    def __call__(self, requests: list[tuple[dict, dict | None]]) -> list[dict | ElExportError]:
        """Answer a batch of requests.

        Args:
            requests: per request, its input tensors by name (each with the batch axis first) and
                its parameters (generation arguments under HF's names).

        Returns:
            Per request, its output tensors by name (`model_outputs`, batch axis first), or the error that
            refused it (without traceback). One request's error never fails another.
        """
        results: list[dict | ElExportError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        parsed: dict[int, _Request] = {}
        for i, (data, parameters) in enumerate(requests):
            try:
                parsed[i] = self._parse(data, parameters or {}, i)
            except ElExportError as e:
                results[i] = _detached(e)
                continue
            groups.setdefault(parsed[i].key, []).append(i)
        answer = self._answer_inflight if self.batching == "inflight" else self._answer_grouped
        members = list(groups.values())
        for indices, answers in zip(members, answer([[parsed[i] for i in m] for m in members]), strict=True):
            for i, result in zip(indices, answers, strict=True):
                results[i] = result
        return results

    def close(self) -> None:
        """Stop the in-flight scheduler's thread, if one started (a later call starts another)."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.stop()

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _answer_grouped(self, groups: list[list[_Request]]) -> list[list[dict | ElExportError]]:
        """One blocking `generate` (or `transcribe`) per group, in turn; a failed group's requests retried alone
        (the one at fault fails, the others get their answers)."""
        results = []
        for group in groups:
            try:
                search = self._search_of(group)
                if search.long_form:
                    results.append(self._transcribe(search))
                else:
                    results.append(self._crop(search, self.generator.generate(**search.call)))
            except ElExportError as e:
                if len(group) == 1:
                    results.append([_detached(e)])
                else:
                    results.append([answer for request in group for answer in self._answer_grouped([[request]])[0]])
        return results

    def _answer_inflight(self, groups: list[list[_Request]]) -> list[list[dict | ElExportError]]:
        """Every group submitted to the shared scheduler at once, then each waited on: they run together with the
        other model calls' groups. A long-form group is transcribed here meanwhile, on this model call's thread.
        A failed group's requests are retried alone, as in `_answer_grouped`."""
        submitted = [self._submit(group) for group in groups]
        results = []
        for group, search in zip(groups, submitted, strict=True):
            try:
                if isinstance(search, ElExportError):
                    raise search
                search, request = search
                if request is None:
                    results.append(self._transcribe(search))
                else:
                    results.append(self._crop(search, self._background().wait(request)))
            except ElExportError as e:
                if len(group) == 1:
                    results.append([_detached(e)])
                else:
                    results.append([answers[0] for answers in self._answer_inflight([[r] for r in group])])
        return results

    def _submit(self, group: list[_Request]) -> tuple[_Search, Request | None] | ElExportError:
        """The group's request, checked (by `Generator.request`: nothing runs) and submitted; or why it was not.
        A long-form group is not submitted (request None): its loop drives a scheduler of its own."""
        try:
            search = self._search_of(group)
            if search.long_form:
                return search, None
            request = self.generator.request(**search.call)
        except ElExportError as e:
            return e
        return search, self._background().submit(request)

    def _background(self) -> BackgroundScheduler:
        with self._scheduler_lock:
            if self._scheduler is None:
                generator = self.generator
                self._scheduler = BackgroundScheduler(generator.scheduler, around=generator.backend.generating)
            return self._scheduler

    def _parse(self, data: dict, parameters: dict, index: int) -> _Request:
        kwargs = _check_parameters(parameters, self.caps, self.speech)
        truncation = kwargs.pop("truncation", False)
        names = sorted(name for name, value in data.items() if value is not None)
        kinds = ("audio", "samples") if self.speech else ("text", "input_ids")
        given = [name for name in kinds if name in names]
        if len(given) != 1 or not set(names) <= {*kinds, "attention_mask"}:
            raise InvalidArgumentError(f"give exactly one of the inputs {' or '.join(kinds)}; got {', '.join(names)}")
        if "attention_mask" in names and given != ["input_ids"]:
            raise InvalidArgumentError("attention_mask goes with input_ids")
        values = np.asarray(data[given[0]])
        if values.ndim != 2 or values.shape[0] == 0:
            raise InputError(f"input {given[0]} must be [batch, length], got shape {list(values.shape)}")
        read = {"text": self._text_items, "input_ids": self._input_ids_items, "audio": self._audio_items,
                "samples": self._samples_items}[given[0]]  # fmt: skip
        items = read(values, data.get("attention_mask"), truncation)
        long_form = self.speech and self._long_form(items, kwargs)
        key = (*sorted(kwargs.items()), ("long-form", long_form))
        if kwargs.get("do_sample") and "seed" in kwargs:  # a seeded draw depends on the batch: run it alone
            key += ("alone", index)
        if self.decoder_only and "max_new_tokens" not in kwargs:  # max_length counts the padded prompt
            key += ("prompt", max(len(ids) for ids in items))
        return _Request(items, kwargs, key, long_form)

    def _long_form(self, items: list[np.ndarray], kwargs: dict) -> bool:
        """Whether Whisper's long-form loop answers the request, as `generate` decides it (audio past one window, or
        long-form arguments, the bundle's defaults included); `kwargs` made `transcribe`'s if so, else
        `generate`'s."""
        word_timestamps = kwargs.pop("word_timestamps", False)
        window = self.generator.manifest.audio["chunk_length"]  # seconds
        long_audio = max(item.size for item in items) > window * self.generator.manifest.audio["sampling_rate"]
        given = {name: kwargs[name] for name in longform.ARGUMENTS if name in kwargs}
        settings = longform.settings(given, self.defaults, self.generator.manifest.dims["vocab_size"])
        if not (long_audio or word_timestamps or not settings.plain):
            return False
        if kwargs.pop("return_timestamps", None) is False:  # `transcribe` predicts them
            raise InvalidArgumentError(f"{f'audio past {window} s' if long_audio else 'this request'} is transcribed "
                                       "long-form, with timestamps: drop return_timestamps=false")  # fmt: skip
        kwargs["word_timestamps"] = word_timestamps
        return True

    def _text_items(self, values: np.ndarray, mask, truncation: bool) -> list[list[int]]:
        tokenizer = self.generator.tokenizer
        if tokenizer is None:
            raise InvalidArgumentError("this bundle has no tokenizer: send input_ids instead of text")
        cap = self.caps.max_text_bytes
        for value in values[:, 0]:  # before decoding or tokenizing: both cost memory in proportion
            size = len(value) if isinstance(value, bytes) else len(str(value).encode())
            if size > cap:
                raise InputError(f"a text input is {size} bytes, over this server's limit of {cap}; send "
                                 "less text, or start the server with a higher --max-text-bytes")  # fmt: skip
        texts = [_utf8(value) for value in values[:, 0]]
        max_length = self.generator.max_source_positions
        return [tokenizer.encode([text], max_length=max_length, truncation=truncation)[0][0].tolist() for text in texts]

    def _input_ids_items(self, values: np.ndarray, mask, truncation: bool) -> list[list[int]]:
        if not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {values.dtype}")
        if mask is None:
            return [row.tolist() for row in values]
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise InputError(f"attention_mask {list(mask.shape)} does not match input_ids {list(values.shape)}")
        return [row[keep != 0].tolist() for row, keep in zip(values, mask, strict=True)]

    def _audio_items(self, values: np.ndarray, mask, truncation: bool) -> list[np.ndarray]:
        rate = self.generator.manifest.audio["sampling_rate"]  # an upload's length is checked from its header
        return [load_audio(value if isinstance(value, bytes) else bytes(value), rate, self.caps.max_audio_seconds,
                           self.caps.audio_limit) for value in values[:, 0]]  # fmt: skip

    def _samples_items(self, values: np.ndarray, mask, truncation: bool) -> list[np.ndarray]:
        rate = self.generator.manifest.audio["sampling_rate"]
        if values.shape[1] > self.caps.max_audio_seconds * rate:
            raise too_long("a samples input", values.shape[1], rate, self.caps.max_audio_seconds, self.caps.audio_limit)
        return [row.astype(np.float32) for row in values]

    def _search_of(self, requests: list[_Request]) -> _Search:
        """The `generate` arguments over every input of `requests` (which share their generation arguments)."""
        items = [item for request in requests for item in request.items]
        kwargs = requests[0].kwargs
        if self.speech:  # the decoder prompt: only its first token (BART's start) may be an eos
            return _Search(requests, {"audio": items, **kwargs}, prompt_width=1, long_form=requests[0].long_form)
        if any(len(ids) == 0 for ids in items):
            raise InputError("an input has no tokens; give at least one token per input")
        input_ids, mask = pad_ids(items, self.pad_token_id, self.padding_side)
        prompt_width = input_ids.shape[1] if self.decoder_only else 1
        return _Search(requests, {"input_ids": input_ids, "attention_mask": mask, **kwargs}, prompt_width)

    def _crop(self, search: _Search, out) -> list[dict]:
        """Each request's rows of the search's output, cropped to what `generate` on each input alone returns."""
        prompt_width = search.prompt_width
        sequences = out.sequences.cpu()  # [B * R, W]
        inputs = sum(len(request.items) for request in search.requests)
        R = sequences.shape[0] // inputs
        ends = self._row_ends(sequences, out.beam_indices, prompt_width)  # [B * R]
        scores = torch.full((sequences.shape[0],), math.nan)
        if out.sequences_scores is not None:
            scores = out.sequences_scores.cpu().float()
        answers, row = [], 0
        for request in search.requests:
            per_input = []
            for item in request.items:
                rows = slice(row, row + R)
                start = prompt_width - len(item) if self.decoder_only else 0  # drop the batch's left padding
                per_input.append((sequences[rows, start : int(ends[rows].max())], scores[rows], len(item)))
                row += R
            answers.append(self._answer(per_input))
        return answers

    def _row_ends(self, sequences: torch.Tensor, beam_indices, prompt_width: int) -> torch.Tensor:
        """Per row, the column after its last token: what `generate` on its input alone would keep."""
        if beam_indices is not None:  # -1 past each hypothesis' end
            steps = beam_indices.shape[1]
            return sequences.shape[1] - steps + (beam_indices.cpu() >= 0).sum(dim=1)
        generated = sequences[:, prompt_width:]
        is_eos = torch.isin(generated, self.eos)  # a row ends at its first eos, or runs to the last column
        first = is_eos.int().argmax(dim=1)
        return torch.where(is_eos.any(dim=1), prompt_width + first + 1, sequences.shape[1])

    def _answer(self, per_input: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict:
        """One request's output tensors: [n, R] texts and scores, [n, R, T] sequences (right-padded), and for
        speech [n, 1] segments (none: short-form)."""
        tokenizer = self.generator.tokenizer
        texts = []
        for seqs, _, prompt_length in per_input:
            generated = seqs[:, prompt_length:] if self.decoder_only else seqs
            decoded = tokenizer.decode(generated) if tokenizer is not None else [""] * seqs.shape[0]
            texts.append([text.encode() for text in decoded])
        answer = {
            "text": np.array(texts, dtype=np.object_),
            "sequences": self._right_padded([seqs for seqs, _, _ in per_input]),
            "scores": torch.stack([scores for _, scores, _ in per_input]).numpy().astype(np.float32),
        }
        if self.speech:
            answer["segments"] = np.array([[NO_SEGMENTS]] * len(per_input), dtype=np.object_)
        return answer

    def _transcribe(self, search: _Search) -> list[dict]:
        """A long-form group's answers: one `transcribe` over its recordings, each request's outputs ([n, 1] text,
        [n, 1, T] sequences: the segments' tokens one after another, as `generate` returns them, NaN scores, and the
        transcripts' JSON as segments)."""
        transcripts = self.generator.transcribe(**search.call)
        answers, first = [], 0
        for request in search.requests:
            mine: list[Transcript] = transcripts[first : first + len(request.items)]
            first += len(request.items)
            tokens = [torch.tensor([[t for s in tr.segments for t in s.tokens]], dtype=torch.int64) for tr in mine]
            answers.append({
                "text": np.array([[tr.text.encode()] for tr in mine], dtype=np.object_),
                "sequences": self._right_padded(tokens),
                "scores": np.full((len(mine), 1), math.nan, dtype=np.float32),
                "segments": np.array([[to_json_text(tr).encode()] for tr in mine], dtype=np.object_),
            })  # fmt: skip
        return answers

    def _right_padded(self, sequences: list[torch.Tensor]) -> np.ndarray:
        """Per input [R, T_i] -> [n, R, max T_i], padded on the right with the pad id."""
        width = max(seqs.shape[1] for seqs in sequences)
        padded = [F.pad(seqs, (0, width - seqs.shape[1]), value=self.pad_token_id) for seqs in sequences]
        return torch.stack(padded).numpy()


def _detached(error: ElExportError) -> ElExportError:
    """`error` without its traceback and chained errors. Kept past its `except` block (in the results), those
    hold the failed call's frames, whose locals (a long text's token ids) a reference cycle through the
    results then keeps alive until a full garbage collection, which big allocations of ints never trigger."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def _check_parameters(parameters: dict, caps: RequestCaps, speech: bool) -> dict:
    """Request parameters -> generation arguments, with every unknown name, wrong type, value over a cap, or speech
    parameter of a text bundle refused."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise InvalidArgumentError(f"unknown parameter {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    if not speech and (speech_only := [name for name in SPEECH_PARAMETERS if name in parameters]):
        raise InvalidArgumentError(f"parameter {', '.join(speech_only)}: for speech bundles (Whisper transcription) "
                                   "only; this bundle takes text")  # fmt: skip
    for name, value in parameters.items():
        types = PARAMETERS[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            if name == "temperature":  # openai-whisper's fallback schedule
                raise InvalidArgumentError("parameter temperature must be one number: a schedule of fallback "
                                           "temperatures (a list) is not a Triton parameter type")  # fmt: skip
            raise InvalidArgumentError(f"parameter {name} must be {' or '.join(t.__name__ for t in types)}")
    kwargs = dict(parameters)
    if isinstance(kwargs.get("early_stopping"), str) and kwargs["early_stopping"] != "never":
        raise InvalidArgumentError("parameter early_stopping must be true, false or 'never'")
    for name, cap in (("num_beams", "max_num_beams"), ("num_return_sequences", "max_num_beams"),
                      ("max_new_tokens", "max_new_tokens")):  # fmt: skip
        if kwargs.get(name, 0) > getattr(caps, cap):
            raise caps.refuse(name, kwargs[name], cap)
    return kwargs


def _utf8(value) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InputError("text inputs must be UTF-8") from None
