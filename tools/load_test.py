"""Load test: `el-export serve` with in-flight and with group batching, against offline batch generation.

N text inputs, each with its own length (max_new_tokens = min_new_tokens drawn, seeded, from --new-tokens, so
lengths really vary on the random tiny model), go through:
  offline, alone              `generate` per input: the answer every other run must give (token ids equal)
  offline, batches            `generate_each` on batches of --max-batch-size inputs, in this process
  served, in-flight           `el-export serve --batching inflight` (its default instances: 8)
  served, group               `el-export serve --batching group` (one generate per parameter group, 1 instance)
Served runs are open-loop: requests (one input each) arrive as a seeded Poisson process of --rate inputs/s, each
sent at its arrival time from a thread pool large enough that none waits for a free client. The default rate
is 1.2x the offline batches' throughput measured just before, so the server is saturated. For each run:
throughput (inputs/s), p50 / p95 latency from arrival to answer, Triton's mean batch per model call (from its
metrics), whether every answer equals offline `generate` alone, and the 1-minute load average (whether something
else competed for the CPU); then the ratios in-flight / group and in-flight / offline. Bounded: N requests, and
each server run stops after --time-limit s.

    .venv/bin/python tools/load_test.py                      # a tiny BART bundle, exported on the fly
    .venv/bin/python tools/load_test.py graphs/bart-el --requests 128 --rate 40 --num-beams 4
"""

import argparse
import concurrent.futures
import json
import os
import random
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
    parser.add_argument("--rate", type=float, help="arrivals, inputs/s (default: 1.2x offline batches' throughput)")
    parser.add_argument("--new-tokens", default="4:48", help="max_new_tokens = min_new_tokens range, LO:HI")
    parser.add_argument("--seed", type=int, default=0, help="seeds the lengths and the arrivals")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds each server run may send for")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    args = parser.parse_args()
    low, _, high = args.new_tokens.partition(":")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        parser.error(f"--new-tokens {args.new_tokens}: give LO:HI, 1 <= LO <= HI")
    if not 1 <= args.requests <= 10_000 or (args.rate is not None and args.rate <= 0):
        parser.error("--requests must be 1..10000 and --rate above 0")
    draw = random.Random(args.seed)
    lengths = [draw.randint(int(low), int(high)) for _ in range(args.requests)]

    with tempfile.TemporaryDirectory(prefix="elx-load-") as tmp:
        bundle = args.bundle or _tiny_bundle(Path(tmp))
        generator = el_export.load(bundle)
        if generator.tokenizer is None:
            parser.error(f"{bundle} has no tokenizer: the load test sends text")
        texts = [f"{CORPUS[i % len(CORPUS)]} Request {i}." for i in range(args.requests)]
        parameters = [{"num_beams": args.num_beams, "max_new_tokens": n, "min_new_tokens": n} for n in lengths]
        rows, expected = _offline(generator, texts, parameters, args.max_batch_size)
        rate = args.rate or 1.2 * rows[-1]["throughput"]
        gaps = [draw.expovariate(rate) for _ in texts]
        arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]
        for batching in ("inflight", "group"):
            rows.append(_served(bundle, Path(tmp), texts, parameters, expected, arrivals, batching, args))
    header = ("run", "inputs/s", "p50 ms", "p95 ms", "mean batch", "= offline", "load avg")
    print(f"{args.requests} inputs arriving at {rate:.1f}/s (Poisson, seed {args.seed}), num_beams {args.num_beams}, "
          f"new tokens {args.new_tokens}, max batch {args.max_batch_size}, queue delay {args.max_queue_delay_us} us, "
          f"bundle {bundle if args.bundle else 'tiny BART'}")  # fmt: skip
    print("  ".join(f"{h:>12}" if i else f"{h:<26}" for i, h in enumerate(header)))
    for row in rows:
        batch = f"{row['mean_batch']:.2f}" if row["mean_batch"] else "-"
        cells = [row["run"], f"{row['throughput']:.1f}", _ms(row["p50"]), _ms(row["p95"]), batch, row["equal"],
                 f"{row['load']:.1f}"]  # fmt: skip
        print("  ".join(f"{c:>12}" if i else f"{c:<26}" for i, c in enumerate(cells)))
    offline, inflight, group = rows[1], rows[2], rows[3]
    ratios = {"in-flight / group throughput": inflight["throughput"] / group["throughput"],
              "in-flight / group p95": inflight["p95"] / group["p95"],
              "in-flight / offline throughput": inflight["throughput"] / offline["throughput"]}  # fmt: skip
    print("; ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))
    if args.json:
        settings = vars(args) | {"bundle": str(args.bundle or "tiny BART"), "json": str(args.json), "rate": rate}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows, "ratios": ratios}, indent=2))
    return 0


