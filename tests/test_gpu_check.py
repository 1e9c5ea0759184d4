"""The GPU check script runs end to end on CPU with a tiny model (its smoke mode)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def test_gpu_check_smoke_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parity"]["passed"]
    paper = report["paper_setting"]
    for mode in ("el", "kv"):
        assert paper[f"{mode}_batch4"]["samples_per_s"] > 0
        assert paper[f"{mode}_largest"]["batch"] >= 4
