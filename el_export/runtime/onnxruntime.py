"""ONNX Runtime backend: IO binding on torch buffers, so caches never leave the device between steps.

Sessions are made from the checked bytes of each graph and of the external-data files it names (in memory,
never reopened by path), and their inputs and outputs are checked against the manifest's contract.
"""

import contextlib
import posixpath
import threading
from pathlib import Path

import onnxruntime as ort
import torch

from el_export import logs
from el_export.contract.dtypes import name_of, numpy_dtype
from el_export.contract.manifest import MANIFEST
from el_export.errors import BackendError, BundleError, first_line
from el_export.runtime.base import Backend, check_io


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle_dir, manifest, device: str = "cpu", threads: int | None = None, verify: bool = True):
        super().__init__(bundle_dir, manifest, device, verify)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime has no CUDA provider here; on a GPU host: pip install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise BackendError(f"the onnxruntime backend runs on cpu or cuda, not {self.device}")
        self.sessions = {}
        for name, graph in manifest.graphs.items():
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = logs.onnxruntime_session_severity()
            if threads:
                options.intra_op_num_threads = threads
            # The encoder (or prefill) runs once per batch with activations that grow with batch x length^2: an
            # arena would keep its peak for good (0.8 GB at W1's batch 32). The step runs many times at one size:
            # its arena pays off.
            options.enable_cpu_mem_arena = name == "decoder_step"
            path = Path(bundle_dir) / graph.file
            model = self.read(graph.file)
            external = self._external_data(graph.file, model)
            if external:
                sizes = [len(data) for data in external.values()]
                options.add_external_initializers_from_files_in_memory(list(external), list(external.values()), sizes)
            try:
                session = ort.InferenceSession(model, options, providers=providers)
            except Exception as e:  # ORT raises its own exception types for corrupted / truncated files
                raise BackendError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
            check_io(
                name, graph, _tensors(session.get_inputs()), _tensors(session.get_outputs()), "re-export the bundle"
            )
            self.sessions[name] = session

    def _external_data(self, graph_file: str, model: bytes) -> dict[str, bytes]:
        """The checked bytes of every external-data file the graph's tensors name, by the name the graph uses: each
        must be listed (and hashed) in the manifest, or ONNX Runtime would read it from disk unchecked."""
        try:
            locations = _external_locations(model)
        except ValueError as e:
            raise BackendError(f"onnxruntime cannot load {graph_file}: not an ONNX model ({e})") from None
        files = {}
        for location in sorted(locations):
            name = posixpath.join(posixpath.dirname(graph_file), location)
            if name not in self.manifest.files:
                raise BundleError(
                    f"{graph_file} keeps weights in {location!r}, which {MANIFEST} does not list; re-export the bundle"
                )
            files[location] = self.read(name)
        return files

    def generating(self):
        return _one_torch_thread() if self.device.type == "cpu" else contextlib.nullcontext()

    def _run_impl(self, graph_name, feeds, axes):
        outputs = self.allocate_outputs(graph_name, axes)
        binding = self.sessions[graph_name].io_binding()
        kind, index = self.device.type, self.device.index or 0
        for bind, tensors in ((binding.bind_input, feeds), (binding.bind_output, outputs)):
            for name, t in tensors.items():
                bind(name, kind, index, numpy_dtype(name_of(t.dtype)), list(t.shape), t.data_ptr())
        self.sessions[graph_name].run_with_iobinding(binding)
        return outputs


def _tensors(args) -> dict:
    """A session's inputs or outputs as `check_io` takes them, types as the manifest spells them (tensor(float):
    float32, tensor(int64): int64)."""
    types = {a.name: a.type.removeprefix("tensor(").removesuffix(")") for a in args}
    return {a.name: ("float32" if types[a.name] == "float" else types[a.name], a.shape) for a in args}


# Where an ONNX ModelProto can hold a TensorProto (whose external_data entries name files), by message: field
# number -> the field's message (onnx.proto field numbers). Read from the wire format: onnx is not a runtime
# dependency, and reading the whole message would copy the weights.
_HOLDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},  # StringStringEntryProto: key = 1, value = 2
}


def _external_locations(model: bytes) -> set[str]:
    """The "location" of every external_data entry anywhere in a serialized ONNX model.

    Raises:
        ValueError: the bytes are not a well-formed protobuf message.
    """
    data, locations = memoryview(model), set()
    stack = [("model", 0, len(data))]
    while stack:  # a stack, not recursion: a hostile graph may nest subgraphs deeply
        kind, start, end = stack.pop()
        entry = {}
        for number, value_start, value_end in _fields(data, start, end):
            if kind == "entry":
                entry[number] = bytes(data[value_start:value_end])
            elif number in _HOLDS[kind]:
                stack.append((_HOLDS[kind][number], value_start, value_end))
        if entry.get(1) == b"location":
            locations.add(entry.get(2, b"").decode("utf-8"))
    return locations


def _fields(data: memoryview, pos: int, end: int):
    """(field number, start, end) of each length-delimited field of one protobuf message; other fields skipped."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"protobuf wire type {wire} does not occur in ONNX models")
    if pos != end:
        raise ValueError("a field runs past the end of its message")


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise ValueError("a truncated varint")


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def _one_torch_thread():
    """torch at one thread while ONNX Runtime generates on the CPU. The search's torch ops (log-softmax and top-k
    over [rows, vocab]) are small, and torch's OpenMP threads, spinning after each op, take the cores from ONNX
    Runtime's threads: W1 ran 5.1-5.4 s with torch at 2 threads, 4.6-4.9 s at 1 (2 cores). Nested and concurrent
    calls share one saved setting, restored when the last one leaves."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)
