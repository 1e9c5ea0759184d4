"""Engine precision, and how a family's overflow-prone modules stay fp32 in a reduced-precision engine.

Two ways to get an fp16 (bf16) engine:
- strongly typed: the engine computes in the graph's own types. An fp16 bundle already holds the
  family's fp32 modules in fp32 (export casts them), so its engine does too. The only way on
  TensorRT 11, which builds strongly typed networks alone.
- weakly typed (TensorRT 10): an fp32 bundle with the FP16 (BF16) builder flag, TensorRT choosing
  precisions per layer, and the layers of the family's fp32 modules pinned to fp32 by precision
  constraints ("obey").

Finding those layers. The dynamo exporter names nodes after ops (`node_linear_6`), not modules, but
records each node's module path in its metadata: `pkg.torch.onnx.name_scopes` is, for example,
"['', 'model.decoder.layers.0.fc2', 'linear_6']" (the graph module holds ours as `model`). The
outputs of the nodes inside a kept module are the seeds. TensorRT's parser names each network
tensor after the ONNX tensor it computes and leaves its intermediate tensors unnamed by ONNX, so the
layers of one node are the seed's producer and, backwards through tensors the ONNX graph does not
name, everything up to the node's ONNX inputs. Layer names are not used: the parser's suffixes for a
node's extra layers (`node_linear_6_12`) can collide with other nodes' names.
"""

import ast
import fnmatch
import os
from dataclasses import dataclass

from el_export.contract.manifest import Manifest
from el_export.errors import BackendError, InvalidArgumentError

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # engine precision -> bundle dtype
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build: strongly typed, or a builder flag plus the module patterns held in fp32."""

    precision: str
    strongly_typed: bool
    keep_fp32: tuple[str, ...] = ()

    @property
    def flag(self) -> str | None:
        """The Polygraphy CreateConfig flag ("fp16", "bf16") of a weakly typed build."""
        return None if self.strongly_typed or self.precision == "fp32" else self.precision


def plan_precision(manifest: Manifest, precision: str, tensorrt_version: str, fp32_modules=()) -> PrecisionPlan:
    """Choose strong or weak typing for an engine of `precision` from this bundle.

    Args:
        manifest: the bundle's manifest (its dtype is the graphs' precision).
        precision: "fp32", "fp16" or "bf16".
        tensorrt_version: the installed TensorRT's version string.
        fp32_modules: the family's module patterns that overflow in fp16 (Family.fp32_modules).

    Raises:
        InvalidArgumentError: this bundle cannot give that precision with this TensorRT.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if PRECISIONS[precision] == manifest.dtype:
        return PrecisionPlan(precision, strongly_typed=True)
    own = next(p for p, d in PRECISIONS.items() if d == manifest.dtype)
    if manifest.dtype != "float32":
        raise InvalidArgumentError(
            f"the bundle's graphs are {manifest.dtype}: build {own} engines from it, "
            f"or {precision} engines from a float32 export"
        )
    if int(tensorrt_version.split(".")[0]) >= 11:
        how = "export the bundle with --dtype float16" if precision == "fp16" else "use TensorRT 10"
        raise InvalidArgumentError(
            f"TensorRT {tensorrt_version} builds strongly typed networks only, which compute in the graph's own "
            f"types: for a {precision} engine, {how}"
        )
    return PrecisionPlan(precision, strongly_typed=False, keep_fp32=tuple(fp32_modules))


def fp32_tensors(onnx_path: str | os.PathLike, patterns: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(outputs of the nodes inside modules matching `patterns`, every tensor name of the graph).

    Raises:
        BackendError: the graph records no module paths, so the modules cannot be found.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
    seeds, scoped = set(), False
    for node in graph.node:
        names.update(node.output)
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES), None)
        if scopes is None:
            continue
        scoped = True
        modules = [s.removeprefix("model.") for s in scopes if s]
        if any(fnmatch.fnmatch(m, p) for m in modules for p in patterns):
            seeds.update(o for o in node.output if o)
    if patterns and not scoped:
        raise BackendError(
            f"{os.fspath(onnx_path)} records no module paths ({NAME_SCOPES}), so {', '.join(patterns)} cannot be "
            "kept in fp32; re-export it with this el-export"
        )
    return seeds, names


def fp32_layers(network, seeds: set[str], onnx_names: set[str]) -> list:
    """The network layers that compute the seed tensors (see the module docstring)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    found, stack = {}, [producer[name] for name in seeds if name in producer]
    while stack:
        layer = stack.pop()
        if layer.name in found:
            continue
        found[layer.name] = layer
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None and tensor.name not in onnx_names and tensor.name in producer:
                stack.append(producer[tensor.name])
    return list(found.values())


def hold_fp32(trt, network, seeds: set[str], onnx_names: set[str]) -> int:
    """Pin the seeds' layers to fp32 (compute and floating outputs); returns how many were pinned.

    Raises:
        BackendError: the graph has kept-module tensors but none of them is in the network.
    """
    floats = (trt.float32, trt.float16, trt.bfloat16)
    pinned = 0
    for layer in fp32_layers(network, seeds, onnx_names):
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outputs or layer.type == trt.LayerType.CONSTANT:  # weights and shape arithmetic have no precision
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if seeds and not pinned:
        raise BackendError("none of the fp32 modules' tensors is in the TensorRT network: cannot keep them in fp32")
    return pinned
