"""The bundle: the contract between export time and run time.

A directory holding `manifest.json` and the files it names (graphs, external weights, tokenizer).
The runtime reads only this: no `transformers`, no original checkpoint. Readers refuse a format
version they do not know, a file whose sha256 differs from the manifest, and any file name that
would leave the bundle directory.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from el_export.errors import BundleError, InvalidArgumentError
from el_export.graphs import TensorSpec

FORMAT = "el-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GraphEntry:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)


@dataclass(frozen=True)
class Manifest:
    family: str
    kind: str  # "seq2seq" | "decoder-only"
    mode: str  # "el" | "kv"
    dtype: str
    dims: dict
    graphs: dict[str, GraphEntry]
    special_tokens: dict
    generation_defaults: dict
    files: dict[str, dict]  # relative name -> {"sha256": ..., "bytes": ...}
    tokenizer: str | None = None
    exporter: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    fp32_modules: dict = field(default_factory=dict)  # {"modules": [...], "reason": ...} in fp16 bundles
    quantization: str = ""  # "int8": ONNX Runtime dynamic int8 weights in the float32 graphs
    audio: dict = field(default_factory=dict)  # speech models: feature settings and the mel filter file
    engines: dict = field(default_factory=dict)  # TensorRT engines, once built (el_export.trt.build)
    mode_choice: dict = field(default_factory=dict)  # --mode auto: the workload and both modes' measured seconds

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "kind": self.kind,
            "mode": self.mode,
            "dtype": self.dtype,
            "dims": self.dims,
            "graphs": {
                name: {
                    "file": g.file,
                    "inputs": [s.to_json() for s in g.inputs],
                    "outputs": [s.to_json() for s in g.outputs],
                }
                for name, g in self.graphs.items()
            },
            "special_tokens": self.special_tokens,
            "generation_defaults": self.generation_defaults,
            "tokenizer": self.tokenizer,
            "files": self.files,
            "exporter": self.exporter,
            "source": self.source,
            "fp32_modules": self.fp32_modules,
            "quantization": self.quantization,
            "audio": self.audio,
            "engines": self.engines,
            "mode_choice": self.mode_choice,
        }

    @classmethod
    def from_json(cls, data) -> "Manifest":
        """Validate and read a manifest; every problem is a BundleError naming the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f'{MANIFEST} is not an el-export bundle manifest (no "format": "{FORMAT}")')
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this el-export (it reads version "
                f"{FORMAT_VERSION}); re-export the model with this version of el-export"
            )
        _require(data, "family", str)
        _require(data, "kind", str, choices=("seq2seq", "decoder-only"))
        _require(data, "mode", str, choices=("el", "kv"))
        _require(data, "dtype", str, choices=("float32", "float16", "bfloat16"))
        for key in ("dims", "graphs", "special_tokens", "generation_defaults", "files"):
            _require(data, key, dict)
        for key in ("exporter", "source", "fp32_modules", "audio", "engines", "mode_choice"):
            if not isinstance(data.get(key) or {}, dict):
                raise BundleError(f"manifest field {key!r} is not an object")
        _check_dims(data["dims"])
        _check_special_tokens(data["special_tokens"])
        files = data["files"]
        for name, entry in files.items():
            _safe_name(name)
            if not isinstance(entry, dict) or not _SHA256.fullmatch(str(entry.get("sha256"))):
                raise BundleError(f"manifest files[{name!r}] has no valid sha256")
        expected = {"seq2seq": {"encoder", "decoder_step"}, "decoder-only": {"prefill", "decoder_step"}}[data["kind"]]
        if set(data["graphs"]) != expected:
            raise BundleError(
                f"manifest graphs are {sorted(data['graphs'])}; a {data['kind']} bundle has {sorted(expected)}"
            )
        graphs = {}
        for name, entry in data["graphs"].items():
            graph = _graph_entry(name, entry)
            if graph.file not in files:
                raise BundleError(f"manifest graphs[{name!r}] names {graph.file!r}, which is not in its files list")
            graphs[name] = graph
        tokenizer = data.get("tokenizer")
        if tokenizer is not None and (not isinstance(tokenizer, str) or tokenizer not in files):
            raise BundleError(f"manifest names tokenizer {tokenizer!r}, which is not in its files list")
        audio = data.get("audio") or {}
        if audio:
            fields = ("sampling_rate", "n_fft", "hop_length", "chunk_length", "n_mels")
            mel_filters = audio.get("mel_filters")
            listed = isinstance(mel_filters, str) and mel_filters in files
            if not listed or not all(_positive_int(audio.get(k)) for k in fields):
                raise BundleError(
                    f"manifest field 'audio' needs positive integer {', '.join(fields)} and a listed mel_filters file"
                )
        quantization = data.get("quantization") or ""
        if quantization not in ("", "int8"):
            raise BundleError(f"manifest field 'quantization' is {quantization!r}; expected int8 or nothing")
        mode_choice = data.get("mode_choice") or {}
        if mode_choice and mode_choice.get("chosen") != data["mode"]:
            chosen = mode_choice.get("chosen")
            raise BundleError(f"manifest mode_choice chose {chosen!r} but the bundle's mode is {data['mode']!r}")
        engines = data.get("engines") or {}
        if engines:
            _check_engines(engines, graphs, files)
        return cls(
            family=data["family"],
            kind=data["kind"],
            mode=data["mode"],
            dtype=data["dtype"],
            dims=data["dims"],
            graphs=graphs,
            special_tokens=data["special_tokens"],
            generation_defaults=data["generation_defaults"],
            files=files,
            tokenizer=tokenizer,
            exporter=data.get("exporter", {}),
            source=data.get("source", {}),
            fp32_modules=data.get("fp32_modules", {}),
            quantization=quantization,
            audio=audio,
            engines=engines,
            mode_choice=mode_choice,
        )


