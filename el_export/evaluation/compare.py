"""`compare`: proof that a bundle computes what the original model computes.

1. Per graph, through Polygraphy's comparator: the bundle's graph on a backend against the PyTorch
   step module it was exported from, on shapes not used at export (B=1, one row, t=0, S=1, and a
   larger batch), with per-output tolerances. For TensorRT: each engine against the same ONNX graph
   in ONNX Runtime, on those shapes brought inside the engine's profile, with the tolerances of the
   engine's precision. int8 graphs are checked for shapes and finite values only: int8 changes the
   numbers by design, and the tokens measure by how much.
2. Speech bundles: the bundle's log-mel features of the clips against the checkpoint's feature extractor's.
3. End to end: `load(bundle).generate` against HF `generate` on the same inputs (text: a padded batch;
   speech: audio clips), greedy and beam search.

Verdicts: PASS and FAIL hold float32 to equal token sequences and sequence scores within tolerance.
Reduced precision (float16 / bfloat16 graphs or engines, int8 weights) may pick other tokens than HF in
float32 by rounding alone, so its generation checks report agreement instead: AGREE (every sequence
equal) or DIFFER (with how many sequences differ and from which step), never PASS, with the figures
(agreement.py): tokens equal at equal positions, and for speech the transcripts identical to HF's and the
word error rate against them. HF always runs in float32.
"""

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from el_export import logs
from el_export.contract.quantization import MEMORY_OUTPUTS
from el_export.errors import CheckpointError, InvalidArgumentError
from el_export.evaluation.agreement import first_difference, token_agreement, transcript_agreement
from el_export.export.graphs import graphs_for, sample_inputs
from el_export.export.quantize import MEMORY, memory_feeds
from el_export.runtime.tokenizer import padding
from el_export.tolerance import GRAPH_TOLERANCE, SCORE_TOLERANCE, graph_atol, graph_close

COMPARE_SIZES = (
    {"batch": 1, "rows": 1, "source": 1, "past": 0, "prompt": 1, "context": 1},
    {"batch": 1, "rows": 1, "source": 11, "past": 1, "prompt": 9, "context": 10},
    {"batch": 3, "rows": 12, "source": 13, "past": 5, "prompt": 7, "context": 12},
)
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Exported graphs must give the same tokens as the original model.",
    "Short input.",
    "Memory efficient attention keeps one copy of the encoder output per input.",
)
TEXT_NEW_TOKENS = 16  # text bundles' default; speech bundles decode whole transcripts (the model's max_length)

PASS, FAIL, AGREE, DIFFER = "PASS", "FAIL", "AGREE", "DIFFER"
# The exit status of `el-export compare` for each overall verdict (the worst check's, FAIL first).
EXIT_CODES = {PASS: 0, AGREE: 0, FAIL: 1, DIFFER: 8}


