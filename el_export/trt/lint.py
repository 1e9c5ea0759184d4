"""Lint an ONNX graph against what TensorRT's ONNX parser accepts (el_export.trt.ops), without TensorRT.

Checked: the opset range; only default-domain operators from the support table, with their
attribute, constant-input and output restrictions; no control flow (our rule); every tensor of a
type TensorRT has (no float64); graph inputs and outputs of known rank whose dynamic axes are named;
the 1-D inputs that fix an output's rank (Reshape's shape, ...) of a length known at build time.
Shape inputs with dynamic values are fine: TensorRT computes them at run time.
"""

import contextlib
import os
from pathlib import Path

from el_export.errors import ExportError
from el_export.trt import ops


def lint_onnx(path: str | os.PathLike) -> list[str]:
    """Problems that would stop TensorRT's ONNX parser (or our runtime) on this graph; empty if none.

    Args:
        path: an .onnx file (external weights are not read).

    Returns:
        One line per problem, naming the node or tensor.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    with contextlib.suppress(Exception):  # inference only adds types and lengths; unknown ones are reported below
        model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    problems = _opset_problems(model)
    types = _tensor_types(graph)
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        problems += _node_problems(node, types, constants)
    io = {*(v.name for v in graph.input), *(v.name for v in graph.output)}
    for name, (dtype, _) in types.items():
        if dtype not in ops.DTYPES and not (dtype in ops.IO_ONLY_DTYPES and name in io):
            problems.append(f"tensor {name!r} is {dtype}, which TensorRT does not run ({_dtype_hint(dtype)})")
    for value in [*graph.input, *graph.output]:
        problems += _io_shape_problems(value)
    return problems


def check_onnx(path: str | os.PathLike) -> None:
    """Raise ExportError listing the lint's problems (the export-time gate).

    Raises:
        ExportError: the graph uses something TensorRT's ONNX parser does not accept.
    """
    problems = lint_onnx(path)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(
            f"{Path(path).name} would not build with TensorRT {ops.SOURCE['tensorrt']}: "
            + "; ".join(problems[:3])
            + more
        )


def _opset_problems(model) -> list[str]:
    low, high = ops.SOURCE["opsets"]
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high:
            problems.append(f"opset {opset.version} is outside the parser's range {low} to {high}")
    return problems


def _tensor_types(graph) -> dict[str, tuple[str, object]]:
    """name -> (dtype name, shape proto or None) for every typed tensor of the graph."""
    types = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            shape = tensor_type.shape if tensor_type.HasField("shape") else None
            types[value.name] = (_dtype_name(tensor_type.elem_type), shape)
    for init in graph.initializer:
        types.setdefault(init.name, (_dtype_name(init.data_type), None))
    return types


def _dtype_name(elem_type: int) -> str:
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _dtype_hint(dtype: str) -> str:
    if dtype == "float64":
        return "it would be cast to float32 with clamping; compute in float32"
    if dtype in ("int8", "int4", "uint4", "float8e4m3fn", "float4e2m1"):
        return "quantized types exist only between QuantizeLinear and DequantizeLinear"
    return "use float32, float16, bfloat16, int32, int64 or bool"


def _node_problems(node, types: dict, constants: set[str]) -> list[str]:
    where = f"node {node.name or ','.join(node.output)!r} ({node.op_type})"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where} is in domain {node.domain!r}: a custom operator TensorRT runs only as a plugin"]
    if node.op_type in ops.CONTROL_FLOW:
        return [f"{where} is control flow; graphs must be straight-line"]
    if node.op_type not in ops.OPERATORS:
        return [f"{where} is not supported by TensorRT's ONNX parser"]
    problems = []
    dtype = types.get(node.input[0], (None, None))[0] if node.input and node.input[0] else None
    if dtype is not None and dtype not in ops.OPERATORS[node.op_type]:
        problems.append(f"{where} takes {dtype}; TensorRT implements {', '.join(ops.OPERATORS[node.op_type])}")
    if node.op_type in ("Cast", "CastLike"):
        target = next((_dtype_name(a.i) for a in node.attribute if a.name == "to"), None)
        if target is not None and target not in ops.OPERATORS["Cast"]:
            problems.append(f"{where} casts to {target}, which TensorRT does not have")
    problems += _attribute_problems(node, where)
    for index in ops.CONSTANT_INPUTS.get(node.op_type, ()):
        if index < len(node.input) and node.input[index] and node.input[index] not in constants:
            problems.append(f"{where} input {index} ({node.input[index]!r}) must be a build-time constant")
    for index in ops.STATIC_LENGTH_INPUTS.get(node.op_type, ()):
        if index < len(node.input) and node.input[index] and node.input[index] not in constants:
            shape = types.get(node.input[index], (None, None))[1]
            if shape is None or len(shape.dim) != 1 or not shape.dim[0].HasField("dim_value"):
                problems.append(
                    f"{where} input {index} ({node.input[index]!r}) has no length known at build time: "
                    "the output's rank would depend on data"
                )
    used_outputs = sum(1 for o in node.output if o)
    if used_outputs > ops.MAX_OUTPUTS.get(node.op_type, used_outputs):
        problems.append(f"{where} uses {used_outputs} outputs; TensorRT implements {ops.MAX_OUTPUTS[node.op_type]}")
    used_inputs = len([i for i in node.input if i])
    if used_inputs > ops.MAX_INPUTS.get(node.op_type, used_inputs):
        problems.append(f"{where} uses {used_inputs} inputs; TensorRT implements {ops.MAX_INPUTS[node.op_type]}")
    return problems


def _attribute_problems(node, where: str) -> list[str]:
    import onnx

    rules = ops.ATTRIBUTES.get(node.op_type, {})
    problems = []
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            problems.append(f"{where} holds a subgraph ({attribute.name}); graphs must be straight-line")
        if attribute.name not in rules:
            continue
        allowed, value = rules[attribute.name], onnx.helper.get_attribute_value(attribute)
        value = value.decode() if isinstance(value, bytes) else value
        if allowed == ops.ABSENT:
            problems.append(f"{where} sets {attribute.name}, which TensorRT does not support")
        elif allowed == ops.ALL_ONES:
            if any(v != 1 for v in value):
                problems.append(f"{where} has {attribute.name}={list(value)}; TensorRT supports only ones")
        elif value not in allowed:
            problems.append(f"{where} has {attribute.name}={value!r}; TensorRT supports {', '.join(map(str, allowed))}")
    return problems


def _io_shape_problems(value) -> list[str]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return [f"graph IO {value.name!r} has no shape: TensorRT needs every input's and output's rank"]
    problems = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if not dim.HasField("dim_value") and not dim.dim_param:
            problems.append(f"graph IO {value.name!r} axis {axis} is dynamic but unnamed: a profile cannot cover it")
    return problems
