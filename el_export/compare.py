"""`compare`: proof that a bundle computes what the original model computes.

1. Per graph, through Polygraphy's comparator: the bundle's graph on a backend against the PyTorch
   step module it was exported from, on shapes not used at export (B=1, one row, t=0, S=1, and a
   larger batch), with per-output tolerances. For TensorRT: each engine against the same ONNX graph
   in ONNX Runtime, on those shapes brought inside the engine's profile, with the tolerances of the
   engine's precision.
2. End to end: `load(bundle).generate` against HF `generate` on the same inputs (batch > 1 with
   padding, beams > 1): identical token sequences, sequence scores within tolerance.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from el_export.errors import InvalidArgumentError
from el_export.graphs import graphs_for, sample_inputs
from el_export.tolerance import GRAPH_TOLERANCE, SCORE_TOLERANCE, graph_atol

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


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


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

    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # the table below reports the outcome
    checks = []
    for graph in graphs_for(model, manifest.mode):
        runners, dtype, shapes = _graph_runners(backend, bundle_dir, manifest, graph)
        tol = GRAPH_TOLERANCE[dtype]
        feeds = [
            OrderedDict(
                (s.name, t.numpy()) for s, t in zip(graph.inputs, sample_inputs(graph, sizes, seed=7), strict=True)
            )
            for sizes in shapes
        ]
        results = Comparator.run(runners, data_loader=feeds)
        reference = results[1][1]
        atol = {s.name: graph_atol([r[s.name] for r in reference], dtype) for s in graph.outputs}
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atol, rtol=tol["rtol"], check_shapes=True)
        )
        worst = _worst_error(results)
        bounds = ", ".join(f"{name} atol {value:.1e}" for name, value in atol.items())
        checks.append(
            Check(
                f"graph {graph.name} ({backend} vs {'onnxruntime' if backend == 'tensorrt' else 'torch'})",
                bool(accuracy),
                f"{len(feeds)} shapes, max abs error {worst:.2e} ({bounds}, rtol {tol['rtol']})",
            )
        )
    return checks


def _worst_error(results) -> float:
    (_, a), (_, b) = results[0], results[1]
    worst = 0.0
    for out_a, out_b in zip(a, b, strict=True):
        for name in out_a:
            x, y = out_a[name], out_b[name]
            if x.shape == y.shape and x.size:
                worst = max(worst, float(abs(x - y).max()))
    return worst


def compare_generation(generator, hf_model, *, batch_size: int = 3, num_beams: int = 4, max_new_tokens: int = 16):
    """`generate` of the bundle vs HF `generate` on the same padded batch: greedy and beam search."""
    input_ids, attention_mask = _inputs(generator, batch_size)
    checks = []
    settings = [("greedy", {"num_beams": 1})]
    if num_beams > 1:
        settings.append(
            (
                f"beam {num_beams}",
                {"num_beams": num_beams, "num_return_sequences": min(2, num_beams), "length_penalty": 0.8},
            )
        )
    for label, kwargs in settings:
        kwargs = {**kwargs, "max_new_tokens": max_new_tokens}
        ours = generator.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with torch.no_grad():
            ref = hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                return_dict_in_generate=True,
                output_scores=True,
                **kwargs,
            )
        same = ours.sequences.shape == ref.sequences.shape and torch.equal(ours.sequences.cpu(), ref.sequences)
        detail = f"batch {batch_size}, {ours.sequences.shape[0]} sequences of {ours.sequences.shape[1]} tokens"
        passed = same
        if same and ours.sequences_scores is not None:
            err = float((ours.sequences_scores.cpu() - ref.sequences_scores).abs().max())
            passed = err <= SCORE_TOLERANCE
            detail += f", scores max abs error {err:.1e}"
        elif not same:
            detail += f", first differing sequence: {_first_difference(ours.sequences.cpu(), ref.sequences)}"
        checks.append(Check(f"generate {label} (tokens == HF generate)", passed, detail))
    return checks


def _inputs(generator, batch_size: int):
    if generator.tokenizer is not None:
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch_size)]
        return generator.tokenizer.encode(texts, max_length=generator.max_source_positions, truncation=True)
    vocab = generator.manifest.dims["encoder_vocab_size"]
    g = torch.Generator().manual_seed(0)
    S = min(12, generator.max_source_positions or 12)
    input_ids = torch.randint(4, vocab, (batch_size, S), generator=g)
    mask = torch.ones_like(input_ids)
    for i in range(1, batch_size):  # a different amount of padding per input
        mask[i, max(1, S - 3 * i) :] = 0
    if generator.manifest.kind == "decoder-only":  # prompts are left-padded
        mask = mask.flip(1)
    input_ids[mask == 0] = generator.manifest.special_tokens.get("pad_token_id") or 0
    return input_ids, mask


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} vs {list(b.shape)}"
    row = int((a != b).any(dim=1).nonzero()[0])
    return f"row {row}: {a[row].tolist()} vs HF {b[row].tolist()}"


def compare_bundle(
    bundle_dir,
    reference: str,
    *,
    backend: str = "onnxruntime",
    batch_size: int = 3,
    num_beams: int = 4,
    max_new_tokens: int = 16,
) -> list[Check]:
    """All checks of a bundle against the checkpoint it was exported from.

    Raises:
        BundleError, CheckpointError, UnsupportedModelError, BackendError: as `load` and export do.
    """
    from pathlib import Path

    import el_export
    from el_export.export import load_checkpoint
    from el_export.families import build_from_hf, cast

    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise InvalidArgumentError("--batch-size, --num-beams and --max-new-tokens must be at least 1")
    generator = el_export.load(bundle_dir, backend=backend)
    hf_model, _ = load_checkpoint(reference)
    model, family = build_from_hf(hf_model)
    if family.name != generator.manifest.family:
        raise InvalidArgumentError(
            f"the bundle is a {generator.manifest.family} model but {reference} is {family.name}; "
            "compare a bundle with the checkpoint it was exported from"
        )
    cast(model, family, generator.manifest.dtype)
    checks = compare_graphs(Path(bundle_dir), generator.manifest, model, backend=backend)
    generation = compare_generation(
        generator, hf_model, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens
    )
    dtype = engine_dtype(generator.manifest) if backend == "tensorrt" else generator.manifest.dtype
    if dtype != "float32":  # fp16 rounding may pick other tokens than HF in fp32
        for check in generation:
            check.detail = f"{'equal' if check.passed else 'differs'} (informational for {dtype})"
            check.passed = True
    return checks + generation
