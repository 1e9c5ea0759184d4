"""PyTorch backend: runs the very graph modules that export turns into ONNX, on CPU or CUDA.

Built from the checkpoint through the same family and graph code as export, so what it computes is
what the bundle computes; the search code is the same as for every backend. Caches stay on the
device; fp16 / bf16 by casting the modules (logits stay fp32, as in the graphs).
"""

import weakref
from dataclasses import replace

import torch
from torch import nn

from el_export.contract.dtypes import FLOAT_NAMES, torch_dtype
from el_export.contract.manifest import Manifest
from el_export.errors import BackendError, InvalidArgumentError
from el_export.runtime.base import Backend
from el_export.runtime.decoder import check_mergeable, merge_tensors


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
    """One decoder-step shape bucket captured as a CUDA graph, with the static buffers it reads and writes.

    `owner` (a weak reference) is the decoder that last adopted the buffers: another decoder of the same shapes
    takes them over (`StaticCacheDecoder._captured`), which first gives it copies of those it still holds.
    """

    def __init__(self, step, ids, context, state):
        self.ids, self.context, self.state = ids, context, state
        self.owner = lambda: None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up outside capture, as CUDA graphs need
            for _ in range(2):
                step(ids, *context, *state)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = step(ids, *context, *state)


class StaticCacheDecoder:
    """A `RunningDecoder` over preallocated caches of capacity C, grown by doubling (a new shape bucket).

    Each step writes its cache rows at the shared index t in place and attends to the slots its per-row key
    mask [N, C] marks (rows that joined later have fewer), so the step's shapes are fixed within a bucket (N
    rows, B inputs, S source, C capacity): what CUDA graphs need. The per-row positions [N, 1] advance by one.
    """

    CAPACITY = 32  # first bucket; doubled when the cache is full

    def __init__(self, backend: TorchBackend, context: dict[str, torch.Tensor]):
        self.backend = backend
        self.graph = backend.graphs["decoder_step"]
        self.model, self.mode = self.graph.model, self.graph.mode
        self.context = context
        self.k = 0

    @property
    def rows(self) -> int:
        return self.key_mask.shape[0]

    @property
    def inputs(self) -> int:
        return self.rows // self.k

    def start(
        self, prompt_ids: torch.Tensor, rows_per_input: int, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = self.k = rows_per_input
        device = self.backend.device
        specs = {spec.name: spec for spec in self.graph.inputs}
        self.context_args = self.graph.args[1:-2]  # between input_ids and past_mask: names, or lists of names
        names = [n for arg in self.context_args for n in (arg if isinstance(arg, list) else [arg])]
        self.context_shapes = [specs[name].shape for name in names]
        self.context_tensors = []  # flat, in that order (repeated per row where the graph says so)
        for name, shape in zip(names, self.context_shapes, strict=True):
            tensor = self.context[name]
            per_row = "rows" in shape
            self.context_tensors.append(tensor.repeat_interleave(k, dim=shape.index("rows")) if per_row else tensor)
        self.context = {}  # the tensors above hold what is needed: dropped inputs are freed
        N, spec = prompt_ids.shape[0] * k, self.model.spec
        L, h, dh, d = spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head, spec.d_model
        # one packed cache (torch indexes it without copies): [L, N, C, d] (el) or [L, 2, N, h, C, dh] (kv)
        self.cache_shape = [L, N, "past", d] if self.mode == "el" else [L, 2, N, h, "past", dh]
        self.time_axis, self.rows_axis = (2, 1) if self.mode == "el" else (4, 2)
        self.cache = self._allocate(self.CAPACITY, N)
        self.key_mask = torch.zeros(N, self.CAPACITY, dtype=torch.int64, device=device)
        self.positions = torch.zeros(N, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)  # the write index, t
        self.t = 0
        step = self.model.step_el_static if self.mode == "el" else self.model.step_kv_static
        n_context = len(names)
        self.step_fn = lambda ids, *rest: step(ids, *self._structure(rest[:n_context]), *rest[n_context:])
        rows = prompt_ids.to(device).repeat_interleave(k, dim=0)
        real = None if prompt_mask is None else prompt_mask.to(device).repeat_interleave(k, dim=0)
        for p in range(rows.shape[1]):
            logits = self.step(rows[:, p : p + 1])
            if real is not None:  # a padding token's slot is never attended and takes no position
                self.key_mask[:, self.t - 1] = real[:, p]
                self.positions.sub_(1 - real[:, p : p + 1])
        return logits

    @property
    def state(self) -> list[torch.Tensor]:
        """What the step reads after its context, in its argument order."""
        return [self.cache, self.position, self.key_mask, self.positions]

    def _adopt(self, state: list[torch.Tensor]) -> None:
        self.cache, self.position, self.key_mask, self.positions = state

    def _structure(self, flat) -> list:
        """Flat context tensors -> the step's context arguments (a tensor, or a list for per-layer K/V)."""
        flat, out = list(flat), []
        for arg in self.context_args:
            n = len(arg) if isinstance(arg, list) else 1
            out.append(flat[:n] if isinstance(arg, list) else flat[0])
            flat = flat[n:]
        return out

    def _allocate(self, capacity: int, rows: int) -> torch.Tensor:
        shape = [capacity if a == "past" else a for a in self.cache_shape]
        shape[self.rows_axis] = rows
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(shape, dtype=dtype, device=self.backend.device)

    def _resized(self, capacity: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A cache and key mask of `capacity` slots whose first t hold this decoder's filled ones, right-aligned
        (the padding before them is masked)."""
        cache = self._allocate(capacity, self.rows)
        key_mask = self.key_mask.new_zeros(self.rows, capacity)
        cache.narrow(self.time_axis, t - self.t, self.t).copy_(self.cache.narrow(self.time_axis, 0, self.t))
        key_mask[:, t - self.t : t] = self.key_mask[:, : self.t]
        return cache, key_mask

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.t == self.cache.shape[self.time_axis]:  # full: the next bucket, twice as long
            self.cache, self.key_mask = self._resized(2 * self.t, self.t)
        if self.backend.cuda_graphs:
            captured = self._captured()
            captured.ids.copy_(input_ids)
        self.position.fill_(self.t)
        self.key_mask[:, self.t] = 1  # the new token is real
        self.t += 1
        if self.backend.cuda_graphs:
            captured.graph.replay()
            logits = captured.logits.clone()  # the next replay overwrites the static output
        else:
            with torch.no_grad():
                logits = self.step_fn(input_ids, *self.context_tensors, *self.state)
        self.positions.add_(1)
        return logits

    def _captured(self) -> CapturedStep:
        """The graph of this shape bucket; its buffers become this decoder's state and context."""
        key = (self.mode, tuple(self.cache.shape), *(tuple(t.shape) for t in self.context_tensors))
        captured = self.backend.captured.get(key)
        if captured is None:
            if len(self.backend.captured) >= self.backend.MAX_CAPTURED:  # bound the graphs' memory
                self.backend.captured.clear()
            ids = torch.zeros(self.rows, 1, dtype=torch.int64, device=self.backend.device)
            context = [t.clone() for t in self.context_tensors]
            captured = CapturedStep(self.step_fn, ids, context, [t.clone() for t in self.state])
            self.backend.captured[key] = captured
        if captured.state[0] is not self.cache:  # adopt the graph's buffers (once per bucket and call)
            owner = captured.owner()
            if owner is not None and owner is not self:
                owner._detach(captured)
            for static, tensor in zip([*captured.state, *captured.context], [*self.state, *self.context_tensors],
                                      strict=True):  # fmt: skip
                static.copy_(tensor)
            self._adopt(captured.state)
            self.context_tensors = captured.context
            captured.owner = weakref.ref(self)
        return captured

    def _detach(self, captured: CapturedStep) -> None:
        """Private copies of the captured buffers this decoder still holds: another decoder takes them over."""
        shared = {id(t) for t in [*captured.state, *captured.context]}
        self._adopt([t.clone() if id(t) in shared else t for t in self.state])
        self.context_tensors = [t.clone() if id(t) in shared else t for t in self.context_tensors]

    def reorder(self, row_indices: torch.Tensor, input_indices: torch.Tensor | None = None) -> None:
        """See `StepDecoder.reorder`. A beam reorder gathers the filled cache in place (the buffers stay those a
        CUDA graph captured); dropping inputs makes new, smaller buffers (a new shape bucket)."""
        rows = row_indices.to(self.backend.device)
        if input_indices is None:
            filled = self.cache.narrow(self.time_axis, 0, self.t)
            filled.copy_(filled.index_select(self.rows_axis, rows))
            return
        inputs = input_indices.to(self.backend.device)
        self.cache = self.cache.index_select(self.rows_axis, rows)
        self.key_mask, self.positions = self.key_mask.index_select(0, rows), self.positions.index_select(0, rows)
        kept = [(rows, shape.index("rows")) if "rows" in shape else (inputs, shape.index("batch"))
                for shape in self.context_shapes]  # fmt: skip
        self.context_tensors = [
            t.index_select(axis, i) for t, (i, axis) in zip(self.context_tensors, kept, strict=True)
        ]

    def merge(self, other: "StaticCacheDecoder") -> None:
        """See `RunningDecoder.merge`. Each side's filled slots are copied right-aligned at the larger t."""
        check_mergeable(self, other)
        t = max(self.t, other.t)
        capacity = max(self.cache.shape[self.time_axis], other.cache.shape[other.time_axis])
        (cache, key_mask), (other_cache, other_mask) = self._resized(capacity, t), other._resized(capacity, t)
        self.cache = torch.cat([cache, other_cache], dim=self.rows_axis)
        self.key_mask = torch.cat([key_mask, other_mask])
        self.positions = torch.cat([self.positions, other.positions])
        pairs = zip(self.context_tensors, other.context_tensors, self.context_shapes, strict=True)
        self.context_tensors = [merge_tensors(mine, theirs, shape) for mine, theirs, shape in pairs]
        self.t = t


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