_SHA256 = re.compile(r"[0-9a-f]{64}")
_AXIS = re.compile(r"^[a-z_]+(\+\d+)?$")
_DTYPES = ("int64", "float32", "float16", "bfloat16")


def _graph_entry(name: str, entry) -> GraphEntry:
    """A graph's file and IO contract, every field checked."""
    where = f"manifest graphs[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise BundleError(f"{where} needs a 'file' name")
    specs = {}
    for side in ("inputs", "outputs"):
        items = entry.get(side)
        if not isinstance(items, list) or not items:
            raise BundleError(f"{where} needs a non-empty list of {side}")
        for item in items:
            ok = (
                isinstance(item, dict)
                and isinstance(item.get("name"), str)
                and item.get("dtype") in _DTYPES
                and isinstance(item.get("shape"), list)
                and all(
                    (isinstance(a, int) and not isinstance(a, bool) and a >= 0)
                    or (isinstance(a, str) and _AXIS.match(a))
                    for a in item["shape"]
                )
            )
            if not ok:
                raise BundleError(f"{where}.{side} has a malformed tensor entry: {str(item)[:80]}")
        specs[side] = tuple(TensorSpec.from_json(item) for item in items)
    return GraphEntry(file=entry["file"], inputs=specs["inputs"], outputs=specs["outputs"])


