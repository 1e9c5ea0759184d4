"""--mode auto: both decoders exported and timed on the workload, the faster kept, the choice recorded."""

import json

import pytest

import el_export
from el_export.cli import main
from el_export.contract.files import read_manifest
from el_export.errors import BundleError
from el_export.export import auto, export_model
from el_export.testing.tiny import SPEECH


def test_cli_keeps_the_faster_mode_and_records_both_timings(checkpoint, cli_bundle, tmp_path, capsys):
    out = tmp_path / "auto"
    argv = ["export", str(checkpoint), "--out", str(out), "--mode", "auto", "--batch-size", "2", "--num-beams", "3",
            "--source-len", "16", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out)
    choice = manifest.mode_choice
    assert choice["chosen"] == manifest.mode == min(choice["seconds"], key=choice["seconds"].get)
    assert choice["workload"] == {"batch_size": 2, "num_beams": 3, "source_len": 16, "new_tokens": 16}
    assert choice["threads"] == 1 and all(s > 0 for s in choice["seconds"].values())
    assert f"kept {manifest.mode}" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["auto"]  # the other mode's export is gone
    texts = ["the quick brown fox", "jumps"]
    assert el_export.load(out).generate_text(texts, num_beams=3) == el_export.load(cli_bundle).generate_text(
        texts, num_beams=3
    )


@pytest.mark.parametrize("faster", ["el", "kv"])
def test_the_choice_follows_the_measurement(faster, hf_models, tmp_path, monkeypatch):
    timed = []

    def fake_time(bundle, workload, threads=None, repeats=2):
        timed.append((read_manifest(bundle).mode, workload))
        return 1.0 if read_manifest(bundle).mode == faster else 2.0

    monkeypatch.setattr(auto, "time_bundle", fake_time)
    manifest = export_model(hf_models("gpt2"), tmp_path / "b", mode="auto", progress=False)
    assert manifest.mode == faster == read_manifest(tmp_path / "b").mode
    assert [mode for mode, _ in timed] == ["el", "kv"]
    # defaults: source cut so that prompt + new tokens fit GPT-2's 64 positions
    assert timed[0][1] == auto.Workload(batch_size=8, num_beams=4, source_len=48, new_tokens=16)


def test_speech_models_are_timed_on_audio_features(hf_models, tmp_path):
    manifest = export_model(hf_models(SPEECH[0]), tmp_path / "w", mode="auto", progress=False,
                            auto_workload={"batch_size": 1, "num_beams": 2, "new_tokens": 4}, threads=1)  # fmt: skip
    assert manifest.mode_choice["chosen"] == manifest.mode and set(manifest.mode_choice["seconds"]) == {"el", "kv"}
    assert manifest.mode_choice["workload"]["source_len"] == 40  # the encoder's frames (tiny: 80 mel frames / 2)


def test_a_workload_past_the_positions_is_refused_and_nothing_is_left(checkpoint, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["export", str(checkpoint), "--out", str(out), "--mode", "auto", "--source-len", "1000"]) == 2
    assert "does not fit the model's 64 positions" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_workload_flags_need_auto(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "b"), "--batch-size", "4"]) == 2
    assert "--batch-size only apply to --mode auto" in capsys.readouterr().err


def test_a_choice_that_disagrees_with_the_mode_is_refused(cli_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cli_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["mode_choice"] = {"chosen": "kv", "seconds": {"el": 2.0, "kv": 1.0}}
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="mode_choice chose 'kv' but the bundle's mode is 'el'"):
        read_manifest(copy)
