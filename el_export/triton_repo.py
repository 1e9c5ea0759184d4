"""A standard Triton model repository for a bundle, for people who run the official Triton server.

    OUT/NAME/config.pbtxt      Python backend, dynamic batching, the inputs and outputs of `serve`
    OUT/NAME/1/model.py        a Python-backend model: loads the bundle with el_export, answers with `BatchRunner`
    OUT/NAME/1/bundle/         a copy of the bundle (the repository is self-contained)

The server's Python environment needs el-export installed (`pip install el-export`); the model then
batches exactly as `el-export serve` does, and refuses a bad request without failing its neighbours.
`shipped_server` runs the Triton server binary that ships in the PyTriton wheel on such a repository.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from el_export.bundle import read_manifest
from el_export.errors import BackendError, ElExportError, InvalidArgumentError
from el_export.serve import (
    OUTPUTS,
    BatchRunner,
    ServeConfig,
    TensorSpec,
    check_python_stub,
    model_inputs,
    python_stub,
)

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
        config: model name, max batch size, queue delay, dynamic batching on/off, instances (`ServeConfig()`).
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
    (model_dir / "config.pbtxt").write_text(model_config(model_inputs(manifest), config, backend), encoding="utf-8")
    return model_dir


def model_config(inputs: tuple[TensorSpec, ...], config: ServeConfig, backend: str) -> str:
    """config.pbtxt text: Python backend, optional inputs (ragged where lengths vary), the outputs of `serve`."""

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
        f'parameters: {{ key: "el_export_backend" value: {{ string_value: "{backend}" }} }}',
    ]
    if config.dynamic_batching:
        lines.insert(3, f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}")
    return "\n".join(lines) + "\n"


class TritonPythonModel:
    """The Triton Python-backend model (`model.py` imports it): the bundle in the version directory."""

    def initialize(self, args: dict) -> None:
        import el_export

        model_config = json.loads(args["model_config"])
        backend = model_config["parameters"]["el_export_backend"]["string_value"]
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.outputs = [spec.name for spec in OUTPUTS]
        self.runner = BatchRunner(el_export.load(bundle, backend=backend))

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python-backend stub

        names = [spec.name for spec in model_inputs(self.runner.generator.manifest)]
        batch = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
            data = {name: t.as_numpy() for name, t in tensors.items() if t is not None}
            batch.append((data, json.loads(request.parameters() or "{}")))
        responses = []
        for result in self.runner(batch):
            if isinstance(result, ElExportError):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result))))
            else:
                tensors = [pb_utils.Tensor(name, result[name]) for name in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


@contextlib.contextmanager
def shipped_server(repository: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 8000,
                   grpc_port: int = 8001, log: str | os.PathLike | None = None,
                   ready_timeout: float = 120.0) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Run the Triton server binary shipped in the PyTriton wheel on `repository`, on `host` only.

    The Python backend gets the stub built for this Python (as PyTriton arranges it) and this
    environment's packages. Yields the server process once every model is ready; stops it after.

    Raises:
        BackendError: PyTriton is not installed, its stub cannot run this interpreter, or the server
            exited or was not ready within `ready_timeout` seconds (the message ends with its log).
    """
    try:
        import pytriton
    except ImportError:
        raise BackendError("the shipped Triton server comes with PyTriton: pip install 'el-export[serve]'") from None
    check_python_stub()
    stub, env = python_stub()
    dist = Path(pytriton.__file__).parent / "tritonserver"
    with tempfile.TemporaryDirectory(prefix="el-export-triton-") as tmp:
        backends = Path(shutil.copytree(dist / "backends", Path(tmp) / "backends"))
        shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
        argv = [
            str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}", "--allow-metrics=false", "--exit-timeout-secs=5",
        ]  # fmt: skip
        log_path = Path(log) if log is not None else Path(tmp) / "tritonserver.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(process, f"http://{host}:{http_port}/v2/health/ready", ready_timeout, log_path)
            yield process
        finally:
            stop_process_group(process)


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    """Poll `url` until it answers 200.

    Raises:
        BackendError: the process exited first, or `timeout` seconds passed (with the log's last lines).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackendError(f"{Path(process.args[0]).name} exited with {process.returncode}: {_tail(log_path)}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise BackendError(f"{Path(process.args[0]).name} was not ready within {timeout:.0f} s: {_tail(log_path)}")


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
    import signal

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
