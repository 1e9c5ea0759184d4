"""A standard Triton model repository for a bundle, for people who run the official Triton server.

    OUT/NAME/config.pbtxt      Python backend, dynamic batching, the inputs and outputs of `serve`
    OUT/NAME/1/model.py        a Python-backend model: loads the bundle with el_export, answers with `BatchRunner`
    OUT/NAME/1/bundle/         a copy of the bundle (the repository is self-contained)

The server's Python environment needs el-export installed (`pip install el-export`); the model then
batches as `el-export serve` does (the same `BatchRunner`; but each instance is a process of its own, with
its own copy of the bundle and its own running batch), and refuses a bad request (HTTP 400, gRPC INVALID_ARGUMENT)
without failing its neighbours. `shipped_server` runs the
Triton server binary that ships in the PyTriton wheel on such a repository.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from el_export.contract.files import read_manifest
from el_export.errors import InvalidArgumentError
from el_export.serving.batching import RequestCaps, ServingTensor, model_inputs, model_outputs
from el_export.serving.forward import read_batch, responses
from el_export.serving.process import TritonProcess
from el_export.serving.server import ServeConfig, check_ports_free, make_runner

_RUNNING_BATCH_CAPS = ("max_batch", "max_rows")  # ServeConfig fields, in the model's parameters ("": unset)
_TRITON_TYPES = {"bytes": "TYPE_STRING", "int64": "TYPE_INT64", "float32": "TYPE_FP32"}

MODEL_PY = '''"""Triton Python-backend model written by `el-export triton-repo`: the bundle beside this file."""

from el_export.serving.triton_repo import TritonPythonModel  # noqa: F401  (Triton looks the class up here)
'''


def write_repository(bundle_dir: str | os.PathLike, out: str | os.PathLike, config: ServeConfig | None = None,
                     backend: str = "onnxruntime") -> Path:  # fmt: skip
    """Write a Triton model repository serving the bundle.

    Args:
        bundle_dir: an exported bundle (copied into the repository).
        out: the repository directory to create (must not exist, or be empty).
        config: model name, max batch size, queue delay, dynamic batching on/off, instances (unset: 1, as each is
            a process with its own bundle), batching, the running batch's caps, request caps (`ServeConfig()`).
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
    parameters = {"el_export_backend": backend, "el_export_batching": config.batching}
    parameters |= {f"el_export_{name}": str(value) for name, value in dataclasses.asdict(config.caps).items()}
    parameters |= {f"el_export_{name}": str(getattr(config, name) or "") for name in _RUNNING_BATCH_CAPS}
    text = model_config(manifest, config, parameters, config.instances or 1)
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


def model_config(manifest, config: ServeConfig, parameters: dict[str, str], instances: int) -> str:
    """config.pbtxt text: Python backend, the bundle's inputs (optional, ragged where lengths vary) and outputs
    (`model_inputs`, `model_outputs`), `instances` model instances, and `parameters` (strings) for the model."""

    def tensor(spec: ServingTensor, is_input: bool) -> str:
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
        "input [\n" + ",\n".join(tensor(s, True) for s in model_inputs(manifest)) + "\n]",
        "output [\n" + ",\n".join(tensor(s, False) for s in model_outputs(manifest)) + "\n]",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
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
        given = {f: parameters.get(f"el_export_{f.name}") for f in dataclasses.fields(RequestCaps)}
        caps = RequestCaps(**{f.name: type(f.default)(value) for f, value in given.items() if value})  # older: defaults
        batch_caps = {name: parameters.get(f"el_export_{name}") for name in _RUNNING_BATCH_CAPS}
        batching = parameters.get("el_export_batching", "group")  # repositories written before it: group
        config = ServeConfig(caps=caps, batching=batching, **{k: int(v) for k, v in batch_caps.items() if v})
        self.runner = make_runner(el_export.load(bundle, backend=parameters["el_export_backend"]), config)
        self.inputs = [spec.name for spec in model_inputs(self.runner.generator.manifest)]
        self.outputs = [spec.name for spec in model_outputs(self.runner.generator.manifest)]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python-backend stub

        return responses(pb_utils, self.runner(read_batch(pb_utils, requests, self.inputs)), self.outputs)

    def finalize(self) -> None:
        self.runner.close()


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
