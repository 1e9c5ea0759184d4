"""Serving: batching into one search per parameter group, answers equal to offline `generate`, the Triton
server under concurrent clients, refusals (400, one line), request caps, taken ports, a clean stop, a crash
and a restart, and the Triton repository in the shipped server.

Servers bind to 127.0.0.1 only; every client loop is bounded in count and time; every server is stopped
by a finalizer (its whole process group, SIGKILL as a last resort).
"""

import gc
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import el_export
from el_export.cli import main
from el_export.errors import BackendError, InputError, InvalidArgumentError
from el_export.serving.batching import BatchRunner, RequestCaps
from el_export.serving.forward import INTERNAL_ERROR
from el_export.serving.process import free_ports, stop_process_group, wait_until_ready
from el_export.serving.stub import check_python_stub, stub_library, stub_problem
from el_export.tolerance import REBATCHED_SCORE_TOLERANCE

from .threads import run_in_threads

HOST = "127.0.0.1"
REQUEST_TIMEOUT = 30.0  # seconds, any one request
PARAMETER_SETS = (
    {"num_beams": 2, "max_new_tokens": 8},
    {"max_new_tokens": 6},
    {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 7, "length_penalty": 0.5},
)
TEXTS = ("The quick brown fox.", "Beam search keeps several hypotheses.", "Short.", "Memory efficient attention.")


class Counting:
    """A generator whose searches are counted: `generate` calls (group batching) and `request` calls (in-flight)."""

    def __init__(self, generator):
        self.inner, self.calls = generator, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, **kwargs):
        self.calls += 1
        return self.inner.generate(**kwargs)

    def request(self, **kwargs):
        self.calls += 1
        return self.inner.request(**kwargs)


def _text_request(*texts: str) -> dict:
    return {"text": np.array([[t.encode()] for t in texts], dtype=np.object_)}


def _offline(generator, text: str, parameters: dict):
    """What `generate` returns for this text alone."""
    input_ids, mask = generator.tokenizer.encode([text])
    return generator.generate(input_ids=input_ids, attention_mask=mask, **parameters)


def _assert_answer_equals(answer: dict, reference, row: int = 0) -> None:
    assert torch.equal(torch.tensor(answer["sequences"][row]), reference.sequences)
    if reference.sequences_scores is None:
        assert np.isnan(answer["scores"][row]).all()
    else:
        expected = reference.sequences_scores.numpy()
        np.testing.assert_allclose(answer["scores"][row], expected, atol=REBATCHED_SCORE_TOLERANCE)


# --- BatchRunner: no Triton needed -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_generator(cli_bundle):
    return el_export.load(cli_bundle)


@pytest.fixture(params=["inflight", "group"])
def runner(request):
    """runner(generator, caps=None) -> a `BatchRunner` with each batching mode, closed after the test."""
    made = []

    def make(generator, caps=None):
        made.append(BatchRunner(generator, caps, batching=request.param))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_requests_with_the_same_parameters_share_one_search(text_generator, runner):
    generator = Counting(text_generator)
    parameters = PARAMETER_SETS[2]
    answers = runner(generator)([(_text_request(text), parameters) for text in TEXTS])
    assert generator.calls == 1
    for text, answer in zip(TEXTS, answers, strict=True):
        assert answer["sequences"].shape[:2] == (1, 2) and answer["text"].shape == (1, 2)
        _assert_answer_equals(answer, _offline(text_generator, text, parameters))
        assert [t.decode() for t in answer["text"][0]] == text_generator.generate_text([text], **parameters)


def test_different_parameters_form_one_search_each(text_generator, runner):
    generator = Counting(text_generator)
    requests = [(_text_request(text), PARAMETER_SETS[i % 3]) for i, text in enumerate(TEXTS * 2)]
    answers = runner(generator)(requests)
    assert generator.calls == 3
    for (data, parameters), answer in zip(requests, answers, strict=True):
        _assert_answer_equals(answer, _offline(text_generator, data["text"][0, 0].decode(), parameters))