@dataclass
class Check:
    """One check's verdict, a line for people, and its figures for programs (None where one does not apply)."""

    name: str
    verdict: str  # PASS | FAIL | AGREE | DIFFER
    detail: str
    max_abs_error: float | None = None  # graphs, features: worst |bundle - reference| over outputs and shapes
    tolerance: dict | None = None  # graphs: {"atol": {output: value}, "rtol": r}; float32 generate: {"score": s}
    sequences: int | None = None  # generate: sequences compared
    sequences_differing: int | None = None
    first_differing_step: int | None = None  # generated tokens before the first that differs (prompt excluded)
    score_error: float | None = None  # beam search with equal tokens: max |sequences_scores - HF's|
    token_agreement: float | None = None  # generate: generated tokens equal at equal positions / tokens_compared
    tokens_compared: int | None = None
    transcripts: int | None = None  # speech bundles with a tokenizer: transcripts compared with HF's
    transcripts_identical: int | None = None
    transcripts_differing: int | None = None
    word_error_rate: float | None = None  # against HF's transcripts (words as written); None: HF's hold no words
    reference_words: int | None = None  # HF's words, the rate's denominator

    @property
    def passed(self) -> bool:
        return EXIT_CODES[self.verdict] == 0

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class Report:
    """Every check of a bundle against its checkpoint, and the verdict they add up to."""

    bundle: str
    reference: str
    precision: str  # "float32", "float16", "bfloat16" (graphs or engines) or "int8" (weights)
    checks: list[Check] = field(default_factory=list)
    recipe: str | None = None  # int8: the name of the recipe the bundle was quantized with

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.checks}
        return next(v for v in (FAIL, DIFFER, AGREE, PASS) if v in verdicts)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def summary(self) -> str:
        """One line: the verdict and the figures behind it."""
        verdict = self.verdict
        if verdict == FAIL:
            return f"FAIL: {', '.join(c.name for c in self.checks if c.verdict == FAIL)}"
        generation = [c for c in self.checks if c.sequences is not None]
        total = sum(c.sequences for c in generation)
        if self.precision == "int8":
            graphs = f"int8{f' (recipe {self.recipe})' if self.recipe else ''} graphs well-formed"
        else:
            graphs = f"graphs within {self.precision} tolerance"
        if verdict == PASS:
            scores = f"scores within {SCORE_TOLERANCE:.0e}"
            return f"PASS: {graphs}; tokens equal HF generate's on all {total} sequences, {scores}"
        if verdict == AGREE:
            tokens = f"tokens equal HF generate's on all {total} sequences"
        else:
            differing = sum(c.sequences_differing for c in generation)
            step = min(c.first_differing_step for c in generation if c.sequences_differing)
            tokens = f"tokens differ on {differing} of {total} sequences, first at step {step}"
            rate = _weighted(generation, "token_agreement", "tokens_compared")
            tokens += f", {rate:.1%} of tokens equal" if rate is not None else ""
        return f"{verdict}: {graphs}; {tokens}{_transcripts_summary(generation)}"

    def to_json(self) -> dict:
        return {
            "bundle": self.bundle,
            "reference": self.reference,
            "precision": self.precision,
            "recipe": self.recipe,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "summary": self.summary(),
            "checks": [c.to_json() for c in self.checks],
        }


def _weighted(checks: list[Check], rate: str, count: str) -> float | None:
    """The rate over all `checks` together: each check's `rate` weighted by its `count` (its denominator)."""
    counted = [c for c in checks if getattr(c, rate) is not None and getattr(c, count)]
    total = sum(getattr(c, count) for c in counted)
    return sum(getattr(c, rate) * getattr(c, count) for c in counted) / total if total else None


def _transcripts_summary(checks: list[Check]) -> str:
    """The transcript figures of `checks` together, or "" where none has transcripts."""
    speech = [c for c in checks if c.transcripts is not None]
    if not speech:
        return ""
    identical, transcripts = sum(c.transcripts_identical for c in speech), sum(c.transcripts for c in speech)
    return _transcripts_phrase(identical, transcripts, _weighted(speech, "word_error_rate", "reference_words"))


def _transcripts_phrase(identical: int, transcripts: int, word_error_rate: float | None) -> str:
    """The transcript figures as reduced-precision details and summaries say them."""
    wer = "no WER (HF's transcripts hold no words)" if word_error_rate is None else f"WER {word_error_rate:.1%}"
    return f"; transcripts identical {identical}/{transcripts}, {wer} vs HF float32"


@dataclass(frozen=True)
class Inputs:
    """The same inputs for both sides: keyword arguments of the bundle's and of HF's `generate`."""

    ours: dict
    reference: dict
    label: str  # "batch 3", "4 clips"