def _tiny_bundle(root: Path) -> Path:
    from el_export.export import export_model, load_checkpoint
    from el_export.testing.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(root / "checkpoint")
    model, tokenizer = load_checkpoint(str(checkpoint))
    export_model(model, root / "bundle", tokenizer=tokenizer, progress=False)
    return root / "bundle"


def _offline(generator, texts: list[str], parameters: list[dict], batch_size: int) -> tuple[list[dict], list]:
    """Offline runs, alone then in batches; returns their rows and each input's sequences alone (what every other
    run must answer)."""
    calls = []
    for text, kwargs in zip(texts, parameters, strict=True):
        input_ids, mask = generator.tokenizer.encode([text])
        calls.append({"input_ids": input_ids, "attention_mask": mask, **kwargs})
    generator.generate_each(calls[:2])  # warm-up
    latencies, alone, start = [], [], time.perf_counter()
    for call in calls:
        began = time.perf_counter()
        alone.append(generator.generate(**call).sequences.numpy())
        latencies.append(time.perf_counter() - began)
    rows = [_row("offline, alone", len(texts) / (time.perf_counter() - start), latencies, None, "-")]
    latencies, equal, start = [], 0, time.perf_counter()
    for i in range(0, len(calls), batch_size):
        began = time.perf_counter()
        outputs = generator.generate_each(calls[i : i + batch_size])
        latencies.extend([time.perf_counter() - began] * len(outputs))
        equal += sum(np.array_equal(o.sequences.numpy(), alone[i + j]) for j, o in enumerate(outputs))
    elapsed = time.perf_counter() - start
    name, note = f"offline, batches of {batch_size}", f"{equal}/{len(texts)}"
    rows.append(_row(name, len(texts) / elapsed, latencies, None, note))
    return rows, alone


def _served(bundle, tmp, texts, parameters, expected, arrivals, batching: str, args) -> dict:
    import tritonclient.http as http

    ports = free_ports(3)
    argv = [sys.executable, "-m", "el_export.cli", "serve", str(bundle), "--model-name", "load",
            "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--batching", batching,
            "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us", str(args.max_queue_delay_us),
            "--max-num-beams", str(max(16, args.num_beams)),
            "--max-new-tokens-limit", str(max(512, *(p["max_new_tokens"] for p in parameters))),
            "--log-file", str(tmp / "triton.log")]  # fmt: skip
    home = tempfile.mkdtemp(prefix="elx-")  # the server's socket: a short path
    log = tmp / f"serve-{batching}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TMPDIR": home})  # fmt: skip
    clients = threading.local()  # one connection per pool thread (a client is not thread-safe)
    try:
        wait_until_ready(process, f"http://{HOST}:{ports[0]}/v2/models/load/ready", 120, log)
        url = f"{HOST}:{ports[0]}"
        _send(http.InferenceServerClient(url), texts[0], parameters[0])  # warm-up
        before = _metrics(ports[2])
        latencies, answers, errors = [], {}, []
        start = time.perf_counter()
        deadline = start + args.time_limit

        def client(i: int) -> None:
            time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            if time.perf_counter() > deadline:
                return
            if not hasattr(clients, "connection"):
                clients.connection = http.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
            try:
                answers[i] = _send(clients.connection, texts[i], parameters[i])
                latencies.append(time.perf_counter() - (start + arrivals[i]))  # from arrival: queueing counts
            except Exception as e:  # counted, and reported
                errors.append(e)

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(256, len(texts))) as pool:
            list(pool.map(client, range(len(texts))))
        elapsed = time.perf_counter() - start
        after = _metrics(ports[2])
    finally:
        stop_process_group(process)
        shutil.rmtree(home, ignore_errors=True)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    equal = sum(np.array_equal(answers[i][0], expected[i]) for i in answers)
    note = f"{equal}/{len(texts)}" + (f" ({len(errors)} errors: {errors[0]})" if errors else "")
    return _row(f"served, {batching}", len(answers) / elapsed, latencies, inferences / max(executions, 1), note)


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
