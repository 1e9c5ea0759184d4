"""ONNX Runtime backend: IO binding on torch buffers, so caches never leave the device between steps."""

import contextlib
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from el_export.errors import BackendError, first_line
from el_export.runtime.base import Backend

_NUMPY = {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle_dir, manifest, device: str = "cpu", threads: int | None = None):
        super().__init__(bundle_dir, manifest, device)
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
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            # The encoder (or prefill) runs once per batch with activations that grow with batch x length^2: an
            # arena would keep its peak for good (0.8 GB at W1's batch 32). The step runs many times at one size:
            # its arena pays off.
            options.enable_cpu_mem_arena = name == "decoder_step"
            path = Path(bundle_dir) / graph.file
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # ORT raises its own exception types for corrupted / truncated files
                first = first_line(e)
                raise BackendError(f"onnxruntime cannot load {path}: {first}") from None

    def generating(self):
        return _one_torch_thread() if self.device.type == "cpu" else contextlib.nullcontext()

    def _run_impl(self, graph_name, feeds, axes):
        outputs = self.allocate_outputs(graph_name, axes)
        binding = self.sessions[graph_name].io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in feeds.items():
            binding.bind_input(name, kind, index, _NUMPY[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, kind, index, _NUMPY[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        self.sessions[graph_name].run_with_iobinding(binding)
        return outputs


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
