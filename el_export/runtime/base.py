"""The backend interface: run one graph of a bundle on torch tensors that stay on the device.

The base class checks inputs against the manifest's contract and allocates outputs from the
symbolic axes it resolved; a backend fills in `_run_impl` (and says which device it uses). Backends
load bundle files from the bytes `read` checked, and check the contract against the graphs with
`check_io` when they load them.
"""

import contextlib

import torch

from el_export.contract.axes import output_shape, resolve_axes
from el_export.contract.dtypes import torch_dtype
from el_export.contract.files import read_file
from el_export.contract.manifest import GraphEntry, Manifest
from el_export.errors import BundleError, InputError


def check_io(graph_name: str, graph: GraphEntry, inputs: dict, outputs: dict, fix: str) -> None:
    """The graph's own inputs and outputs are the manifest's: names, dtypes, ranks, fixed sizes. A manifest that
    differs would hand the backend wrong buffers (a forged logits size once asked ONNX Runtime for 128 GB).

    Args:
        inputs, outputs: the graph's tensors, name -> (dtype as the manifest spells it, shape: an int where the
            size is fixed, anything else where it is symbolic).
        fix: what the one-line error tells the user to do.

    Raises:
        BundleError: naming the graph, the tensor and the field that differ.
    """
    for side, specs, actual in (("input", graph.inputs, inputs), ("output", graph.outputs, outputs)):
        declared = {s.name for s in specs}
        if missing := [s.name for s in specs if s.name not in actual]:
            raise BundleError(f"{graph_name}: the manifest declares {side} {missing[0]!r}; the graph has none; {fix}")
        if extra := [name for name in actual if name not in declared]:
            raise BundleError(f"{graph_name}: the graph has {side} {extra[0]!r}; the manifest has none; {fix}")
        for spec in specs:
            dtype, shape = actual[spec.name]
            if dtype != spec.dtype:
                raise BundleError(
                    f"{graph_name}: {side} {spec.name!r} is {dtype} in the graph, {spec.dtype} in the manifest; {fix}"
                )
            if _fixed(shape) != _fixed(spec.shape):
                raise BundleError(
                    f"{graph_name}: {side} {spec.name!r} has shape {list(shape)} in the graph, {list(spec.shape)} in "
                    f"the manifest (ranks and fixed sizes must agree); {fix}"
                )


def _fixed(shape) -> list:
    """A shape with every symbolic axis as "*": what a graph and its contract must agree on."""
    return [a if isinstance(a, int) else "*" for a in shape]


class Backend:
    """Runs the graphs of one bundle. Tensors in and out are torch tensors on `self.device`."""

    name = "base"

    def __init__(self, bundle_dir, manifest: Manifest, device: str = "cpu", verify: bool = True):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device: name it
            device = torch.device("cuda", torch.cuda.current_device())
        self.bundle_dir, self.manifest, self.device, self.verify = bundle_dir, manifest, device, verify

    def read(self, name: str) -> bytes:
        """A bundle file's bytes, checked against its sha256 unless `verify` is off. Backends load from these,
        never by path: a file swapped after the check is never run."""
        return read_file(self.bundle_dir, self.manifest, name, self.verify)

    def run(self, graph_name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run a graph on tensors already on `self.device`, checked against the contract first."""
        graph = self.manifest.graphs[graph_name]
        axes = resolve_axes(graph, feeds, graph_name)
        for name, tensor in feeds.items():
            if tensor.device != self.device:
                raise InputError(
                    f"{graph_name}: input {name!r} is on {tensor.device}, the backend runs on {self.device}"
                )
        return self._run_impl(graph_name, {k: v.contiguous() for k, v in feeds.items()}, axes)

    def allocate_outputs(self, graph_name: str, axes: dict[str, int]) -> dict[str, torch.Tensor]:
        """Empty output tensors shaped by the contract, for backends that write into given buffers."""
        return {
            spec.name: torch.empty(output_shape(spec.shape, axes), dtype=torch_dtype(spec.dtype), device=self.device)
            for spec in self.manifest.graphs[graph_name].outputs
        }

    def _run_impl(self, graph_name: str, feeds: dict[str, torch.Tensor], axes: dict[str, int]) -> dict:
        raise NotImplementedError

    def generating(self):
        """A context held around each `generate` call (backends that share the CPU with torch's search)."""
        return contextlib.nullcontext()

    def make_decoder(self, context: dict[str, torch.Tensor]):
        """The `StepDecoder` over this backend's decoder_step graph, given the encoder's outputs."""
        from el_export.runtime.decoder import GraphDecoder

        return GraphDecoder(self, context)
