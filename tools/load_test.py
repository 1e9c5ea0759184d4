"""Load test: `el-export serve` with dynamic batching on and off, against offline batch generation.

The same N text inputs and generation parameters go through:
  offline, one at a time      `generate` per input, in this process
  offline, batched            `generate` on batches of --max-batch-size inputs, in this process
  served, dynamic batching    `el-export serve` on 127.0.0.1; --concurrency client threads send the N
  served, no batching         requests (one input each) as fast as answers come back
For each: throughput (inputs/s), p50 / p95 latency per request, and for the servers the mean batch
Triton executed (inferences / executions, from its metrics) and whether every answer equals offline
`generate` on that input; the 1-minute load average after each run shows whether something else was
competing for the CPU. Bounded: N requests, and each server run stops sending after --time-limit s.

    .venv/bin/python tools/load_test.py                      # a tiny BART bundle, exported on the fly
    .venv/bin/python tools/load_test.py graphs/bart-el --requests 128 --concurrency 16 --num-beams 4
"""

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

import el_export
from el_export.serving.process import free_ports, stop_process_group, wait_until_ready
from el_export.testing.tiny import CORPUS

HOST = "127.0.0.1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle with a tokenizer (default: a tiny BART)")
    parser.add_argument("--requests", type=int, default=64, help="inputs, one per request (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds each server run may send for")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..10000 and --concurrency 1..256")

    with tempfile.TemporaryDirectory(prefix="elx-load-") as tmp:
        bundle = args.bundle or _tiny_bundle(Path(tmp))
        generator = el_export.load(bundle)
        if generator.tokenizer is None:
            parser.error(f"{bundle} has no tokenizer: the load test sends text")
        texts = [f"{CORPUS[i % len(CORPUS)]} Request {i}." for i in range(args.requests)]
        parameters = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
        rows, expected = _offline(generator, texts, parameters, args.max_batch_size)
        for batching in (True, False):
            rows.append(_served(bundle, Path(tmp), texts, parameters, expected, batching, args))
    header = ("run", "inputs/s", "p50 ms", "p95 ms", "mean batch", "= offline", "load avg")
    print(f"{args.requests} inputs, {args.concurrency} clients, {parameters}, max batch {args.max_batch_size}, "
          f"queue delay {args.max_queue_delay_us} us, bundle {bundle if args.bundle else 'tiny BART'}")  # fmt: skip
    print("  ".join(f"{h:>12}" if i else f"{h:<26}" for i, h in enumerate(header)))
    for row in rows:
        batch = f"{row['mean_batch']:.2f}" if row["mean_batch"] else "-"
        cells = [row["run"], f"{row['throughput']:.1f}", _ms(row["p50"]), _ms(row["p95"]), batch, row["equal"],
                 f"{row['load']:.1f}"]  # fmt: skip
        print("  ".join(f"{c:>12}" if i else f"{c:<26}" for i, c in enumerate(cells)))
    if args.json:
        settings = vars(args) | {"bundle": str(args.bundle or "tiny BART"), "json": str(args.json)}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


def _tiny_bundle(root: Path) -> Path:
    from el_export.export import export_model, load_checkpoint
    from el_export.testing.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(root / "checkpoint")
    model, tokenizer = load_checkpoint(str(checkpoint))
    export_model(model, root / "bundle", tokenizer=tokenizer, progress=False)
    return root / "bundle"


def _offline(generator, texts: list[str], parameters: dict, batch_size: int) -> tuple[list[dict], list]:
    """Two offline runs; returns their rows and each input's sequences alone (what the servers must answer)."""
    generator.generate_text(texts[:2], **parameters)  # warm-up
    rows, alone = [], []
    for name, size in (("offline, one at a time", 1), (f"offline, batches of {batch_size}", batch_size)):
        latencies, start = [], time.perf_counter()
        for i in range(0, len(texts), size):
            began = time.perf_counter()
            input_ids, mask = generator.tokenizer.encode(texts[i : i + size])
            out = generator.generate(input_ids=input_ids, attention_mask=mask, **parameters)
            if size == 1:
                alone.append(out.sequences.numpy())
            latencies.extend([time.perf_counter() - began] * input_ids.shape[0])
        rows.append(_row(name, len(texts) / (time.perf_counter() - start), latencies, None, "-"))
    return rows, alone


def _served(bundle, tmp, texts, parameters, expected, batching: bool, args) -> dict:
    import tritonclient.http as http

    ports = free_ports(3)
    argv = [sys.executable, "-m", "el_export.cli", "serve", str(bundle), "--model-name", "load",
            "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us", str(args.max_queue_delay_us),
            "--max-num-beams", str(max(16, args.num_beams)),
            "--max-new-tokens-limit", str(max(512, args.max_new_tokens)),
            "--log-file", str(tmp / "triton.log")]  # fmt: skip
    if not batching:
        argv.append("--no-dynamic-batching")
    home = tempfile.mkdtemp(prefix="elx-")  # the server's socket: a short path
    log = tmp / f"serve-{batching}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TMPDIR": home})  # fmt: skip
    try:
        wait_until_ready(process, f"http://{HOST}:{ports[0]}/v2/models/load/ready", 120, log)
        url = f"{HOST}:{ports[0]}"
        _send(http.InferenceServerClient(url), texts[0], parameters)  # warm-up
        before = _metrics(ports[2])
        work: queue.Queue = queue.Queue()
        for i in range(len(texts)):
            work.put(i)
        latencies, answers, errors, deadline = [], {}, [], time.monotonic() + args.time_limit

        def client() -> None:
            connection = http.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
            while time.monotonic() < deadline:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    break
                began = time.perf_counter()
                try:
                    answers[i] = _send(connection, texts[i], parameters)
                except Exception as e:  # counted, and reported
                    errors.append(e)
                latencies.append(time.perf_counter() - began)
            connection.close()

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.time_limit + 120)
        elapsed = time.perf_counter() - start
        after = _metrics(ports[2])
    finally:
        stop_process_group(process)
        shutil.rmtree(home, ignore_errors=True)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    equal = sum(np.array_equal(answers[i][0], expected[i]) for i in answers)
    name = f"served, {'dynamic batching' if batching else 'no batching'}"
    note = f"{equal}/{len(texts)}" + (f" ({len(errors)} errors: {errors[0]})" if errors else "")
    return _row(name, len(answers) / elapsed, latencies, inferences / max(executions, 1), note)


def _send(client, text: str, parameters: dict) -> np.ndarray:
    import tritonclient.http as http

    tensor = http.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return client.infer("load", [tensor], parameters=parameters).as_numpy("sequences")


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    names = ("nv_inference_exec_count", "nv_inference_count")
    return {name: sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{")) for name in names}


def _row(run: str, throughput: float, latencies: list[float], mean_batch, equal: str) -> dict:
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"run": run, "throughput": throughput, "p50": statistics.median(latencies), "p95": q[18],
            "mean_batch": mean_batch, "equal": equal, "load": os.getloadavg()[0]}  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


if __name__ == "__main__":
    sys.exit(main())