def test_a_request_may_carry_several_inputs_and_token_ids(text_generator, runner):
    ids, mask = text_generator.tokenizer.encode(list(TEXTS[:2]))
    answers = runner(text_generator)([
        (_text_request(*TEXTS[:2]), {"num_beams": 2, "max_new_tokens": 8}),
        ({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, {"num_beams": 2, "max_new_tokens": 8}),
    ])  # fmt: skip
    assert answers[0]["sequences"].shape[0] == 2
    np.testing.assert_array_equal(answers[0]["sequences"], answers[1]["sequences"])
    reference = text_generator.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=8)
    assert torch.equal(torch.tensor(answers[0]["sequences"][:, 0]), reference.sequences)


def test_a_bad_request_does_not_fail_its_neighbours(text_generator, runner):
    generator = Counting(text_generator)
    good = (_text_request(TEXTS[0]), {"max_new_tokens": 5})
    answers = runner(generator)([
        good,
        (_text_request(TEXTS[1]), {"num_beams": "two"}),
        (_text_request(TEXTS[1]), {"temperature_x": 1.0}),
        ({"input_ids": np.array([[5, 6, 10**6]])}, {"max_new_tokens": 5}),  # found only by the search
        ({"text": _text_request("x")["text"], "input_ids": np.array([[5]])}, {}),
        good,
    ])  # fmt: skip
    assert isinstance(answers[1], InvalidArgumentError) and "num_beams must be int" in str(answers[1])
    assert isinstance(answers[2], InvalidArgumentError) and "unknown parameter temperature_x" in str(answers[2])
    assert isinstance(answers[3], InputError) and "outside the vocabulary" in str(answers[3])
    assert isinstance(answers[4], InvalidArgumentError) and "exactly one of" in str(answers[4])
    for answer in (answers[0], answers[5]):
        _assert_answer_equals(answer, _offline(text_generator, TEXTS[0], {"max_new_tokens": 5}))


def test_requests_over_a_cap_are_refused_in_one_line_before_any_search(text_generator, runner):
    generator = Counting(text_generator)
    capped = runner(generator, RequestCaps(max_num_beams=2, max_new_tokens=8, max_text_bytes=100))
    answers = capped([
        (_text_request(TEXTS[0]), {"num_beams": 3}),
        (_text_request(TEXTS[0]), {"num_beams": 2, "num_return_sequences": 3}),
        (_text_request(TEXTS[0]), {"max_new_tokens": 9}),
        (_text_request("x" * 101), {"max_new_tokens": 5}),
        (_text_request(TEXTS[0]), {"num_beams": 2, "max_new_tokens": 8}),  # at the caps: served
    ])  # fmt: skip
    expected = [
        "num_beams 3 is over this server's limit of 2; ask for at most 2, or start the server with a higher "
        "--max-num-beams",
        "num_return_sequences 3 is over this server's limit of 2",
        "max_new_tokens 9 is over this server's limit of 8; ask for at most 8, or start the server with a higher "
        "--max-new-tokens-limit",
        "a text input is 101 bytes, over this server's limit of 100; send less text, or start the server with a "
        "higher --max-text-bytes",
    ]
    for answer, message in zip(answers, expected, strict=False):
        assert isinstance(answer, InvalidArgumentError | InputError) and message in str(answer), answer
        assert "\n" not in str(answer) and answer.__traceback__ is None
    assert generator.calls == 1  # the refused ones never reached a search (nor, the long text, the tokenizer)
    _assert_answer_equals(answers[4], _offline(text_generator, TEXTS[0], {"num_beams": 2, "max_new_tokens": 8}))


