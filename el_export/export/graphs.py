"""The exported graphs: each module keeps its forward, IO names, dtypes, axes and sample inputs together.

Contracts (DESIGN.md section 3); N = B x k rows, t = cache entries (may be 0), i = layer:

    encoder (el):  input_ids [B, S], attention_mask [B, S] -> encoder_hidden [B, S, d]
                   (Whisper: input_features [B, mels, 2 S] instead of ids and mask)
    encoder (kv):  ... -> encoder_hidden, cross_key.i, cross_value.i [B, h, S, dh]
    decoder_step (el): input_ids [N, 1], encoder_hidden [B, S, d], encoder_mask [B, S], past_mask [N, t],
                       past_hidden.i [N, t, d] -> logits [N, V], present_hidden.i [N, t+1, d]
    decoder_step (kv): input_ids [N, 1], cross_key.i, cross_value.i [N, h, S, dh], encoder_mask [N, S],
                       past_mask [N, t], past_key.i, past_value.i [N, h, t, dh]
                       -> logits, present_key.i, present_value.i
    decoder_step (seq2seq whose checkpoint names alignment heads, both modes): also -> alignment_attention
                       [N, A, S] (ALIGNMENT_OUTPUT), the cross-attention probabilities of the A alignment heads for
                       this step's token (word timestamps read them; computed every step, see DecoderStepGraph)
    prefill (GPT-2):   input_ids, attention_mask [B, P] -> logits [B, V], prompt_hidden.i [B, P, d]
                       (kv: past_key.i, past_value.i [B, h, P, dh])
    decoder_step (GPT-2 el): input_ids, position_ids [N, 1], prompt_hidden.i [B, P, d], prompt_mask [B, P],
                       past_mask [N, t], past_hidden.i [N, t, d] -> logits, present_hidden.i
    decoder_step (GPT-2 kv): input_ids, position_ids, past_mask [N, P+t], past_key.i, past_value.i
                       [N, h, P+t, dh] -> logits, present_key.i, present_value.i

past_mask is 1 where a cache entry is a real token and 0 on padding: rows of a running batch joined it at
different steps, and a row's padding sits on the left of its real entries. The new token always attends to
itself. Encoder-decoder steps derive each row's position from it (its sum); GPT-2 steps take position_ids.

Caches are one tensor per layer, as HF/Optimum graphs take them: ONNX has no views, so a packed
[L, ...] cache would be split (copied) into layers on every step.
Symbolic axes: "batch" (B), "rows" (N), "source" (S), "past" (t), "prompt" (P), "context" (P+t), "x+1".
"""

import torch
from torch import nn

from el_export.contract.manifest import ALIGNMENT_OUTPUT, TensorSpec
from el_export.model.models import MODES, DecoderOnlyLM, Seq2SeqLM, alignment_attention

# Sizes used to trace. Each dynamic axis gets a distinct value >= 2 so that the exporter can neither
# specialise it (0/1) nor unify it with another axis of the same size.
SAMPLE_SIZES = {"batch": 2, "rows": 6, "source": 5, "past": 3, "prompt": 4, "context": 7}


def float_dtype(model: nn.Module) -> str:
    """The dtype name of a model's floating-point tensors: what its graphs take and return (logits excepted)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class Graph(nn.Module):
    """A graph module: flat lists of input and output specs, grouped into forward's arguments by `args`.

    `args` names forward's arguments in order: a spec name, or a list of spec names for an argument
    that is a list of tensors (the per-layer caches).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    args: tuple

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        assert mode in MODES
        self.model, self.mode = model, mode
        spec = model.spec
        self.f = float_dtype(model)
        self.d, self.L, self.h, self.dh = spec.d_model, spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head
        self.V = spec.vocab_size

    def group(self, flat) -> tuple:
        """Flat tensors (in `inputs` order) -> forward's arguments."""
        by_name = {spec.name: tensor for spec, tensor in zip(self.inputs, flat, strict=True)}
        return tuple([by_name[n] for n in arg] if isinstance(arg, list) else by_name[arg] for arg in self.args)

    def run(self, flat) -> tuple[torch.Tensor, ...]:
        """Flat tensors in, flat outputs (in `outputs` order) out."""
        out = self(*self.group(flat))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(t for item in out for t in (item if isinstance(item, list) else [item]))

    def per_layer(self, base: str, dtype: str, shape: tuple) -> list[TensorSpec]:
        return [TensorSpec(f"{base}.{i}", dtype, shape) for i in range(self.L)]

    def kv_per_layer(self, prefix: str, shape: tuple) -> list[TensorSpec]:
        """[prefix_key.0, prefix_value.0, prefix_key.1, ...]: K and V of each layer, interleaved."""
        return [TensorSpec(f"{prefix}_{kind}.{i}", self.f, shape) for i in range(self.L) for kind in ("key", "value")]


