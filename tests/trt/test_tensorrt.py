"""TensorRT end to end: build, run through the same search code, compare with ONNX Runtime.

Needs the tensorrt package and a CUDA GPU; skipped with the reason elsewhere.
"""

import shutil

import pytest
import torch

import el_export
from el_export.cli import main
from el_export.contract.files import read_manifest
from el_export.errors import BackendError
from el_export.evaluation.compare import compare_graphs
from el_export.families import build_from_hf
from el_export.testing.tiny import tiny_model, write_tiny_checkpoint
from el_export.trt.build import build_engines
from el_export.trt.profiles import Limits

pytestmark = pytest.mark.tensorrt
trt = pytest.importorskip("tensorrt", reason="needs TensorRT: pip install tensorrt on a GPU host")
if not torch.cuda.is_available():
    pytest.skip("TensorRT needs a CUDA GPU, and none is visible", allow_module_level=True)

LIMITS = Limits(batch=3, beams=4, source=16, new_tokens=8)


@pytest.fixture(scope="module")
def built(bundles, tmp_path_factory):
    """(family, mode, precision) -> a copy of the bundle with engines (built on first use)."""
    cache = {}

    def get(family: str, mode: str, precision: str | None = None):
        if (family, mode, precision) not in cache:
            target = tmp_path_factory.mktemp("engines") / f"{family}-{mode}"
            shutil.copytree(bundles(family, mode), target)
            build_engines(target, precision=precision, limits=LIMITS)
            cache[family, mode, precision] = target
        return cache[family, mode, precision]

    return get


def test_build_records_the_engines(built):
    bundle = built("bart", "el")
    manifest = read_manifest(bundle)  # engine files verified against their sha256
    engines = manifest.engines
    assert engines["precision"] == "fp32" and engines["typing"] == "strong"
    assert engines["tensorrt"] == trt.__version__ and engines["gpu"]["name"] == torch.cuda.get_device_name()
    assert {e["file"] for e in engines["graphs"].values()} == {"engines/encoder.plan", "engines/decoder_step.plan"}
    assert all((bundle / e["file"]).is_file() for e in engines["graphs"].values())


@pytest.mark.parametrize(
    "family, mode", [("bart", "el"), ("bart", "kv"), ("t5-v1_1", "el"), ("gpt2", "el"), ("gpt2", "kv")]
)
def test_same_tokens_as_onnxruntime(built, bundles, family, mode):
    reference = el_export.load(bundles(family, mode))
    engines = el_export.load(built(family, mode), backend="tensorrt")
    ids = torch.randint(4, 90, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if family == "gpt2":  # prompts are left-padded
        mask = mask.flip(1)
    for kwargs in ({"num_beams": 1}, {"num_beams": 4, "num_return_sequences": 2}):
        ours = engines.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        assert torch.equal(ours.sequences.cpu(), theirs.sequences)


def test_whisper(built, bundles):
    features = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(0))
    kwargs = {"input_features": features, "num_beams": 2, "max_new_tokens": 6}
    ours = el_export.load(built("whisper", "el"), backend="tensorrt").generate(**kwargs)
    theirs = el_export.load(bundles("whisper", "el")).generate(**kwargs)
    assert torch.equal(ours.sequences.cpu(), theirs.sequences)


@pytest.mark.parametrize("family, mode", [("bart", "kv"), ("gpt2", "el"), ("whisper", "kv")])
def test_each_engine_matches_onnxruntime(built, hf_models, family, mode):
    bundle = built(family, mode)
    model, _ = build_from_hf(hf_models(family))
    checks = compare_graphs(bundle, read_manifest(bundle), model, backend="tensorrt")
    assert len(checks) == 2 and all(c.passed for c in checks), checks


def test_shapes_outside_the_profile_are_refused(built):
    generator = el_export.load(built("bart", "el"), backend="tensorrt")
    with pytest.raises(BackendError, match=r"batch is 4 .*profile \[1, 3\].*--max-batch"):
        generator.generate(input_ids=torch.randint(4, 90, (4, 5)), max_new_tokens=2)
    with pytest.raises(BackendError, match=r"rows is 15 .*profile \[1, 12\].*--max-beams"):
        generator.generate(input_ids=torch.randint(4, 90, (3, 5)), num_beams=5, max_new_tokens=2)


def test_caches_stay_on_the_device(built):
    generator = el_export.load(built("bart", "el"), backend="tensorrt")
    encoded = generator.encode({"input_ids": torch.randint(4, 90, (2, 5), device="cuda"),
                                "attention_mask": torch.ones(2, 5, dtype=torch.int64, device="cuda")})  # fmt: skip
    assert encoded["encoder_hidden"].is_cuda
    decoder = generator.backend.make_decoder({**encoded, "encoder_mask": torch.ones(2, 5, dtype=torch.int64).cuda()})
    decoder.start(torch.full((2, 1), 2), 2)
    assert decoder.state["past_hidden.0"].is_cuda and decoder.state["past_hidden.0"].shape[1] == 1
    assert decoder.state["past_mask"].is_cuda and decoder.state["past_mask"].tolist() == [[1]] * 4


@pytest.mark.skipif(int(trt.__version__.split(".")[0]) >= 11, reason="TensorRT 11 builds strongly typed networks only")
def test_fp16_engine_of_an_fp32_bundle_holds_t5_feed_forward_in_fp32(built):
    engines = read_manifest(built("t5-v1_1", "el", "fp16")).engines
    assert engines["precision"] == "fp16" and engines["typing"] == "weak"
    assert engines["fp32"]["modules"] == ["*.fc2"] and all(n >= 2 for n in engines["fp32"]["layers"].values())


def test_fp16_engine_of_an_fp16_bundle(tmp_path):
    from el_export.export import export_model

    export_model(tiny_model("t5-v1_1"), tmp_path / "t5", dtype="float16", progress=False)
    engines = build_engines(tmp_path / "t5", limits=LIMITS).engines
    assert engines["precision"] == "fp16" and engines["typing"] == "strong"
    assert engines["fp32"]["how"] == "graph types"
    out = el_export.load(tmp_path / "t5", backend="tensorrt").generate(input_ids=[[5, 6, 7, 1]], max_new_tokens=4)
    assert out.sequences.shape[0] == 1


def test_cli_build_generate_compare(tmp_path, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    bundle = tmp_path / "bundle"
    assert main(["export", str(checkpoint), "--out", str(bundle)]) == 0
    assert main(["build", str(bundle), "--max-batch", "3", "--max-beams", "4", "--max-new-tokens", "16"]) == 0
    assert "built engines/encoder.plan, engines/decoder_step.plan (fp32" in capsys.readouterr().out
    args = ["generate", str(bundle), "The quick brown fox.", "--backend", "tensorrt", "--num-beams", "2"]
    assert main([*args, "--max-new-tokens", "8"]) == 0
    assert main(["compare", str(bundle), "--reference", str(checkpoint), "--backend", "tensorrt"]) == 0
