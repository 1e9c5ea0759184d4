"""Export writes checked, dynamic, straight-line graphs and a complete manifest, atomically."""

import json

import onnx
import pytest
import torch

import el_export
from el_export.contract.files import read_manifest, sha256
from el_export.contract.manifest import FORMAT_VERSION
from el_export.errors import ExportError, InvalidArgumentError
from el_export.evaluation.compare import compare_graphs
from el_export.export import export_model
from el_export.export import onnx as export_module
from el_export.families import build_from_hf
from el_export.testing.tiny import DECODER_ONLY, FAMILIES, SPEECH, tiny_model


@pytest.mark.parametrize("mode", ["el", "kv"])
@pytest.mark.parametrize("family", FAMILIES + DECODER_ONLY + SPEECH)
def test_graphs_match_pytorch_on_unseen_shapes(family, mode, bundles, hf_models):
    bundle = bundles(family, mode)
    manifest = read_manifest(bundle)
    model, _ = build_from_hf(hf_models(family))
    checks = compare_graphs(bundle, manifest, model)  # B=1, one row, t=0, S=1, and a larger batch
    assert all(c.passed for c in checks), [c.detail for c in checks]
    for graph in manifest.graphs.values():
        proto = onnx.load(str(bundle / graph.file))
        assert not {n.op_type for n in proto.graph.node} & {"If", "Loop", "Scan"}
        onnx.checker.check_model(proto, full_check=True)
        names = [i.name for i in proto.graph.input]
        assert names == [s.name for s in graph.inputs]
        for value, spec in zip(proto.graph.output, graph.outputs, strict=True):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(spec.shape)


def test_manifest_records_the_contract(bundles, hf_models):
    bundle = bundles("bart", "el")
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert (data["family"], data["kind"], data["mode"], data["dtype"]) == ("bart", "seq2seq", "el", "float32")
    assert data["dims"]["decoder_layers"] == 2 and data["dims"]["d_model"] == 32
    step = data["graphs"]["decoder_step"]
    names = ["input_ids", "encoder_hidden", "encoder_mask", "past_mask", "past_hidden.0", "past_hidden.1"]
    assert [i["name"] for i in step["inputs"]] == names  # one cache tensor per layer: ONNX has no views
    assert step["inputs"][1]["shape"] == ["batch", "source", 32]  # shared: never repeated per beam
    assert data["special_tokens"]["decoder_start_token_id"] == 2
    assert data["generation_defaults"]["forced_eos_token_id"] == 2
    assert set(data["exporter"]) >= {"el_export", "torch", "transformers", "onnx", "opset"}
    for name, entry in data["files"].items():
        assert sha256(bundle / name) == entry["sha256"]


def test_kv_encoder_returns_cross_keys_and_values_per_layer(bundles):
    manifest = read_manifest(bundles("bart", "kv"))
    names = ["encoder_hidden", "cross_key.0", "cross_value.0", "cross_key.1", "cross_value.1"]
    assert [s.name for s in manifest.graphs["encoder"].outputs] == names
    assert manifest.graphs["decoder_step"].input("cross_value.1").shape == ("rows", 4, "source", 8)


def test_external_data_is_listed_hashed_and_loadable(tmp_path):
    import el_export

    out = tmp_path / "external"
    manifest = export_model(tiny_model("bart"), out, external_data=True, progress=False)
    data_files = [name for name in manifest.files if not name.endswith((".onnx", ".json"))]
    assert data_files, manifest.files
    out_ids = el_export.load(out).generate(input_ids=[[5, 6, 7, 2]], max_new_tokens=4).sequences
    assert out_ids.shape[1] >= 2


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_on_second_graph(graph, path, **kw):
        calls.append(graph.name)
        if len(calls) == 2:
            raise ExportError("simulated failure")
        return original(graph, path, **kw)

    original = export_module.export_graph
    monkeypatch.setattr(export_module, "export_graph", fail_on_second_graph)
    with pytest.raises(ExportError, match="simulated"):
        export_model(tiny_model("bart"), tmp_path / "bundle", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        export_model(tiny_model("bart"), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="mode"):
        export_model(tiny_model("bart"), tmp_path / "b", mode="paged", progress=False)


def test_float16_export_keeps_t5_feed_forward_output_in_float32(tmp_path, hf_models):
    import numpy as np

    from el_export.evaluation.compare import compare_graphs
    from el_export.families import cast

    out = tmp_path / "t5-fp16"
    manifest = export_model(hf_models("t5-v1_1"), out, dtype="float16", progress=False)
    assert manifest.dtype == "float16"
    assert manifest.graphs["decoder_step"].input("past_hidden.0").dtype == "float16"
    assert manifest.graphs["decoder_step"].output("logits").dtype == "float32"
    kept = manifest.fp32_modules["modules"]
    assert (
        "decoder.layers.0.fc2" in kept
        and "encoder.layers.1.fc2" in kept
        and "overflow" in manifest.fp32_modules["reason"]
    )
    proto = onnx.load(str(out / "decoder_step.onnx"))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]  # matrices, not folded constants
    fp32_weights = [sorted(t.dims) for t in weights if t.data_type == onnx.TensorProto.FLOAT]
    assert fp32_weights == [[32, 64]] * 2  # the two decoder layers' fc2 ([d_model, d_ff]); the rest is fp16
    model, family = build_from_hf(hf_models("t5-v1_1"))
    cast(model, family, "float16")
    assert all(c.passed for c in compare_graphs(out, read_manifest(out), model))
    out_ids = el_export.load(out).generate(input_ids=[[5, 6, 7, 1]], num_beams=2, max_new_tokens=4).sequences
    assert out_ids.dtype == torch.int64 and np.all(out_ids.numpy() >= 0)


def test_quantize_options_are_refused_before_anything_is_written(tmp_path, hf_models):
    """(int8 exports themselves: tests/export/test_quantize.py)"""
    for options, match in [({"quantize": "int4"}, "int8"), ({"quantize": "int8", "dtype": "float16"}, "float32"),
                           ({"quantize_recipe": "tensor"}, "--quantize int8")]:  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=match):
            export_model(hf_models("bart"), tmp_path / "x", progress=False, **options)
        assert not (tmp_path / "x").exists()
