"""PyTorch backend: runs the very graph modules that export turns into ONNX, on CPU or CUDA.

Built from the checkpoint through the same family and graph code as export, so what it computes is
what the bundle computes; the search code is the same as for every backend. Caches stay on the
device; fp16 / bf16 by casting the modules (logits stay fp32, as in the graphs).
"""

from dataclasses import replace

import torch
from torch import nn

from el_export.contract.dtypes import FLOAT_NAMES, torch_dtype
from el_export.contract.manifest import Manifest
from el_export.errors import BackendError, InvalidArgumentError
from el_export.runtime.base import Backend


class TorchBackend(Backend):
    """Runs the graph modules. With `static_cache`, decoding writes into preallocated caches
    (no O(t) copy per step); with `cuda_graphs` too, each decoder step shape bucket is captured once
    as a CUDA graph and replayed."""

    name = "torch"
    MAX_CAPTURED = 16  # shape buckets kept as CUDA graphs at once

    def __init__(
        self,
        graphs: list[nn.Module],
        manifest: Manifest,
        device: str = "cpu",
        static_cache: bool = False,
        cuda_graphs: bool = False,
    ):
        super().__init__(None, manifest, device)
        if cuda_graphs and self.device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        self.graphs = {g.name: g for g in graphs}
        self.static_cache = static_cache or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.captured: dict[tuple, CapturedStep] = {}  # shape bucket -> graph and its static buffers

    def make_decoder(self, context):
        if not self.static_cache:
            return super().make_decoder(context)
        return StaticCacheDecoder(self, context)

    def _run_impl(self, graph_name, feeds, axes):
        graph = self.graphs[graph_name]
        with torch.no_grad():
            out = graph.run([feeds[spec.name] for spec in graph.inputs])
        return {spec.name: tensor for spec, tensor in zip(graph.outputs, out, strict=True)}


