"""W5's clips: our own English sentences spoken by espeak-ng, 16 kHz mono 16-bit WAV, made at bench time.

Real work has outputs of varied lengths; these clips (0.5 to 12 s, from two words to 35) make a batch whose
transcripts end at very different steps, with text we wrote ourselves (no data set to fetch, no licence to
check). They are made once into a directory and reused: `clips.json` records the sha256 of the sentences (all
clips are made again when they change) and of each clip (a clip whose bytes changed is made again).
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
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
    directory.mkdir(parents=True, exist_ok=True)
    record_path = directory / RECORD
    key = _sentences_sha256(sentences)
    record = _read_record(record_path)
    if record.get("sentences_sha256") != key:
        record = {"sentences_sha256": key, "sentences": list(sentences), "clips": {}}
    clips = [directory / f"{i:02d}.wav" for i in range(len(sentences))]
    for clip, text in zip(clips, sentences, strict=True):
        if not clip.is_file() or sha256(clip) != record["clips"].get(clip.name):
            _speak(text, clip)
            record["clips"][clip.name] = sha256(clip)
    for stale in set(directory.glob("*.wav")) - set(clips):  # clips of sentences no longer in the list
        stale.unlink()
    record["clips"] = {clip.name: record["clips"][clip.name] for clip in clips}
    record_path.write_text(json.dumps(record, indent=1))
    return clips


def clip_seconds(clip: Path) -> float:
    import soundfile

    return soundfile.info(str(clip)).duration


def _sentences_sha256(sentences: tuple[str, ...]) -> str:
    """Of the sentences and the format they are written in: either changed, every clip is made again."""
    return hashlib.sha256(json.dumps([SAMPLING_RATE, "PCM_16", *sentences]).encode()).hexdigest()


def _read_record(path: Path) -> dict:
    """The record of the clips made before; {} when there is none or it is unreadable (all are made again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("clips"), dict) else {}


def _speak(text: str, clip: Path) -> None:
    """espeak-ng's 22050 Hz speech of `text` -> `clip`, resampled to 16 kHz mono 16-bit, its duration checked.
    Written beside the clip and renamed over it, so an interrupted run leaves no half clip."""
    import soundfile

    from el_export.runtime.audio import mono_waveform, resample

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise InputError(f"espeak-ng is not installed; W5 speaks its clips with it: {INSTALL}")
    with tempfile.TemporaryDirectory(dir=clip.parent, prefix=".speak-") as scratch:
        spoken, written = Path(scratch) / "espeak.wav", Path(scratch) / clip.name
        result = subprocess.run([espeak, "-v", "en-us", "-w", str(spoken), "--stdin"], input=text,
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0 or not spoken.is_file():
            raise InputError(f"espeak-ng failed on {text!r} ({(result.stderr.strip() or 'no output')[:200]}); "
                             f"reinstall it: {INSTALL}")  # fmt: skip
        try:
            samples, rate = soundfile.read(str(spoken), dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as e:
            raise InputError(f"espeak-ng wrote no readable WAV for {text!r} ({first_line(e)}); reinstall it: "
                             f"{INSTALL}") from None  # fmt: skip
        waveform = mono_waveform(samples.mean(axis=1), f"espeak-ng's speech of {text!r}")
        waveform = np.clip(resample(waveform, rate, SAMPLING_RATE), -1.0, 1.0)
        seconds = waveform.size / SAMPLING_RATE
        if not SHORTEST_S <= seconds <= LONGEST_S:
            raise InputError(f"espeak-ng speaks {text!r} in {seconds:.2f} s, outside W5's {SHORTEST_S}-{LONGEST_S} s; "
                             "shorten or lengthen the sentence")  # fmt: skip
        soundfile.write(str(written), waveform, SAMPLING_RATE, subtype="PCM_16")
        written.replace(clip)