def test_a_refused_long_text_keeps_nothing_alive(text_generator):
    """A text under the byte cap but over the model's positions is tokenized, then refused: its token ids (400k
    here) go with the request. Kept with its traceback, the error held them in a cycle (error -> frames ->
    results -> error) that only a full collection frees: 20 MiB per request here, 1.5 GiB over 9 requests of
    5 MB in a server. With the collector off, only what reference counting frees is freed."""
    runner = BatchRunner(text_generator, RequestCaps(max_text_bytes=10**6))
    request = (_text_request("word " * 100_000), {})
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        runner([request])  # warm: lazily built state stays
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            answers = runner([request])
            assert isinstance(answers[0], InputError) and "tokens but the model takes at most" in str(answers[0])
            del answers
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert grown < 2**20, f"{grown / 2**20:.1f} MiB still allocated after 3 refused requests"


def test_seeded_sampling_runs_alone_so_it_repeats(text_generator, runner):
    generator = Counting(text_generator)
    parameters = {"do_sample": True, "seed": 7, "max_new_tokens": 6, "top_k": 20}
    answers = runner(generator)([(_text_request(text), parameters) for text in TEXTS[:3]])
    assert generator.calls == 3
    for text, answer in zip(TEXTS, answers, strict=False):
        _assert_answer_equals(answer, _offline(text_generator, text, parameters))


def test_decoder_only_prompts_of_different_lengths_share_a_search(bundles, runner):
    generator = Counting(el_export.load(bundles("gpt2", "el")))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    for parameters in ({"max_new_tokens": 6}, {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5}):
        generator.calls = 0
        answers = runner(generator)([({"input_ids": np.array([p])}, parameters) for p in prompts])
        assert generator.calls == 1
        for prompt, answer in zip(prompts, answers, strict=True):
            _assert_answer_equals(answer, generator.inner.generate(input_ids=[prompt], **parameters))


def test_speech_takes_audio_files_and_samples(whisper_bundle):
    import soundfile

    generator = Counting(el_export.load(whisper_bundle))
    rate = generator.manifest.audio["sampling_rate"]
    waves = [np.sin(np.arange(n) / (5 + i)).astype(np.float32) * 0.1 for i, n in enumerate((4000, 9000))]
    wav = io.BytesIO()
    soundfile.write(wav, np.concatenate([waves[0], np.zeros(50, np.float32)]), rate, format="WAV", subtype="FLOAT")
    parameters = {"num_beams": 2, "max_new_tokens": 6}
    answers = BatchRunner(generator)([
        ({"audio": np.array([[wav.getvalue()]], dtype=np.object_)}, parameters),
        ({"samples": waves[1][None]}, parameters),
    ])  # fmt: skip
    assert generator.calls == 1
    padded = np.concatenate([waves[0], np.zeros(50, np.float32)])  # the file ends in silence: kept whole
    for wave, answer in zip((padded, waves[1]), answers, strict=True):
        _assert_answer_equals(answer, generator.inner.generate(audio=[wave], **parameters))
    bad = BatchRunner(generator)([({"audio": np.array([[b"not audio"]], dtype=np.object_)}, {})])
    assert isinstance(bad[0], InputError) and "cannot read audio" in str(bad[0])


def test_the_stub_mismatch_is_one_clear_line():
    problem = stub_problem(("3.11.2", "/lib/x86_64-linux-gnu/libpython3.11.so.1.0"), "3.11.7", "/opt/py/bin/python")
    assert problem is not None and "\n" not in problem
    assert "runs Python 3.11.7" in problem and "loads Python 3.11.2 from /lib/x86_64-linux-gnu/" in problem
    if Path("/usr/bin/python3.11").exists():
        assert problem.endswith("/usr/bin/python3.11 -m venv .venv")
    assert stub_problem(("3.11.2", "/lib/libpython3.11.so.1.0"), "3.11.2", "/usr/bin/python3.11") is None
    assert "apt-get install libpython3.11" in stub_problem(None, "3.11.7", "/opt/py/bin/python")


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_the_libpython_a_binary_loads_is_found_with_its_version():
    """This interpreter's own binary: linked to its libpython (a shared build) or to none (a static one)."""
    found = stub_library(Path(sys.executable).resolve(), dict(os.environ))
    assert found is None or (found[0] == platform.python_version() and Path(found[1]).is_file()), found


