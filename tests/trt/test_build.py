"""`el-export build` without a GPU: the manifest's engines entry, its hashes, and the errors that say
what to install. The build itself is in test_tensorrt.py (TensorRT and a GPU)."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

import el_export
from el_export.cli import main
from el_export.contract.files import file_entries, read_manifest, write_manifest
from el_export.contract.manifest import Manifest
from el_export.errors import BackendError, BundleError, InvalidArgumentError
from el_export.trt.build import build_engines, engines_record
from el_export.trt.precision import PrecisionPlan
from el_export.trt.profiles import Limits

GPU = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}


@pytest.fixture
def bundle(bundles, tmp_path):
    target = tmp_path / "bart-el"
    shutil.copytree(bundles("bart", "el"), target)
    return target


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, as where it is missing


def _with_engines(bundle, precision="fp16") -> Manifest:
    """The bundle as `build` leaves it, with stand-in engine files."""
    manifest = read_manifest(bundle)
    (bundle / "engines").mkdir()
    for name in manifest.graphs:
        (bundle / "engines" / f"{name}.plan").write_bytes(f"engine for {name}".encode())
    plan = PrecisionPlan(precision, strongly_typed=False)
    engines = engines_record(manifest, plan, Limits(batch=2, beams=3), "10.15.1.29", GPU, {})
    updated = replace(manifest, files=file_entries(bundle), engines=engines)
    write_manifest(bundle, updated)
    return updated


def test_engines_round_trip_through_the_manifest(bundle):
    written = _with_engines(bundle)
    read = read_manifest(bundle)  # every file verified, the engines too
    assert read == written and Manifest.from_json(json.loads(json.dumps(read.to_json()))) == read
    assert {k: v for k, v in read.files.items() if k.startswith("engines/")}.keys() == {
        "engines/encoder.plan",
        "engines/decoder_step.plan",
    }
    assert read.engines["graphs"]["decoder_step"]["profile"]["past_hidden.1"]["max"] == [6, 63, 32]
    assert read.engines["axes"]["rows"] == [1, 6, 6] and read.engines["limits"]["beams"] == 3


def test_a_changed_engine_fails_its_sha256(bundle):
    _with_engines(bundle)
    (bundle / "engines" / "encoder.plan").write_bytes(b"another engine")
    with pytest.raises(BundleError, match="encoder.plan does not match the sha256"):
        read_manifest(bundle)


def test_bundles_without_engines_read_as_before(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    data.pop("engines", None)
    assert Manifest.from_json(data).engines == {}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.update(precision="int8"), "needs a precision"),
        (lambda e: e.pop("tensorrt"), "TensorRT version and the GPU"),
        (lambda e: e["graphs"].pop("encoder"), "one engine per graph"),
        (lambda e: e["graphs"]["encoder"].update(file="engines/other.plan"), "names no engine file"),
        (lambda e: e["graphs"]["encoder"]["profile"].pop("input_ids"), "for every input"),
        (lambda e: e["graphs"]["encoder"]["profile"]["input_ids"].update(min=[1]), "rank 2"),
        (lambda e: e["graphs"]["encoder"]["profile"]["input_ids"].update(min=[3, 1]), "min <= opt <= max"),
    ],
)
def test_malformed_engines_are_refused(bundle, change, message):
    data = _with_engines(bundle).to_json()
    change(data["engines"])
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(data)


def test_build_without_tensorrt_says_what_to_install(bundle, no_tensorrt):
    with pytest.raises(BackendError, match="TensorRT is not installed here .*pip install tensorrt"):
        build_engines(bundle)
    assert not (bundle / "engines").exists() and read_manifest(bundle).engines == {}


def test_build_checks_the_limits_first(bundle, no_tensorrt):
    with pytest.raises(InvalidArgumentError, match="--max-source 100 is past the model's 64 positions"):
        build_engines(bundle, limits=Limits(source=100))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_build_and_compare_without_tensorrt(bundle, no_tensorrt, capsys):
    assert main(["build", str(bundle), "--fp16", "--max-batch", "4"]) == BackendError.exit_code
    assert "pip install tensorrt" in _error_line(capsys)
    assert main(["compare", str(bundle), "--reference", "unused", "--backend", "tensorrt"]) == BackendError.exit_code
    assert "pip install tensorrt" in _error_line(capsys)
    assert main(["build", str(bundle), "--max-beams", "0"]) == InvalidArgumentError.exit_code
    assert "limit beams must be a positive integer" in _error_line(capsys)


def test_load_with_the_tensorrt_backend_without_tensorrt(bundle, no_tensorrt):
    with pytest.raises(BackendError, match=r"backend 'tensorrt' needs .*\(tensorrt\): pip install tensorrt"):
        el_export.load(bundle, backend="tensorrt")


def test_the_trt_modules_import_without_tensorrt_and_polygraphy():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'polygraphy'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import el_export.trt.ops, el_export.trt.lint, el_export.trt.profiles, el_export.trt.precision\n"
        "import el_export.trt.build, el_export.evaluation.compare, el_export.cli\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_build_help_lists_the_limits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    options = ("--fp16", "--bf16", "--max-batch", "--max-beams", "--max-source", "--max-new-tokens", "--max-prompt")
    assert all(option in usage for option in options)
