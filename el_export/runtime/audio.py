"""Audio in, Whisper's log-mel features out, at run time (torch only; no transformers).

The computation is `WhisperFeatureExtractor`'s torch path op for op (pad or cut to 30 s, periodic
Hann STFT, power, mel filters, log10, dynamic range of 8, (x + 4) / 4), with the mel filter bank
the exporter copied into the bundle, so the features are the ones HF computes. Audio at another sample rate
is resampled to the model's (`resample`), where HF's feature extractor refuses it.
"""

import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from el_export.errors import InputError, first_line

FORMATS = ("WAV", "WAVEX", "FLAC")  # libsndfile's names, read from the file's header (not its name)
ACCEPTED = "a WAV or FLAC file"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSpec:
    """What the manifest records about the feature extractor."""

    sampling_rate: int
    n_fft: int
    hop_length: int
    chunk_length: int  # seconds the encoder sees
    n_mels: int

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    def to_json(self) -> dict:
        return dict(vars(self))


def load_audio(
    source: str | Path | bytes,
    sampling_rate: int,
    max_seconds: float | None = None,
    limit: str | None = None,
    name: str | None = None,
) -> np.ndarray:
    """A WAV or FLAC file (its path, or its bytes) -> mono float32 samples at `sampling_rate`: a file at another
    rate is resampled (`resample`), with a one-line note on stderr (a warning of the `el_export.runtime.audio`
    logger: Python prints it when no logging is set up; pytest captures it). `name` is what errors call bytes
    (default "the audio bytes").

    Raises:
        InputError: a missing, unreadable, truncated or empty file, one of another format; one to resample that
            is longer than `max_seconds` (at any rate; `limit` says why, as `too_long`); one to resample that holds
            NaN or infinite samples (checked before resampling).
    """
    with _sound_file(source, sampling_rate, name) as (name, sound):
        _check_length(name, sound, max_seconds, limit)  # from the header: a 1 Hz header would resample to gigabytes
        samples, rate = sound.read(dtype="float32", always_2d=True), sound.samplerate
    samples = samples.mean(axis=1)  # mono
    if rate == sampling_rate:
        return samples
    samples = mono_waveform(samples, name)  # NaN would spread through the filter: count the file's own
    _log.warning("el-export: note: %s resampled from %d Hz to %d Hz", name, rate, sampling_rate)
    return resample(samples, rate, sampling_rate)


def read_audio_file(
    path: str | Path, sampling_rate: int, max_seconds: float | None = None, limit: str | None = None
) -> bytes:
    """The bytes of a WAV or FLAC file, for a reader on another machine (a Ray job's workers), checked from its
    header as `load_audio` checks it, and refused when the file is far larger than the samples its header declares
    (a short header in front of gigabytes would be read whole).

    Raises:
        InputError: what `load_audio` refuses that a header shows, a file past `max_seconds`, or one too large for
            its header.
    """
    with _sound_file(path, sampling_rate) as (name, sound):
        _check_length(name, sound, max_seconds, limit)
        frames, most = sound.frames, sound.frames * sound.channels * 8 + 2**20  # 64-bit samples, a MiB of tags
    with open(path, "rb") as f:
        data = f.read(most + 1)
    if len(data) > most:
        raise InputError(
            f"audio {name} holds more than {most} bytes, past what the {frames} samples its header declares "
            "can take; re-encode it (for example: sox in.wav out.flac)"
        )
    return data


def _check_length(name: str, sound, max_seconds: float | None, limit: str | None) -> None:
    """Refuse an open sound file whose header says it lasts more than `max_seconds`, before any of it is read."""
    if max_seconds is not None and sound.frames > max_seconds * sound.samplerate:
        raise too_long(name, sound.frames, sound.samplerate, max_seconds, limit)


def audio_seconds(path: str | Path, sampling_rate: int) -> float:
    """The duration of a WAV or FLAC file, from its header alone: many files checked, and a progress bar sized,
    before any is decoded. `sampling_rate` (the model's) only shapes the advice for a RAW file.

    Raises:
        InputError: what `load_audio` refuses that a header shows (missing, not a file, RAW, another format).
    """
    with _sound_file(path, sampling_rate) as (_, sound):
        return sound.frames / sound.samplerate


