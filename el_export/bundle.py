"""The bundle: the contract between export time and run time.

A directory holding `manifest.json` and the files it names (graphs, external weights, tokenizer).
The runtime reads only this: no `transformers`, no original checkpoint. Readers refuse a format
version they do not know, a file whose sha256 differs from the manifest, any file name that would
leave the bundle directory, and links or anything but plain files inside it. The runtime reads each
file it uses once, into memory, and uses the bytes it checked (`read_file`).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from el_export.errors import BundleError, InvalidArgumentError, first_line
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

    @property
    def source_vocab_size(self) -> int:
        """Ids an input_ids entry may take: the encoder's vocabulary (Marian's differs from the decoder's), or
        the decoder's for decoder-only models, whose dims hold encoder_vocab_size 0."""
        return self.dims["encoder_vocab_size"] or self.dims["vocab_size"]

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
        vocab = data["dims"]["vocab_size"]
        _check_token_ids("special_tokens", data["special_tokens"], vocab, all_keys=True)
        _check_token_ids("generation_defaults", data["generation_defaults"], vocab, all_keys=False)
        files = data["files"]
        for name, entry in files.items():
            _safe_name(name)
            if not isinstance(entry, dict) or not _SHA256.fullmatch(str(entry.get("sha256"))):
                raise BundleError(f"manifest files[{name!r}] has no valid sha256")
            if not _size(entry.get("bytes"), minimum=0):
                raise BundleError(f"manifest files[{name!r}] has no valid size in bytes")
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
            logits = next((s for s in graph.outputs if s.name == "logits"), None)
            if logits is not None and logits.shape[-1:] != (vocab,):
                raise BundleError(
                    f"manifest graphs[{name!r}] logits end in {list(logits.shape[-1:])}, not dims.vocab_size {vocab}"
                )
            graphs[name] = graph
        tokenizer = data.get("tokenizer")
        if tokenizer is not None and (not isinstance(tokenizer, str) or tokenizer not in files):
            raise BundleError(f"manifest names tokenizer {tokenizer!r}, which is not in its files list")
        audio = data.get("audio") or {}
        if audio:
            fields = ("sampling_rate", "n_fft", "hop_length", "chunk_length", "n_mels")
            mel_filters = audio.get("mel_filters")
            listed = isinstance(mel_filters, str) and mel_filters in files
            if not listed or not all(_size(audio.get(k), minimum=1) for k in fields):
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
_LIMIT = 2**31  # dims, fixed axis sizes and token ids stay below it: int32 range, which engines index with
# generation_defaults keys holding token ids: these lists, *_token_id, and *_to_id (Whisper's language and task maps)
_TOKEN_LISTS = ("suppress_tokens", "begin_suppress_tokens")


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
            if too_large := [a for a in item["shape"] if isinstance(a, int) and a >= _LIMIT]:
                raise BundleError(
                    f"{where}.{side}: {item['name']!r} declares size {too_large[0]}; fixed sizes are below 2**31"
                )
        specs[side] = tuple(TensorSpec.from_json(item) for item in items)
        if len({s.name for s in specs[side]}) != len(items):
            raise BundleError(f"{where}.{side} names a tensor twice")
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
        all(_size(v, minimum=0) for v in axis) and axis[0] <= axis[1] <= axis[2]
        for axis in zip(*(shapes[k] for k in keys), strict=True)
    )


def _check_dims(dims: dict) -> None:
    for key in ("d_model", "decoder_layers", "heads", "d_head", "vocab_size"):
        if not _size(dims.get(key), minimum=1):
            raise BundleError(f"manifest dims.{key} is missing or not a positive integer below 2**31")
    for key in ("encoder_layers", "encoder_vocab_size"):
        if not _size(dims.get(key, 0), minimum=0):
            raise BundleError(f"manifest dims.{key} is not a non-negative integer below 2**31")
    if dims.get("max_positions") is not None and not _size(dims["max_positions"], minimum=1):
        raise BundleError("manifest dims.max_positions is not a positive integer below 2**31 (or null)")


def _check_token_ids(where: str, tokens: dict, vocab: int, all_keys: bool) -> None:
    """Token ids (null, an id, a list of ids, or a map to ids) inside the decoder's vocabulary [0, vocab): an id
    past it would index past the embedding table in the graph. `all_keys`: every key holds ids, not only the
    keys named for them."""
    for key, value in tokens.items():
        if not (all_keys or key.endswith(("_token_id", "_to_id")) or key in _TOKEN_LISTS):
            continue
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        bad = next((v for v in values if v is not None and not (_size(v, minimum=0) and v < vocab)), None)
        if bad is not None:
            shown = f"{bad!r}"[:40]
            raise BundleError(f"manifest {where}.{key} holds {shown}, which is not a token id below vocab_size {vocab}")