def _names(specs: list[TensorSpec]) -> list[str]:
    return [s.name for s in specs]


class EncoderGraph(Graph):
    name = "encoder"

    def __init__(self, model: Seq2SeqLM, mode: str):
        super().__init__(model, mode)
        spec = model.spec
        if spec.n_mels:  # audio: fixed-length log-mel frames, every frame attended (Whisper)
            S = spec.encoder_positions
            self.inputs = (TensorSpec("input_features", self.f, ("batch", spec.n_mels, 2 * S)),)
        else:
            S = "source"
            self.inputs = (
                TensorSpec("input_ids", "int64", ("batch", "source")),
                TensorSpec("attention_mask", "int64", ("batch", "source")),
            )
        self.args = tuple(s.name for s in self.inputs)
        cross = self.kv_per_layer("cross", ("batch", self.h, S, self.dh)) if mode == "kv" else []
        self.outputs = (TensorSpec("encoder_hidden", self.f, ("batch", S, self.d)), *cross)

    def outputs_of(self, hidden):
        return hidden if self.mode == "el" else (hidden, self.model.cross_keys_values(hidden))


class _TextEncoder(EncoderGraph):
    def forward(self, input_ids, attention_mask):
        return self.outputs_of(self.model.encoder(input_ids, attention_mask))


class _AudioEncoder(EncoderGraph):
    def forward(self, input_features):
        return self.outputs_of(self.model.encoder(input_features))


class DecoderStepGraph(Graph):
    """The encoder-decoder step. With alignment heads, one more output, computed every step (ONNX Runtime runs
    every node whatever is asked for): on tiny.en, the smallest real Whisper, its 11 nodes take 0.6% of the step's
    kernel time at 1 row and 0.8% at 5 (ONNX Runtime, CPU, 1 thread; a fixed cost, less on larger models). A
    second step graph would cost nothing per step but hold the decoder's weights twice."""

    name = "decoder_step"

    def __init__(self, model: Seq2SeqLM, mode: str):
        super().__init__(model, mode)
        ids = TensorSpec("input_ids", "int64", ("rows", 1))
        logits = TensorSpec("logits", "float32", ("rows", self.V))
        if mode == "el":
            context = [
                TensorSpec("encoder_hidden", self.f, ("batch", "source", self.d)),
                TensorSpec("encoder_mask", "int64", ("batch", "source")),
            ]
            past = self.per_layer("past_hidden", self.f, ("rows", "past", self.d))
            present = self.per_layer("present_hidden", self.f, ("rows", "past+1", self.d))
            self.args = ("input_ids", "encoder_hidden", "encoder_mask", "past_mask", _names(past))
        else:
            cross = self.kv_per_layer("cross", ("rows", self.h, "source", self.dh))
            context = [*cross, TensorSpec("encoder_mask", "int64", ("rows", "source"))]
            past = self.kv_per_layer("past", ("rows", self.h, "past", self.dh))
            present = self.kv_per_layer("present", ("rows", self.h, "past+1", self.dh))
            self.args = ("input_ids", _names(cross), "encoder_mask", "past_mask", _names(past))
        self.inputs = (ids, *context, TensorSpec("past_mask", "int64", ("rows", "past")), *past)
        self.heads = model.spec.alignment_heads
        alignment = [TensorSpec(ALIGNMENT_OUTPUT, self.f, ("rows", len(self.heads), "source"))]
        self.outputs = (logits, *present, *(alignment if self.heads else []))

    def forward(self, input_ids, memory, encoder_mask, past_mask, past):
        step = self.model.step_el if self.mode == "el" else self.model.step_kv
        if not self.heads:
            return step(input_ids, memory, encoder_mask, past_mask, past)
        cross_probs = []
        logits, present = step(input_ids, memory, encoder_mask, past_mask, past, cross_probs)
        return logits, present, alignment_attention(cross_probs, self.heads)