@contextmanager
def _sound_file(source: str | Path | bytes, sampling_rate: int, name: str | None = None):
    """(name, open soundfile.SoundFile) of a WAV or FLAC path or bytes (called `name`); libsndfile's errors in the
    block (an unreadable, empty or truncated file) become InputError."""
    import soundfile

    if isinstance(source, bytes):
        name, file = name or "the audio bytes", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"audio file {path} does not exist")
        if not path.is_file():
            raise InputError(f"audio {path} is not a file; give {ACCEPTED}")
        if path.suffix.lower() == ".raw":  # soundfile reads a *.raw name as headerless PCM, whatever it holds
            raise InputError(
                f"audio {path} is headerless RAW audio; give {ACCEPTED} (for example: sox -t raw -r {sampling_rate} "
                f"-e signed -b 16 -c 1 {path.name} out.wav)"
            )
        name, file = str(path), str(path)
    try:
        with soundfile.SoundFile(file) as sound:
            if sound.format not in FORMATS:
                raise InputError(f"audio {name} is {sound.format}; give {ACCEPTED}")
            yield name, sound
    except soundfile.LibsndfileError as e:  # not audio, empty, truncated
        raise InputError(f"cannot read audio {name} ({first_line(e)}); give {ACCEPTED}") from None


def resample(samples: np.ndarray, rate: int, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples at `rate` -> at `sampling_rate`, by soxr at quality "HQ". HF's WhisperFeatureExtractor
    refuses other rates, openai-whisper resamples with ffmpeg and faster-whisper with PyAV: soxr is one small
    wheel, and its HQ filter keeps the band below 8 kHz, all that 16 kHz features see, intact."""
    import soxr

    return soxr.resample(samples, rate, sampling_rate, quality="HQ").astype(np.float32, copy=False)


def mono_waveform(audio, name: str) -> np.ndarray:
    """A mono waveform as float32 samples, checked.

    Raises:
        InputError: not numbers, not one non-empty axis, or NaN or infinite samples.
    """
    try:
        audio = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError) as e:  # not numbers, or ragged
        raise InputError(f"{name} must be a mono waveform of numbers ({first_line(e)})") from None
    if audio.ndim != 1 or audio.size == 0:
        raise InputError(f"{name} must be a non-empty mono waveform, got shape {list(audio.shape)}")
    bad = int(audio.size - np.isfinite(audio).sum())
    if bad:  # one NaN turns every feature into NaN, and the transcript into noise
        raise InputError(f"{name} has {bad} NaN or infinite samples; give finite samples (-1 to 1)")
    return audio


def too_long(name: str, samples: int, rate: int, max_seconds: float, limit: str | None = None) -> InputError:
    """The refusal of audio past `max_seconds`, its duration shown to the first decimal that is past it; `limit`
    says what the limit is (default: the model's chunk)."""
    limit = limit or f"the model transcribes up to {max_seconds} s at once"
    return InputError(f"{name} is {_seconds_over(samples / rate, max_seconds)} s; {limit}: split it")


def log_mel(
    audios: list[np.ndarray], spec: FeatureSpec, mel_filters: torch.Tensor, names: list[str] | None = None
) -> torch.Tensor:
    """Mono float32 waveforms -> float32 features [B, n_mels, frames], each padded or cut to the chunk.
    `names` (default "audio i") are what errors call the inputs.

    Raises:
        InputError: an empty waveform, one with NaN or infinite samples, or one longer than the model's chunk
            (Whisper sees 30 s at once).
    """
    batch = np.zeros((len(audios), spec.n_samples), dtype=np.float32)
    for i, audio in enumerate(audios):
        name = names[i] if names else f"audio {i}"
        audio = mono_waveform(audio, name)
        if audio.size > spec.n_samples:
            raise too_long(name, audio.size, spec.sampling_rate, spec.chunk_length)
        batch[i, : audio.size] = audio
    return _log_mel(torch.from_numpy(batch), spec, mel_filters)


def log_mel_whole(audio: np.ndarray, spec: FeatureSpec, mel_filters: torch.Tensor, name: str) -> torch.Tensor:
    """One recording of any length -> float32 features [n_mels, samples // hop_length], computed over the recording
    as it is (no padding, one peak): what HF's feature extractor gives long-form generation (`truncation=False`).

    Raises:
        InputError: an empty waveform, or one with NaN or infinite samples.
    """
    return _log_mel(torch.from_numpy(mono_waveform(audio, name))[None], spec, mel_filters)[0]


def _log_mel(waveform: torch.Tensor, spec: FeatureSpec, mel_filters: torch.Tensor) -> torch.Tensor:
    """float32 [B, samples] -> [B, n_mels, samples // hop_length], `WhisperFeatureExtractor`'s torch path."""
    window = torch.hann_window(spec.n_fft)
    stft = torch.stft(waveform, spec.n_fft, spec.hop_length, window=window, return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()  # the last frame is dropped, as in HF
    mel_spec = mel_filters.T @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    peak = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0]  # per input
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def _seconds_over(seconds: float, limit: float) -> str:
    """The duration with the fewest decimals (at least one) that still shows it is past the limit: "30.01"."""
    for decimals in range(1, 7):
        text = f"{seconds:.{decimals}f}"
        if float(text) > limit:
            return text
    return repr(seconds)
