"""Reproduce the whole benchmark report: every workload, every engine, then the README's markdown tables.

    tools/optimum_env.sh                      # once: Optimum ONNX needs its own environment (transformers < 4.58)
    .venv/bin/python tools/bench_report.py    # about 30 minutes on 2 cores; graphs/bench/report/{bench.json,bench.png}

With --from-json, only the tables are printed from an existing bench.json.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("el", "el-static", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8", "optimum", "faster-whisper")


def tables(report: dict) -> str:
    summary, lines = report["summary"], []
    limits = report["limits"]
    step_gemm = limits.get("step_gemm_flops") or 0
    lines.append(f"Machine: {report['threads']} threads, fp32 GEMM {limits['gemm_flops'] / 1e9:.0f} GFLOP/s "
                 f"({step_gemm / 1e9:.0f} GFLOP/s at a decode step's shapes: 32 rows x 768 -> 3072, weights streamed "
                 "from memory), "
                 f"copy bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s.\n")  # fmt: skip
    lines.append("| workload | engine | total s | encoder s | decode-loop tokens/s | end-to-end tokens/s | vs HF "
                 "| vs CT2 fp32 | peak RSS GiB |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        if not run["ok"]:
            lines.append(f"| {run['workload']} | {run['engine']} | {run['reason']} | | | | | | |")
            continue
        s = summary[f"{run['workload']}/{run['engine']}"]
        fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        encoder = f"{run['encoder_s']:.2f}" if run["encoder_s"] is not None else "-"
        decode = run["total_s"] - run["encoder_s"] if run["encoder_s"] is not None else 0  # timed apart: noise
        loop = f"{run['generated_tokens'] / decode:.1f}" if decode > 0.05 * run["total_s"] else "-"
        lines.append(f"| {run['workload']} | {run['engine']} | {s['total_s']:.2f} | {encoder} | {loop} | "
                     f"{s['tokens_per_s']:.1f} | {fmt(s['speedup_vs_hf'])} | {fmt(s['speedup_vs_ct2_float32'])} | "
                     f"{s['peak_gib']:.2f} |")  # fmt: skip
    for engine, reason in report.get("skipped", {}).items():
        lines.append(f"| all | {engine} | skipped: {reason} | | | | | | |")
    lines.append("\n| W2: largest batch within 4 GiB | batch | tokens/s there | stopped by |")
    lines.append("|---|---|---|---|")
    for engine, w2 in report.get("w2", {}).items():
        best = next((p for p in w2["points"] if p["batch"] == w2["largest_batch"]), None)
        speed = f"{best['generated_tokens'] / best['total_s']:.1f}" if best else "-"
        lines.append(f"| {engine} | {w2['largest_batch']} | {speed} | {w2['stopped_by']} |")
    lines.append("\n| decode step (W1) | measured ms | least at the square-GEMM rate, ms | ratio "
                 "| least at the step-shape GEMM rate, ms | ratio |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")
    for mode in ("el", "kv"):
        s = summary.get(f"W1/{mode}", {})
        if "step_vs_limit" in s:
            rows = (f"{1e3 * s['step_limit_rows_s']:.1f} | {s['step_vs_limit_rows']:.2f}x" if "step_limit_rows_s" in s
                    else "- | -")  # fmt: skip
            lines.append(f"| {mode} | {1e3 * s['decode_step_s']:.1f} | {1e3 * s['step_limit_s']:.1f} | "
                         f"{s['step_vs_limit']:.2f}x | {rows} |")  # fmt: skip
    for key, value in summary.items():
        if key.startswith("W3/") and isinstance(value, dict) and "identical_transcripts" in value:
            lines.append(f"\n{key}: {value['identical_transcripts']}/{value['clips']} identical transcripts")
    lines += varied_tables(report)
    return "\n".join(lines)


def varied_tables(report: dict) -> list[str]:
    """W5 and W6 (one batch of varied output lengths): each engine's time against el's and its outputs against
    HF's, what in-flight batching buys (el-static over el) and W5's goal against CTranslate2 float32."""
    summary, lines = report["summary"], []
    for workload, compared in (("W5", "identical transcripts"), ("W6", "identical outputs")):
        runs = [r for r in report["runs"] if r["workload"] == workload and r["ok"]]
        if not runs:
            continue
        el = summary.get(f"{workload}/el")
        lines.append(f"\n| {workload} | total s | time / el's | {compared} (to HF) |")
        lines.append("|---|---|---|---|")
        for run in runs:
            s = summary[f"{workload}/{run['engine']}"]
            same = s.get("identical_transcripts", s.get("identical_to_hf"))
            if "not_compared" in s:
                same = f"not compared ({s['not_compared']})"
            elif same is not None:
                same = f"{same}/{s['compared']}"
            lines.append(f"| {run['engine']} | {s['total_s']:.2f} | "
                         f"{s['total_s'] / el['total_s'] if el else 0:.2f}x | {same or 'reference'} |")  # fmt: skip
        if ratio := summary.get(f"{workload}/el_vs_el_static"):
            lines.append(f"\n{workload}: el (in-flight batching) is {ratio:.2f}x as fast as el-static")
    if goal := summary.get("W5/el_vs_ct2_float32"):
        verdict = "met" if goal["met"] else "missed"
        lines.append(f"\nW5: el is {goal['speedup']:.2f}x as fast as CTranslate2 float32 (goal {goal['goal']}x: "
                     f"{verdict})")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", type=Path, help="print the tables of an existing bench.json")
    parser.add_argument("--out", type=Path, default=ROOT / "graphs" / "bench" / "report")
    args = parser.parse_args()
    if args.from_json is None:
        command = [sys.executable, "-m", "el_export.cli", "bench", "--out", str(args.out)]
        subprocess.run(command, check=True, cwd=ROOT)
        args.from_json = args.out / "bench.json"
    print(tables(json.loads(args.from_json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