def test_serving_modules_import_without_pytriton_or_tritonclient():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pytriton", "tritonclient"):
                    raise ImportError(f"blocked in this test: {name}", name=name)
        sys.meta_path.insert(0, Block())
        import el_export.serve, el_export.serving.triton_repo
        try:
            el_export.serve.start(None)
        except el_export.BackendError as e:
            print(e)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "serving needs PyTriton" in result.stdout and "pip install 'el-export[serve]'" in result.stdout


def test_triton_repo_writes_a_python_backend_repository(cli_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    argv = ["triton-repo", str(cli_bundle), "--out", str(out), "--model-name", "tiny", "--max-batch-size", "4",
            "--max-num-beams", "4"]  # fmt: skip
    assert main(argv) == 0
    config = (out / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config
    assert 'key: "el_export_max_num_beams" value: { string_value: "4" }' in config
    assert 'key: "el_export_max_text_bytes" value: { string_value: "262144" }' in config
    assert "dynamic_batching { max_queue_delay_microseconds: 5000 }" in config
    assert re.search(r'name: "input_ids" data_type: TYPE_INT64 dims: \[-1\] optional: true allow_ragged_batch', config)
    assert (out / "tiny" / "1" / "bundle" / "manifest.json").is_file()
    assert "TritonPythonModel" in (out / "tiny" / "1" / "model.py").read_text()
    assert main(argv) == 2  # never writes over a repository
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "triton-repo"])
def test_help_lists_the_batching_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(option in out for option in ("--max-batch-size", "--max-queue-delay-us", "--instances", "--backend"))
    caps = RequestCaps()  # the request caps, with the library's defaults
    for flag, default in (("--max-num-beams", caps.max_num_beams), ("--max-new-tokens-limit", caps.max_new_tokens),
                          ("--max-text-bytes", caps.max_text_bytes),
                          ("--max-audio-seconds", caps.max_audio_seconds)):  # fmt: skip
        metavar = flag.removeprefix("--").upper().replace("-", "_")
        assert re.search(f"{flag} {metavar} .*?\\(default {default:g}\\)", out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "http port 70000 is not a port number"),
        (["--grpc-port", "8000"], "ports must differ"),
        (["--max-batch-size", "0"], "at least 1"),
        (["--model-name", "a/b"], "use letters, digits"),
        (["--max-num-beams", "0"], "--max-num-beams must be at least 1, got 0"),
        (["--max-audio-seconds", "0.5"], "--max-audio-seconds must be at least 1, got 0.5"),
        (["--max-audio-seconds", "nan"], "--max-audio-seconds must be a finite number, got nan"),
        (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1: nobody's
    ],
)
def test_serve_refuses_bad_settings_in_one_line(cli_bundle, capsys, argv, message):
    assert main(["serve", str(cli_bundle), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --- Triton: servers on 127.0.0.1 ------------------------------------------------------------------------


def _triton_or_skip() -> None:
    pytest.importorskip("pytriton", reason="PyTriton is not installed (pip install 'el-export[serve]')")
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
    try:
        check_python_stub()
    except BackendError as e:
        pytest.skip(f"Triton's Python backend cannot run here: {e}")


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
            try:
                s.bind((HOST, port))
            except OSError:
                return False
    return True


class ServeProcess:
    """`el-export serve` in its own process group, with its output (and Triton's log, or with `console` Triton's
    console output too) under `root`."""

    def __init__(self, bundle: Path, root: Path, ports: list[int], *extra: str, console: bool = False):
        self.ports, self.url, self.log = ports, f"{HOST}:{ports[0]}", root / "serve.log"
        argv = [sys.executable, "-m", "el_export.cli", "serve", str(bundle), "--model-name", "tiny",
                "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                *extra]  # fmt: skip
        if not console:
            argv += ["--log-file", str(root / "triton.log")]
        self.home = tempfile.mkdtemp(prefix="elx-")  # its socket and Triton's files: short paths, removed after
        env = {**os.environ, "TMPDIR": self.home}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(self.process, f"http://{self.url}/v2/models/tiny/ready", 120, self.log)
            deadline = time.monotonic() + 30  # and serve itself is up: it says so once `start` returns
            while "serving " not in self.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        except BackendError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process_group(self.process)
        shutil.rmtree(self.home, ignore_errors=True)
        for region in Path("/dev/shm").glob(f"el-export-{self.process.pid}-*"):  # what a SIGKILL leaves behind
            region.unlink(missing_ok=True)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://{HOST}:{self.ports[2]}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.fixture(scope="module")
def server(cli_bundle, tmp_path_factory):
    _triton_or_skip()
    process = ServeProcess(cli_bundle, tmp_path_factory.mktemp("serve"), free_ports(3), "--max-queue-delay-us",
                           "50000")  # fmt: skip
    yield process
    process.stop()


def _infer(client, text: str, parameters: dict) -> dict:
    import tritonclient.http as http

    tensor = http.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(_text_request(text)["text"])
    result = client.infer("tiny", [tensor], parameters=parameters, timeout=int(REQUEST_TIMEOUT * 1e6))
    return {name: result.as_numpy(name) for name in ("text", "sequences", "scores")}


def _client(url: str):
    import tritonclient.http as http

    return http.InferenceServerClient(url, connection_timeout=REQUEST_TIMEOUT, network_timeout=REQUEST_TIMEOUT)


def test_concurrent_clients_get_what_offline_generate_returns(server, text_generator):
    """4 client threads x 6 requests with three parameter sets; every answer equals `generate` alone."""
    jobs = [(TEXTS[(t + i) % 4], PARAMETER_SETS[(t * 6 + i) % 3]) for t in range(4) for i in range(6)]
    answers, errors = {}, []

    def client_thread(t: int) -> None:
        client = _client(server.url)
        try:
            for i in range(6):
                answers[t * 6 + i] = _infer(client, *jobs[t * 6 + i])
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            client.close()

    run_in_threads(client_thread, 4, timeout=120)
    assert not errors and len(answers) == len(jobs), errors
    for k, (text, parameters) in enumerate(jobs):
        _assert_answer_equals(answers[k], _offline(text_generator, text, parameters))
        assert [t.decode() for t in answers[k]["text"][0]] == text_generator.generate_text([text], **parameters)


def test_requests_arriving_together_are_batched(server, text_generator):
    """8 requests released at once run in fewer model executions than requests (50 ms queue delay)."""
    before = server.metric("nv_inference_exec_count"), server.metric("nv_inference_count")
    barrier, answers = threading.Barrier(8, timeout=30), {}

    def send(i: int) -> None:
        client = _client(server.url)
        barrier.wait()
        answers[i] = _infer(client, TEXTS[i % 4], PARAMETER_SETS[0])
        client.close()

    run_in_threads(send, 8)
    executions = server.metric("nv_inference_exec_count") - before[0]
    assert server.metric("nv_inference_count") - before[1] == 8 and len(answers) == 8
    assert executions < 8, "no two requests were batched"
    for i, answer in answers.items():
        _assert_answer_equals(answer, _offline(text_generator, TEXTS[i % 4], PARAMETER_SETS[0]))


def test_a_bad_request_gets_a_clear_error_from_the_server(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="parameter num_beams must be int"):
        _infer(_client(server.url), TEXTS[0], {"num_beams": "two"})


def _post_infer(url: str, parameters: dict, text: str = TEXTS[0]) -> tuple[int, str]:
    """A JSON inference request as any HTTP client sends it: (status, the error message or "")."""
    body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}],
            "parameters": parameters}  # fmt: skip
    request = urllib.request.Request(f"http://{url}/v2/models/tiny/infer", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"num_beams": "two"}, "parameter num_beams must be int"),
        ({"bogus": 1}, "unknown parameter bogus; known: num_beams"),
        (
            {"num_beams": 17},
            "num_beams 17 is over this server's limit of 16; ask for at most 16, or start the "
            "server with a higher --max-num-beams",
        ),
        ({"max_new_tokens": 10_000}, "max_new_tokens 10000 is over this server's limit of 512"),
    ],
)
def test_a_refused_request_is_a_400_with_its_one_line_only(server, parameters, message):
    status, error = _post_infer(server.url, parameters)
    assert status == 400 and error.startswith(message), (status, error)
    assert "\n" not in error and "Traceback" not in error and "/work/" not in error and ".py" not in error, error


