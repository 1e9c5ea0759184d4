"""A standard Triton model repository for a bundle, for people who run the official Triton server.

    OUT/NAME/config.pbtxt      Python backend, dynamic batching, the inputs and outputs of `serve`
    OUT/NAME/1/model.py        a Python-backend model: loads the bundle with el_export, answers with `BatchRunner`
    OUT/NAME/1/bundle/         a copy of the bundle (the repository is self-contained)

The server's Python environment needs el-export installed (`pip install el-export`); the model then
batches exactly as `el-export serve` does, and refuses a bad request (HTTP 400, gRPC INVALID_ARGUMENT)
without failing its neighbours. `TritonProcess` runs the Triton server binary that ships in the PyTriton
wheel on a repository (`el-export serve` runs it too); `shipped_server` on such a repository.
"""

import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from el_export.bundle import read_manifest
from el_export.errors import BackendError, InvalidArgumentError
from el_export.serve import (
    OUTPUTS,
    BatchRunner,
    RequestCaps,
    ServeConfig,
    TensorSpec,
    check_ports_free,
    check_python_stub,
    model_inputs,
    python_stub,
)
from el_export.triton_forward import read_batch, responses

_TRITON_TYPES = {"bytes": "TYPE_STRING", "int64": "TYPE_INT64", "float32": "TYPE_FP32"}

MODEL_PY = '''"""Triton Python-backend model written by `el-export triton-repo`: the bundle beside this file."""

from el_export.triton_repo import TritonPythonModel  # noqa: F401  (Triton looks the class up here)
'''


def write_repository(bundle_dir: str | os.PathLike, out: str | os.PathLike, config: ServeConfig | None = None,
                     backend: str = "onnxruntime") -> Path:  # fmt: skip
    """Write a Triton model repository serving the bundle.

    Args:
        bundle_dir: an exported bundle (copied into the repository).
        out: the repository directory to create (must not exist, or be empty).
        config: model name, max batch size, queue delay, dynamic batching on/off, instances, request caps
            (`ServeConfig()`).
        backend: the el-export runtime backend the model runs the graphs on.

    Returns:
        The model's directory, `out / config.model_name`.

    Raises:
        BundleError: the bundle is missing or invalid.
        InvalidArgumentError: `out` exists and is not empty, or an invalid configuration.
    """
    config = config or ServeConfig()
    config.check()
    manifest = read_manifest(bundle_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"{out} already exists and is not empty; choose another --out")
    model_dir = out / config.model_name
    (model_dir / "1").mkdir(parents=True)
    shutil.copytree(bundle_dir, model_dir / "1" / "bundle")
    (model_dir / "1" / "model.py").write_text(MODEL_PY, encoding="utf-8")
    parameters = {"el_export_backend": backend}
    parameters |= {f"el_export_{name}": str(value) for name, value in dataclasses.asdict(config.caps).items()}
    (model_dir / "config.pbtxt").write_text(model_config(model_inputs(manifest), config, parameters), encoding="utf-8")
    return model_dir


def model_config(inputs: tuple[TensorSpec, ...], config: ServeConfig, parameters: dict[str, str]) -> str:
    """config.pbtxt text: Python backend, optional inputs (ragged where lengths vary), the outputs of `serve`, and
    `parameters` (strings) for the model."""

    def tensor(spec: TensorSpec, is_input: bool) -> str:
        fields = [f'name: "{spec.name}"', f"data_type: {_TRITON_TYPES[spec.dtype]}", f"dims: {list(spec.shape)}"]
        if is_input:
            fields.append("optional: true")
            if spec.ragged and config.dynamic_batching:
                fields.append("allow_ragged_batch: true")
        return "  { " + " ".join(fields) + " }"

    lines = [
        f'name: "{config.model_name}"',
        'backend: "python"',
        f"max_batch_size: {config.max_batch_size}",
        "input [\n" + ",\n".join(tensor(s, True) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(s, False) for s in OUTPUTS) + "\n]",
        f"instance_group [ {{ count: {config.instances} kind: KIND_CPU }} ]",
        *(f"parameters: {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}"
          for k, v in parameters.items()),
    ]  # fmt: skip
    if config.dynamic_batching:
        lines.insert(3, f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}")
    return "\n".join(lines) + "\n"


