"""Hostile bundles at load time: every file is run from the bytes its sha256 was checked on, links and special
files are refused, the manifest's contracts must match the graphs, and hostile JSON or tokenizers end in one line."""

import hashlib
import json
import os
import shutil

import onnx
import pytest

import el_export
import el_export.contract.files
import el_export.runtime.generator
from el_export.cli import main
from el_export.contract.files import read_manifest
from el_export.errors import BundleError
from el_export.export import export_model

from .conftest import edit_manifest

IDS = [[5, 6, 7, 2]]


def _sequences(bundle, verify=True):
    generator = el_export.load(bundle, verify=verify)
    return generator.generate(input_ids=IDS, max_new_tokens=4).sequences.tolist()


def _copy(source, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture
def bundle(bundles, tmp_path):
    return _copy(bundles("bart", "el"), tmp_path)


@pytest.fixture
def text_bundle(cli_bundle, tmp_path):
    """A copy of the CLI's BART bundle, which ships a tokenizer.json."""
    return _copy(cli_bundle, tmp_path)


@pytest.fixture(scope="module")
def external_bundle(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "bundle"
    export_model(hf_models("bart"), out, external_data=True, progress=False)
    return out


def _replace(bundle, name, data: bytes):
    """Write a bundle file and record its new sha256 and size, so the check under test is not the sha256's."""
    (bundle / name).write_bytes(data)
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(bundle, lambda d: d["files"].update({name: entry}))


def _cli_error(bundle, capsys, *texts) -> str:
    """`el-export generate` on the bundle: exit 4, nothing printed, one stderr line, no file added to the bundle."""
    before = sorted(p.name for p in bundle.iterdir())
    capsys.readouterr()
    assert main(["generate", str(bundle), *(texts or ["x"])]) == 4
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in bundle.iterdir()) == before
    return err


def _negated_logits(path) -> bytes:
    """The graph at `path` with its logits negated: a valid graph of the same contract that decodes differently."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", ["logits_raw"], ["logits"]))
    return model.SerializeToString()


def _swap_after_hashing(monkeypatch, sha, path, data: bytes) -> list:
    """Replace `path` with `data` right after the bytes whose sha256 is `sha` are hashed; returns the swap log."""
    swapped, real = [], el_export.contract.files.sha256_bytes

    def hash_then_swap(blob):
        digest = real(blob)
        if digest == sha and not swapped:
            path.write_bytes(data)
            swapped.append(path.name)
        return digest

    monkeypatch.setattr(el_export.contract.files, "sha256_bytes", hash_then_swap)
    return swapped


def test_a_graph_swapped_after_its_check_is_never_run(bundle, monkeypatch):
    expected = _sequences(bundle)
    sha = json.loads((bundle / "manifest.json").read_text())["files"]["decoder_step.onnx"]["sha256"]
    other = _negated_logits(bundle / "decoder_step.onnx")
    swapped = _swap_after_hashing(monkeypatch, sha, bundle / "decoder_step.onnx", other)
    assert _sequences(bundle) == expected  # the verified graph ran
    assert swapped == ["decoder_step.onnx"] and (bundle / "decoder_step.onnx").read_bytes() == other
    monkeypatch.undo()
    assert _sequences(bundle, verify=False) != expected  # the swapped-in graph would have decoded otherwise


def test_a_graph_swapped_after_the_manifest_is_read_is_refused(bundle, monkeypatch):
    """The window the runtime had: files hashed by read_manifest, then reopened by path by ONNX Runtime."""
    other = _negated_logits(bundle / "decoder_step.onnx")
    real = el_export.runtime.generator.read_manifest

    def read_then_swap(*args, **kwargs):
        manifest = real(*args, **kwargs)
        (bundle / "decoder_step.onnx").write_bytes(other)
        return manifest

    monkeypatch.setattr(el_export.runtime.generator, "read_manifest", read_then_swap)
    with pytest.raises(BundleError, match="decoder_step.onnx does not match the sha256 in manifest.json"):
        el_export.load(bundle)


def test_external_data_swapped_after_its_check_is_never_used(external_bundle, bundles, tmp_path, monkeypatch):
    bundle = _copy(external_bundle, tmp_path)
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    for graph in ("encoder", "decoder_step"):  # export lists (and hashes) every external-data file a graph names
        model = onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False)
        names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert names == {f"{graph}.onnx.data"} and names <= set(files)
    expected = _sequences(bundles("bart", "el"))  # the same model, weights inside the graphs
    data = bundle / "decoder_step.onnx.data"
    swapped = _swap_after_hashing(monkeypatch, files[data.name]["sha256"], data, bytes(data.stat().st_size))
    assert _sequences(bundle) == expected
    assert swapped == [data.name]
    monkeypatch.undo()
    assert _sequences(bundle, verify=False) != expected  # zeroed weights would have decoded otherwise


def test_external_data_the_manifest_does_not_list_is_refused(external_bundle, tmp_path, capsys):
    bundle = _copy(external_bundle, tmp_path)
    edit_manifest(bundle, lambda d: d["files"].pop("decoder_step.onnx.data"))
    assert "keeps weights in 'decoder_step.onnx.data', which manifest.json does not list" in _cli_error(bundle, capsys)


def test_a_tokenizer_linked_outside_the_bundle_is_refused(text_bundle, capsys):
    (text_bundle / "tokenizer.json").unlink()
    (text_bundle / "tokenizer.json").symlink_to("/etc/passwd")
    assert "tokenizer.json is a symbolic link" in _cli_error(text_bundle, capsys)
    assert (text_bundle / "tokenizer.json").is_symlink()


def test_a_link_inside_the_bundle_is_refused_even_with_the_right_bytes(bundle):
    (bundle / "decoder_step.onnx").rename(bundle / "real.onnx")
    (bundle / "decoder_step.onnx").symlink_to("real.onnx")
    with pytest.raises(BundleError, match="decoder_step.onnx is a symbolic link"):
        el_export.load(bundle)


def test_a_file_under_a_linked_directory_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _replace(bundle, "extra.bin", b"weights")
    (bundle / "extra.bin").rename(outside / "extra.bin")
    (bundle / "sub").symlink_to(outside)
    edit_manifest(bundle, lambda d: d["files"].update({"sub/extra.bin": d["files"].pop("extra.bin")}))
    with pytest.raises(BundleError, match="sub/extra.bin is a symbolic link"):
        read_manifest(bundle)
    with pytest.raises(BundleError, match="sub/extra.bin is a symbolic link"):
        el_export.load(bundle)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_listed_directory_or_fifo_is_refused_without_blocking(bundle, capsys, kind):
    if kind == "directory":
        (bundle / "extra").mkdir()
    else:
        os.mkfifo(bundle / "extra")  # opening it for reading would block until a writer came
    edit_manifest(bundle, lambda d: d["files"].update({"extra": {"sha256": "0" * 64, "bytes": 0}}))
    assert "extra is not a regular file" in _cli_error(bundle, capsys)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g["outputs"][0].update(name="scores"), "decoder_step: the manifest declares output 'scores'"),
        (lambda g: g["inputs"][1].update(dtype="float16"), "'encoder_hidden' is float32 in the graph, float16 in"),
        (lambda g: g["inputs"][0].update(shape=["rows"]), "'input_ids' has shape ['rows', 1] in the graph, ['rows'] "),
        (lambda g: g["inputs"][1].update(shape=["batch", "source", 33]), "['batch', 'source', 32] in the graph"),
    ],
)
def test_a_contract_that_differs_from_its_graph_is_refused(bundle, capsys, change, message):
    edit_manifest(bundle, lambda d: change(d["graphs"]["decoder_step"]))
    assert message in _cli_error(bundle, capsys)


def test_a_forged_logits_size_is_refused_before_any_allocation(bundle, capsys):
    edit_manifest(bundle, lambda d: d["graphs"]["decoder_step"]["outputs"][0].update(shape=["rows", 4_000_000_000]))
    assert "'logits' declares size 4000000000" in _cli_error(bundle, capsys)

    def vocab_4000(d):  # a consistent lie: dims and contract agree with each other, not with the graph
        d["dims"]["vocab_size"] = 4000
        d["graphs"]["decoder_step"]["outputs"][0]["shape"] = ["rows", 4000]

    edit_manifest(bundle, vocab_4000)
    assert "output 'logits' has shape ['rows', 96] in the graph, ['rows', 4000] in the manifest" in _cli_error(
        bundle, capsys
    )


@pytest.mark.parametrize(
    "field, key, value",
    [
        ("generation_defaults", "decoder_start_token_id", 10**9),
        ("special_tokens", "decoder_start_token_id", 2**70),
        ("special_tokens", "pad_token_id", 96),  # vocab_size: one past the last id
        ("generation_defaults", "suppress_tokens", [3, 96]),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused(bundle, capsys, field, key, value):
    edit_manifest(bundle, lambda d: d[field].update({key: value}))
    err = _cli_error(bundle, capsys)
    assert f"manifest {field}.{key} holds " in err and "which is not a token id below vocab_size 96" in err


def test_token_ids_and_dims_at_their_limits(bundle, capsys):
    edit_manifest(bundle, lambda d: d["special_tokens"].update(pad_token_id=95))
    assert _sequences(bundle)  # the last id of the vocabulary is an id
    edit_manifest(bundle, lambda d: d["dims"].update(vocab_size=2**31))
    assert "manifest dims.vocab_size is missing or not a positive integer below 2**31" in _cli_error(bundle, capsys)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 200_000 + "]" * 200_000, "is not valid JSON (nested too deeply)"),
        (None, "is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ],
)
def test_hostile_manifest_json_is_one_line(bundle, capsys, text, message):
    path = bundle / "manifest.json"
    if text is None:  # a 5000-digit integer in an otherwise valid manifest
        text = path.read_text().replace('"vocab_size": 96', '"vocab_size": ' + "9" * 5000)
    path.write_text(text)
    assert message in _cli_error(bundle, capsys)


_NESTED = '{"type": "Sequence", "normalizers": [' * 100_000 + '{"type": "Lowercase"}' + "]}" * 100_000


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x01 garbage", "tokenizer.json is not a tokenizer the tokenizers library can read (expected value"),
        (b"{}", "tokenizer.json is not a tokenizer the tokenizers library can read (Model missing."),
        (b"\xff\xfe{}", "tokenizer.json is not UTF-8 text (invalid start byte at byte 0)"),
        (None, "tokenizer.json is not a tokenizer the tokenizers library can read (recursion limit exceeded"),
    ],
)
def test_hostile_tokenizer_json_is_one_line(text_bundle, capsys, data, message):
    if data is None:  # a valid tokenizer whose normalizer nests 100 000 deep
        tokenizer = (text_bundle / "tokenizer.json").read_text()
        data = tokenizer.replace('"normalizer": null', '"normalizer": ' + _NESTED, 1).encode()
        assert data != tokenizer.encode()
    _replace(text_bundle, "tokenizer.json", data)
    assert message in _cli_error(text_bundle, capsys)


def test_a_catastrophic_tokenizer_regex_is_one_line_not_a_panic(text_bundle, capsys):
    tokenizer = json.loads((text_bundle / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated",
                                  "invert": False}  # fmt: skip
    _replace(text_bundle, "tokenizer.json", json.dumps(tokenizer).encode())
    assert main(["generate", str(text_bundle), "hello"]) == 0  # loads, and runs on text it can match
    err = _cli_error(text_bundle, capsys, "a" * 50_000 + "!")  # Rust panics: its regex engine gives up
    assert "the bundle's tokenizer tokenizer.json failed on input 0 (Onig: Regex search error" in err


@pytest.fixture
def whisper_bundle(bundles, tmp_path):
    """A copy of the tiny Whisper bundle, whose decoder step returns its 3 alignment heads' attention."""
    return _copy(bundles("whisper", "el"), tmp_path)


def _outputs(d) -> list:
    return d["graphs"]["decoder_step"]["outputs"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["alignment"].update(heads=[[2, 0], [0, 1], [1, 0]]),
            "alignment.heads must be [layer, head] pairs",
        ),
        (lambda d: d["alignment"].update(heads=[[0, 4], [0, 1], [1, 0]]), "inside the decoder's 2 x 4 heads"),
        (lambda d: d["alignment"].update(heads=[[True, 0], [0, 1], [1, 0]]), "alignment.heads must be [layer, head]"),
        (lambda d: d["alignment"].update(heads="all"), "alignment.heads must be [layer, head] pairs"),
        (lambda d: d["alignment"].update(heads=[]), "alignment.heads must be [layer, head] pairs"),
        (lambda d: d["alignment"].update(median_filter_width=6), "alignment.median_filter_width is 6; expected an odd"),
        (lambda d: d["alignment"].update(median_filter_width="7"), "alignment.median_filter_width is 7; expected"),
        (
            lambda d: d["alignment"].update(heads=[[0, 1]]),
            "decoder_step needs an output 'alignment_attention' of shape",
        ),
        (lambda d: _outputs(d)[-1].update(shape=["rows", 3, 40]), "['rows', 3, 'source']"),
        (lambda d: d.update(alignment=["heads"]), "manifest field 'alignment' is not an object"),
        (lambda d: d.pop("alignment"), "decoder_step has output 'alignment_attention' but no 'alignment' field"),
    ],
)
def test_hostile_alignment_heads_are_refused(whisper_bundle, capsys, change, message):
    edit_manifest(whisper_bundle, change)
    assert message in _cli_error(whisper_bundle, capsys)


def test_a_manifest_written_before_alignment_heads_still_loads(bundle):
    edit_manifest(bundle, lambda d: d.pop("alignment"))
    assert _sequences(bundle)
