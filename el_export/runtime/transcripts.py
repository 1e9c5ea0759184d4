"""Transcripts of long audio, and the files they are written to: txt, srt, vtt and json.

The writers follow openai-whisper's `whisper/utils.py` (its `WriteTXT`, `WriteSRT`, `WriteVTT`, `WriteJSON` and
`format_timestamp`: milliseconds rounded half to even by `round`, hours always shown in SRT and from the first
hour on in VTT, "-->" in a cue written "->"). Where they differ, on purpose:
- srt/vtt skip a segment whose text is empty (openai writes a cue with no text, which reads as a cue break), keep
  a cue's text free of blank lines, and with word timestamps keep one cue per segment timed by its first and last
  word as openai does, but write the segment's text (openai joins the words, "-->" left in) and time a segment
  without words by its own bounds (openai drops it);
- txt writes a segment's lines as one line ("one segment per line" holds for any text);
- json is UTF-8 (openai escapes non-ASCII), refuses NaN, ends with a newline, and adds "duration".
Every file is rendered before any is written, and written beside its destination and renamed over it.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from el_export.contract.files import replace_files
from el_export.errors import ElExportError, InputError, InvalidArgumentError

AUDIO_SUFFIXES = (".wav", ".flac")  # what a directory argument contributes; a file named itself may be any name


@dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the audio
    end: float
    word: str  # with its leading space, as Whisper decodes it
    probability: float | None = None


@dataclass(frozen=True)
class Segment:
    id: int
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: tuple[int, ...]
    words: tuple[Word, ...] | None = None  # None: no word timestamps were asked for


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: tuple[Segment, ...]
    duration: float  # seconds of audio transcribed
    language: str | None = None  # the language transcribed ("en"), given or detected; None: not known

    def to_json(self) -> dict:
        """openai-whisper's result layout (text, segments, language), plus the duration."""
        segments = []
        for s in self.segments:
            segment = {"id": s.id, "start": s.start, "end": s.end, "text": s.text, "tokens": list(s.tokens)}
            if s.words is not None:
                segment["words"] = [
                    {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability} for w in s.words
                ]
            segments.append(segment)
        return {"text": self.text, "segments": segments, "language": self.language, "duration": self.duration}

    @classmethod
    def from_json(cls, data: dict) -> "Transcript":
        """The inverse of `to_json`."""
        segments = []
        for s in data["segments"]:
            words = None if "words" not in s else tuple(Word(**w) for w in s["words"])
            segments.append(Segment(s["id"], s["start"], s["end"], s["text"], tuple(s["tokens"]), words))
        return cls(data["text"], tuple(segments), data["duration"], data["language"])


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """openai-whisper's: [HH:]MM:SS.mmm, milliseconds by `round` (half to even), hours past 99 in more digits."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"a timestamp must be a finite number of seconds >= 0, got {seconds}")
    milliseconds = round(seconds * 1000.0)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{seconds:02d}{decimal_marker}{milliseconds:03d}"


def to_txt(transcript: Transcript) -> str:
    return "".join(" ".join(_lines(s.text)) + "\n" for s in transcript.segments)


def to_srt(transcript: Transcript) -> str:
    cues = _cues(transcript, always_include_hours=True, decimal_marker=",")
    return "".join(f"{i}\n{start} --> {end}\n{text}\n\n" for i, (start, end, text) in enumerate(cues, start=1))


def to_vtt(transcript: Transcript) -> str:
    cues = _cues(transcript, always_include_hours=False, decimal_marker=".")
    return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in cues)


def to_json_text(transcript: Transcript) -> str:
    import json

    return json.dumps(transcript.to_json(), ensure_ascii=False, allow_nan=False) + "\n"


FORMATS: dict[str, Callable[[Transcript], str]] = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json_text}


def _lines(text: str) -> list[str]:
    """The non-blank lines of a segment's text, stripped: a blank line inside a cue would end it."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _cues(transcript: Transcript, always_include_hours: bool, decimal_marker: str) -> list[tuple[str, str, str]]:
    """(start, end, text) of each segment with text; timed by its words when it has them, as openai times them."""
    cues = []
    for s in transcript.segments:
        text = "\n".join(_lines(s.text.replace("-->", "->")))
        if not text:
            continue
        start, end = (s.words[0].start, s.words[-1].end) if s.words else (s.start, s.end)
        stamp = lambda t: format_timestamp(t, always_include_hours, decimal_marker)  # noqa: E731
        cues.append((stamp(start), stamp(end), text))
    return cues


