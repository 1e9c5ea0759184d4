"""The exported graphs: each module keeps its forward, IO names, dtypes, axes and sample inputs together.

Contracts (DESIGN.md section 3); N = B x k rows, t = tokens already decoded (may be 0):

    encoder (el):  input_ids [B, S], attention_mask [B, S] -> encoder_hidden [B, S, d]
    encoder (kv):  ... -> encoder_hidden, cross_kv [L, 2, B, h, S, dh]
    decoder_step (el): input_ids [N, 1], encoder_hidden [B, S, d], encoder_mask [B, S],
                       past_hidden [L, N, t, d] -> logits [N, V], present_hidden [L, N, t+1, d]
    decoder_step (kv): input_ids [N, 1], cross_kv [L, 2, N, h, S, dh], encoder_mask [N, S],
                       past_kv [L, 2, N, h, t, dh] -> logits [N, V], present_kv [L, 2, N, h, t+1, dh]

Symbolic axis names: "batch" (B), "rows" (N), "source" (S), "past" (t), "past+1" (t+1).
"""

from dataclasses import dataclass

import torch
from torch import nn

from el_export.models import MODES, DecoderOnlyLM, Seq2SeqLM


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


# Sizes used to trace. Each dynamic axis gets a distinct value >= 2 so that the exporter can neither
# specialise it (0/1) nor unify it with another axis of the same size.
SAMPLE_SIZES = {"batch": 2, "rows": 6, "source": 5, "past": 3, "prompt": 4, "context": 7}


def float_dtype(model: nn.Module) -> str:
    """The dtype name of a model's floating-point tensors: what its graphs take and return (logits excepted)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class EncoderGraph(nn.Module):
    name = "encoder"

    def __init__(self, model: Seq2SeqLM, mode: str):
        super().__init__()
        assert mode in MODES
        self.model, self.mode = model, mode
        spec, f = model.spec, float_dtype(model)
        d, L, h, dh = spec.d_model, spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head
        if spec.n_mels:  # audio: fixed-length log-mel frames, every frame attended (Whisper)
            S = spec.encoder_positions
            self.inputs = (TensorSpec("input_features", f, ("batch", spec.n_mels, 2 * S)),)
        else:
            S = "source"
            self.inputs = (
                TensorSpec("input_ids", "int64", ("batch", "source")),
                TensorSpec("attention_mask", "int64", ("batch", "source")),
            )
        outputs = [TensorSpec("encoder_hidden", f, ("batch", S, d))]
        if mode == "kv":
            outputs.append(TensorSpec("cross_kv", f, (L, 2, "batch", h, S, dh)))
        self.outputs = tuple(outputs)

    def outputs_of(self, hidden):
        return hidden if self.mode == "el" else (hidden, self.model.cross_keys_values(hidden))


class _TextEncoder(EncoderGraph):
    def forward(self, input_ids, attention_mask):
        return self.outputs_of(self.model.encoder(input_ids, attention_mask))


class _AudioEncoder(EncoderGraph):
    def forward(self, input_features):
        return self.outputs_of(self.model.encoder(input_features))


class DecoderStepGraph(nn.Module):
    name = "decoder_step"

    def __init__(self, model: Seq2SeqLM, mode: str):
        super().__init__()
        assert mode in MODES
        self.model, self.mode = model, mode
        spec, f = model.spec, float_dtype(model)
        d, L, h, dh, V = spec.d_model, spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head, spec.vocab_size
        ids = TensorSpec("input_ids", "int64", ("rows", 1))
        logits = TensorSpec("logits", "float32", ("rows", V))
        if mode == "el":
            self.inputs = (
                ids,
                TensorSpec("encoder_hidden", f, ("batch", "source", d)),
                TensorSpec("encoder_mask", "int64", ("batch", "source")),
                TensorSpec("past_hidden", f, (L, "rows", "past", d)),
            )
            self.outputs = (logits, TensorSpec("present_hidden", f, (L, "rows", "past+1", d)))
        else:
            self.inputs = (
                ids,
                TensorSpec("cross_kv", f, (L, 2, "rows", h, "source", dh)),
                TensorSpec("encoder_mask", "int64", ("rows", "source")),
                TensorSpec("past_kv", f, (L, 2, "rows", h, "past", dh)),
            )
            self.outputs = (logits, TensorSpec("present_kv", f, (L, 2, "rows", h, "past+1", dh)))

    def forward(self, input_ids, memory, encoder_mask, past):
        step = self.model.step_el if self.mode == "el" else self.model.step_kv
        return step(input_ids, memory, encoder_mask, past)


class PrefillGraph(nn.Module):
    """Decoder-only: the prompt, once. EL keeps each layer's prompt hidden states once per input;
    K/V returns the prompt's K/V, which the runtime repeats per row as HF does."""

    name = "prefill"

    def __init__(self, model: DecoderOnlyLM, mode: str):
        super().__init__()
        assert mode in MODES
        self.model, self.mode = model, mode
        spec, f = model.spec, float_dtype(model)
        d, L, h, dh, V = spec.d_model, spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head, spec.vocab_size
        self.inputs = (
            TensorSpec("input_ids", "int64", ("batch", "prompt")),
            TensorSpec("attention_mask", "int64", ("batch", "prompt")),
        )
        cache = (
            TensorSpec("prompt_hidden", f, (L, "batch", "prompt", d))
            if mode == "el"
            else TensorSpec("past_kv", f, (L, 2, "batch", h, "prompt", dh))
        )
        self.outputs = (TensorSpec("logits", "float32", ("batch", V)), cache)

    def forward(self, input_ids, attention_mask):
        prefill = self.model.prefill_el if self.mode == "el" else self.model.prefill_kv
        return prefill(input_ids, attention_mask)


