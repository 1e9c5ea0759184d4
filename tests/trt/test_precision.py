"""Engine precision: strong or weak typing, and finding the layers of a family's fp32 modules."""

from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import onnx
import pytest

from el_export.contract.files import read_manifest
from el_export.errors import BackendError, InvalidArgumentError
from el_export.trt.precision import NAME_SCOPES, PrecisionPlan, fp32_tensors, hold_fp32, plan_precision


@pytest.fixture(scope="module")
def fp32_bundle(bundles):
    return read_manifest(bundles("t5-v1_1", "el"))


def test_a_bundle_in_its_own_precision_is_strongly_typed(fp32_bundle):
    assert plan_precision(fp32_bundle, "fp32", "10.15.1", ("*.fc2",)) == PrecisionPlan("fp32", strongly_typed=True)
    fp16 = replace(fp32_bundle, dtype="float16")
    assert plan_precision(fp16, "fp16", "11.4.0", ("*.fc2",)) == PrecisionPlan("fp16", strongly_typed=True)
    assert plan_precision(fp16, "fp16", "11.4.0").flag is None  # the graph's types say it all


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_10_lowers_an_fp32_bundle_holding_the_family_modules(fp32_bundle, precision):
    plan = plan_precision(fp32_bundle, precision, "10.15.1", ("*.fc2",))
    assert plan == PrecisionPlan(precision, strongly_typed=False, keep_fp32=("*.fc2",))
    assert plan.flag == precision


@pytest.mark.parametrize(
    "dtype, precision, version, message",
    [
        ("float32", "fp16", "11.4.0", "strongly typed networks only.*export the bundle with --dtype float16"),
        ("float32", "bf16", "11.0.1", "strongly typed networks only.*use TensorRT 10"),
        ("float16", "fp32", "10.15.1", "the bundle's graphs are float16: build fp16 engines"),
        ("float32", "int8", "10.15.1", "precision 'int8' is not one of"),
    ],
)
def test_impossible_precisions_are_refused(fp32_bundle, dtype, precision, version, message):
    with pytest.raises(InvalidArgumentError, match=message):
        plan_precision(replace(fp32_bundle, dtype=dtype), precision, version)


def test_kept_modules_are_found_from_the_exporter_metadata(bundles):
    bundle = bundles("t5-v1_1", "el")
    for graph in ("encoder", "decoder_step"):  # two layers, fc2 in each, in both graphs
        path = bundle / f"{graph}.onnx"
        seeds, names = fp32_tensors(path, ("*.fc2",))
        nodes = {o: n for n in onnx.load(str(path), load_external_data=False).graph.node for o in n.output}
        scopes = {str(next(p.value for p in nodes[s].metadata_props if p.key == NAME_SCOPES)) for s in seeds}
        assert len(seeds) == 2 and all(".fc2" in scope for scope in scopes), scopes
        assert seeds <= names
    assert fp32_tensors(bundles("bart", "el") / "decoder_step.onnx", ("*.fc_nothing",))[0] == set()


def test_a_graph_without_module_paths_is_refused(bundles, tmp_path):
    model = onnx.load(str(bundles("t5-v1_1", "el") / "encoder.onnx"))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, tmp_path / "encoder.onnx")
    with pytest.raises(BackendError, match="records no module paths"):
        fp32_tensors(tmp_path / "encoder.onnx", ("*.fc2",))
    assert fp32_tensors(tmp_path / "encoder.onnx", ())[0] == set()  # nothing to keep: nothing to find


# A stand-in for a parsed TensorRT network (the attributes hold_fp32 uses).
TRT = SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16", LayerType=SimpleNamespace(CONSTANT="constant"))


@dataclass
class Tensor:
    name: str
    dtype: str = "f32"


@dataclass
class Layer:
    name: str
    inputs: list
    outputs: list
    type: str = "other"
    precision: str | None = None
    output_types: dict = field(default_factory=dict)

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, layers):
        self.layers = layers
        self.num_layers = len(layers)

    def get_layer(self, i):
        return self.layers[i]


def _fc2_network():
    """ONNX `x -> MatMul(w) + b -> linear_6 (fc2) -> Add(x) -> out`, as the parser might lay it out:
    a shuffle and a shape computation before the matmul, the bias add as its own layer."""
    x, w, b = Tensor("x"), Tensor("w"), Tensor("b")
    shape, flat, product = Tensor("(Unnamed 1)", "i64"), Tensor("(Unnamed 2)"), Tensor("(Unnamed 3)")
    fc2, out = Tensor("linear_6"), Tensor("out")
    return Network([
        Layer("w", [], [w], type="constant"),
        Layer("b", [], [b], type="constant"),
        Layer("node_linear_6_1", [x], [shape]),  # shape arithmetic: integer, not pinned
        Layer("node_linear_6", [x, shape], [flat]),
        Layer("node_linear_6_2", [flat, w], [product]),
        Layer("node_add_6", [product, b], [fc2]),
        Layer("node_add_7", [fc2, x], [out]),  # the next module: TensorRT's choice
    ])  # fmt: skip


def test_layers_between_a_kept_node_and_its_onnx_inputs_are_pinned():
    network = _fc2_network()
    names = {"x", "w", "b", "linear_6", "out"}
    assert hold_fp32(TRT, network, {"linear_6"}, names) == 3
    pinned = {layer.name for layer in network.layers if layer.precision == "f32"}
    assert pinned == {"node_linear_6", "node_linear_6_2", "node_add_6"}
    assert all(layer.output_types == {0: "f32"} for layer in network.layers if layer.name in pinned)


def test_kept_tensors_missing_from_the_network_are_an_error():
    with pytest.raises(BackendError, match="cannot keep them in fp32"):
        hold_fp32(TRT, _fc2_network(), {"linear_99"}, {"x", "linear_99"})
    assert hold_fp32(TRT, _fc2_network(), set(), {"x"}) == 0