def test_a_refused_request_is_invalid_argument_over_grpc(server):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(f"{HOST}:{server.ports[1]}")
    tensor = grpc.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(_text_request(TEXTS[0])["text"])
    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [tensor], parameters={"num_beams": "two"}, client_timeout=REQUEST_TIMEOUT)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message() == "parameter num_beams must be int"
    client.close()


def test_refused_requests_do_not_fail_the_requests_batched_with_them(server, text_generator):
    """8 requests released at once (50 ms queue delay: batched), every other one refused: each refused one gets
    its own 400, the others their answers."""
    before = server.metric("nv_inference_exec_count")
    barrier, answers = threading.Barrier(8, timeout=30), {}

    def send(i: int) -> None:
        client = _client(server.url)
        barrier.wait()
        try:
            answers[i] = _infer(client, TEXTS[i % 4], PARAMETER_SETS[0] if i % 2 else {"num_beams": 99})
        except Exception as e:  # checked below
            answers[i] = e
        client.close()

    run_in_threads(send, 8)
    assert server.metric("nv_inference_exec_count") - before < 8, "no two requests were batched"
    for i in range(8):
        if i % 2:
            _assert_answer_equals(answers[i], _offline(text_generator, TEXTS[i % 4], PARAMETER_SETS[0]))
        else:
            assert answers[i].status() == "400" and "num_beams 99 is over this server's limit" in str(answers[i])