def write_transcript(transcript: Transcript, out_dir: str | Path, stem: str, formats: Iterable[str]) -> list[Path]:
    """Write `<out_dir>/<stem>.<format>` for each format: all rendered first, each written whole (beside it, then
    renamed over it), so a failure leaves no file half-written and no format of this transcript changed.

    Returns:
        The paths written, in the order of `formats`.

    Raises:
        InvalidArgumentError: an unknown format, or a file that cannot be written (the OS's reason).
    """
    formats = list(formats)
    if unknown := [f for f in formats if f not in FORMATS]:
        raise InvalidArgumentError(f"unknown transcript format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    contents = {out_dir / f"{stem}.{f}": FORMATS[f](transcript).encode("utf-8") for f in formats}
    try:
        replace_files(contents)
    except OSError as e:
        raise InvalidArgumentError(
            f"cannot write {e.filename or out_dir} ({e.strerror or e}); free space or choose another output directory"
        ) from None
    return list(contents)


@dataclass(frozen=True)
class AudioFile:
    path: Path
    seconds: float  # from its header


def find_audio(
    arguments: Iterable[str | Path], sampling_rate: int, on_skip: Callable[[Path, str], None] = lambda path, why: None
) -> list[AudioFile]:
    """The audio files to transcribe, each header read and checked before any is decoded: each file argument, and
    each WAV/FLAC inside a directory argument (sorted, not recursive; anything else there goes to `on_skip`).

    Raises:
        InputError: a missing argument, a file that is not WAV or FLAC, a directory without audio, or two inputs of
            one stem (their transcripts would overwrite each other).
    """
    from el_export.runtime.audio import audio_seconds

    paths = []
    for argument in map(Path, arguments):
        if not argument.is_dir():
            paths.append(argument)
            continue
        found = []
        for entry in sorted(argument.iterdir()):
            if entry.is_file() and entry.suffix.lower() in AUDIO_SUFFIXES:
                found.append(entry)
            else:
                on_skip(entry, "a directory (not searched)" if entry.is_dir() else "not a .wav or .flac file")
        if not found:
            raise InputError(f"directory {argument} holds no .wav or .flac file; give a directory of audio files")
        paths.extend(found)
    seen: dict[str, Path] = {}
    for path in paths:
        if (other := seen.setdefault(path.stem, path)) is not path:
            raise InputError(
                f"{other} and {path} would both be written as {path.stem}.*: rename one, or transcribe them apart"
            )
    return [AudioFile(path, audio_seconds(path, sampling_rate)) for path in paths]


def transcribe_files(
    generator,
    files: list[AudioFile],
    out_dir: str | Path,
    formats: Iterable[str],
    batch_size: int = 8,
    on_progress: Callable[[float, float], None] | None = None,
    **transcribe_kwargs,
) -> list[Path]:
    """Transcribe `files` in groups of `batch_size` (one `generator.transcribe` call each, so their windows share
    the running batch) and write each group's transcripts as soon as it ends.

    Args:
        on_progress: called with (seconds of audio done, seconds in all the files).

    Returns:
        Every path written.

    Raises:
        ElExportError: the first failure, of its type, its message saying how many inputs were written before it
            (each whole, in every format); nothing is written for the input that failed, or for any after it.
    """
    formats, out_dir, written = list(formats), Path(out_dir), []
    total, done = sum(f.seconds for f in files), 0.0
    for first in range(0, len(files), batch_size):
        group = files[first : first + batch_size]
        kwargs = dict(transcribe_kwargs)
        if on_progress is not None:
            kwargs["on_progress"] = lambda seconds, _, base=done: on_progress(base + seconds, total)
        try:
            transcripts = generator.transcribe([str(f.path) for f in group], **kwargs)
            for file, transcript in zip(group, transcripts, strict=True):
                written += write_transcript(transcript, out_dir, file.path.stem, formats)
        except ElExportError as e:
            if not written:
                raise
            raise type(e)(f"{e} (written before it: {len(written) // len(formats)} of {len(files)} inputs)") from None
        done += sum(f.seconds for f in group)
    return written