class TritonPythonModel:
    """The Triton Python-backend model (`model.py` imports it): the bundle in the version directory."""

    def initialize(self, args: dict) -> None:
        import el_export

        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        given = {f.name: parameters.get(f"el_export_{f.name}") for f in dataclasses.fields(RequestCaps)}
        caps = RequestCaps(**{name: int(value) for name, value in given.items() if value})  # older ones: defaults
        self.runner = BatchRunner(el_export.load(bundle, backend=parameters["el_export_backend"]), caps)
        self.inputs = [spec.name for spec in model_inputs(self.runner.generator.manifest)]
        self.outputs = [spec.name for spec in OUTPUTS]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python-backend stub

        return responses(pb_utils, self.runner(read_batch(pb_utils, requests, self.inputs)), self.outputs)


DRAIN_TIMEOUT_S = 30  # in-flight requests get this long to finish when the server is stopped
EXIT_TIMEOUT_S = 1  # then Triton waits this long for idle client connections to close


class TritonProcess:
    """The Triton server binary shipped in the PyTriton wheel, serving `repository` on `host` only.

    The Python backend gets the stub built for this Python (as PyTriton arranges it) and this environment's
    packages. Triton runs in a session of its own, so a terminal's Ctrl-C reaches only this process, which
    stops it in order (`stop`); it follows this process if that dies (PDEATHSIG). Its output goes to `log`
    (appended, in full), or to stderr: warnings and errors only, and without the CUDA driver line that every
    host without a GPU prints (GPU metrics and pinned memory are off there too: nothing to report).

    Raises:
        BackendError: PyTriton is not installed, or its stub cannot run this interpreter.
    """

    def __init__(self, repository: str | os.PathLike, host: str, http_port: int, grpc_port: int,
                 metrics_port: int | None = None, log: str | os.PathLike | None = None):  # fmt: skip
        try:
            import pytriton
        except ImportError:
            raise BackendError("the Triton server comes with PyTriton: pip install 'el-export[serve]'") from None
        check_python_stub()
        stub, env = python_stub()
        dist = Path(pytriton.__file__).parent / "tritonserver"
        self.host, self.http_port, self._stopped, self.process, self._copier = host, http_port, False, None, None
        self._last_lines: deque[str] = deque(maxlen=5)
        self._shm_prefix = f"el-export-{os.getpid()}-{secrets.token_hex(4)}-"  # what a killed server leaves: ours
        self._tmp = Path(tempfile.mkdtemp(prefix="el-export-triton-"))
        try:  # whatever stops the start (a signal included) removes what it made
            backends = Path(shutil.copytree(dist / "backends", self._tmp / "backends"))
            shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
            gpu = any(Path("/dev").glob("nvidia[0-9]*"))
            argv = [
                str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
                f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
                f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}", f"--log-info={log is not None}",
                "--model-control-mode=explicit", "--load-model=*",
            ]  # fmt: skip
            if metrics_port is None:
                argv.append("--allow-metrics=false")
            else:
                argv += [f"--metrics-address={host}", f"--metrics-port={metrics_port}", f"--allow-gpu-metrics={gpu}"]
            if not gpu:
                argv.append("--pinned-memory-pool-byte-size=0")
            self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_follow_parent)  # fmt: skip
            self._copier = threading.Thread(target=self._copy_output, args=(log, gpu), name="triton-log", daemon=True)
            self._copier.start()
        except BaseException:
            self._remove(grace=1)
            raise

    def wait_ready(self, path: str, timeout: float) -> None:
        """Poll `path` (`/v2/health/ready`, a model's ready URL) until it answers 200.

        Raises:
            BackendError: Triton exited first, or `timeout` seconds passed (with its last log lines).
        """
        _wait_ready(self.process, self._url(path), timeout, self.tail)

    def tail(self) -> str:
        """Triton's last log lines, on one line."""
        if self.process.poll() is not None and self._copier is not None:
            self._copier.join(timeout=5)  # its last words
        return " | ".join(self._last_lines)

    def stop(self) -> None:
        """Unload the models (in-flight requests finish, the stubs exit cleanly), SIGTERM, SIGKILL past a grace
        time; then remove what Triton leaves: its copy of the backends, its shared memory if it was killed."""
        if self._stopped:
            return
        self._stopped = True
        self._drain()
        self._remove(grace=EXIT_TIMEOUT_S + 15)

    def _remove(self, grace: float) -> None:
        """Triton's process group (SIGTERM, SIGKILL after `grace` s), its files, its shared memory."""
        if self.process is not None:
            stop_process_group(self.process, timeout=grace)
        if self._copier is not None:
            self._copier.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def _drain(self) -> None:
        """Unload every model, waiting up to `DRAIN_TIMEOUT_S`. Triton's own shutdown (SIGTERM) waits first for
        idle client connections to close, a keep-alive client's never do, and then leaves the models no time:
        it kills their stubs, which leaves their shared memory behind, and exits with a failure."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with contextlib.suppress(OSError, ValueError):  # Triton gone, or not answering: the SIGTERM follows
            for model in self._post("/v2/repository/index"):
                if model.get("state") == "READY":
                    self._post(f"/v2/repository/models/{urllib.parse.quote(model['name'])}/unload")
            while time.monotonic() < deadline and self.process.poll() is None:
                if not any(m.get("state") in ("READY", "UNLOADING") for m in self._post("/v2/repository/index")):
                    return
                time.sleep(0.1)

    def _post(self, path: str):
        request = urllib.request.Request(self._url(path), data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def _url(self, path: str) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}{path}"

    def _copy_output(self, log: str | os.PathLike | None, gpu: bool) -> None:
        sink = open(log, "a", encoding="utf-8", errors="replace") if log is not None else sys.stderr  # noqa: SIM115
        try:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                self._last_lines.append(line.strip())
                if not gpu and "CudaDriverHelper has not been initialized" in line:  # no GPU here to drive
                    continue
                sink.write(line)
                sink.flush()
        finally:
            if sink is not sys.stderr:
                sink.close()


def _follow_parent() -> None:
    """In Triton's process before it runs: SIGTERM when the thread that started it ends, a crash included."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def shipped_server(repository: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 8000,
                   grpc_port: int = 8001, log: str | os.PathLike | None = None,
                   ready_timeout: float = 120.0) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Run the Triton server binary shipped in the PyTriton wheel on `repository` (`TritonProcess`), on `host`
    only. Yields the server process once every model is ready; stops it after.

    Raises:
        BackendError: PyTriton is not installed, its stub cannot run this interpreter, or the server
            exited or was not ready within `ready_timeout` seconds (the message ends with its log).
        InvalidArgumentError: a port cannot be listened on (taken, privileged) or `host` is not this machine's.
    """
    check_ports_free(host, {"http_port": http_port, "grpc_port": grpc_port})
    server = TritonProcess(repository, host, http_port, grpc_port, log=log)
    try:
        server.wait_ready("/v2/health/ready", ready_timeout)
        yield server.process
    finally:
        server.stop()


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    """Poll `url` until it answers 200.

    Raises:
        BackendError: the process exited first, or `timeout` seconds passed (with the log's last lines).
    """
    _wait_ready(process, url, timeout, lambda: _tail(log_path))


def _wait_ready(process: subprocess.Popen, url: str, timeout: float, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackendError(f"{Path(process.args[0]).name} exited with {process.returncode}: {tail()}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise BackendError(f"{Path(process.args[0]).name} was not ready within {timeout:.0f} s: {tail()}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (the OS picks them), for servers started next."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def _tail(log_path: Path, lines: int = 5) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started in its own session: SIGTERM to its process group (server and stubs), time to
    exit and clean up (its leader may be gone already, its children not), then SIGKILL to what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=timeout)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
