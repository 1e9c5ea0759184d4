"""int8 recipes: validated as data, applied to graphs as they say, recorded in the manifest; products that keep a
row's numbers to that row; every family exports and generates in int8."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import el_export
from el_export.cli import main
from el_export.contract.files import read_manifest
from el_export.contract.quantization import DEFAULT, LEGACY, RECIPES, Keep, Recipe, check_record, load_recipe
from el_export.errors import BundleError, InvalidArgumentError
from el_export.export.quantize import MEMORY_OUTPUTS, memory_feeds, quantize_model
from el_export.testing.tiny import DECODER_ONLY, FAMILIES, SPEECH


def _product_graph(weight: np.ndarray, rank: int = 2):
    """x [M, K] (or [B, M, K]) @ weight, as the exporter writes a Linear without bias."""
    k, n = weight.shape
    shape = ["m", k] if rank == 2 else ["b", "m", k]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], n])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 20)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_row_product_matches_its_definition_and_ignores_the_other_rows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = _product_graph(w)
    record = quantize_model(model, "decoder_step", DEFAULT)
    assert record == {"activations": "row", "int8": ["mm"], "float32": {}}
    assert [n.op_type for n in model.graph.node].count("MatMul") == 0
    x = rng.standard_normal((5, 64)).astype(np.float32) * np.array([[1], [100], [0.01], [3], [1]], np.float32)
    got = _run(model, x)
    # the definition: weights per output channel, activations per row, both symmetric, round half to even
    w_scale = np.abs(w).max(axis=0) / 127
    x_scale = (np.abs(x).max(axis=1, keepdims=True) / 127).astype(np.float32)
    wq, xq = np.rint(w / w_scale), np.rint(x * (1 / x_scale))
    np.testing.assert_allclose(got, (xq @ wq) * w_scale * x_scale, rtol=1e-5, atol=1e-6)
    assert np.abs(got - x @ w).max(axis=1).max() / np.abs(x @ w).max() < 0.02
    louder = x.copy()
    louder[1] *= 1000  # another row's magnitude changes nothing in row 0
    assert np.array_equal(_run(model, louder)[0], got[0])


def test_tensor_product_shares_one_scale_across_the_batch():
    """ONNX Runtime's dynamic quantization: one row's magnitude sets every row's resolution (why row is the
    default)."""
    rng = np.random.default_rng(1)
    model = _product_graph(rng.standard_normal((64, 48)).astype(np.float32))
    quantize_model(model, "decoder_step", RECIPES["tensor"])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    louder = x.copy()
    louder[1] *= 1000
    assert not np.array_equal(_run(model, louder)[0], _run(model, x)[0])


def test_kept_modules_stay_float32_and_are_recorded_with_why():
    model = _product_graph(np.eye(8, dtype=np.float32))
    recipe = Recipe("keep", {"decoder_step": "row"}, (Keep("m*", "measured: most sensitive"),))
    assert quantize_model(model, "decoder_step", recipe)["float32"] == {"mm": "measured: most sensitive"}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_memory_feeds_quantize_each_position_on_its_own():
    rng = np.random.default_rng(2)
    memory = rng.standard_normal((2, 5, 8)).astype(np.float32) * np.arange(1, 6, dtype=np.float32)[None, :, None]
    feeds = memory_feeds(memory)
    q, qt, scale = (feeds[name] for name in MEMORY_OUTPUTS)
    assert q.dtype == qt.dtype == np.int8 and scale.shape == (2, 1, 5)
    assert np.array_equal(qt, q.transpose(0, 2, 1)) and np.abs(q).max(axis=-1).min() == 127
    np.testing.assert_allclose(q * scale.transpose(0, 2, 1), memory, atol=float(scale.max()) / 2 + 1e-7)


@pytest.mark.parametrize("family", [*FAMILIES, *DECODER_ONLY, *SPEECH])
def test_every_family_exports_int8_and_generates(family, bundles, hf_models):
    out = bundles(family, "el", "int8")
    manifest = read_manifest(out)
    record = manifest.quantization
    assert record["recipe"] == DEFAULT.to_json() and set(record["graphs"]) == set(manifest.graphs)
    for name, got in record["graphs"].items():
        ops = [n.op_type for n in onnx.load(str(out / f"{name}.onnx")).graph.node]
        assert got["int8"] and ops.count("MatMulIntegerToFloat") + ops.count("Gather") >= len(got["int8"]), name
    seq2seq = manifest.kind == "seq2seq"
    step = manifest.graphs["decoder_step"]
    assert ({s.name for s in step.inputs} >= set(MEMORY_OUTPUTS)) == seq2seq  # the step reads H in int8
    assert "encoder_hidden" not in {s.name for s in step.inputs}  # seq2seq: replaced; decoder-only: never there
    hf = hf_models(family)
    if family in SPEECH:
        frames = 2 * hf.config.max_source_positions
        inputs = {"input_features": np.random.default_rng(0).standard_normal((2, hf.config.num_mel_bins, frames))}
        inputs["input_features"] = inputs["input_features"].astype(np.float32)
    else:
        inputs = {"input_ids": [[5, 6, 7, 8], [9, 10, 11, 12]]}
    out = el_export.load(out).generate(**inputs, num_beams=2, max_new_tokens=5)
    assert out.sequences.shape[0] == 2


def test_kv_bundles_keep_their_cross_products_float(bundles):
    manifest = read_manifest(bundles("bart", "kv", "int8"))
    assert "memory_products" not in manifest.quantization["graphs"]["decoder_step"]
    assert not {s.name for s in manifest.graphs["encoder"].outputs} & set(MEMORY_OUTPUTS)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"activations": {}}, "non-empty 'name'"),
        ({"name": "x", "extra": 1}, "unknown fields"),
        ({"name": "x", "activations": {"decoder": "row"}}, "'activations' must map"),
        ({"name": "x", "activations": {"encoder": "channel"}}, "'activations' must map"),
        ({"name": "x", "float32": [{"pattern": "a"}]}, "'float32' must be a list"),
        ({"name": "x", "float32": [{"pattern": "", "why": "w"}]}, "'float32' must be a list"),
        ({"name": "x", "float32": "model.lm_head"}, "'float32' must be a list"),
        ({"name": "x", "memory": "yes"}, "'memory' must be true or false"),
        ([], "non-empty 'name'"),
    ],
)
def test_malformed_recipes_are_refused_naming_the_field(data, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Recipe.from_json(data)


def test_recipe_files_are_read_and_hostile_ones_refused(tmp_path):
    assert load_recipe(None) is DEFAULT and load_recipe("tensor") is RECIPES["tensor"]
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"name": "mine", "activations": {"encoder": "tensor"}, "memory": True,
                                "float32": [{"pattern": "model.lm_head", "why": "sensitive"}]}))  # fmt: skip
    recipe = load_recipe(str(good))
    assert recipe.granularity("encoder") == "tensor" and recipe.granularity("decoder_step") == "row"
    assert recipe.kept("model.lm_head").why == "sensitive" and recipe.kept("model.decoder") is None
    assert Recipe.from_json(recipe.to_json()) == recipe
    for name, content, match in [
        ("missing.json", None, "neither a built-in recipe"),
        ("binary.json", b"\xff\xfe\x00", "not JSON"),
        ("broken.json", b'{"name": ', "not JSON"),
        ("huge.json", b" " * (1 << 20 | 1), "over 1 MiB"),
    ]:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(InvalidArgumentError, match=match):
            load_recipe(str(path))


def test_manifest_records_are_validated():
    good = {"method": "int8", "recipe": DEFAULT.to_json(), "weights": "w",
            "graphs": {"decoder_step": {"activations": "row", "int8": ["m"], "float32": {}, "memory_products": 2}}}
    assert check_record(good) is good and check_record("") == {} and check_record("int8") is LEGACY  # fmt: skip
    for bad in (
        "int4",
        {"method": "int4"},
        {**good, "recipe": {"name": "x", "memory": 1}},
        {**good, "graphs": {}},
        {**good, "graphs": {"decoder": good["graphs"]["decoder_step"]}},
        {**good, "graphs": {"decoder_step": {"activations": "row", "int8": "m", "float32": {}}}},
        {**good, "graphs": {"decoder_step": {**good["graphs"]["decoder_step"], "memory_products": -1}}},
        {**good, "graphs": {"encoder": {"activations": "row", "int8": [], "float32": {}, "memory_outputs": ["x"]}}},
    ):
        with pytest.raises(BundleError, match="quantization"):
            check_record(bad)


def test_cli_refuses_bad_recipes_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "bad", "activations": {"encoder": "block"}}')
    missing_checkpoint = str(tmp_path / "no-checkpoint")
    for args, match in [
        (["--quantize", "int8", "--quantize-recipe", str(bad)], "'activations' must map"),
        (["--quantize-recipe", "tensor"], "add --quantize int8"),
    ]:
        assert main(["export", missing_checkpoint, "--out", str(tmp_path / "out"), *args]) != 0
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_embedding_tables_are_int8_rows_with_their_own_scales():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 6)).astype(np.float32) * np.arange(1, 11, dtype=np.float32)[:, None]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0, name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 6])],
        [numpy_helper.from_array(table, "table")],
    )  # fmt: skip
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 20)])
    kept = Recipe("keep", {}, (Keep("emb*", "measured"),))
    assert quantize_model(model.__deepcopy__(), "decoder_step", kept)["float32"] == {"embed": "measured"}
    assert quantize_model(model, "decoder_step", DEFAULT)["int8"] == ["embed"]
    assert [i.data_type for i in model.graph.initializer if i.dims == [10, 6]] == [TensorProto.INT8]
    ids = np.array([[0, 9, 9], [3, 4, 0]], np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    scale = np.abs(table).max(axis=1, keepdims=True) / 127
    np.testing.assert_allclose(got, (np.rint(table / scale) * scale)[ids], rtol=1e-6)
    assert np.abs(got - table[ids]).max() <= scale.max() / 2 + 1e-6


def test_inspect_shows_what_each_graph_got(bundles, capsys):
    assert main(["inspect", str(bundles("bart", "el", "int8"))]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("int8")]
    assert len(lines) == 2 and "recipe default, row activation scales" in lines[1]
    assert "memory products 4" in lines[1]  # 2 layers x (scores, weighted sums)
