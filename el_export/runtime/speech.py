"""Speech models (Whisper): audio to features, and the decoder prompt HF's Whisper `generate` builds.

A recording of up to 30 s becomes 30 s of features (padded, as HF's feature extractor pads it); a longer one the
features of the whole recording, which the long-form loop (`longform.py`) reads window by window.
The prompt, as transformers 5.23's `_retrieve_init_tokens` builds it: [decoder_start] + [language] + [task] +
[no_timestamps] (left out when timestamps are predicted). English-only models take no language or task.
A multilingual model without a given language detects it per input from the first step's logits over
the language tokens, as HF's `detect_language` does.
"""

import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from el_export.errors import InputError, InvalidArgumentError, first_line
from el_export.runtime.audio import (
    FeatureSpec,
    load_audio,
    log_mel,
    log_mel_whole,
    mono_waveform,
    resample,
    too_long,
)

# The longest recording accepted (a WAV header can claim anything; features take 32 KB a second): 4 hours.
MAX_RECORDING_SECONDS = 4 * 3600
RECORDING_LIMIT = f"el-export transcribes recordings of up to {MAX_RECORDING_SECONDS} s (4 hours)"


@dataclass(frozen=True)
class Recordings:
    """A call's recordings as the long-form loop reads them (HF's `input_features` + `attention_mask`).

    Attributes:
        features: per recording, float32 [n_mels, frames]: 30 s of padded features for a recording that fits one
            window, the whole recording's features for a longer one (what HF's feature extractor gives each alone).
        frames: per recording, where its windows stop (HF's `max_frames`).
        num_frames: per recording, its frames of audio (HF: the attention mask's sum), which word timestamps crop
            the attention to; None where unknown (input_features without an attention mask).
        window: frames the encoder takes at once (3000 for 30 s).
    """

    features: list[torch.Tensor]
    frames: list[int]
    num_frames: list[int] | None
    window: int

    @property
    def long(self) -> bool:
        """Any recording longer than a window: HF then transcribes the whole call long-form, with timestamps."""
        return max(f.shape[-1] for f in self.features) > self.window

    def stacked(self) -> torch.Tensor:
        """float32 [B, n_mels, window] (short-form calls only)."""
        return torch.stack(self.features)


def features(manifest, mel_filters: torch.Tensor | None, input_features=None, audio=None, sampling_rate=None):
    """Short-form features [B, n_mels, frames]: input_features as given (checked), or computed from audio: paths
    (read at the rate in their header), or float32 mono arrays at `sampling_rate` (default: the model's),
    resampled to the model's rate when they differ.

    Raises:
        InputError: as `recordings`, and audio longer than one window (30 s).
    """
    loaded = recordings(manifest, mel_filters, input_features, audio, sampling_rate)
    if loaded.long:
        if input_features is not None:
            raise InputError(f"input_features are longer than {loaded.window} frames; transcribe them with generate()")
        spec = _spec(manifest)
        index = max(range(len(loaded.features)), key=lambda i: loaded.features[i].shape[-1])
        raise too_long(f"audio {index}", loaded.frames[index] * spec.hop_length, spec.sampling_rate, spec.chunk_length)
    return loaded.stacked()


def recordings(manifest, mel_filters, input_features=None, audio=None, sampling_rate=None, attention_mask=None):
    """The call's audio as `Recordings`: from audio (paths or arrays, as `features`, up to MAX_RECORDING_SECONDS
    each), or from input_features [B, n_mels, frames >= window] with, for a batch longer than a window, HF's
    frame-level `attention_mask` [B, frames].

    Raises:
        InvalidArgumentError: both or neither of input_features and audio, a bad sampling_rate, or a batch of long
            input_features without attention_mask.
        InputError: unreadable or non-finite audio, features of the wrong shape, an attention mask that does not
            fit them.
    """
    spec = _spec(manifest)
    window = manifest.graphs["encoder"].input("input_features").shape[2]
    if (input_features is None) == (audio is None):
        raise InvalidArgumentError("give either input_features or audio (WAV/FLAC paths, or mono float arrays)")
    if sampling_rate is not None and audio is None:
        raise InvalidArgumentError("sampling_rate is the rate of audio arrays; pass it with audio=, not input_features")
    if sampling_rate is not None and (
        isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Integral) or sampling_rate <= 0
    ):
        raise InvalidArgumentError(f"`sampling_rate` must be a positive integer (Hz), got {sampling_rate!r}")
    if attention_mask is not None and input_features is None:
        raise InvalidArgumentError("attention_mask goes with input_features; audio carries its own length")
    if audio is not None:
        rate = spec.sampling_rate if sampling_rate is None else int(sampling_rate)
        return _from_audio(audio, spec, mel_filters, rate, window)
    return _from_features(input_features, attention_mask, spec, window)


def _spec(manifest) -> FeatureSpec:
    return FeatureSpec(**{k: v for k, v in manifest.audio.items() if k != "mel_filters"})


