"""int8 products in an exported float32 graph, as a recipe says (contract.quantization).

Embedding tables become int8 with one scale per row (a Gather of int8 rows and of their scales). Each product of an
activation with a float32 weight (MatMul, Gemm, and EL's per-head products with a reshaped weight) becomes an
integer product on ONNX Runtime's u8 x s8 kernels (VNNI / AMX where the CPU has them): the weight
int8 with one scale per output channel (per head and channel for per-head weights), the activation uint8 around 128
with one scale per row (`row`: a token's scale does not depend on the other rows of the batch, as in CTranslate2) or
ONNX Runtime's one scale per tensor (`tensor`, which it fuses into a single kernel):

    row:     s = max|x| / 127 over the last axis        [..., 1]
             q = QuantizeLinear(x / s, 1, 128)           uint8, round half to even
             y = MatMulIntegerToFloat(q, W8, 1, w_scale, 128) * s
    tensor:  q, xs, xz = DynamicQuantizeLinear(x)
             y = MatMulIntegerToFloat(q, W8, xs, w_scale, xz)

A quantized activation is shared by every product it feeds (a layer's q, k and v projections).

With `recipe.memory`, EL's products over the encoder output H [B, S, d] (every layer's scores q' H^T and sums p H)
are int8 too. H is quantized once per input, by the encoder graph, with one scale per position: the encoder also
returns MEMORY (H in int8, its transpose, the positions' scales [B, 1, S]) and the decoder step takes those instead
of H, a quarter of its bytes per copy. A position's scale multiplies the scores' columns, and is folded into p
before p is quantized for the sums. Convolutions and the other activation x activation products stay float32.
"""

import ast
from pathlib import Path

import numpy as np

from el_export.contract.manifest import GraphEntry, TensorSpec
from el_export.contract.quantization import MEMORY_OUTPUTS, METHOD, WEIGHTS, Recipe

_MS = "com.microsoft"
MEMORY = "encoder_hidden"  # the EL decoder's memory, held once per input (graphs.py)
MEMORY_INT8, MEMORY_INT8_T, MEMORY_SCALE = MEMORY_OUTPUTS


