"""The manifest: what a bundle holds and what each graph takes and returns, validated field by field.

The schema alone, no file access (`contract.files` reads and writes bundle directories). Readers refuse a format
version they do not know.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from el_export.contract.dtypes import NAMES
from el_export.contract.quantization import check_record
from el_export.errors import BundleError

FORMAT = "el-export-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# The decoder step's output of the alignment heads' cross-attention, in bundles whose manifest has `alignment`.
ALIGNMENT_OUTPUT = "alignment_attention"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ints are fixed sizes, strings are symbolic (dynamic) axes."""

    name: str
    dtype: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


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
    # int8 graphs: the recipe and what each graph got (contract.quantization.check_record); empty: float weights
    quantization: dict = field(default_factory=dict)
    audio: dict = field(default_factory=dict)  # speech models: feature settings and the mel filter file
    engines: dict = field(default_factory=dict)  # TensorRT engines, once built (el_export.trt.build)
    mode_choice: dict = field(default_factory=dict)  # --mode auto: the workload and both modes' measured seconds
    # word timestamps: {"heads": [[layer, head], ...], "median_filter_width": odd int}, the heads the decoder step's
    # ALIGNMENT_OUTPUT holds in order; empty where the checkpoint names no alignment heads
    alignment: dict = field(default_factory=dict)

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
            "alignment": self.alignment,
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
        for key in ("exporter", "source", "fp32_modules", "audio", "engines", "mode_choice", "alignment"):
            if not isinstance(data.get(key) or {}, dict):
                raise BundleError(f"manifest field {key!r} is not an object")
        patterns = (data.get("fp32_modules") or {}).get("patterns", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise BundleError("manifest fp32_modules.patterns is not a list of module name patterns")
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
        quantization = check_record(data.get("quantization"))
        mode_choice = data.get("mode_choice") or {}
        if mode_choice and mode_choice.get("chosen") != data["mode"]:
            chosen = mode_choice.get("chosen")
            raise BundleError(f"manifest mode_choice chose {chosen!r} but the bundle's mode is {data['mode']!r}")
        engines = data.get("engines") or {}
        if engines:
            _check_engines(engines, graphs, files)
        alignment = data.get("alignment") or {}
        _check_alignment(alignment, graphs, data["dims"])
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
            alignment=alignment,
        )


_SHA256 = re.compile(r"[0-9a-f]{64}")
_AXIS = re.compile(r"^[a-z_]+(\+\d+)?$")
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
                and item.get("dtype") in NAMES
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


def _check_alignment(alignment: dict, graphs: dict[str, GraphEntry], dims: dict) -> None:
    """Alignment heads inside the decoder, an odd median filter width, and the step output that holds the heads."""
    step = graphs.get("decoder_step")
    output = next((s for s in step.outputs if s.name == ALIGNMENT_OUTPUT), None) if step else None
    if not alignment:
        if output is not None:
            raise BundleError(f"manifest decoder_step has output {ALIGNMENT_OUTPUT!r} but no 'alignment' field")
        return
    heads, width = alignment.get("heads"), alignment.get("median_filter_width")
    L, h = dims["decoder_layers"], dims["heads"]
    inside = [isinstance(p, list) and len(p) == 2 and all(_size(i, minimum=0) for i in p) and p[0] < L and p[1] < h
              for p in heads] if isinstance(heads, list) else []  # fmt: skip
    if not inside or not all(inside):
        raise BundleError(f"manifest alignment.heads must be [layer, head] pairs inside the decoder's {L} x {h} heads")
    if not _size(width, minimum=1) or width % 2 == 0:
        raise BundleError(f"manifest alignment.median_filter_width is {str(width)[:20]}; expected an odd positive int")
    if output is None or output.shape != ("rows", len(heads), "source"):
        raise BundleError(
            f"manifest alignment names {len(heads)} heads; decoder_step needs an output {ALIGNMENT_OUTPUT!r} of shape "
            f"['rows', {len(heads)}, 'source']"
        )


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