def _torch_runner(module: torch.nn.Module, graph):
    """A Polygraphy runner over a PyTorch module on CPU (Polygraphy's own PytRunner moves inputs to CUDA)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=f"torch-{graph.name}", prefix="torch-runner")

        def activate_impl(self):
            module.eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in graph.inputs:
                shape = [None if isinstance(a, str) else a for a in spec.shape]
                meta.add(spec.name, dtype=getattr(torch, spec.dtype), shape=shape)
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                out = graph.run([torch.as_tensor(feed_dict[s.name]) for s in graph.inputs])
            self.inference_time = time.perf_counter() - start
            return OrderedDict((s.name, o.numpy()) for s, o in zip(graph.outputs, out, strict=True))

        def deactivate_impl(self):
            pass

    return TorchRunner()


def backend_runner(backend: str, bundle_dir, graph_file: str):
    """The Polygraphy runner for one bundle file on a backend (an .onnx graph, or a TensorRT engine)."""
    if backend == "onnxruntime":
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return OnnxrtRunner(SessionFromOnnx(str(bundle_dir / graph_file), providers=["CPUExecutionProvider"]))
    if backend == "tensorrt":
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(BytesFromPath(str(bundle_dir / graph_file))))
    raise ValueError(f"no graph runner for backend {backend!r}")


def _graph_runners(backend: str, bundle_dir, manifest, graph) -> tuple[list, str, tuple[dict, ...]]:
    """(runners, the last one being the reference; the dtype whose tolerances apply; the shapes to run)."""
    if backend != "tensorrt":
        runner = backend_runner(backend, bundle_dir, manifest.graphs[graph.name].file)
        return [runner, _torch_runner(graph, graph)], manifest.dtype, COMPARE_SIZES
    engine = backend_runner("tensorrt", bundle_dir, manifest.engines["graphs"][graph.name]["file"])
    reference = backend_runner("onnxruntime", bundle_dir, manifest.graphs[graph.name].file)
    sizes = tuple(_within_profile(s, manifest.engines["axes"]) for s in COMPARE_SIZES)
    return [engine, reference], engine_dtype(manifest), sizes


def engine_dtype(manifest) -> str:
    """The dtype a bundle's TensorRT engines compute in (their precision), for tolerances."""
    from el_export.trt.precision import PRECISIONS

    return PRECISIONS[manifest.engines["precision"]]


def precision_of(manifest, backend: str = "onnxruntime") -> str:
    """What a bundle's numbers are held to: "int8" for int8 weights, else the dtype its graphs (engines) compute in."""
    if manifest.quantization:
        return manifest.quantization["method"]
    return engine_dtype(manifest) if backend == "tensorrt" else manifest.dtype