def quantize_model(model, graph_name: str, recipe: Recipe, el: bool = True) -> dict:
    """Rewrite an onnx ModelProto in place; returns what the graph got (the manifest's
    `quantization.graphs[graph_name]`): {"activations", "int8": [modules], "float32": {module: why}}, and where the
    memory is int8 (`recipe.memory`, EL graphs: `el`), "memory_outputs" (encoder) or "memory_products" (step)."""
    from onnx import helper

    graph = model.graph
    granularity = recipe.granularity(graph_name)
    weights = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    builder = _Builder(granularity)
    record = {"activations": granularity, "int8": [], "float32": {}}
    memory_step = el and recipe.memory and MEMORY in inputs
    nodes = []
    for node in graph.node:
        module = module_name(node, weights, producers)
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
            keep = recipe.kept(module)
            record["float32"][module] = keep.why if keep else "convolution: no per-row integer convolution"
            nodes.append(node)
            continue
        if memory_step and node.op_type == "MatMul":
            b = node.input[1]
            transposed = b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] == MEMORY
            if b == MEMORY or (transposed and _perm(producers[b]) == [0, 2, 1]):
                nodes.extend(builder.memory_product(node.input[0], transposed, node.output[0], f"{node.name}_int8"))
                record["memory_products"] = record.get("memory_products", 0) + 1
                continue
        table = _embedding_table(node, weights)
        weight = None if table is not None else _weight_operand(node, weights, producers)
        if table is None and weight is None:
            nodes.append(node)
            continue
        if keep := recipe.kept(module):
            record["float32"][module] = keep.why
            nodes.append(node)
            continue
        if table is not None:
            nodes.extend(builder.lookup(table, node.input[1], node.output[0], f"{node.name}_int8"))
            record["int8"].append(module)
            continue
        nodes.extend(builder.product(node.input[0], weight, node.output[0], f"{node.name}_int8"))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            nodes[-1].output[0] = f"{node.output[0]}_nobias"  # the bias is added after the product
            nodes.append(helper.make_node("Add", [f"{node.output[0]}_nobias", node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))  # fmt: skip
        if module not in record["int8"]:
            record["int8"].append(module)
    if el and recipe.memory and MEMORY in outputs:  # the encoder: its output in int8 once, for every step to read
        nodes.extend(builder.memory_outputs(MEMORY))
        graph.output.extend(_memory_infos(next(o for o in graph.output if o.name == MEMORY)))
        record["memory_outputs"] = list(MEMORY_OUTPUTS)
    graph.ClearField("node")
    graph.node.extend(_live(nodes, outputs | set(record.get("memory_outputs", []))))
    graph.initializer.extend(builder.initializers)
    _drop_unused(graph)
    if record.get("memory_products"):
        used = {name for node in graph.node for name in node.input}
        memory = next(i for i in graph.input if i.name == MEMORY)
        kept = [i for i in graph.input if i.name in used or i.name != MEMORY]
        graph.ClearField("input")
        graph.input.extend(kept + _memory_infos(memory))
    del graph.value_info[:]  # intermediate shapes of replaced nodes would be stale
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return record


def quantize_file(path: Path, graph_name: str, recipe: Recipe, el: bool = True) -> dict:
    """`quantize_model` on the graph file at `path`, rewritten in place (weights inline)."""
    import onnx

    model = onnx.load(str(path))
    record = quantize_model(model, graph_name, recipe, el)
    onnx.save(model, str(path))
    return record


def record(recipe: Recipe, graphs: dict) -> dict:
    """The manifest's `quantization` field for a bundle whose graphs got `graphs` ({name: quantize_model's})."""
    return {"method": METHOD, "recipe": recipe.to_json(), "weights": WEIGHTS, "graphs": graphs}


def quantized_entry(entry: GraphEntry, graph_record: dict) -> GraphEntry:
    """A graph's manifest IO after quantization: the encoder also returns the int8 memory; a decoder step whose
    memory products are int8 takes it instead of the float memory."""
    if graph_record.get("memory_outputs"):
        b, s, d = entry.output(MEMORY).shape
        return GraphEntry(entry.file, entry.inputs, (*entry.outputs, *memory_specs(b, s, d)))
    if graph_record.get("memory_products"):
        b, s, d = entry.input(MEMORY).shape
        kept = tuple(spec for spec in entry.inputs if spec.name != MEMORY)
        return GraphEntry(entry.file, (*kept, *memory_specs(b, s, d)), entry.outputs)
    return entry


def memory_specs(b, s, d) -> tuple[TensorSpec, ...]:
    """The int8 memory's tensors, given the float memory's axes [b, s, d]."""
    return (TensorSpec(MEMORY_INT8, "int8", (b, s, d)), TensorSpec(MEMORY_INT8_T, "int8", (b, d, s)),
            TensorSpec(MEMORY_SCALE, "float32", (b, 1, s)))  # fmt: skip


def memory_feeds(memory: np.ndarray) -> dict[str, np.ndarray]:
    """What the quantized encoder returns for a memory [B, S, d] (numpy, for checks and tests)."""
    scale = np.maximum(np.abs(memory).max(axis=-1, keepdims=True), 1e-30).astype(np.float32) * np.float32(1 / 127)
    q = np.clip(np.rint(memory * (np.float32(1) / scale)), -128, 127).astype(np.int8)
    return {MEMORY_INT8: q, MEMORY_INT8_T: np.ascontiguousarray(q.transpose(0, 2, 1)),
            MEMORY_SCALE: np.ascontiguousarray(scale.transpose(0, 2, 1))}  # fmt: skip


def module_name(node, weights: dict, producers: dict) -> str:
    """The PyTorch module a node was exported from (`model.decoder.layers.0.fc2`), from the torch exporter's name
    scopes; for a product with a reshaped weight outside any module's forward (EL's per-head W_k, W_v), the module
    owning that weight (`model.decoder.layers.0.encoder_attn.k_proj`); else the node's own name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 3 and isinstance(scopes[-2], str) and scopes[-2]:
                return scopes[-2]
    name = node.input[1] if len(node.input) > 1 else ""
    for _ in range(4):  # through the Reshape / Transpose chain to the weight
        if name in weights or name not in producers:
            break
        name = producers[name].input[0]
    return name.removesuffix(".weight") if name in weights and name.endswith(".weight") else node.name


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _weight_operand(node, weights: dict, producers: dict) -> np.ndarray | None:
    """The weight [K, N] (or per head [h, K, N]) where `node` multiplies an activation by a float32 weight: an
    initializer, or one reshaped / transposed (EL's per-head W_k and W_v); else None."""
    from onnx import TensorProto, numpy_helper

    def attr(name, default):
        return next((a.i if a.type == a.INT else a.f for a in node.attribute if a.name == name), default)

    if len(node.input) < 2 or node.input[0] in weights:
        return None
    if node.op_type == "Gemm":
        tensor = weights.get(node.input[1])
        plain = attr("transA", 0) == 0 and attr("alpha", 1.0) == 1.0 and attr("beta", 1.0) == 1.0
        if tensor is None or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2 or not plain:
            return None
        matrix = numpy_helper.to_array(tensor).astype(np.float32)
        return matrix.T if attr("transB", 0) else matrix
    if node.op_type != "MatMul":
        return None
    matrix = _constant(node.input[1], weights, producers)
    return matrix if matrix is not None and matrix.ndim in (2, 3) and matrix.dtype == np.float32 else None


def _embedding_table(node, weights: dict) -> np.ndarray | None:
    """The float32 table [V, d] a Gather looks rows up in (token and position embeddings), else None."""
    from onnx import TensorProto, numpy_helper

    if node.op_type != "Gather" or node.input[0] not in weights:
        return None
    if any(a.name == "axis" and a.i for a in node.attribute):
        return None
    tensor = weights[node.input[0]]
    return numpy_helper.to_array(tensor) if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2 else None


def _constant(name: str, weights: dict, producers: dict, depth: int = 0) -> np.ndarray | None:
    """The value of `name` where it is an initializer, or a Reshape / Transpose of one; else None."""
    from onnx import numpy_helper

    if name in weights:
        return numpy_helper.to_array(weights[name])
    node = producers.get(name)
    if node is None or depth > 3:
        return None
    if node.op_type == "Transpose":
        value = _constant(node.input[0], weights, producers, depth + 1)
        return None if value is None else np.transpose(value, _perm(node) or None)
    if node.op_type == "Reshape" and node.input[1] in weights:
        value = _constant(node.input[0], weights, producers, depth + 1)
        shape = numpy_helper.to_array(weights[node.input[1]]).tolist()
        if value is None or any(s == 0 for s in shape):
            return None
        return value.reshape(shape)
    return None


def _live(nodes: list, wanted: set[str]) -> list:
    """`nodes` without those whose outputs nothing reads (the float nodes a replaced product fed on)."""
    needed, kept = set(wanted), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


def _drop_unused(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _memory_infos(memory) -> list:
    """Graph inputs or outputs for the int8 memory, with the float memory's (value info `memory`) axes."""
    from onnx import TensorProto, helper

    b, s, d = (x.dim_param or x.dim_value for x in memory.type.tensor_type.shape.dim)
    types = {"int8": TensorProto.INT8, "float32": TensorProto.FLOAT}
    return [helper.make_tensor_value_info(t.name, types[t.dtype], list(t.shape)) for t in memory_specs(b, s, d)]


class _Builder:
    """Makes the integer products of one graph, sharing each activation's quantization among its products."""

    def __init__(self, granularity: str):
        self.granularity = granularity
        self.initializers = []
        self.quantized = {}  # activation name -> (uint8 name, scale name, zero point name)
        self._constants = {}
        self._count = 0

    def constant(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        key = (value.dtype.str, value.shape, value.tobytes()) if value.size == 1 else None
        if key in self._constants:
            return self._constants[key]
        self._count += 1
        name = f"int8_{hint}_{self._count}"
        self.initializers.append(numpy_helper.from_array(value, name))
        if key is not None:
            self._constants[key] = name
        return name

    def _row_scale(self, x: str, stem: str) -> list:
        """Nodes making `{stem}_scale` = max|x| / 127 over the last axis and `{stem}_unit` = x / scale."""
        from onnx import helper

        axes = self.constant(np.array([-1], np.int64), "axes")
        tiny = self.constant(np.array(1e-30, np.float32), "tiny")
        step = self.constant(np.array(1 / 127, np.float32), "step")
        return [
            helper.make_node("ReduceMax", [x, axes], [f"{stem}_max"], keepdims=1, name=f"{stem}_max"),
            helper.make_node("ReduceMin", [x, axes], [f"{stem}_min"], keepdims=1, name=f"{stem}_min"),
            helper.make_node("Neg", [f"{stem}_min"], [f"{stem}_negmin"], name=f"{stem}_negmin"),
            helper.make_node("Max", [f"{stem}_max", f"{stem}_negmin", tiny], [f"{stem}_amax"], name=f"{stem}_amax"),
            helper.make_node("Mul", [f"{stem}_amax", step], [f"{stem}_scale"], name=f"{stem}_scale"),  # [..., 1]
            helper.make_node("Reciprocal", [f"{stem}_scale"], [f"{stem}_inv"], name=f"{stem}_inv"),
            helper.make_node("Mul", [x, f"{stem}_inv"], [f"{stem}_unit"], name=f"{stem}_unit"),  # in [-127, 127]
        ]

    def activation(self, x: str) -> tuple[list, tuple[str, str, str]]:
        """Nodes quantizing `x` (none if already done) and the (uint8, scale, zero point) names."""
        from onnx import helper

        if x in self.quantized:
            return [], self.quantized[x]
        stem = f"{x}_int8"
        if self.granularity == "tensor":
            names = (f"{stem}_q", f"{stem}_scale", f"{stem}_zero")
            nodes = [helper.make_node("DynamicQuantizeLinear", [x], list(names), name=f"{stem}_quantize")]
        else:
            one = self.constant(np.array(1.0, np.float32), "one")
            zero = self.constant(np.array(128, np.uint8), "zero")
            quantize = helper.make_node("QuantizeLinear", [f"{stem}_unit", one, zero], [f"{stem}_q"], name=f"{stem}_q")
            nodes = [*self._row_scale(x, stem), quantize]
            names = (f"{stem}_q", f"{stem}_scale", zero)
        self.quantized[x] = names
        return nodes, names

    def product(self, x: str, weight: np.ndarray, out: str, name: str) -> list:
        """Nodes computing out = x @ weight ([K, N], or per head [h, K, N]) with int8 weights."""

        scale = np.abs(weight).max(axis=-2, keepdims=True) / 127  # [1, N] or [h, 1, N]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        w = self.constant(q, "weight")
        nodes, (xq, x_scale, x_zero) = self.activation(x)
        one = self.constant(np.array(1.0, np.float32), "one")
        # per column [N], or per head and column [h, 1, N] (MatMulIntegerToFloat broadcasts it over the heads)
        w_scale = self.constant((scale.reshape(-1) if weight.ndim == 2 else scale).astype(np.float32), "weight_scale")
        after = [x_scale] if self.granularity == "row" else []
        a_scale = one if self.granularity == "row" else x_scale
        return [*nodes, *self._integer_product(xq, w, a_scale, w_scale, x_zero, after, out, name)]

    def _integer_product(self, xq, w, a_scale, w_scale, x_zero, after: list, out: str, name: str) -> list:
        """MatMulIntegerToFloat, then a Mul by each of `after` (scales it cannot apply itself); returns the nodes."""
        from onnx import helper

        names = [f"{out}_int8_{i}" for i in range(len(after))] + [out]
        nodes = [helper.make_node("MatMulIntegerToFloat", [xq, w, a_scale, w_scale, x_zero], [names[0]], domain=_MS,
                                  name=name)]  # fmt: skip
        for i, s in enumerate(after):
            nodes.append(helper.make_node("Mul", [names[i], s], [names[i + 1]], name=f"{name}_scale{i}"))
        return nodes

    def lookup(self, table: np.ndarray, ids: str, out: str, name: str) -> list:
        """Nodes computing out = table[ids] from the table in int8, one scale per row (per token)."""
        from onnx import TensorProto, helper

        scale = np.abs(table).max(axis=1, keepdims=True) / 127  # [V, 1]
        scale[scale == 0] = 1.0
        q = self.constant(np.clip(np.rint(table / scale), -127, 127).astype(np.int8), "table")
        scales = self.constant(scale.astype(np.float32), "table_scale")
        return [
            helper.make_node("Gather", [q, ids], [f"{out}_int8"], axis=0, name=name),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_unit"], to=TensorProto.FLOAT, name=f"{name}_cast"),
            helper.make_node("Gather", [scales, ids], [f"{out}_scale"], axis=0, name=f"{name}_scale"),
            helper.make_node("Mul", [f"{out}_unit", f"{out}_scale"], [out], name=f"{name}_rescale"),
        ]

    def memory_product(self, x: str, transposed: bool, out: str, name: str) -> list:
        """out = x @ H^T (scores, `transposed`) or x @ H (weighted sums), H the int8 memory the step takes."""
        from onnx import helper

        one = self.constant(np.array(1.0, np.float32), "one")
        fold = []
        if not transposed:  # [B, Q, S] @ [B, S, d]: the positions' scales lie along the reduced axis: folded into x
            fold = [helper.make_node("Mul", [x, MEMORY_SCALE], [f"{x}_by_memory_scale"], name=f"{name}_fold")]
            x = f"{x}_by_memory_scale"
        nodes, (xq, x_scale, x_zero) = self.activation(x)
        after = [x_scale] if self.granularity == "row" else []
        if transposed:  # [B, Q, d] @ [B, d, S]: a position's scale multiplies its column of the scores
            after.append(MEMORY_SCALE)
        a_scale = one if self.granularity == "row" else x_scale
        memory = MEMORY_INT8_T if transposed else MEMORY_INT8
        return [*fold, *nodes, *self._integer_product(xq, memory, a_scale, one, x_zero, after, out, name)]

    def memory_outputs(self, memory: str) -> list:
        """Nodes making the int8 memory from the float one, once per input (the encoder's extra outputs)."""
        from onnx import helper

        stem = f"{memory}_memory"
        one = self.constant(np.array(1.0, np.float32), "one")
        zero = self.constant(np.array(0, np.int8), "signed_zero")
        return [
            *self._row_scale(memory, stem),
            helper.make_node("QuantizeLinear", [f"{stem}_unit", one, zero], [MEMORY_INT8], name=f"{stem}_q"),
            helper.make_node("Transpose", [MEMORY_INT8], [MEMORY_INT8_T], perm=[0, 2, 1], name=f"{stem}_t"),
            helper.make_node("Transpose", [f"{stem}_scale"], [MEMORY_SCALE], perm=[0, 2, 1], name=f"{stem}_scale_t"),
        ]
