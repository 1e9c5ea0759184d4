"""The resumable JSONL job under hostile conditions: two jobs on one output, changed inputs or settings, bad
output paths, a full disk, and input files that are not what they claim. Each refusal is one line, exit 2, and
leaves the output as it was (or absent) with nothing generated."""

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from el_export.cli import main

FAST = ["--batch-size", "1", "--num-beams", "1", "--max-new-tokens", "4"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("el-export: error: ")
    return err[0]


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _job(bundle, inputs: Path, output: Path, *extra: str) -> list[str]:
    return ["generate", str(bundle), "--input-file", str(inputs), "--output", str(output), *FAST, *extra]


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def finished(tmp_path, cli_bundle, capsys):
    """A finished two-record job: (inputs, output, the output's bytes)."""
    inputs = _write(tmp_path / "in.jsonl", [{"id": "r0", "text": "first fox"}, {"id": "r1", "text": "second fox"}])
    output = tmp_path / "out.jsonl"
    assert main(_job(cli_bundle, inputs, output)) == 0
    capsys.readouterr()
    return inputs, output, output.read_bytes()


# 4. one job per output


def test_a_held_lock_refuses_a_second_job_naming_its_pid(finished, cli_bundle, capsys, generated):
    inputs, output, before = finished
    with open(output, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(_job(cli_bundle, inputs, output)) == 2
    line = _error_line(capsys)
    assert f"{output} is being written by another el-export job (pid {os.getpid()})" in line
    assert output.read_bytes() == before and not generated


def test_two_concurrent_jobs_write_every_record_once(tmp_path, cli_bundle, capsys):
    inputs = _write(tmp_path / "in.jsonl", [{"id": i, "text": f"input {i} about foxes"} for i in range(30)])
    output = tmp_path / "out.jsonl"
    argv = _job(cli_bundle, inputs, output, "--num-beams", "2", "--max-new-tokens", "40")
    first = subprocess.Popen([sys.executable, "-m", "el_export.cli", *argv], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 2):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused part-way, holding the output
    assert first.poll() is None, "the first job should still be running"
    assert main(argv) == 2  # the second job, while the first holds the output
    assert f"is being written by another el-export job (pid {first.pid})" in _error_line(capsys)
    first.send_signal(signal.SIGKILL)  # the first job dies part-way; a rerun completes the output
    first.wait()
    assert main(argv) == 0
    header, *records = _lines(output)
    assert "el_export_job" in header
    assert [r["id"] for r in records] == list(range(30))


@pytest.mark.parametrize("link", ["same path", "hard link", "symlink"])
def test_output_that_is_the_input_file_is_refused(tmp_path, cli_bundle, capsys, link):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "a fox"}])
    before = inputs.read_bytes()
    output = {"same path": lambda: inputs, "hard link": lambda: os.link(inputs, tmp_path / "o") or tmp_path / "o",
              "symlink": lambda: os.symlink(inputs, tmp_path / "o") or tmp_path / "o"}[link]()  # fmt: skip
    assert main(_job(cli_bundle, inputs, output)) == 2
    assert "is the --input-file itself" in _error_line(capsys)
    assert inputs.read_bytes() == before


# 5. the output records what produced it; a resume is checked against it


def test_duplicate_ids_are_refused_before_anything_runs(tmp_path, cli_bundle, capsys, generated):
    records = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    inputs = _write(tmp_path / "in.jsonl", records)
    output = tmp_path / "out.jsonl"
    assert main(_job(cli_bundle, inputs, output)) == 2
    assert f'{inputs}:3: id "a" is also the id of line 1' in _error_line(capsys)
    assert not output.exists() and not generated


def test_ids_keep_their_json_type_and_1_is_not_the_string_1(tmp_path, cli_bundle, capsys):
    inputs = _write(tmp_path / "in.jsonl", [{"id": 1, "text": "one"}, {"id": "1", "text": "uno"}, {"text": "line"}])
    output = tmp_path / "out.jsonl"
    assert main(_job(cli_bundle, inputs, output)) == 0
    assert [r["id"] for r in _lines(output)[1:]] == [1, "1", 3]  # no id: the line number
    assert main(_job(cli_bundle, inputs, output)) == 0
    assert "0 written, 3 already in" in capsys.readouterr().err
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs), *FAST, "--json"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [1, "1", 3]


