"""The TensorRT lint: every exported graph passes, each rule catches what it is for, export runs it."""

import onnx
import pytest
from onnx import TensorProto, helper

from el_export.contract.files import read_manifest
from el_export.errors import ExportError
from el_export.export import export_model
from el_export.model.models import MODES
from el_export.testing.tiny import DECODER_ONLY, FAMILIES, SPEECH, tiny_model
from el_export.trt import ops
from el_export.trt.lint import check_onnx, lint_onnx

F, I64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES + DECODER_ONLY + SPEECH)
def test_every_family_and_mode_passes(bundles, family, mode):
    bundle = bundles(family, mode)
    for graph in read_manifest(bundle).graphs.values():
        assert lint_onnx(bundle / graph.file) == []


def _save(tmp_path, nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    return path


def _io(name, elem=F, shape=("n", 4)):
    return helper.make_tensor_value_info(name, elem, shape)


def _axes(name="axes", values=(0,)):
    return helper.make_tensor(name, I64, [len(values)], list(values))


def test_a_plain_graph_passes(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")])
    assert lint_onnx(path) == []


# name -> (nodes, inputs, outputs, initializers, opset, what the problem says)
CASES = {
    "control flow": (
        [helper.make_node("If", ["c"], ["y"], then_branch=helper.make_graph([], "t", [], [_io("x")]),
                          else_branch=helper.make_graph([], "e", [], [_io("x")]))],
        [_io("c", TensorProto.BOOL, [])], [_io("y")], [], 20, "control flow",
    ),
    "unsupported op": ([helper.make_node("Unique", ["x"], ["y"])], [_io("x")], [_io("y")], [], 20, "not supported"),
    "custom domain": (
        [helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")],
        [_io("x")], [_io("y")], [], 20, "plugin",
    ),
    "float64": ([helper.make_node("Relu", ["x"], ["y"])], [_io("x", TensorProto.DOUBLE)],
                [_io("y", TensorProto.DOUBLE)], [], 20, "float64"),
    "int64 CumSum": (
        [helper.make_node("CumSum", ["x", "axis"], ["y"])], [_io("x", I64)], [_io("y", I64)],
        [helper.make_tensor("axis", I64, [], [1])], 20, "(CumSum) takes int64",
    ),
    "cast to float64": ([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [_io("x")],
                        [_io("y", TensorProto.DOUBLE)], [], 20, "casts to float64"),
    "dynamic rank": ([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, None)],
                     [_io("y")], [], 20, "has no shape"),
    "unnamed axis": ([helper.make_node("Relu", ["x"], ["y"])], [_io("x", shape=(None, 4))], [_io("y")], [], 20,
                     "dynamic but unnamed"),
    "data-dependent rank": (
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], [_io("x"), _io("shape", I64, ("k",))],
        [helper.make_tensor_value_info("y", F, None)], [], 20, "no length known at build time",
    ),
    "non-constant axes": (
        [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [_io("x"), _io("axes", I64, (1,))],
        [_io("y", shape=(1, "n", 4))], [], 20, "must be a build-time constant",
    ),
    "unsorted TopK": (
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)], [_io("x")], [_io("v"), _io("i", I64)],
        [helper.make_tensor("k", I64, [1], [2])], 20, "sorted=0",
    ),
    "cubic Resize": (
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")], [_io("x", shape=(1, 1, 4, 4))],
        [_io("y", shape=(1, 1, 8, 8))], [helper.make_tensor("scales", F, [4], [1, 1, 2, 2])], 20, "mode='cubic'",
    ),
    "dilated pooling": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
        [_io("x", shape=(1, 1, 8, 8))], [_io("y", shape=(1, 1, 6, 6))], [], 20, "dilations=[2, 2]",
    ),
    "LayerNormalization statistics": (
        [helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean", "inv"])], [_io("x")],
        [_io("y"), _io("mean", shape=("n", 1)), _io("inv", shape=("n", 1))],
        [helper.make_tensor("w", F, [4], [1.0] * 4)], 20, "uses 3 outputs",
    ),
    "string constant": (
        [helper.make_node("Constant", [], ["y"], value_string="text")], [], [_io("y", TensorProto.STRING, ())],
        [], 20, "value_string",
    ),
    "opset past the parser": ([helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], [], 25, "opset 25"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_each_rule_reports_its_problem(tmp_path, case):
    nodes, inputs, outputs, initializers, opset, expected = CASES[case]
    problems = lint_onnx(_save(tmp_path, nodes, inputs, outputs, initializers, opset))
    assert any(expected in p for p in problems), problems


def test_check_raises_one_line_naming_the_problems(tmp_path):
    path = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"])], [_io("x", TensorProto.DOUBLE)],
                 [_io("y", TensorProto.DOUBLE)])  # fmt: skip
    with pytest.raises(ExportError, match=r"g.onnx would not build with TensorRT 10.15: .*Unique.*float64") as e:
        check_onnx(path)
    assert "\n" not in str(e.value)


def test_export_runs_the_lint(tmp_path, monkeypatch):
    monkeypatch.delitem(ops.OPERATORS, "MatMul")  # as if TensorRT had no MatMul
    with pytest.raises(ExportError, match=r"\(MatMul\) is not supported"):
        export_model(tiny_model("bart"), tmp_path / "bundle", progress=False)
    assert not (tmp_path / "bundle").exists()


def test_the_table_is_self_consistent():
    assert ops.SOURCE["tensorrt"] and ops.SOURCE["opsets"][0] <= ops.SOURCE["opsets"][1]
    for table in (ops.ATTRIBUTES, ops.CONSTANT_INPUTS, ops.MAX_OUTPUTS, ops.MAX_INPUTS, ops.STATIC_LENGTH_INPUTS):
        assert set(table) <= set(ops.OPERATORS), set(table) - set(ops.OPERATORS)
    assert set(ops.CONTROL_FLOW) <= set(ops.OPERATORS)  # the parser takes them; our rule does not
