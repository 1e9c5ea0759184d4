"""The benchmark harness on tiny models: the built-in workloads' smoke profile and a user's bundle, each engine in
its own process; the decoder's measured cache against the formula; what it refuses and what it reports skipped."""

import json
import subprocess
import sys

import pytest
import torch

import el_export
from el_export.cli import main
from el_export.contract.cache import Workload, cache_bytes
from el_export.evaluation import bench
from el_export.testing.tiny import write_tiny_checkpoint


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
    out = tmp_path / "report"
    command = [sys.executable, "-m", "el_export.cli", "bench", "--profile", "smoke", "--workloads", "W1,W2", "--work",
               str(tmp_path / "work"), "--out", str(out), "--threads", "1", "--time-cap", "120", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["profile"] == "smoke" and report["skipped"] == {}
    runs = {r["engine"]: r for r in report["runs"]}
    assert {"el", "kv", "hf", "ct2-float32"} <= set(runs) and all(r["ok"] for r in runs.values())
    assert runs["el"]["cache_bytes_measured"] < runs["kv"]["cache_bytes_measured"]
    for mode in ("el", "kv"):  # the runtime's live decoder state is exactly what the cache formula says
        assert runs[mode]["cache_bytes_measured"] == runs[mode]["cache_bytes_formula"]
    summary = report["summary"]
    assert summary["W1/el"]["speedup_vs_hf"] > 0 and summary["W1/el"]["step_vs_limit"] > 0
    assert summary["W1/el"]["identical_to_hf"] == summary["W1/el"]["compared"] == 2
    assert all(report["w2"][e]["points"] for e in ("el", "kv"))
    assert (out / "bench.png").stat().st_size > 1000
    assert not list((tmp_path / "work").glob(".run-*"))  # the workers' jobs are cleaned up


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
