"""`generate --ray`: the JSONL job on a Ray cluster of three nodes on 127.0.0.1 (a head without CPUs for workers,
two nodes of 2 CPUs), started and stopped by this module. The job's records must be the single-machine job's,
record for record, with a worker node SIGKILLed mid-job and with the driver killed and rerun."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from el_export.cli import main
from el_export.errors import BundleError, InputError
from el_export.tolerance import REBATCHED_SCORE_TOLERANCE

pytest.importorskip("ray")  # the [ray] extra (in [dev])
from el_export.testing.ray_cluster import LocalCluster, _cmdline

SETTINGS = ["--num-beams", "2", "--max-new-tokens", "40", "--batch-size", "2"]
CLIPS = Path(__file__).parents[2] / "el_export" / "clips"
JOB_SECONDS = 300  # any one job run here; a cluster node joins within LocalCluster's 120 s


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(head_cpus=0) as running:
        running.add_node(2)
        running.add_node(2)
        yield running


@pytest.fixture(scope="module")
def reference(cli_bundle, tmp_path_factory):
    """The inputs (of varied lengths, so outputs end at different steps) and the single-machine job's output."""
    root = tmp_path_factory.mktemp("ray-job")
    inputs = root / "in.jsonl"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "the", "river"]
    inputs.write_text("".join(
        json.dumps({"id": f"r{i}", "text": " ".join(words[: 2 + i % 9]) + f" number {i}"}) + "\n" for i in range(40)
    ))  # fmt: skip
    output = root / "single.jsonl"
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs), "--output", str(output), *SETTINGS]) == 0
    return inputs, *_read(output)


def _read(output: Path) -> tuple[dict, list[dict]]:
    header, *records = [json.loads(line) for line in output.read_text().splitlines()]
    return header, records


def _job(bundle, inputs: Path, output: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "el_export.cli", "generate", str(bundle), "--input-file", str(inputs),
            "--output", str(output), "--ray", address, "--workers", "2", *SETTINGS]  # fmt: skip


def _assert_same_job(output: Path, reference) -> None:
    """Every input's record exactly once, each the single-machine job's (scores as close as rebatching allows)."""
    _, want_header, want = reference
    header, records = _read(output)
    assert header == want_header
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(r["id"] for r in want) and len(set(ids)) == len(ids)
    by_id = {r["id"]: r for r in want}
    for record in records:
        expected = by_id[record["id"]]
        assert {**record, "outputs": None} == {**expected, "outputs": None}
        for got, ref in zip(record["outputs"], expected["outputs"], strict=True):
            assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]
            assert abs(got["score"] - ref["score"]) <= REBATCHED_SCORE_TOLERANCE


def _summary(stderr: str) -> dict[str, int]:
    match = re.search(r"(\d+) written, (\d+) already in .*?, (\d+) inputs; (\d+) Ray workers on (\d+) nodes, "
                      r"(\d+) inputs retried", stderr)  # fmt: skip
    assert match, stderr[-3000:]
    names = ("written", "skipped", "total", "workers", "nodes", "retried")
    return dict(zip(names, map(int, match.groups()), strict=True))