def _within_profile(sizes: dict, axes: dict) -> dict:
    """Compare sizes moved inside an engine profile's axis ranges, keeping rows = batch x beams and
    context = prompt + past."""
    clamp = {a: (lambda v, a=a: min(max(v, axes[a][0]), axes[a][2])) for a in axes}
    out = {a: clamp[a](v) if a in clamp else v for a, v in sizes.items()}
    if "rows" in axes:
        beams = min(sizes["rows"] // sizes["batch"], axes["rows"][2] // out["batch"])
        out["rows"] = out["batch"] * max(1, beams)
    if "context" in axes:
        out["context"] = clamp["context"](out["prompt"] + sizes["context"] - sizes["prompt"])
    return out


def compare_graphs(bundle_dir, manifest, model: torch.nn.Module, backend: str = "onnxruntime") -> list[Check]:
    """Each bundle graph on `backend` vs its PyTorch module, via Polygraphy's Comparator."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    checks = []
    for graph in graphs_for(model, manifest.mode):
        runners, dtype, shapes = _graph_runners(backend, bundle_dir, manifest, graph)
        feeds = [
            OrderedDict(
                (s.name, t.numpy()) for s, t in zip(graph.inputs, sample_inputs(graph, sizes, seed=7), strict=True)
            )
            for sizes in shapes
        ]
        if MEMORY_OUTPUTS[0] in {s.name for s in manifest.graphs[graph.name].inputs}:
            for feed in feeds:  # an int8 step takes the memory as the int8 encoder returns it
                feed.update(memory_feeds(feed[MEMORY]))
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the checks report the outcome
            results = Comparator.run(runners, data_loader=feeds)
        worst = _worst_error(results)
        name = f"graph {graph.name} ({backend} vs {'onnxruntime' if backend == 'tensorrt' else 'torch'})"
        if manifest.quantization:
            verdict = PASS if _well_formed(results) else FAIL
            detail = (
                f"{len(feeds)} shapes, max abs error {worst:.2e} vs float32 PyTorch; int8 weights: shapes and "
                "finite values checked, the tokens below measure the accuracy"
            )
            checks.append(Check(name, verdict, detail, max_abs_error=worst))
            continue
        tol = GRAPH_TOLERANCE[dtype]
        width = manifest.dims["d_model"]
        atol = {s.name: graph_atol([r[s.name] for r in results[1][1]], dtype, width) for s in graph.outputs}
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            accuracy = Comparator.compare_accuracy(
                results, compare_func=CompareFunc.simple(atol=atol, rtol=tol["rtol"], check_shapes=True)
            )
        bounds = ", ".join(f"{output} atol {value:.1e}" for output, value in atol.items())
        checks.append(
            Check(
                name,
                PASS if accuracy else FAIL,
                f"{len(feeds)} shapes, max abs error {worst:.2e} ({bounds}, rtol {tol['rtol']})",
                max_abs_error=worst,
                tolerance={"atol": atol, "rtol": tol["rtol"]},
            )
        )
    return checks


def _worst_error(results) -> float:
    (_, a), (_, b) = results[0], results[1]
    worst = 0.0
    for out_a, out_b in zip(a, b, strict=True):
        for name in out_b:  # the reference's outputs (an int8 encoder returns more)
            x, y = out_a[name], out_b[name]
            if x.shape == y.shape and x.size:
                worst = max(worst, float(abs(x - y).max()))
    return worst


def _well_formed(results) -> bool:
    """Every output of the bundle's runs has the reference's shape and only finite values."""
    (_, ours), (_, reference) = results[0], results[1]
    return all(
        out[name].shape == ref[name].shape and np.isfinite(out[name]).all()
        for out, ref in zip(ours, reference, strict=True)
        for name in ref
    )


def compare_generation(
    generator,
    hf_model,
    inputs: Inputs,
    *,
    num_beams: int = 4,
    max_new_tokens: int | None = TEXT_NEW_TOKENS,
    precision: str = "float32",
) -> list[Check]:
    """`generate` of the bundle vs HF `generate` on the same inputs: greedy and beam search.

    Args:
        max_new_tokens: None: the model's own max_length (speech: whole transcripts).
        precision: what the bundle's numbers are held to (`precision_of`): float32 gives PASS / FAIL,
            anything else AGREE / DIFFER.
    """
    settings = [("greedy", {"num_beams": 1})]
    if num_beams > 1:
        beam = {"num_beams": num_beams, "length_penalty": 0.8}
        if not generator.manifest.audio:  # HF's Whisper returns its best hypothesis k times, not the k best
            beam["num_return_sequences"] = min(2, num_beams)
        settings.append((f"beam {num_beams}", beam))
    decode = generator.tokenizer.decode if generator.manifest.audio and generator.tokenizer is not None else None
    pad, _ = padding(generator.manifest)  # what HF fills finished sequences with
    checks = []
    for label, kwargs in settings:
        if max_new_tokens is not None:
            kwargs = {**kwargs, "max_new_tokens": max_new_tokens}
        ours = generator.generate(**inputs.ours, **kwargs)
        with logs.quiet_transformers(), torch.no_grad():
            ref = hf_model.generate(**inputs.reference, return_dict_in_generate=True, output_scores=True, **kwargs)
        checks.append(_generation_check(f"generate {label} (tokens vs HF generate)", ours, ref, inputs.label,
                                        precision, pad, decode))  # fmt: skip
    return checks


def _generation_check(name: str, ours, ref, label: str, precision: str, pad: int | None, decode=None) -> Check:
    got, expected = ours.sequences.cpu(), ref.sequences
    prompt_length = expected.shape[1] - len(ref.scores)  # HF: sequences are the prompt, then one token per score
    tokens = token_agreement(got, expected, prompt_length, pad)
    sequences, differing, step = tokens.sequences, tokens.sequences_differing, tokens.first_differing_step
    figures = {"sequences": sequences, "sequences_differing": differing, "first_differing_step": step,
               "token_agreement": tokens.rate, "tokens_compared": tokens.tokens_compared}  # fmt: skip
    reduced = precision != "float32"
    detail = f"{label}, {sequences} sequences of up to {got.shape[1]} tokens"
    if differing:
        where = first_difference(got, expected, pad)
        detail += f": tokens differ on {differing} of {sequences}, first at step {step} ({where})"
        if reduced:
            detail += f"; {tokens.rate:.1%} of {tokens.tokens_compared} tokens equal"
    else:
        detail += ": tokens equal"
        if ours.sequences_scores is not None and ref.get("sequences_scores") is not None:
            figures["score_error"] = float((ours.sequences_scores.cpu() - ref.sequences_scores).abs().max())
            bound = f"not bounded in {precision}" if reduced else f"tolerance {SCORE_TOLERANCE:.0e}"
            detail += f", scores max abs error {figures['score_error']:.1e} ({bound})"
    if decode is not None:
        texts = transcript_agreement(decode(got), decode(expected))
        figures |= {"transcripts": texts.transcripts, "transcripts_identical": texts.identical,
                    "transcripts_differing": texts.transcripts - texts.identical,
                    "word_error_rate": texts.word_error_rate, "reference_words": texts.reference_words}  # fmt: skip
        if reduced:
            detail += _transcripts_phrase(texts.identical, texts.transcripts, texts.word_error_rate)
        elif texts.identical < texts.transcripts:
            detail += f"; transcripts differ on {texts.transcripts - texts.identical} of {texts.transcripts}"
        else:
            detail += "; transcripts equal"
    if not reduced:
        ok = not differing and figures.get("score_error", 0.0) <= SCORE_TOLERANCE
        verdict, tolerance = (PASS if ok else FAIL), {"score": SCORE_TOLERANCE}
    else:
        verdict, tolerance, detail = (DIFFER if differing else AGREE), None, f"{precision}: {detail}"
    return Check(name, verdict, detail, tolerance=tolerance, **figures)


def _text_inputs(generator, batch_size: int) -> Inputs:
    """The tokenizer's sentences, or (no tokenizer) seeded random ids, in a batch padded differently per input."""
    if generator.tokenizer is not None:
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch_size)]
        input_ids, mask = generator.tokenizer.encode(texts, max_length=generator.max_source_positions, truncation=True)
    else:
        g = torch.Generator().manual_seed(0)
        S = min(12, generator.max_source_positions or 12)
        input_ids = torch.randint(4, generator.manifest.source_vocab_size, (batch_size, S), generator=g)
        mask = torch.ones_like(input_ids)
        for i in range(1, batch_size):  # a different amount of padding per input
            mask[i, max(1, S - 3 * i) :] = 0
        if generator.manifest.kind == "decoder-only":  # prompts are left-padded
            mask = mask.flip(1)
        input_ids[mask == 0] = generator.manifest.special_tokens.get("pad_token_id") or 0
    feeds = {"input_ids": input_ids, "attention_mask": mask}
    return Inputs(feeds, feeds, f"batch {batch_size}")


