"""Speech models (Whisper): audio to features, and the decoder prompt HF's Whisper `generate` builds.

The prompt for short-form audio (<= 30 s), as transformers 5.23's `_retrieve_init_tokens` builds it:
[decoder_start] + [language] + [task] + [no_timestamps]. English-only models take no language or task.
A multilingual model without a given language detects it per input from the first step's logits over
the language tokens, as HF's `detect_language` does. Timestamps are not predicted (no_timestamps).
"""

from pathlib import Path

import numpy as np
import torch

from el_export.errors import InputError, InvalidArgumentError, first_line
from el_export.runtime.audio import FeatureSpec, load_audio, log_mel


def features(manifest, mel_filters: torch.Tensor | None, input_features=None, audio=None):
    """input_features as given (checked), or computed from audio: paths, or float32 mono arrays at 16 kHz."""
    spec = FeatureSpec(**{k: v for k, v in manifest.audio.items() if k != "mel_filters"})
    frames = manifest.graphs["encoder"].input("input_features").shape[2]
    if (input_features is None) == (audio is None):
        raise InvalidArgumentError("give either input_features or audio (file paths or 16 kHz mono arrays)")
    if audio is not None:
        items = [audio] if isinstance(audio, str | Path | np.ndarray) else list(audio)
        if not items:
            raise InputError("no audio was given")
        waves = [load_audio(a, spec.sampling_rate) if isinstance(a, str | Path) else a for a in items]
        names = [f"audio {i} ({a})" if isinstance(a, str | Path) else f"audio {i}" for i, a in enumerate(items)]
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