class CapturedStep:
    """One decoder-step shape bucket captured as a CUDA graph, with the static buffers it reads and writes."""

    def __init__(self, step, ids, context, cache, position):
        self.ids, self.context, self.cache, self.position = ids, context, cache, position
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up outside capture, as CUDA graphs need
            for _ in range(2):
                step(ids, *context, cache, position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = step(ids, *context, cache, position)


class StaticCacheDecoder:
    """A `StepDecoder` over preallocated caches of capacity C, grown by doubling (a new shape bucket).

    Each step writes its cache rows at position t in place and masks the keys past t, so the step's
    shapes are fixed within a bucket (N rows, B inputs, S source, C capacity): what CUDA graphs need.
    """

    CAPACITY = 32  # first bucket; doubled when the cache is full

    def __init__(self, backend: TorchBackend, context: dict[str, torch.Tensor]):
        self.backend = backend
        self.graph = backend.graphs["decoder_step"]
        self.model, self.mode = self.graph.model, self.graph.mode
        self.context = context

    def start(self, prompt_ids: torch.Tensor, rows_per_input: int) -> torch.Tensor:
        k = rows_per_input
        device = self.backend.device
        specs = {spec.name: spec for spec in self.graph.inputs}
        self.context_args = self.graph.args[1:-1]  # between input_ids and the caches: names, or lists of names
        self.inputs = []  # the context tensors, flat, in that order (repeated per row where the graph says so)
        for name in (n for arg in self.context_args for n in (arg if isinstance(arg, list) else [arg])):
            tensor, shape = self.context[name], specs[name].shape
            self.inputs.append(tensor.repeat_interleave(k, dim=shape.index("rows")) if "rows" in shape else tensor)
        N, spec = prompt_ids.shape[0] * k, self.model.spec
        L, h, dh, d = spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head, spec.d_model
        # one packed cache (torch indexes it without copies): [L, N, C, d] (el) or [L, 2, N, h, C, dh] (kv)
        self.cache_shape = [L, N, "past", d] if self.mode == "el" else [L, 2, N, h, "past", dh]
        self.time_axis, self.rows_axis = (2, 1) if self.mode == "el" else (4, 2)
        self.cache = self._allocate(self.CAPACITY)
        self.t = 0
        step = self.model.step_el_static if self.mode == "el" else self.model.step_kv_static
        self.step_fn = lambda ids, *rest: step(ids, *self._structure(rest[:-2]), *rest[-2:])
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        rows = prompt_ids.to(device).repeat_interleave(k, dim=0)
        for p in range(rows.shape[1]):
            logits = self.step(rows[:, p : p + 1])
        return logits

    def _structure(self, flat) -> list:
        """Flat context tensors -> the step's context arguments (a tensor, or a list for per-layer K/V)."""
        flat, out = list(flat), []
        for arg in self.context_args:
            n = len(arg) if isinstance(arg, list) else 1
            out.append(flat[:n] if isinstance(arg, list) else flat[0])
            flat = flat[n:]
        return out

    def _allocate(self, capacity: int) -> torch.Tensor:
        shape = [capacity if a == "past" else a for a in self.cache_shape]
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(shape, dtype=dtype, device=self.backend.device)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.t == self.cache.shape[self.time_axis]:  # full: the next bucket, twice as long
            grown = self._allocate(2 * self.t)
            grown.narrow(self.time_axis, 0, self.t).copy_(self.cache)
            self.cache = grown
        self.position.fill_(self.t)
        self.t += 1
        if not self.backend.cuda_graphs:
            with torch.no_grad():
                return self.step_fn(input_ids, *self.inputs, self.cache, self.position)
        captured = self._captured()
        captured.ids.copy_(input_ids)
        captured.position.copy_(self.position)
        captured.graph.replay()
        return captured.logits.clone()  # the next replay overwrites the static output

    def _captured(self) -> CapturedStep:
        """The graph of this shape bucket; its buffers become this decoder's cache and context."""
        key = (self.mode, tuple(self.cache.shape), *(tuple(t.shape) for t in self.inputs))
        captured = self.backend.captured.get(key)
        if captured is None:
            if len(self.backend.captured) >= self.backend.MAX_CAPTURED:  # bound the graphs' memory
                self.backend.captured.clear()
            ids = torch.zeros(self.cache_shape[self.rows_axis], 1, dtype=torch.int64, device=self.backend.device)
            context = [t.clone() for t in self.inputs]
            captured = CapturedStep(self.step_fn, ids, context, self.cache.clone(), self.position.clone())
            self.backend.captured[key] = captured
        if captured.cache is not self.cache:  # adopt the graph's buffers (once per bucket and call)
            captured.cache.copy_(self.cache)
            for static, tensor in zip(captured.context, self.inputs, strict=True):
                static.copy_(tensor)
            self.cache, self.inputs = captured.cache, captured.context
        return captured

    def reorder(self, row_indices: torch.Tensor) -> None:
        filled = self.cache.narrow(self.time_axis, 0, self.t)
        filled.copy_(filled.index_select(self.rows_axis, row_indices.to(self.backend.device)))


def load_torch(
    model,
    mode: str = "el",
    device: str = "cpu",
    dtype: str = "float32",
    tokenizer=None,
    static_cache: bool = False,
    cuda_graphs: bool = False,
):
    """A Generator that runs the EL (or K/V) step modules in PyTorch.

    Args:
        model: a checkpoint directory (or hub id) or a loaded `transformers` model.
        mode: "el" or "kv".
        device: "cpu", "cuda" or "cuda:N".
        dtype: "float32", "float16" or "bfloat16" for weights and activations.
        tokenizer: an HF fast tokenizer for `generate_text` (loaded with the checkpoint when a path).
        static_cache: decode into preallocated caches (fixed step shapes, no O(t) copy per step).
        cuda_graphs: capture each decoder-step shape bucket as a CUDA graph (implies static_cache).

    Raises:
        InvalidArgumentError, BackendError, CheckpointError, UnsupportedModelError.
    """
    from el_export.export import describe, load_checkpoint
    from el_export.export.graphs import graphs_for
    from el_export.families import build_from_hf
    from el_export.model.models import MODES
    from el_export.runtime.generator import Generator
    from el_export.runtime.tokenizer import Tokenizer

    if mode not in MODES:
        raise InvalidArgumentError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if dtype not in FLOAT_NAMES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_NAMES)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("the torch backend was asked for CUDA, but torch sees no CUDA device here")
    if isinstance(model, str):
        model, tokenizer = load_checkpoint(model)
    built, family = build_from_hf(model)
    if (static_cache or cuda_graphs) and family.kind != "seq2seq":
        raise InvalidArgumentError("static_cache / cuda_graphs are implemented for encoder-decoder models only")
    built = built.to(device=device, dtype=torch_dtype(dtype))
    graphs = [g.eval() for g in graphs_for(built, mode)]
    manifest = describe(model, graphs, family)
    mel_filters = None
    if built.spec.n_mels:  # speech: the feature settings and filters a bundle would carry
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=built.spec.n_mels)
        mel_filters = torch.from_numpy(fe.mel_filters).float()
        spec = {k: getattr(fe, k) for k in ("sampling_rate", "n_fft", "hop_length", "chunk_length")}
        manifest = replace(manifest, audio={**spec, "n_mels": built.spec.n_mels, "mel_filters": None})
    backend = TorchBackend(graphs, manifest, device=str(device), static_cache=static_cache, cuda_graphs=cuda_graphs)
    return Generator(manifest, backend, tokenizer=Tokenizer.from_hf(tokenizer, manifest), mel_filters=mel_filters)
