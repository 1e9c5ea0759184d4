"""Bundles are checked at load: missing or changed files, other format versions, unsafe names."""

import shutil

import pytest

import el_export
from el_export.contract.files import read_manifest
from el_export.errors import BackendError, BundleError

from .conftest import edit_manifest


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    def make(family="bart", mode="el"):
        target = tmp_path / f"{family}-{mode}"
        shutil.copytree(bundles(family, mode), target)
        return target

    return make


def test_missing_file(bundle_copy):
    bundle = bundle_copy()
    (bundle / "decoder_step.onnx").unlink()
    with pytest.raises(BundleError, match="missing decoder_step.onnx"):
        el_export.load(bundle)


def test_changed_graph_fails_its_sha256(bundle_copy):
    bundle = bundle_copy()
    with open(bundle / "encoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="encoder.onnx does not match the sha256"):
        el_export.load(bundle)


def test_other_format_version(bundle_copy):
    bundle = bundle_copy()
    edit_manifest(bundle, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        read_manifest(bundle)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "a/../../b"])
def test_file_names_outside_the_bundle_are_refused(bundle_copy, name):
    bundle = bundle_copy()
    edit_manifest(bundle, lambda d: d["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(BundleError, match="outside the bundle directory"):
        read_manifest(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_with_a_wrong_field_type(bundle_copy):
    bundle = bundle_copy()
    edit_manifest(bundle, lambda d: d.update(mode="fast"))
    with pytest.raises(BundleError, match="'mode' is 'fast'"):
        read_manifest(bundle)


def test_truncated_graph_is_a_clear_error_not_a_crash(bundle_copy):
    bundle = bundle_copy()
    path = bundle / "decoder_step.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(BackendError, match="onnxruntime cannot load"):
        el_export.load(bundle, verify=False)