class PrefillGraph(Graph):
    """Decoder-only: the prompt, once. EL keeps each layer's prompt hidden states once per input;
    K/V returns the prompt's K/V, which the runtime repeats per row as HF does."""

    name = "prefill"

    def __init__(self, model: DecoderOnlyLM, mode: str):
        super().__init__(model, mode)
        self.inputs = (
            TensorSpec("input_ids", "int64", ("batch", "prompt")),
            TensorSpec("attention_mask", "int64", ("batch", "prompt")),
        )
        self.args = ("input_ids", "attention_mask")
        cache = (
            self.per_layer("prompt_hidden", self.f, ("batch", "prompt", self.d))
            if mode == "el"
            else self.kv_per_layer("past", ("batch", self.h, "prompt", self.dh))
        )
        self.outputs = (TensorSpec("logits", "float32", ("batch", self.V)), *cache)

    def forward(self, input_ids, attention_mask):
        prefill = self.model.prefill_el if self.mode == "el" else self.model.prefill_kv
        return prefill(input_ids, attention_mask)


class DecoderOnlyStepGraph(Graph):
    """Decoder-only step with explicit positions (left-padded prompts start at different offsets)."""

    name = "decoder_step"

    def __init__(self, model: DecoderOnlyLM, mode: str):
        super().__init__(model, mode)
        head = [TensorSpec("input_ids", "int64", ("rows", 1)), TensorSpec("position_ids", "int64", ("rows", 1))]
        logits = TensorSpec("logits", "float32", ("rows", self.V))
        if mode == "el":
            prompt = self.per_layer("prompt_hidden", self.f, ("batch", "prompt", self.d))
            prompt_mask = TensorSpec("prompt_mask", "int64", ("batch", "prompt"))
            past_mask = TensorSpec("past_mask", "int64", ("rows", "past"))
            past = self.per_layer("past_hidden", self.f, ("rows", "past", self.d))
            present = self.per_layer("present_hidden", self.f, ("rows", "past+1", self.d))
            self.inputs = (*head, *prompt, prompt_mask, past_mask, *past)
            self.args = ("input_ids", "position_ids", _names(prompt), "prompt_mask", "past_mask", _names(past))
        else:  # the prompt's K/V and then the generated tokens' ("context" = prompt + past), one mask over both
            past_mask = TensorSpec("past_mask", "int64", ("rows", "context"))
            past = self.kv_per_layer("past", ("rows", self.h, "context", self.dh))
            present = self.kv_per_layer("present", ("rows", self.h, "context+1", self.dh))
            self.inputs = (*head, past_mask, *past)
            self.args = ("input_ids", "position_ids", "past_mask", _names(past))
        self.outputs = (logits, *present)


class _DecoderOnlyStepEL(DecoderOnlyStepGraph):
    def forward(self, input_ids, position_ids, prompt_hidden, prompt_mask, past_mask, past_hidden):
        return self.model.step_el(input_ids, position_ids, prompt_hidden, prompt_mask, past_mask, past_hidden)


class _DecoderOnlyStepKV(DecoderOnlyStepGraph):
    def forward(self, input_ids, position_ids, past_mask, past_kv):
        return self.model.step_kv(input_ids, position_ids, past_mask, past_kv)


def graphs_for(model: nn.Module, mode: str) -> list[Graph]:
    if isinstance(model, DecoderOnlyLM):
        step = _DecoderOnlyStepEL if mode == "el" else _DecoderOnlyStepKV  # the exporter needs explicit arguments
        return [PrefillGraph(model, mode), step(model, mode)]
    encoder = _AudioEncoder if model.spec.n_mels else _TextEncoder  # the exporter needs explicit arguments
    return [encoder(model, mode), DecoderStepGraph(model, mode)]


def sample_inputs(graph: Graph, sizes: dict[str, int] | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random flat inputs that satisfy a graph's contract (masks all ones but the last input's tail)."""
    sizes = {**SAMPLE_SIZES, **(sizes or {})}
    generator = torch.Generator().manual_seed(seed)
    vocab = min(graph.model.spec.vocab_size, graph.model.spec.encoder_vocab_size or graph.model.spec.vocab_size)
    tensors = []
    for spec in graph.inputs:
        shape = [sizes[a] if isinstance(a, str) else a for a in spec.shape]
        if spec.name == "input_ids":
            tensors.append(torch.randint(0, vocab, shape, generator=generator))
        elif spec.name == "position_ids":
            tensors.append(torch.randint(0, graph.model.spec.max_positions, shape, generator=generator))
        elif spec.dtype == "int64":  # masks: pad the tail of the last row, keep the first position
            mask = torch.ones(shape, dtype=torch.int64)
            mask[-1, max(1, shape[1] // 2) :] = 0
            tensors.append(mask)
        else:
            tensors.append(torch.randn(shape, generator=generator).to(getattr(torch, spec.dtype)))
    return tuple(tensors)
