"""The benchmark harness end to end on tiny models (its smoke run): every engine in its own process."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_smoke_run(tmp_path):
    pytest.importorskip("ctranslate2")
    env = {**os.environ, "EL_EXPORT_BENCH_TINY": "1"}
    out = tmp_path / "report"
    command = [sys.executable, "-m", "el_export.cli", "bench", "--workloads", "W1,W2", "--work", str(tmp_path / "work"),
               "--out", str(out), "--threads", "1", "--time-cap", "120", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    runs = {r["engine"]: r for r in report["runs"]}
    assert {"el", "kv", "hf", "ct2-float32"} <= set(runs) and all(r["ok"] for r in runs.values())
    assert runs["el"]["cache_bytes_measured"] < runs["kv"]["cache_bytes_measured"]
    # the runtime's measured decoder state agrees with the cache formula (masks and positions aside)
    assert (
        abs(runs["kv"]["cache_bytes_measured"] - runs["kv"]["cache_bytes_formula"])
        < 0.05 * runs["kv"]["cache_bytes_formula"]
    )
    summary = report["summary"]
    assert summary["W1/el"]["speedup_vs_hf"] > 0 and summary["W1/el"]["step_vs_limit"] > 0
    assert all(report["w2"][e]["points"] for e in ("el", "kv"))
    assert (out / "bench.png").stat().st_size > 1000
