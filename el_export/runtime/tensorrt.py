"""TensorRT backend: the bundle's engines, run on torch CUDA buffers bound by address.

Inputs and outputs are torch tensors on the device (outputs allocated from the contract), so caches
never leave it between steps. Each graph runs on torch's current CUDA stream, so it is ordered with
the torch work around it (cache gathers, allocations) without a synchronisation. Shapes outside an
engine's optimization profile are refused before TensorRT sees them, naming the limit and the
`el-export build` option that raises it. Engines are deserialized from the bytes whose sha256 was
checked, and their tensors checked against the manifest's contract.
"""

import tensorrt as trt
import torch

from el_export.errors import BackendError
from el_export.runtime.base import Backend, check_io
from el_export.trt.profiles import AXIS_OPTIONS

_DTYPE_NAMES = {trt.int64: "int64", trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
_ALIGNMENT = 256  # bytes; TensorRT's I/O addresses must be aligned like a cudaMalloc'd buffer


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle_dir, manifest, device: str = "cuda", verify: bool = True):
        super().__init__(bundle_dir, manifest, device, verify)
        if self.device.type != "cuda":
            raise BackendError(f"the tensorrt backend runs on a CUDA device, not {self.device}")
        engines = manifest.engines
        rebuild = f"el-export build {bundle_dir}"
        if not engines:
            raise BackendError(f"bundle {bundle_dir} has no TensorRT engines; build them with `{rebuild}`")
        if engines["tensorrt"] != trt.__version__:
            raise BackendError(
                f"the engines were built with TensorRT {engines['tensorrt']}, this is {trt.__version__}: `{rebuild}`"
            )
        capability = list(torch.cuda.get_device_capability(self.device))
        if engines["gpu"].get("capability", capability) != capability:
            raise BackendError(
                f"the engines were built for {engines['gpu']['name']}, not {torch.cuda.get_device_name(self.device)}"
                f": `{rebuild}` on this GPU"
            )
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        with torch.cuda.device(self.device):
            for name, entry in engines["graphs"].items():
                engine = self.runtime.deserialize_cuda_engine(self.read(entry["file"]))
                if engine is None:
                    raise BackendError(f"TensorRT cannot load {entry['file']}: `{rebuild}`")
                check_io(name, manifest.graphs[name], *_engine_tensors(engine), f"rebuild the engines: `{rebuild}`")
                self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.placeholder = torch.empty(_ALIGNMENT, dtype=torch.uint8, device=self.device)  # for empty tensors

    def _run_impl(self, graph_name, feeds, axes):
        self._check_profile(graph_name, feeds)
        engine, context = self.engines[graph_name], self.contexts[graph_name]
        outputs = self.allocate_outputs(graph_name, axes)
        keep = []  # host copies of shape-tensor inputs and realigned inputs live until the run is queued
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            if engine.is_shape_inference_io(name):  # TensorRT reads shape tensors on the host
                tensor = tensor.cpu()
            elif tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                tensor = tensor.clone()
            keep.append(tensor)
            context.set_tensor_address(name, self._address(tensor))
        for name, tensor in outputs.items():
            if tuple(context.get_tensor_shape(name)) != tuple(tensor.shape):
                raise BackendError(
                    f"{graph_name}: TensorRT makes {name!r} {tuple(context.get_tensor_shape(name))}, "
                    f"the contract {tuple(tensor.shape)}"
                )
            context.set_tensor_address(name, self._address(tensor))
        with torch.cuda.device(self.device):
            if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise BackendError(f"TensorRT failed to run {graph_name} (see its log above)")
        return outputs

    def _address(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self.placeholder.data_ptr()

    def _check_profile(self, graph_name: str, feeds: dict[str, torch.Tensor]) -> None:
        """Refuse shapes outside the engine's profile, naming the axis, its limit and how to raise it."""
        engine = self.engines[graph_name]
        graph = self.manifest.graphs[graph_name]
        for spec in graph.inputs:
            low, _, high = engine.get_tensor_profile_shape(spec.name, 0)
            for axis, size, lo, hi in zip(spec.shape, feeds[spec.name].shape, low, high, strict=True):
                if lo <= size <= hi:
                    continue
                option = AXIS_OPTIONS.get(axis, "the limits") if isinstance(axis, str) else "the limits"
                raise BackendError(
                    f"{graph_name}: {axis} is {size} in {spec.name!r}, outside the engine's profile [{lo}, {hi}]; "
                    f"rebuild with `el-export build {self.bundle_dir}` and a larger {option}"
                )


def _engine_tensors(engine) -> tuple[dict, dict]:
    """An engine's inputs and outputs as `check_io` takes them (TensorRT's -1 for a dynamic size: None)."""
    inputs, outputs = {}, {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        shape = [None if size < 0 else size for size in engine.get_tensor_shape(name)]
        side = inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs
        side[name] = (_DTYPE_NAMES.get(dtype, str(dtype)), shape)
    return inputs, outputs