@pytest.mark.parametrize("bad_id", [1.5, {"a": 1}, True, None, [1]])
def test_ids_other_than_strings_and_integers_are_refused(tmp_path, cli_bundle, capsys, generated, bad_id):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "ok", "text": "x"}, {"id": bad_id, "text": "y"}])
    output = tmp_path / "out.jsonl"
    assert main(_job(cli_bundle, inputs, output)) == 2
    assert f'{inputs}:2: "id" must be a string or an integer' in _error_line(capsys)
    assert not output.exists() and not generated


def _other_bundle(cli_bundle, tmp_path) -> Path:
    other = tmp_path / "other-bundle"
    shutil.copytree(cli_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"] = {**manifest["source"], "note": "another export"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


@pytest.mark.parametrize(
    "change, message",
    [
        ("settings", "was written with max_new_tokens=4, this run has max_new_tokens=5"),
        ("truncate", "was written with truncation=False, this run has truncation=True"),
        ("bundle", "was written from another bundle (manifest sha256"),
        ("input text", 'the input of record id "r1" changed'),
        ("input file", 'the output holds record id "r0", which is not in'),
    ],
)
def test_a_resume_that_does_not_match_the_output_is_refused(
    finished, cli_bundle, tmp_path, capsys, generated, change, message
):
    inputs, output, before = finished
    bundle, extra = cli_bundle, []
    if change == "settings":
        extra = ["--max-new-tokens", "5"]
    elif change == "truncate":
        extra = ["--truncate"]
    elif change == "bundle":
        bundle = _other_bundle(cli_bundle, tmp_path)
    elif change == "input text":
        _write(inputs, [{"id": "r0", "text": "first fox"}, {"id": "r1", "text": "second FOX"}])
    else:
        inputs = _write(tmp_path / "other.jsonl", [{"id": "s0", "text": "another fox"}])
    assert main(_job(bundle, inputs, output, *extra)) == 2
    assert message in _error_line(capsys)
    assert output.read_bytes() == before and not generated


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"id": "r0", "input": "x", "outputs": ["y"]}\n', "was written by an older el-export"),
        (b"my notes\n", "is not an el-export job output"),
        (b"my notes, no newline", "is not an el-export job output"),  # not mistaken for a cut-off write
        (b'{"el_export_job": {"format": 1}}\nnot a record\n', ":2 is not a record written by el-export"),
    ],
)
def test_an_output_that_is_not_a_job_output_is_left_alone(tmp_path, cli_bundle, capsys, generated, content, message):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "r0", "text": "x"}])
    output = tmp_path / "out.jsonl"
    output.write_bytes(content)
    assert main(_job(cli_bundle, inputs, output)) == 2
    assert message in _error_line(capsys)
    assert output.read_bytes() == content and not generated


def test_a_header_with_no_records_restarts_with_this_runs_settings(finished, cli_bundle, capsys):
    inputs, output, before = finished
    header = before.splitlines(keepends=True)[0]
    output.write_bytes(header + b'{"id": "r0", "inp')  # the first batch cut off by a crash
    assert main(_job(cli_bundle, inputs, output, "--max-new-tokens", "5")) == 0
    header, *records = _lines(output)
    assert header["el_export_job"]["generation"]["max_new_tokens"] == 5
    assert [r["id"] for r in records] == ["r0", "r1"]


# 6. output paths and write errors


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda tmp: Path("/dev/null"), "is a character device, not a regular file"),
        (lambda tmp: tmp, "is a directory, not a regular file"),
        (lambda tmp: tmp / "missing" / "out.jsonl", "does not exist; create it"),
    ],
)
def test_an_output_that_is_not_a_regular_file_is_refused_before_the_bundle_loads(tmp_path, capsys, where, message):
    inputs = _write(tmp_path / "in.jsonl", [{"text": "x"}])
    output = where(tmp_path)
    assert main(_job("/no/such/bundle", inputs, output)) == 2  # the output is checked first: no bundle error
    assert message in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_fifo_or_a_piped_stdout_is_refused_without_hanging(tmp_path):
    inputs = _write(tmp_path / "in.jsonl", [{"text": "x"}])
    os.mkfifo(tmp_path / "fifo")
    for output in (tmp_path / "fifo", "/dev/stdout"):
        argv = [sys.executable, "-m", "el_export.cli", *_job("/no/such/bundle", inputs, output)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().splitlines() == [
            f"el-export: error: --output {output} is a pipe, not a regular file; give a file path (to print the "
            "results instead, leave out --output)"
        ]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch, code):
    inputs = _write(tmp_path / "in.jsonl", [{"text": "x"}])
    output = tmp_path / "out.jsonl"
    real_open = os.open

    def refuse(path, *args, **kwargs):  # as root, chmod 0555 would not stop the write
        if Path(path) == output:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert main(_job("/no/such/bundle", inputs, output)) == 2
    assert f"cannot write --output {output} ({os.strerror(code)})" in _error_line(capsys)
    assert not output.exists()


