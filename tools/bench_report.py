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
INT8_ENGINES = ("el-int8", "ct2-int8")


def tables(report: dict) -> str:
    summary, lines = report["summary"], []
    limits = report["limits"]
    step_gemm, int8_gemm = limits.get("step_gemm_flops") or 0, limits.get("int8_step_gemm_flops") or 0
    lines.append(f"Machine: {report['threads']} threads, fp32 GEMM {limits['gemm_flops'] / 1e9:.0f} GFLOP/s "
                 f"({step_gemm / 1e9:.0f} GFLOP/s at a decode step's shapes: 32 rows x 768 -> 3072, weights streamed "
                 f"from memory; int8 {int8_gemm / 1e9:.0f} GOP/s there, MatMulIntegerToFloat u8 x s8), "
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
    if "step_vs_limit_int8" in (s := summary.get("W1/el-int8", {})):  # its int8 products at the int8 rate
        lines.append(f"| el-int8 | {1e3 * s['decode_step_s']:.1f} | - | - | {1e3 * s['step_limit_int8_s']:.1f} | "
                     f"{s['step_vs_limit_int8']:.2f}x |")  # fmt: skip
    for key, value in summary.items():
        if key.startswith("W3/") and isinstance(value, dict) and "clips" in value:
            lines.append(f"\n{key}: {value['identical_transcripts']}/{value['clips']} identical transcripts")
    lines += varied_tables(report)
    lines += int8_tables(report)
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


def int8_tables(report: dict) -> list[str]:
    """Each int8 engine beside float32 el and CTranslate2 int8 on every workload it ran: time, agreement with HF's
    float32 outputs (speech: transcripts and word error rate), weights on disk, peak RSS; then where el-int8's decode
    step spends its time (ONNX Runtime's per-op profile)."""
    summary, lines = report["summary"], []
    ran = [r["workload"] for r in report["runs"] if r["ok"] and r["engine"] in INT8_ENGINES]
    for workload in dict.fromkeys(ran):  # in run order
        ct2 = summary.get(f"{workload}/ct2-int8")
        lines.append(f"\n| {workload} int8 | total s | time / ct2-int8's | same as HF fp32 | WER vs HF fp32 "
                     "| weights MB | peak RSS GiB |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|")
        for engine in ("el", *INT8_ENGINES, "ct2-float32"):
            if (s := summary.get(f"{workload}/{engine}")) is None:
                continue
            same = s.get("identical_transcripts", s.get("identical_to_hf"))
            same = f"{same}/{s['compared']}" if same is not None else s.get("not_compared", "-")
            wer = f"{s['wer_vs_hf']:.1%}" if s.get("wer_vs_hf") is not None else "-"
            size = f"{s['model_bytes'] / 1e6:.1f}" if s.get("model_bytes") else "-"
            ratio = f"{s['total_s'] / ct2['total_s']:.2f}x" if ct2 else "-"
            lines.append(f"| {engine} | {s['total_s']:.2f} | {ratio} | {same} | {wer} | {size} | "
                         f"{s['peak_gib']:.2f} |")  # fmt: skip
    if step := report.get("int8_step"):
        p = step["profile"]
        lines.append(f"\nel-int8 decode step (recipe {step['recipe']}; int8 products are {step['int8_flop_share']:.0%} "
                     f"of its FLOPs), ONNX Runtime's profile of {p['steps']} steps ({p['batch']} inputs x "
                     f"{p['num_beams']} beams, source {p['source_len']}): {p['run_ms_per_step']:.1f} ms a step, "
                     f"{p['kernel_ms_per_step']:.1f} ms of it in kernels\n")  # fmt: skip
        lines.append("| op | ms / step | share of kernel time |")
        lines.append("|---|---|---|")
        for op in p["ops"]:
            lines.append(f"| {op['op']} | {op['ms_per_step']:.2f} | {op['share']:.1%} |")
        lines.append(f"| others | | {p['others_share']:.1%} |")
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