def _speech_inputs(generator, reference: str, audio: list) -> tuple[Inputs, Check]:
    """The clips for both sides: the bundle reads the files itself, HF gets the checkpoint's feature extractor's
    features; a check compares the two sets of features."""
    from el_export.export import load_feature_extractor
    from el_export.runtime import speech
    from el_export.runtime.audio import load_audio

    extractor = load_feature_extractor(reference)
    if extractor is None:
        raise CheckpointError(
            f"{reference} has no feature extractor (preprocessor_config.json); save the model's "
            "WhisperFeatureExtractor there (feature_extractor.save_pretrained(...)) to compare a speech bundle"
        )
    paths = [str(p) for p in audio]
    ours = speech.features(generator.manifest, generator.mel_filters, audio=paths)  # InputError: unreadable, too long
    waves = [load_audio(p, extractor.sampling_rate) for p in paths]
    with logs.quiet_transformers():
        theirs = extractor(waves, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
    close = graph_close(ours.numpy(), theirs.numpy(), "float32", width=1)  # no sums over a model width here
    error, detail = close.error, f"{len(paths)} clips, {close}"
    if ours.shape != theirs.shape:  # another chunk length or mel count than the bundle's
        error, detail = None, f"{len(paths)} clips, features {list(ours.shape)} vs the extractor's {list(theirs.shape)}"
    tolerance = {"atol": {"input_features": close.atol}, "rtol": close.rtol}
    name = "features (bundle log-mel vs the checkpoint's feature extractor)"
    check = Check(name, PASS if close.ok else FAIL, detail, max_abs_error=error, tolerance=tolerance)
    return Inputs({"audio": paths}, {"input_features": theirs}, f"{len(paths)} clips"), check


def compare_bundle(
    bundle_dir,
    reference: str,
    *,
    backend: str = "onnxruntime",
    batch_size: int = 3,
    num_beams: int = 4,
    max_new_tokens: int | None = None,
    audio: list | None = None,
) -> Report:
    """All checks of a bundle against the checkpoint it was exported from.

    Args:
        batch_size: text bundles: inputs in the padded batch.
        max_new_tokens: None: 16 for text bundles, the model's max_length for speech (whole transcripts).
        audio: speech bundles: WAV/FLAC files to transcribe (default: the clips shipped in el_export/clips).

    Returns:
        The checks, their verdict and its exit status (`Report.exit_code`: 0 PASS / AGREE, 1 FAIL, 8 DIFFER).

    Raises:
        InvalidArgumentError: bad counts, --audio for a text bundle, a reference of another family or shape.
        BundleError, CheckpointError, UnsupportedModelError, BackendError, InputError: as `load`, export and
            `generate` do.
    """
    import el_export
    from el_export.evaluation.demo import CLIPS
    from el_export.export import describe, load_checkpoint
    from el_export.families import build_from_hf, cast

    if batch_size < 1 or num_beams < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise InvalidArgumentError("--batch-size, --num-beams and --max-new-tokens must be at least 1")
    generator = el_export.load(bundle_dir, backend=backend)
    manifest = generator.manifest
    if audio is not None and not manifest.audio:
        raise InvalidArgumentError(f"--audio is for speech bundles; {bundle_dir} is a {manifest.family} text model")
    if audio is not None and not audio:
        raise InvalidArgumentError("--audio needs at least one file")
    hf_model, _ = load_checkpoint(reference)
    hf_model.float()  # the reference is HF in float32, whatever dtype the checkpoint was saved in
    model, family = build_from_hf(hf_model)
    if family.name != manifest.family:
        raise InvalidArgumentError(
            f"the bundle is a {manifest.family} model but {reference} is {family.name}; "
            "compare a bundle with the checkpoint it was exported from"
        )
    dims = describe(hf_model, graphs_for(model, manifest.mode), family).dims
    changed = [k for k in dims if dims[k] != manifest.dims.get(k)]
    if changed:
        k = changed[0]
        raise InvalidArgumentError(
            f"the bundle's {k} is {manifest.dims.get(k)} but {reference}'s is {dims[k]}; "
            "compare a bundle with the checkpoint it was exported from"
        )
    checks = []
    if manifest.audio:
        inputs, features = _speech_inputs(generator, reference, audio or sorted(CLIPS.iterdir()))
        checks.append(features)
    else:
        inputs = _text_inputs(generator, batch_size)
        max_new_tokens = max_new_tokens or TEXT_NEW_TOKENS
    cast(model, family, manifest.dtype)
    recipe = manifest.quantization["recipe"]["name"] if manifest.quantization else None
    report = Report(str(bundle_dir), reference, precision_of(manifest, backend), recipe=recipe)
    report.checks = compare_graphs(Path(bundle_dir), manifest, model, backend=backend) + checks
    report.checks += compare_generation(generator, hf_model, inputs, num_beams=num_beams,
                                        max_new_tokens=max_new_tokens, precision=report.precision)  # fmt: skip
    return report