def _size(value, minimum: int) -> bool:
    """An int (not a bool) in [minimum, 2**31)."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value < _LIMIT


def _require(data: dict, key: str, kind: type, choices: tuple | None = None) -> None:
    if not isinstance(data.get(key), kind):
        raise BundleError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    if choices and data[key] not in choices:
        raise BundleError(f"manifest field {key!r} is {data[key]!r}; expected one of {', '.join(choices)}")


def _safe_name(name: str) -> None:
    """A file name inside the bundle: relative, no parent references, no absolute paths, no empty or "." parts."""
    parts = name.split("/")
    if not name or Path(name).is_absolute() or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"manifest names file {name!r}, which is outside the bundle directory")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entries(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in a directory being written as a bundle (manifest excluded)."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            entries[path.relative_to(directory).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return entries


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True, hash_files: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with `verify`, check that every file is there, a plain file of its
    size and (`hash_files`) sha256. A loader passes hash_files=False and hashes what it reads (`read_file`).

    Raises:
        BundleError: the directory, manifest or a file is missing, malformed or corrupted.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist; create one with `el-export export`")
    path = bundle_dir / MANIFEST
    if not os.path.lexists(path):
        raise BundleError(f"{bundle_dir} has no {MANIFEST}: not a bundle, or an export that did not finish")
    with _open(bundle_dir, MANIFEST) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except RecursionError:
        raise BundleError(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # malformed JSON, not UTF-8, or an integer past Python's digit limit
        raise BundleError(f"{path} is not valid JSON ({first_line(e)})") from None
    manifest = Manifest.from_json(data)
    if verify:
        for name, entry in manifest.files.items():
            with _open(bundle_dir, name) as f:
                _check_size(f, bundle_dir / name, entry)
                if hash_files and hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    raise _changed(bundle_dir / name)
    return manifest


def read_file(bundle_dir: str | os.PathLike, manifest: Manifest, name: str, verify: bool = True) -> bytes:
    """The bytes of listed file `name`, read once: what the sha256 was checked on is what the caller uses (a
    file swapped after the check is never read).

    Raises:
        BundleError: the file is missing, a link, not a regular file, or (with `verify`) changed.
    """
    bundle_dir = Path(bundle_dir)
    with _open(bundle_dir, name) as f:
        if verify:
            _check_size(f, bundle_dir / name, manifest.files[name])
        data = f.read()
    if verify and sha256_bytes(data) != manifest.files[name]["sha256"]:
        raise _changed(bundle_dir / name)
    return data


def _open(bundle_dir: Path, name: str):
    """Open `name` in the bundle for reading through no symbolic link, so nothing resolves outside the bundle
    (O_NOFOLLOW on every part, each opened relative to the last); FIFOs open without blocking and are refused."""
    path = bundle_dir / name
    parts = name.split("/")
    try:
        directory = os.open(bundle_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise BundleError(f"cannot open bundle directory {bundle_dir} ({e.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError as e:  # O_NOFOLLOW refuses a link with ELOOP, or with ENOTDIR where a directory was expected
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and any(
            os.path.islink(bundle_dir.joinpath(*parts[: i + 1])) for i in range(len(parts))
        ):
            raise BundleError(
                f"{path} is a symbolic link (or inside one); a bundle holds plain files: copy the file in, or re-export"
            ) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BundleError(f"bundle {bundle_dir} is missing {name}; re-export it") from None
        raise BundleError(f"cannot read {path} ({e.strerror})") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path} is not a regular file (a directory, FIFO or device); re-export the bundle")
    return os.fdopen(fd, "rb")


def _check_size(f, path: Path, entry: dict) -> None:
    """A size that differs from the manifest's is a changed file, found before reading it all."""
    if os.fstat(f.fileno()).st_size != entry["bytes"]:
        raise _changed(path)


def _changed(path: Path) -> BundleError:
    return BundleError(f"{path} does not match the sha256 in {MANIFEST}: the file is corrupted or was changed")


@contextmanager
def writing_bundle(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `out_dir` only if the block finishes.

    A failed export leaves nothing behind; an existing bundle is replaced only with `overwrite`, and nothing but an
    el-export bundle (or a directory inside one: its TensorRT engines) is ever replaced. The result gets the
    permissions the umask allows (mkdtemp's are 0700), so a server running as another user can read it.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise InvalidArgumentError(f"{out_dir} already exists; choose another --out or pass --overwrite")
        if out_dir.is_symlink() or not (_is_bundle(out_dir) or (out_dir.is_dir() and _is_bundle(out_dir.parent))):
            raise InvalidArgumentError(
                f"{out_dir} is not an el-export bundle (no manifest.json of format {FORMAT}); --overwrite replaces "
                "only bundles: choose another --out"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        _allow_umask(tmp)
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


def _is_bundle(path: Path) -> bool:
    """A real directory (not a link) whose manifest.json says it is an el-export bundle."""
    try:
        data = json.loads((path / MANIFEST).read_bytes()) if path.is_dir() and not path.is_symlink() else None
    except (OSError, ValueError):  # unreadable or not JSON: not a bundle to replace
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _allow_umask(directory: Path) -> None:
    """Give a directory tree the modes the umask allows: 0777 & ~umask for directories, 0666 & ~umask for files."""
    probe = directory / ".umask"
    probe.mkdir()  # mkdir applies the umask to 0777; reading it this way leaves the process umask untouched
    dirs = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dirs if path.is_dir() else dirs & 0o666)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