class DecoderOnlyStepGraph(nn.Module):
    """Decoder-only step with explicit positions (left-padded prompts start at different offsets)."""

    name = "decoder_step"

    def __init__(self, model: DecoderOnlyLM, mode: str):
        super().__init__()
        assert mode in MODES
        self.model, self.mode = model, mode
        spec, f = model.spec, float_dtype(model)
        d, L, h, dh, V = spec.d_model, spec.decoder_layers, spec.decoder.n_heads, spec.decoder.d_head, spec.vocab_size
        head = (TensorSpec("input_ids", "int64", ("rows", 1)), TensorSpec("position_ids", "int64", ("rows", 1)))
        logits = TensorSpec("logits", "float32", ("rows", V))
        if mode == "el":
            self.inputs = (
                *head,
                TensorSpec("prompt_hidden", f, (L, "batch", "prompt", d)),
                TensorSpec("prompt_mask", "int64", ("batch", "prompt")),
                TensorSpec("past_hidden", f, (L, "rows", "past", d)),
            )
            self.outputs = (logits, TensorSpec("present_hidden", f, (L, "rows", "past+1", d)))
        else:  # the prompt's K/V and then the generated tokens' ("context" = prompt + past)
            self.inputs = (
                *head,
                TensorSpec("prompt_mask", "int64", ("rows", "prompt")),
                TensorSpec("past_kv", f, (L, 2, "rows", h, "context", dh)),
            )
            self.outputs = (logits, TensorSpec("present_kv", f, (L, 2, "rows", h, "context+1", dh)))


class _DecoderOnlyStepEL(DecoderOnlyStepGraph):
    def forward(self, input_ids, position_ids, prompt_hidden, prompt_mask, past_hidden):
        return self.model.step_el(input_ids, position_ids, prompt_hidden, prompt_mask, past_hidden)


class _DecoderOnlyStepKV(DecoderOnlyStepGraph):
    def forward(self, input_ids, position_ids, prompt_mask, past_kv):
        return self.model.step_kv(input_ids, position_ids, prompt_mask, past_kv)


def graphs_for(model: nn.Module, mode: str) -> list[nn.Module]:
    if isinstance(model, DecoderOnlyLM):
        step = _DecoderOnlyStepEL if mode == "el" else _DecoderOnlyStepKV  # the exporter needs explicit arguments
        return [PrefillGraph(model, mode), step(model, mode)]
    encoder = _AudioEncoder if model.spec.n_mels else _TextEncoder  # the exporter needs explicit arguments
    return [encoder(model, mode), DecoderStepGraph(model, mode)]


def sample_inputs(graph: nn.Module, sizes: dict[str, int] | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs that satisfy a graph's contract (masks all ones but the last input's tail)."""
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
