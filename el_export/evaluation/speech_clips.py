"""W5's clips: our own English sentences spoken by espeak-ng, 16 kHz mono 16-bit WAV, made at bench time.

Real work has outputs of varied lengths; these clips (0.5 to 12 s, from two words to 35) make a batch whose
transcripts end at very different steps, with text we wrote ourselves (no data set to fetch, no licence to
check). They are made once into a directory and reused: `clips.json` records the sha256 of the sentences (all
clips are made again when they change) and of each clip (a clip whose bytes changed is made again). W7's long
recordings (long_speech.py) are spoken and cached by the same functions.
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from el_export.contract.files import sha256
from el_export.errors import InputError, first_line

SAMPLING_RATE = 16_000
SHORTEST_S, LONGEST_S = 0.5, 12.0
RECORD = "clips.json"
INSTALL = "apt-get install espeak-ng"
# Ordinary English of varied length: numbers, names, times, punctuation. Each clip must last 0.5 to 12 s.
SENTENCES = (
    "Good morning.",
    "Turn left at the lights.",
    "The meeting starts at nine thirty.",
    "Anna sent the report to Mr. Patel on Friday.",
    "Please call me back when you get this message, thanks.",
    "The train to Boston leaves from platform four at 6:45 in the evening.",
    "If it rains tomorrow, the picnic will move indoors to the hall on Main Street.",
    "Dr. Garcia said the results were good, but she wants to see us again in two weeks.",
    "We sold 1,250 tickets in the first hour, which is twice as many as last year.",
    "My sister moved to Berlin last spring, and she says the winters there are colder than she expected.",
    "The bridge, which opened in 1932, carries about forty thousand cars across the river every day.",
    "The library on Elm Road is open from ten to six on weekdays, and from noon to four on Saturdays and Sundays.",
    "When the storm finally passed, the neighbours came out to clear the fallen branches, and by evening the street "
    "was open again.",
    "According to the new plan, the company will hire 300 engineers over the next three years, most of them in "
    "London, Paris and Madrid.",
    "Thomas checked the map twice, packed some water and a few sandwiches, and then set off up the hill, hoping to "
    "reach the old stone tower before the sun went down.",
    "On the first Monday of every month, the twelve members of the garden club meet at Linda's house on Oak Avenue "
    "to swap seeds, share recipes, and argue about whose tomatoes grew the largest.",
)


def build_clips(directory: Path, sentences: tuple[str, ...] = SENTENCES) -> list[Path]:
    """One WAV per sentence in `directory` (00.wav, 01.wav, ...), made only where missing, changed, or made from
    other sentences.

    Returns:
        The clips, in the sentences' order.

    Raises:
        InputError: espeak-ng is not installed, fails, or speaks a sentence outside 0.5-12 s.
    """
    return build_cached(directory, sentences, _write_clip)


def build_cached(directory: Path, texts: tuple, write: Callable) -> list[Path]:
    """`write(text, path)` for each of `texts` into `directory` (00.wav, 01.wav, ...), only where the file is missing,
    its bytes changed, or it was made from other texts; files of texts no longer listed are removed.

    `texts` are JSON values (a sentence, a recording's paragraphs and pauses): the record holds the sha256 of all of
    them and of each file made.
    """
    directory.mkdir(parents=True, exist_ok=True)
    record_path = directory / RECORD
    key = _texts_sha256(texts)
    record = _read_record(record_path)
    if record.get("texts_sha256") != key:
        record = {"texts_sha256": key, "texts": list(texts), "files": {}}
    files = [directory / f"{i:02d}.wav" for i in range(len(texts))]
    for path, text in zip(files, texts, strict=True):
        if not path.is_file() or sha256(path) != record["files"].get(path.name):
            write(text, path)
            record["files"][path.name] = sha256(path)
    for stale in set(directory.glob("*.wav")) - set(files):  # files of texts no longer in the list
        stale.unlink()
    record["files"] = {path.name: record["files"][path.name] for path in files}
    record_path.write_text(json.dumps(record, indent=1))
    return files


def clip_seconds(clip: Path) -> float:
    import soundfile

    return soundfile.info(str(clip)).duration


def speak(text: str, scratch: Path) -> np.ndarray:
    """espeak-ng's 22050 Hz speech of `text`, resampled to 16 kHz mono float32 in [-1, 1]; `scratch` holds its WAV.

    Raises:
        InputError: espeak-ng is not installed, fails, or writes no readable WAV.
    """
    import soundfile

    from el_export.runtime.audio import mono_waveform, resample

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise InputError(f"espeak-ng is not installed; the bench speaks its recordings with it: {INSTALL}")
    spoken = scratch / "espeak.wav"
    result = subprocess.run([espeak, "-v", "en-us", "-w", str(spoken), "--stdin"], input=text, capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0 or not spoken.is_file():
        raise InputError(f"espeak-ng failed on {text[:80]!r} ({(result.stderr.strip() or 'no output')[:200]}); "
                         f"reinstall it: {INSTALL}")  # fmt: skip
    try:
        samples, rate = soundfile.read(str(spoken), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise InputError(f"espeak-ng wrote no readable WAV for {text[:80]!r} ({first_line(e)}); reinstall it: "
                         f"{INSTALL}") from None  # fmt: skip
    waveform = mono_waveform(samples.mean(axis=1), f"espeak-ng's speech of {text[:80]!r}")
    return np.clip(resample(waveform, rate, SAMPLING_RATE), -1.0, 1.0)


def write_wav(waveform: np.ndarray, path: Path) -> None:
    """16 kHz mono 16-bit, written beside `path` and renamed over it, so an interrupted run leaves no half file."""
    import soundfile

    written = path.with_name(f".{path.name}.partial")
    soundfile.write(str(written), waveform, SAMPLING_RATE, subtype="PCM_16", format="WAV")
    written.replace(path)


def _texts_sha256(texts: tuple) -> str:
    """Of the texts and the format they are written in: either changed, every file is made again."""
    return hashlib.sha256(json.dumps([SAMPLING_RATE, "PCM_16", *texts]).encode()).hexdigest()


def _read_record(path: Path) -> dict:
    """The record of the files made before; {} when there is none or it is unreadable (all are made again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else {}


def _write_clip(text: str, clip: Path) -> None:
    """`text` spoken into `clip`, its duration checked against W5's range."""
    with tempfile.TemporaryDirectory(dir=clip.parent, prefix=".speak-") as scratch:
        waveform = speak(text, Path(scratch))
    seconds = waveform.size / SAMPLING_RATE
    if not SHORTEST_S <= seconds <= LONGEST_S:
        raise InputError(f"espeak-ng speaks {text!r} in {seconds:.2f} s, outside W5's {SHORTEST_S}-{LONGEST_S} s; "
                         "shorten or lengthen the sentence")  # fmt: skip
    write_wav(waveform, clip)