def _from_audio(audio, spec: FeatureSpec, mel_filters, rate: int, window: int) -> Recordings:
    items = [audio] if isinstance(audio, str | Path | np.ndarray) else list(audio)
    if not items:
        raise InputError("no audio was given")
    names = [f"audio {i} ({a})" if isinstance(a, str | Path) else f"audio {i}" for i, a in enumerate(items)]
    features, frames, num_frames = [], [], []
    for item, name in zip(items, names, strict=True):
        wave = mono_waveform(_waveform(item, name, rate, spec), name)
        if wave.size <= spec.n_samples:  # one window, padded to 30 s; HF's mask counts the hops that start in audio
            features.append(log_mel([wave], spec, mel_filters, [name])[0])
            frames.append(window)
            num_frames.append(-(-wave.size // spec.hop_length))
        else:  # the whole recording; HF's mask drops the hop the last frame would start in
            features.append(log_mel_whole(wave, spec, mel_filters, name))
            frames.append(features[-1].shape[-1])
            num_frames.append(frames[-1])
    return Recordings(features, frames, num_frames, window)


def _from_features(input_features, attention_mask, spec: FeatureSpec, window: int) -> Recordings:
    try:
        input_features = torch.as_tensor(input_features, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:  # not numbers, or ragged
        raise InputError(f"input_features must be a float array [batch, mels, frames] ({first_line(e)})") from None
    if input_features.dim() != 3 or input_features.shape[1] != spec.n_mels or input_features.shape[2] < window:
        raise InputError(
            f"input_features must be [batch, {spec.n_mels}, frames >= {window}] ({window} frames: 30 s of log-mel "
            f"features), got {list(input_features.shape)}"
        )
    if input_features.shape[0] == 0:
        raise InputError("input_features is empty (0 inputs); give at least one")
    if not torch.isfinite(input_features).all():
        raise InputError("input_features holds NaN or infinite values; compute them from finite audio")
    B, _, T = input_features.shape
    num_frames = None
    if attention_mask is not None:
        try:
            mask = torch.as_tensor(attention_mask)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"attention_mask must be an integer array [batch, frames] ({first_line(e)})") from None
        if mask.shape != (B, T) or ((mask != 0) & (mask != 1)).any():
            raise InputError(f"attention_mask must be 0/1 of shape [{B}, {T}] (one per frame), got {list(mask.shape)}")
        num_frames = [int(n) for n in mask.sum(dim=1)]
        if min(num_frames) == 0:
            raise InputError("an input has an all-zero attention_mask (no frames); remove it")
    if B > 1 and T > window:
        if num_frames is None:  # HF refuses too: which frames are padding is unknown
            raise InvalidArgumentError(
                "a batch of input_features longer than 30 s needs attention_mask (the feature extractor's, "
                "return_attention_mask=True)"
            )
        frames = num_frames
    else:
        frames = [T] * B
    return Recordings(list(input_features), frames, num_frames, window)


def _waveform(audio, name: str, rate: int, spec: FeatureSpec):
    """A file read at its own rate, or an array at `rate`, as samples at the model's rate. An array to resample is
    checked, and refused when too long, first (an array said to be at 1 Hz would resample to gigabytes)."""
    if isinstance(audio, str | Path):
        return load_audio(audio, spec.sampling_rate, MAX_RECORDING_SECONDS, RECORDING_LIMIT)
    if rate == spec.sampling_rate:
        return audio  # checked by the caller
    samples = mono_waveform(audio, name)
    if samples.size > MAX_RECORDING_SECONDS * rate:
        raise too_long(name, samples.size, rate, MAX_RECORDING_SECONDS, RECORDING_LIMIT)
    return resample(samples, rate, spec.sampling_rate)


def decoder_prompt(
    defaults: dict, batch: int, language: str | None, task: str | None, detect, timestamps: bool = False
) -> torch.Tensor:
    """int64 [B, P]: the decoder prompt of every input. `detect()` returns first-step logits [B, V]. With
    `timestamps` the prompt leaves out <|notimestamps|>, so the model predicts timestamp tokens."""
    sot = defaults["decoder_start_token_id"]
    if not defaults.get("is_multilingual", False):
        if language is not None or task is not None:
            raise InvalidArgumentError("this is an English-only Whisper model: it takes no language or task")
        prompt = torch.tensor([[sot]] * batch)
    else:
        lang_to_id, task_to_id = defaults.get("lang_to_id") or {}, defaults.get("task_to_id") or {}
        forced = dict(defaults.get("forced_decoder_ids") or []) if language is None and task is None else {}
        if language is not None:
            token = language if language.startswith("<|") else f"<|{language}|>"
            if token not in lang_to_id:
                raise InvalidArgumentError(f"unknown language {language!r}; known: {', '.join(sorted(lang_to_id))}")
            languages = torch.full((batch, 1), lang_to_id[token])
        elif forced.get(1) is not None:
            languages = torch.full((batch, 1), forced[1])
        else:  # HF: argmax over the language tokens of the logits after <|startoftranscript|>, per input
            logits = detect()
            allowed = torch.full_like(logits, -float("inf"))
            ids = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
            allowed[:, ids] = 0
            languages = (logits + allowed).argmax(dim=-1, keepdim=True).cpu()
        prompt = torch.cat([torch.tensor([[sot]] * batch), languages], dim=1)
        task_id = None
        if task is not None:
            if task not in task_to_id:
                raise InvalidArgumentError(f"unknown task {task!r}; choose one of {', '.join(sorted(task_to_id))}")
            task_id = task_to_id[task]
        elif language is not None:
            task_id = task_to_id.get("transcribe")
        elif forced.get(2) is not None:
            task_id = forced[2]
        if task_id is not None:
            prompt = torch.cat([prompt, torch.full((batch, 1), task_id)], dim=1)
    no_timestamps = defaults.get("no_timestamps_token_id")
    if no_timestamps is not None and not timestamps:
        prompt = torch.cat([prompt, torch.full((batch, 1), no_timestamps)], dim=1)
    return prompt.to(torch.int64)
