"""Export: a loaded HF model -> EL (or K/V) graphs -> ONNX -> checked bundle, written atomically.

One template for every family: load, build + copy weights, export each graph, check each graph
against its PyTorch module on shapes it was not traced with, write the manifest. The exporter
knows torch and ONNX; families know checkpoints.
"""

import json
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.export import Dim

from el_export import __version__, logs
from el_export.contract.files import file_entries, write_manifest, writing_bundle
from el_export.contract.manifest import GraphEntry, Manifest
from el_export.contract.quantization import load_recipe
from el_export.errors import CheckpointError, ExportError, InvalidArgumentError, first_line
from el_export.export.graphs import float_dtype, graphs_for, sample_inputs
from el_export.export.quantize import MEMORY, memory_feeds, quantize_file, quantized_entry
from el_export.export.quantize import record as quantization_record
from el_export.families import build_from_hf, cast
from el_export.model.models import MODES
from el_export.progress import Steps
from el_export.runtime.audio import FeatureSpec
from el_export.tolerance import graph_close
from el_export.trt.lint import check_onnx
from el_export.trt.ops import SOURCE

# torch's dynamo exporter implements ONNX ops at opset 18 and later; a lower opset goes through onnx's down-converter,
# which fails (T5 at 17, every other family below 17: LayerNormalization), prints a traceback and keeps 18.
MIN_OPSET = 18
MAX_OPSET = SOURCE["opsets"][1]  # the graphs must also parse in TensorRT (and 24 runs in ONNX Runtime)
CHECK_SIZES = (
    {"batch": 1, "rows": 1, "source": 1, "past": 0, "prompt": 1, "context": 1},
    {"batch": 3, "rows": 12, "source": 9, "past": 7, "prompt": 6, "context": 13},
)

# generation_config keys that describe bookkeeping, not search.
_NOT_GENERATION = {
    "_from_model_config",
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
}