def test_a_5_mb_text_is_refused_before_tokenizing_and_leaves_no_memory(server):
    """The byte cap refuses it in one line, fast; the server's memory does not grow over 5 of them."""
    from tritonclient.utils import InferenceServerException

    client = _client(server.url)
    statm = Path(f"/proc/{server.process.pid}/statm")
    rss = lambda: int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # noqa: E731
    start, before = time.monotonic(), rss()
    for _ in range(5):
        with pytest.raises(InferenceServerException) as refused:
            _infer(client, "word " * 1_000_000, {})
        assert refused.value.status() == "400"
        assert "a text input is 5000000 bytes, over this server's limit of 262144" in str(refused.value)
        assert "--max-text-bytes" in str(refused.value)
    assert time.monotonic() - start < 30
    assert rss() - before < 100, f"the server grew from {before:.0f} to {rss():.0f} MiB"
    client.close()


class Broken(Counting):
    """A generator with a bug, in either batching mode."""

    def generate(self, **kwargs):
        raise RuntimeError("a bug in generate")

    request = generate


def test_a_bug_fails_its_batch_with_a_500_and_keeps_its_traceback_in_the_log(text_generator, capsys):
    from el_export.serve import ServeConfig, start

    _triton_or_skip()
    http_port, grpc_port, metrics_port = free_ports(3)
    config = ServeConfig(model_name="tiny", http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    with start(Broken(text_generator), config) as running:
        status, error = _post_infer(f"{HOST}:{http_port}", {"max_new_tokens": 3})
        assert status == 500 and error == INTERNAL_ERROR, (status, error)
        assert _post_infer(f"{HOST}:{http_port}", {"num_beams": "two"})[0] == 400  # and it goes on serving
    assert running.wait() == 0
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug in generate" in err


def _taken_port() -> socket.socket:
    """A socket listening on a free port of HOST: that port is taken until it closes."""
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    return taken


def test_a_taken_port_fails_in_seconds_naming_the_port_and_its_flag(cli_bundle, tmp_path):
    """Triton would wait two minutes for a server that cannot come up; serve checks first, before loading."""
    _triton_or_skip()
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        grpc_port, metrics_port = free_ports(2)
        argv = [sys.executable, "-m", "el_export.cli", "serve", str(cli_bundle), "--port", str(port),
                "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]  # fmt: skip
        began = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ,
                                "TMPDIR": str(tmp_path)})  # fmt: skip
        elapsed = time.monotonic() - began
    assert result.returncode == 2 and elapsed < 10, (result.returncode, elapsed, result.stderr)
    assert result.stderr.splitlines() == [
        f"el-export: error: port {port} (--port) is in use on {HOST}: stop what listens there, or choose another --port"
    ]
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port"])
def test_the_grpc_and_metrics_ports_are_checked_too(cli_bundle, capsys, flag):
    _triton_or_skip()
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        ports = dict(zip(("--port", "--grpc-port", "--metrics-port"), free_ports(3), strict=True)) | {flag: port}
        assert main(["serve", str(cli_bundle), *(str(a) for item in ports.items() for a in item)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"el-export: error: port {port} ({flag}) is in use on {HOST}: "
                                                    f"stop what listens there, or choose another {flag}"]  # fmt: skip


def _shared_memory() -> set[str]:
    """/dev/shm entries of the kind Triton's Python backend and PyTriton create."""
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(("el-export-", "pytrtion", "psm_"))}


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_normal_stop_is_clean_and_the_console_quiet(cli_bundle, tmp_path, stop):
    """SIGTERM to serve, or SIGINT to its process group (a terminal's Ctrl-C), with a keep-alive client still
    connected (Triton's own shutdown waits for it, then kills the stubs): exit 0 in seconds, no failure, no
    CUDA / NVML noise on a host without a GPU, no shared memory or temporary files left."""
    _triton_or_skip()
    shared_before = _shared_memory()
    serving = ServeProcess(cli_bundle, tmp_path, free_ports(3), console=True)
    try:
        client = _client(serving.url)
        _infer(client, TEXTS[0], PARAMETER_SETS[0])  # the stub's shared memory is in use; the client stays connected
        began = time.monotonic()
        if stop == "SIGTERM":
            serving.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(serving.process.pid, signal.SIGINT)
        returncode = serving.process.wait(timeout=60)
        elapsed = time.monotonic() - began
        leftovers = sorted(name for name in os.listdir(serving.home) if name.startswith("el-export-"))  # ours
    finally:
        serving.stop()
    output = serving.log.read_text()
    assert returncode == 0 and elapsed < 15, (returncode, elapsed, output)
    assert not re.search("fail|traceback|nvml|cuda|error", output, re.I), output
    assert _shared_memory() <= shared_before and not leftovers, (_shared_memory() - shared_before, leftovers)