def _full_disk(monkeypatch, output: Path):
    """os.write on `output`: the first call writes half its bytes, the next fails with ENOSPC."""
    real_write, calls = os.write, []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != str(output):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_mid_batch_keeps_whole_records_only(finished, cli_bundle, capsys, monkeypatch):
    inputs, output, before = finished
    more = [{"id": f"r{i}", "text": f"fox {i}"} for i in range(2, 5)]
    _write(inputs, [{"id": "r0", "text": "first fox"}, {"id": "r1", "text": "second fox"}, *more])
    with monkeypatch.context() as m:
        _full_disk(m, output)
        assert main(_job(cli_bundle, inputs, output, "--batch-size", "3")) == 2
    line = _error_line(capsys)
    assert f"writing {output} failed (No space left on device)" in line and "rerun to resume" in line
    assert output.read_bytes() == before  # the half-written batch is cut back off
    assert main(_job(cli_bundle, inputs, output, "--batch-size", "3")) == 0
    assert [r["id"] for r in _lines(output)[1:]] == [f"r{i}" for i in range(5)]


def test_a_full_disk_on_the_first_batch_leaves_no_file(tmp_path, cli_bundle, capsys, monkeypatch):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "a fox"}, {"id": "b", "text": "b fox"}])
    output = tmp_path / "out.jsonl"
    _full_disk(monkeypatch, output)
    assert main(_job(cli_bundle, inputs, output, "--batch-size", "2")) == 2
    assert "No space left on device" in _error_line(capsys)
    assert not output.exists()


# input files that are not what they claim: one line naming FILE:LINE, for the job and for printing alike

_RANDOM = bytes(b for b in random.Random(0).randbytes(64) if b != ord("\n"))
BAD_LINES = [
    (_RANDOM, "not UTF-8 text"),
    ('{"text": "café"}'.encode("latin-1"), "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"id": ' + b"7" * 5000 + b', "text": "x"}', "a number on this line is too long to read"),
    (b"[1, 2]", 'expected a JSON object with "text", got an array'),
    (b'{"id": "x"}', 'no "text" field'),
    (b'{"text": 5}', '"text" must be a string, not an integer'),
    (b'{"text": ""}', "input is empty"),
    (b'{"text": " \\t "}', "input is empty"),
    (b'{"text": "\\ud800"}', "holds an unpaired surrogate"),
    (('{"text": "' + "fox " * 200 + '"}').encode(), "input is 802 tokens but the model takes at most 64"),
]  # fmt: skip


@pytest.mark.parametrize("to_output", [True, False], ids=["output", "stdout"])
@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_bad_input_line_names_file_and_line(tmp_path, cli_bundle, capsys, generated, line, message, to_output):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"text": "a fox"}\n\n' + line + b"\n")  # the blank line still counts
    output = tmp_path / "out.jsonl"
    argv = _job(cli_bundle, inputs, output) if to_output else ["generate", str(cli_bundle), "--input-file", str(inputs)]
    assert main(argv) == 2
    assert f"{inputs}:3: {message}" in _error_line(capsys)
    assert not output.exists() and not generated
    assert capsys.readouterr().out == ""


def test_latin1_in_a_text_input_file_names_the_line(tmp_path, cli_bundle, capsys, generated):
    inputs = tmp_path / "in.txt"
    inputs.write_bytes("a fox\ncafé\n".encode("latin-1"))
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs)]) == 2
    assert f"{inputs}:2: not UTF-8 text" in _error_line(capsys)
    assert not generated


def test_a_piped_input_file_is_refused_without_hanging(tmp_path, cli_bundle):
    os.mkfifo(tmp_path / "fifo")
    argv = [sys.executable, "-m", "el_export.cli", "generate", str(cli_bundle), "--input-file", str(tmp_path / "fifo")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "is a pipe, not a regular file (it is read twice" in done.stderr.strip().splitlines()[-1]