def export_model(
    hf_model,
    out_dir: str | os.PathLike,
    *,
    mode: str = "el",
    dtype: str = "float32",
    opset: int | None = None,
    tokenizer=None,
    feature_extractor=None,
    quantize: str | None = None,
    quantize_recipe: str | None = None,
    overwrite: bool = False,
    external_data: bool | None = None,
    progress: bool = True,
    source: str | None = None,
    auto_workload: dict | None = None,
    threads: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Manifest:
    """Export an HF generation model to a bundle of ONNX graphs with an EL (or K/V) decoder.

    Args:
        hf_model: a loaded `transformers` model of a supported family.
        out_dir: the bundle directory to create (atomically: a failure leaves nothing).
        mode: "el" (EL-attention decoder), "kv" (the standard K/V-cache baseline), or "auto": both are exported,
            timed on `auto_workload` with ONNX Runtime (`threads`), and the faster is kept (`el_export.export.auto`).
        dtype: "float32" or "float16" (modules a family knows to overflow stay fp32; see the manifest).
        opset: ONNX opset, `MIN_OPSET` to `MAX_OPSET`; None lets the exporter choose. The written graphs are
            checked to carry it.
        tokenizer: an HF fast tokenizer to ship as tokenizer.json (optional).
        feature_extractor: a speech model's `WhisperFeatureExtractor` (default: Whisper's standard one).
        quantize: "int8": the float32 graphs' weight products in int8 (export.quantize; a CPU option for ONNX
            Runtime; TensorRT builds refuse such bundles).
        quantize_recipe: with int8, a built-in recipe's name or a recipe JSON file (contract.quantization;
            None: the default recipe); recorded in the manifest.
        overwrite: replace an existing bundle at `out_dir`.
        external_data: store weights beside the graph; None does so only past 2 GB.
        progress: show a progress display on stderr.
        source: where the checkpoint came from, recorded in the manifest.
        auto_workload: `mode="auto"`: batch_size, num_beams, source_len, new_tokens to time (`auto.DEFAULTS`).
        threads: ONNX Runtime threads for the `mode="auto"` timing (default: all cores).
        atol, rtol: the accuracy check's tolerances, replacing tolerance.py's (for a model that fails it and whose
            error the user accepts).

    Returns:
        The manifest written.

    Raises:
        InvalidArgumentError, UnsupportedModelError, CheckpointError, ExportError.
    """
    check_options(mode=mode, dtype=dtype, quantize=quantize, quantize_recipe=quantize_recipe, opset=opset, atol=atol,
                  rtol=rtol)  # fmt: skip
    recipe = load_recipe(quantize_recipe) if quantize else None
    if mode == "auto":
        from el_export.export.auto import export_auto

        options = dict(dtype=dtype, opset=opset, tokenizer=tokenizer, feature_extractor=feature_extractor,
                       quantize=quantize, quantize_recipe=quantize_recipe, external_data=external_data,
                       progress=progress, source=source, atol=atol, rtol=rtol)  # fmt: skip
        return export_auto(hf_model, out_dir, auto_workload, overwrite=overwrite, threads=threads,
                           **options)  # fmt: skip
    steps = Steps(["build", "encoder", "decoder_step", "bundle"], enabled=progress)
    with steps, writing_bundle(out_dir, overwrite=overwrite) as tmp:
        steps.start("build", f"building the {mode} graphs")
        model, family = build_from_hf(hf_model)
        kept = cast(model, family, dtype)
        graphs = graphs_for(model, mode)
        quantized = {}
        for graph in graphs:
            steps.start(graph.name, f"exporting {graph.name}.onnx")
            path = tmp / f"{graph.name}.onnx"
            export_graph(graph, path, opset=opset, external_data=external_data)
            check_graph(graph, path, atol=atol, rtol=rtol)
            if recipe is not None:
                quantized[graph.name] = quantize_graph(graph, path, recipe)
        steps.start("bundle", "writing the bundle")
        tokenizer_file = _save_tokenizer(tokenizer, tmp)
        audio = _save_audio_features(hf_model, feature_extractor, tmp) if model.spec.n_mels else {}
        described = describe(hf_model, graphs, family)
        entries = {name: quantized_entry(e, quantized[name]) if name in quantized else e
                   for name, e in described.graphs.items()}  # fmt: skip
        manifest = replace(
            described,
            graphs=entries,
            files=file_entries(tmp),
            tokenizer=tokenizer_file,
            exporter=_versions(_opset_of(tmp / "decoder_step.onnx")),
            source={"model": source, "config_class": type(hf_model.config).__name__},
            fp32_modules=_fp32_record(family, kept),
            audio=audio,
            quantization=quantization_record(recipe, quantized) if recipe is not None else {},
        )
        write_manifest(tmp, manifest)
        steps.done()
    return manifest


def check_options(*, mode: str = "el", dtype: str = "float32", quantize: str | None = None,
                  quantize_recipe: str | None = None, opset: int | None = None, atol: float | None = None,
                  rtol: float | None = None) -> None:  # fmt: skip
    """Refuse export options that cannot work, before anything is loaded or written (`export_model`'s arguments).

    Raises:
        InvalidArgumentError: naming the option and what it accepts.
    """
    if mode not in (*MODES, "auto"):
        raise InvalidArgumentError(f"mode {mode!r} is not one of {', '.join(MODES)}, auto")
    if dtype not in ("float32", "float16"):
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of float32, float16")
    if quantize not in (None, "int8") or (quantize and dtype != "float32"):
        raise InvalidArgumentError(f"quantize={quantize!r}: the only option is int8, on a float32 export")
    if quantize_recipe is not None:
        if not quantize:
            raise InvalidArgumentError("--quantize-recipe applies to --quantize int8; add --quantize int8")
        load_recipe(quantize_recipe)
    for name, value in (("atol", atol), ("rtol", rtol)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 <= value < float("inf")):
            raise InvalidArgumentError(f"--{name} must be a non-negative number, got {value!r}")
    if opset is not None and not (type(opset) is int and MIN_OPSET <= opset <= MAX_OPSET):
        raise InvalidArgumentError(
            f"--opset {opset!r} is not supported: el-export writes opsets {MIN_OPSET} (torch's dynamo exporter's "
            f"lowest) to {MAX_OPSET} (TensorRT's parser's highest); choose one in that range or omit --opset"
        )


def export_graph(graph: torch.nn.Module, path: Path, opset: int | None = None, external_data: bool | None = None):
    """torch.onnx (dynamo) export with every symbolic axis of the graph's contract dynamic."""
    import onnx

    dims: dict[str, Dim] = {}

    def dim(axis: str) -> Dim:
        if axis not in dims:
            dims[axis] = Dim(axis, min=0 if axis == "past" else 1)
        return dims[axis]

    axes = [{i: dim(a) for i, a in enumerate(spec.shape) if isinstance(a, str)} for spec in graph.inputs]
    dynamic_shapes = graph.group(axes)  # the same nesting as forward's arguments (lists of per-layer caches)
    graph.eval()
    try:  # torch.onnx warns about torchvision ops we never use
        with logs.logger_level("torch.onnx", logging.ERROR), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                graph.group(sample_inputs(graph)),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[s.name for s in graph.inputs],
                output_names=[s.name for s in graph.outputs],
                opset_version=opset,
                verbose=False,
            )
            program.save(path, external_data=external_data)
    except Exception as e:  # the exporter raises many types; the first line says what failed
        raise ExportError(f"exporting {graph.name} failed: {first_line(e)}") from e
    # Name output axes as the contract does (the exporter writes expressions such as "past + 1").
    model = onnx.load(str(path), load_external_data=False)
    written = _onnx_opset(model)
    if opset is not None and written != opset:
        raise ExportError(f"{path.name}: opset {opset} was asked for, but the exporter wrote opset {written}")
    for spec, value in zip(graph.outputs, model.graph.output, strict=True):
        for axis, dim_proto in zip(spec.shape, value.type.tensor_type.shape.dim, strict=True):
            if isinstance(axis, str):
                dim_proto.dim_param = axis
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {first_line(e)}") from None
    bad = {n.op_type for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")}
    if bad:
        raise ExportError(f"{path.name} contains control flow ({', '.join(sorted(bad))}); graphs must be straight-line")
    check_onnx(path)  # what TensorRT's ONNX parser accepts (el_export.trt.ops)


def check_graph(graph: torch.nn.Module, path: Path, atol: float | None = None, rtol: float | None = None) -> None:
    """Run the exported graph in ONNX Runtime on shapes it was not traced with; compare with PyTorch.

    `atol` / `rtol` replace tolerance.py's (scaled to each output's peak and the model's width) when given.
    """
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sizes in CHECK_SIZES:
        inputs = sample_inputs(graph, sizes, seed=1)
        with torch.no_grad():
            expected = graph.run(inputs)
        got = session.run(None, {s.name: t.numpy() for s, t in zip(graph.inputs, inputs, strict=True)})
        for spec, e, g in zip(graph.outputs, expected, got, strict=True):
            close = graph_close(g.astype(np.float32), e.float().numpy(), float_dtype(graph.model),
                                width=graph.model.spec.d_model, atol=atol, rtol=rtol)  # fmt: skip
            if not close.ok:
                raise ExportError(
                    f"{path.name} output {spec.name} differs from PyTorch at {sizes}: {close}; "
                    "if that is acceptable for this model, export with a larger --atol (or --rtol)"
                )


def quantize_graph(graph, path: Path, recipe) -> dict:
    """The graph's weight products in int8 as `recipe` says (export.quantize), then a run on unseen shapes.

    The float32 graph was already checked against PyTorch; int8 changes the numbers by design (how much
    depends on the weights: far more on the tiny init-std-0.5 test models than on trained ones), so this
    checks shapes and finiteness, and accuracy is measured where it means something: tokens against HF's float32
    ones (`el-export compare`, `el-export bench`). Returns what the graph got (the manifest's record).
    """
    import numpy as np
    import onnxruntime as ort

    record = quantize_file(path, graph.name, recipe, el=graph.mode == "el")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = sample_inputs(graph, CHECK_SIZES[1], seed=1)
    with torch.no_grad():
        expected = graph.run(inputs)
    feeds = {s.name: t.numpy() for s, t in zip(graph.inputs, inputs, strict=True)}
    if record.get("memory_products"):  # the step takes the memory as the int8 encoder returns it
        feeds.update(memory_feeds(feeds[MEMORY]))
    taken = {i.name for i in session.get_inputs()}
    got = session.run([spec.name for spec in graph.outputs], {k: v for k, v in feeds.items() if k in taken})
    for spec, e, g in zip(graph.outputs, expected, got, strict=True):
        if g.shape != tuple(e.shape) or not np.isfinite(g).all():
            raise ExportError(f"int8 {path.name} output {spec.name} has shape {g.shape} or non-finite values")
    return record


def _fp32_record(family, kept: list[str]) -> dict:
    """The manifest's `fp32_modules`: the family's overflow-prone module patterns (a TensorRT build that lowers
    a float32 bundle pins them), the modules this export kept in fp32, and why."""
    if not family.fp32_modules:
        return {}
    return {"patterns": list(family.fp32_modules), "modules": kept, "reason": family.fp32_reason}


def describe(hf_model, graphs: list, family) -> Manifest:
    """The manifest of a model's graphs, without files: what export writes and the torch backend runs."""
    model = graphs[0].model
    return Manifest(
        family=family.name,
        kind=family.kind,
        mode=graphs[0].mode,
        dtype=float_dtype(model),
        dims=_dims(model.spec),
        graphs={g.name: GraphEntry(file=f"{g.name}.onnx", inputs=g.inputs, outputs=g.outputs) for g in graphs},
        special_tokens=_special_tokens(hf_model),
        generation_defaults=_generation_defaults(hf_model),
        files={},
        alignment=_alignment(hf_model, model.spec),
    )


def _alignment(hf_model, spec) -> dict:
    """The manifest's `alignment`: the heads the decoder step's alignment output holds, and HF's median filter width
    (WhisperConfig's default where a config has none)."""
    if not spec.alignment_heads:
        return {}
    width = getattr(hf_model.config, "median_filter_width", 7)
    if type(width) is not int or width < 1 or width % 2 == 0:
        raise CheckpointError(f"config.json sets median_filter_width {width!r}; it must be an odd positive integer")
    return {"heads": [list(p) for p in spec.alignment_heads], "median_filter_width": width}


def _dims(spec) -> dict:
    return {
        "d_model": spec.d_model,
        "encoder_layers": spec.encoder_layers,
        "decoder_layers": spec.decoder_layers,
        "heads": spec.decoder.n_heads,
        "d_head": spec.decoder.d_head,
        "vocab_size": spec.vocab_size,
        "encoder_vocab_size": spec.encoder_vocab_size,
        "max_positions": spec.max_positions,
    }


def _special_tokens(hf_model) -> dict:
    gen, cfg = hf_model.generation_config, hf_model.config
    tokens = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(gen, key, None)
        tokens[key] = value if value is not None else getattr(cfg, key, None)
    return tokens


def _generation_defaults(hf_model) -> dict:
    return {k: v for k, v in hf_model.generation_config.to_diff_dict().items() if k not in _NOT_GENERATION}


def _save_tokenizer(tokenizer, directory: Path) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "save"):
        return None
    backend.save(str(directory / "tokenizer.json"))
    return "tokenizer.json"


def _save_audio_features(hf_model, feature_extractor, directory: Path) -> dict:
    """The feature settings and mel filter bank the runtime needs to turn audio into input_features."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    fe = feature_extractor or WhisperFeatureExtractor(feature_size=hf_model.config.num_mel_bins)
    filters = np.asarray(fe.mel_filters, dtype=np.float32)  # float32 values round-trip exactly through JSON
    (directory / "mel_filters.json").write_text(json.dumps(filters.tolist()))
    spec = FeatureSpec(fe.sampling_rate, fe.n_fft, fe.hop_length, fe.chunk_length, fe.feature_size)
    return {**spec.to_json(), "mel_filters": "mel_filters.json"}


def _opset_of(path: Path) -> int:
    import onnx

    return _onnx_opset(onnx.load(str(path), load_external_data=False))


def _onnx_opset(model) -> int:
    """The default-domain opset of an ONNX ModelProto."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _versions(opset: int) -> dict:
    import onnx
    import transformers

    return {
        "el_export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "opset": opset,
    }