def test_a_stop_while_triton_starts_leaves_nothing_behind(cli_bundle, tmp_path):
    """SIGTERM once Triton is starting (its files exist), before it is ready: serve unwinds, says so, and removes
    what it made."""
    _triton_or_skip()
    shared_before = _shared_memory()
    ports = free_ports(3)
    argv = [sys.executable, "-m", "el_export.cli", "serve", str(cli_bundle), "--port", str(ports[0]),
            "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]  # fmt: skip
    process = subprocess.Popen(argv, env={**os.environ, "TMPDIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("el-export-triton-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(tmp_path.glob("el-export-triton-*")), "Triton did not start"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        stop_process_group(process)
    assert process.returncode == 130 and err.splitlines()[-1] == "el-export: interrupted", err
    assert not list(tmp_path.glob("el-export-*")) and _shared_memory() <= shared_before


def test_killing_the_server_mid_load_fails_clients_clearly_and_a_restart_serves(cli_bundle, text_generator, tmp_path):
    """Clients loop (at most 200 requests, 60 s) until the server process is SIGKILLed under them."""
    _triton_or_skip()
    ports = free_ports(3)
    first = ServeProcess(cli_bundle, tmp_path, ports)
    served, failures, stop_at = [], [], time.monotonic() + 60

    def client_thread() -> None:
        client = _client(first.url)
        try:
            while len(served) < 200 and time.monotonic() < stop_at:
                served.append(_infer(client, TEXTS[0], PARAMETER_SETS[0]))
        except Exception as e:  # what the client library raises: checked below
            failures.append(e)

    threads = [threading.Thread(target=client_thread) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        while len(served) < 6 and time.monotonic() < stop_at:
            time.sleep(0.05)
        assert len(served) >= 6, f"the server answered only {len(served)} requests: {first.log.read_text()}"
        os.kill(first.process.pid, signal.SIGKILL)  # a crash: Triton follows its parent (PDEATHSIG)
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 10)
        assert not any(thread.is_alive() for thread in threads), "a client hung on the dead server"
    finally:
        first.stop()
    assert len(failures) == 3, failures  # every client stopped on an error, none on the request bound
    for failure in failures:
        assert re.search(r"connect|refused|reset|closed|unavailable|broken|eof|abort", str(failure), re.I), failure
    deadline = time.monotonic() + 60
    while not _ports_free(ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = ServeProcess(cli_bundle, tmp_path, ports)
    try:
        answer = _infer(_client(second.url), TEXTS[1], PARAMETER_SETS[0])
        _assert_answer_equals(answer, _offline(text_generator, TEXTS[1], PARAMETER_SETS[0]))
    finally:
        second.stop()


def test_the_triton_repository_loads_in_the_shipped_triton_server(cli_bundle, text_generator, tmp_path):
    _triton_or_skip()
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from el_export.serving.triton_repo import shipped_server

    assert main(["triton-repo", str(cli_bundle), "--out", str(tmp_path / "repo"), "--model-name", "tiny"]) == 0
    http_port, grpc_port = free_ports(2)
    with shipped_server(tmp_path / "repo", HOST, http_port, grpc_port, log=tmp_path / "triton.log", ready_timeout=120):
        http_client = _client(f"{HOST}:{http_port}")
        grpc_client = grpc.InferenceServerClient(f"{HOST}:{grpc_port}")
        assert http_client.is_server_live() and http_client.is_server_ready() and http_client.is_model_ready("tiny")
        assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready("tiny")
        answer = _infer(http_client, TEXTS[2], PARAMETER_SETS[2])
        _assert_answer_equals(answer, _offline(text_generator, TEXTS[2], PARAMETER_SETS[2]))
        ids = grpc.InferInput("input_ids", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([[5, 6, 2]], dtype=np.int64))
        result = grpc_client.infer("tiny", [ids], parameters={"max_new_tokens": 5}, client_timeout=REQUEST_TIMEOUT)
        reference = text_generator.generate(input_ids=[[5, 6, 2]], max_new_tokens=5)
        assert torch.equal(torch.tensor(result.as_numpy("sequences")[0]), reference.sequences)
        with pytest.raises(InferenceServerException, match="unknown parameter bogus") as refused:  # that one alone
            grpc_client.infer("tiny", [ids], parameters={"bogus": 1}, client_timeout=REQUEST_TIMEOUT)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        status, error = _post_infer(f"{HOST}:{http_port}", {"num_beams": 17})  # the caps, from config.pbtxt
        assert status == 400 and error.startswith("num_beams 17 is over this server's limit of 16"), (status, error)
        http_client.close()
        grpc_client.close()
    assert _ports_free([http_port, grpc_port])  # stopped, and nothing is left listening