def _check_engines(engines: dict, graphs: dict[str, GraphEntry], files: dict) -> None:
    """TensorRT engines: precision, versions, and one listed engine file and profile per graph."""
    if engines.get("precision") not in ("fp32", "fp16", "bf16") or engines.get("typing") not in ("strong", "weak"):
        raise BundleError("manifest engines needs a precision (fp32, fp16, bf16) and a typing (strong, weak)")
    if not isinstance(engines.get("tensorrt"), str) or not isinstance((engines.get("gpu") or {}).get("name"), str):
        raise BundleError("manifest engines needs the TensorRT version and the GPU name they were built with")
    entries = engines.get("graphs")
    if not isinstance(entries, dict) or set(entries) != set(graphs):
        raise BundleError(f"manifest engines.graphs must hold one engine per graph ({', '.join(sorted(graphs))})")
    for name, entry in entries.items():
        where = f"manifest engines.graphs[{name!r}]"
        if not isinstance(entry, dict) or entry.get("file") not in files:
            raise BundleError(f"{where} names no engine file from the files list")
        profile = entry.get("profile")
        inputs = {s.name: s for s in graphs[name].inputs}
        if not isinstance(profile, dict) or set(profile) != set(inputs):
            raise BundleError(f"{where}.profile must give min/opt/max shapes for every input of the graph")
        for input_name, shapes in profile.items():
            rank = len(inputs[input_name].shape)
            if not _shape_range(shapes, rank):
                raise BundleError(f"{where}.profile[{input_name!r}] is not min <= opt <= max shapes of rank {rank}")


def _shape_range(shapes, rank: int) -> bool:
    """{"min", "opt", "max"}: shapes of one rank, min <= opt <= max on every axis."""
    keys = ("min", "opt", "max")
    if not isinstance(shapes, dict) or any(not isinstance(shapes.get(k), list) or len(shapes[k]) != rank for k in keys):
        return False
    return all(
        all(isinstance(v, int) and not isinstance(v, bool) for v in axis) and 0 <= axis[0] <= axis[1] <= axis[2]
        for axis in zip(*(shapes[k] for k in keys), strict=True)
    )


def _check_dims(dims: dict) -> None:
    for key in ("d_model", "decoder_layers", "heads", "d_head", "vocab_size"):
        if not _positive_int(dims.get(key)):
            raise BundleError(f"manifest dims.{key} is missing or not a positive integer")
    for key in ("encoder_layers", "encoder_vocab_size"):
        if not isinstance(dims.get(key, 0), int) or dims.get(key, 0) < 0:
            raise BundleError(f"manifest dims.{key} is not a non-negative integer")
    if dims.get("max_positions") is not None and not _positive_int(dims["max_positions"]):
        raise BundleError("manifest dims.max_positions is not a positive integer (or null)")


def _check_special_tokens(tokens: dict) -> None:
    for key, value in tokens.items():
        values = value if isinstance(value, list) else [value]
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in values):
            raise BundleError(f"manifest special_tokens.{key} is not a token id")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require(data: dict, key: str, kind: type, choices: tuple | None = None) -> None:
    if not isinstance(data.get(key), kind):
        raise BundleError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    if choices and data[key] not in choices:
        raise BundleError(f"manifest field {key!r} is {data[key]!r}; expected one of {', '.join(choices)}")


def _safe_name(name: str) -> None:
    """A file name inside the bundle: relative, no parent references, no absolute paths."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise BundleError(f"manifest names file {name!r}, which is outside the bundle directory")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in a directory being written as a bundle (manifest excluded)."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            entries[path.relative_to(directory).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return entries


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with `verify`, check every file's presence and sha256.

    Raises:
        BundleError: the directory, manifest or a file is missing, malformed or corrupted.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist; create one with `el-export export`")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}: not a bundle, or an export that did not finish")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e})") from None
    manifest = Manifest.from_json(data)
    if verify:
        for name, entry in manifest.files.items():
            file = bundle_dir / name
            if not file.is_file():
                raise BundleError(f"bundle {bundle_dir} is missing {name}; re-export it")
            if sha256(file) != entry["sha256"]:
                raise BundleError(
                    f"{file} does not match the sha256 in {MANIFEST}: the file is corrupted or was changed"
                )
    return manifest


@contextmanager
def writing_bundle(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `out_dir` only if the block finishes.

    A failed export leaves nothing behind; an existing bundle is replaced only with `overwrite`.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise InvalidArgumentError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "bundle")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