def _wait_for_records(output: Path, process: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + JOB_SECONDS
    while not output.exists() or output.read_text().count("\n") < count + 1:  # the header, then `count` records
        assert process.poll() is None, "the job ended before it was interrupted"
        assert time.monotonic() < deadline, "the job wrote nothing in time"
        time.sleep(0.05)


def test_the_cluster_job_writes_the_single_machine_jobs_records(cluster, cli_bundle, reference, tmp_path):
    inputs = reference[0]
    output = tmp_path / "out.jsonl"
    done = subprocess.run(_job(cli_bundle, inputs, output, cluster.address), env=cluster.env, capture_output=True,
                          text=True, timeout=JOB_SECONDS)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_job(output, reference)
    assert _summary(done.stderr) == {"written": 40, "skipped": 0, "total": 40, "workers": 2, "nodes": 2, "retried": 0}


def test_local_starts_a_private_ray_and_stops_it(cli_bundle, reference, tmp_path):
    def ray_processes() -> set[int]:
        return {int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(int(pid)).find("/ray/") >= 0}

    before = ray_processes()
    output = tmp_path / "out.jsonl"
    argv = [*_job(cli_bundle, reference[0], output, "local")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=JOB_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_job(output, reference)
    assert _summary(done.stderr)["nodes"] == 1
    deadline = time.monotonic() + 30  # the instance it started ends with it
    while (left := ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_cmdline(pid) for pid in left]


def test_speech_inputs_are_audio_paths_the_driver_reads(cluster, tiny_en, tmp_path, monkeypatch):
    """Relative paths, read where the driver runs: the workers get the bytes."""
    bundle = tiny_en[2].backend.bundle_dir
    inputs = tmp_path / "audio.txt"
    inputs.write_text("".join(f"{clip.name}\n" for clip in sorted(CLIPS.iterdir())))
    monkeypatch.chdir(CLIPS)
    single = tmp_path / "single.jsonl"
    assert main(["generate", str(bundle), "--input-file", str(inputs), "--output", str(single)]) == 0
    output = tmp_path / "out.jsonl"
    argv = [*_job(bundle, inputs, output, cluster.address)[:-len(SETTINGS)], "--batch-size", "1"]
    done = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=JOB_SECONDS, cwd=CLIPS)
    assert done.returncode == 0, done.stderr[-3000:]
    header, records = _read(output)
    want_header, want = _read(single)
    assert header == want_header and len(records) == 4
    by_id = {r["id"]: r for r in want}
    for record in records:
        assert [o["token_ids"] for o in record["outputs"]] == [o["token_ids"] for o in by_id[record["id"]]["outputs"]]
        assert record["outputs"][0]["text"].strip()  # the real model transcribes the clip


def test_a_killed_driver_is_rerun_and_skips_what_is_done(cluster, cli_bundle, reference, tmp_path):
    inputs, output = reference[0], tmp_path / "out.jsonl"
    argv = _job(cli_bundle, inputs, output, cluster.address)
    process = subprocess.Popen(argv, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_records(output, process, 4)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    kept = output.read_text().count("\n") - 1
    assert 4 <= kept < 40
    done = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=JOB_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_job(output, reference)
    summary = _summary(done.stderr)
    assert (summary["skipped"], summary["written"]) == (kept, 40 - kept)


def test_more_workers_than_the_nodes_hold_is_refused_before_any_runs(cluster, cli_bundle, reference, tmp_path):
    """2 nodes of 2 CPUs hold 4 workers of 1 thread, or 2 of 2 (a fifth, or a third, would wait for ever)."""
    output = tmp_path / "out.jsonl"
    refusals = [(["--workers", "5"], "room for 4 workers of 1 CPU, not --workers 5"),
                (["--workers", "3", "--threads-per-worker", "2"], "room for 2 workers of 2 CPUs, not --workers 3")]
    for flags, room in refusals:
        argv = [*_job(cli_bundle, reference[0], output, cluster.address), *flags]
        done = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=JOB_SECONDS)
        assert done.returncode == 2 and room in done.stderr, done.stderr[-3000:]
        assert len(done.stderr.strip().splitlines()) == 1 and not output.exists()


def test_a_worker_node_killed_mid_job_loses_and_duplicates_nothing(cluster, cli_bundle, reference, tmp_path):
    """Last in this module: it leaves the cluster one worker node short."""
    inputs, output = reference[0], tmp_path / "out.jsonl"
    process = subprocess.Popen(_job(cli_bundle, inputs, output, cluster.address), env=cluster.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_records(output, process, 4)
        victim = cluster.node_running("ray::Worker")
        assert victim is not None and victim is not cluster.nodes[0]  # the head takes no workers
        assert cluster.kill_node(victim) > 0
        _, stderr = process.communicate(timeout=JOB_SECONDS)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    _assert_same_job(output, reference)
    summary = _summary(stderr)
    assert summary["written"] == 40 and summary["retried"] > 0  # the groups in flight on the lost node ran again


def test_without_ray_the_flag_says_what_to_install(cli_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    inputs, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inputs.write_text("a fox\n")
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs), "--output", str(output), "--ray",
                 "local"]) == 2  # fmt: skip
    assert 'pip install "el-export[ray]"' in capsys.readouterr().err
    assert not output.exists()  # nothing left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ray", "127.0.0.1:{port}"], "cannot reach a Ray cluster at --ray 127.0.0.1:"),
        (["--ray", "nowhere"], "--ray nowhere is not host:port"),
        (["--ray", "local", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["--ray", "local", "--threads-per-worker", "0"], "--threads-per-worker must be at least 1, got 0"),
        (["--workers", "2"], "--workers is for a Ray job; add --ray"),
    ],
)
def test_bad_ray_arguments_are_one_line_and_leave_nothing(argv, message, cli_bundle, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inputs, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inputs.write_text("a fox\n")
    argv = [arg.format(port=port) for arg in argv]
    started = time.monotonic()
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs), "--output", str(output), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not output.exists() and time.monotonic() - started < 30


def test_ray_runs_a_job_only(cli_bundle, capsys):
    assert main(["generate", str(cli_bundle), "a fox", "--ray", "local"]) == 2
    assert "--ray runs a job: give --input-file and --output" in capsys.readouterr().err


def test_a_worker_writes_only_the_bundle_it_was_sent(cli_bundle):
    """What reaches a worker is checked again: the manifest against the job's sha256, names inside the bundle, and
    every file against the manifest (by `el_export.load`)."""
    from el_export.contract.files import sha256_bytes
    from el_export.runtime.ray_job import _load_bundle, bundle_files

    files = bundle_files(cli_bundle)
    manifest = sha256_bytes(files["manifest.json"])
    with pytest.raises(BundleError, match="reached this worker changed"):
        _load_bundle(files, "0" * 64, "onnxruntime", 1)
    with pytest.raises(BundleError, match="leaves the bundle directory"):
        _load_bundle({**files, "../escape.txt": b"x"}, manifest, "onnxruntime", 1)
    name = next(n for n in files if n.endswith(".onnx"))
    with pytest.raises(BundleError):
        _load_bundle({**files, name: files[name][:-1] + bytes([files[name][-1] ^ 1])}, manifest, "onnxruntime", 1)
    assert _load_bundle(files, manifest, "onnxruntime", 1).generate_text(["a fox"], max_new_tokens=3)


def test_the_driver_refuses_audio_files_it_cannot_ship(tmp_path):
    from el_export.runtime.audio import read_audio_file

    with pytest.raises(InputError, match="does not exist"):
        read_audio_file(tmp_path / "missing.wav", 16000)
    padded = tmp_path / "padded.wav"  # a one-second header in front of 8 GiB (sparse: nothing is written)
    padded.write_bytes((CLIPS / "fox.wav").read_bytes())
    with open(padded, "r+b") as f:
        f.truncate(8 * 2**30)
    with pytest.raises(InputError, match="holds more than .* bytes, past what the .* samples its header declares"):
        read_audio_file(padded, 16000)
    assert read_audio_file(CLIPS / "fox.wav", 16000) == (CLIPS / "fox.wav").read_bytes()
