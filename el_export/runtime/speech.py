"""Speech models (Whisper): audio to features, and the decoder prompt HF's Whisper `generate` builds.

The prompt for short-form audio (<= 30 s), as transformers 5.23's `_retrieve_init_tokens` builds it:
[decoder_start] + [language] + [task] + [no_timestamps]. English-only models take no language or task.
A multilingual model without a given language detects it per input from the first step's logits over
the language tokens, as HF's `detect_language` does. Timestamps are not predicted (no_timestamps).
"""

import numbers
from pathlib import Path

import numpy as np
import torch

from el_export.errors import InputError, InvalidArgumentError, first_line
from el_export.runtime.audio import FeatureSpec, load_audio, log_mel, mono_waveform, resample, too_long


def features(manifest, mel_filters: torch.Tensor | None, input_features=None, audio=None, sampling_rate=None):
    """input_features as given (checked), or computed from audio: paths (read at the rate in their header), or
    float32 mono arrays at `sampling_rate` (default: the model's), resampled to the model's rate when they differ."""
    spec = FeatureSpec(**{k: v for k, v in manifest.audio.items() if k != "mel_filters"})
    frames = manifest.graphs["encoder"].input("input_features").shape[2]
    if (input_features is None) == (audio is None):
        raise InvalidArgumentError("give either input_features or audio (WAV/FLAC paths, or mono float arrays)")
    if sampling_rate is not None and audio is None:
        raise InvalidArgumentError("sampling_rate is the rate of audio arrays; pass it with audio=, not input_features")
    if sampling_rate is not None and (
        isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Integral) or sampling_rate <= 0
    ):
        raise InvalidArgumentError(f"`sampling_rate` must be a positive integer (Hz), got {sampling_rate!r}")
    rate = spec.sampling_rate if sampling_rate is None else int(sampling_rate)
    if audio is not None:
        items = [audio] if isinstance(audio, str | Path | np.ndarray) else list(audio)
        if not items:
            raise InputError("no audio was given")
        names = [f"audio {i} ({a})" if isinstance(a, str | Path) else f"audio {i}" for i, a in enumerate(items)]
        waves = [_waveform(a, name, rate, spec) for a, name in zip(items, names, strict=True)]
        input_features = log_mel(waves, spec, mel_filters, names)
    try:
        input_features = torch.as_tensor(input_features, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:  # not numbers, or ragged
        raise InputError(f"input_features must be a float array [batch, mels, frames] ({first_line(e)})") from None
    if input_features.dim() != 3 or tuple(input_features.shape[1:]) != (spec.n_mels, frames):
        raise InputError(
            f"input_features must be [batch, {spec.n_mels}, {frames}] (30 s of log-mel frames), "
            f"got {list(input_features.shape)}"
        )
    if not torch.isfinite(input_features).all():
        raise InputError("input_features holds NaN or infinite values; compute them from finite audio")
    return input_features


def _waveform(audio, name: str, rate: int, spec: FeatureSpec):
    """A file read at its own rate, or an array at `rate`, as samples at the model's rate. An array to resample is
    checked, and refused when too long, first (an array said to be at 1 Hz would resample to gigabytes)."""
    if isinstance(audio, str | Path):
        return load_audio(audio, spec.sampling_rate, spec.chunk_length)
    if rate == spec.sampling_rate:
        return audio  # checked by log_mel
    samples = mono_waveform(audio, name)
    if samples.size > spec.chunk_length * rate:
        raise too_long(name, samples.size, rate, spec.chunk_length)
    return resample(samples, rate, spec.sampling_rate)


def decoder_prompt(defaults: dict, batch: int, language: str | None, task: str | None, detect) -> torch.Tensor:
    """int64 [B, P]: the decoder prompt of every input. `detect()` returns first-step logits [B, V]."""
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
    if no_timestamps is not None:
        prompt = torch.cat([prompt, torch.full((batch, 1), no_timestamps)], dim=1)
    return prompt.to(torch.int64)
