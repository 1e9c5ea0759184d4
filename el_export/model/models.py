"""Language models assembled from the shared layers: an encoder-decoder and a decoder-only model.

Module names mirror BART's checkpoint layout (encoder.layers.0.self_attn.q_proj, lm_head, ...), so
families map weights with a rename at most. Every decoder step runs in either mode: `el`
(EL-attention: caches each layer's input, reads the encoder output, or a decoder-only prompt, once
per input) or `kv` (the HF/Optimum baseline: per-row K/V caches).

Every step takes a per-row mask over its self-attention cache (1 on real tokens, 0 on padding), so
that rows which joined a running batch at different steps run in one call: a row's padding sits on
the LEFT of its real entries, which keeps the index distance between them (T5's relative bias) its
own. Encoder-decoder steps derive each row's position from its mask; decoder-only steps take them.

Decoder steps come in two cache layouts. Growing: the step takes the past cache and its mask
(`past_mask` [N, t]) and returns the cache with this step's rows appended (the exported graphs).
Static: the step writes its rows in place into a preallocated cache of capacity C at the shared
index `position`, attends to the slots its key mask [N, C] marks, and embeds the given per-row
positions (fixed shapes, for CUDA graphs).
"""

from dataclasses import dataclass

import torch
from torch import nn

from el_export.errors import CheckpointError
from el_export.model.attention import additive_mask
from el_export.model.layers import DecoderLayer, EncoderLayer, LayerSpec, make_norm
from el_export.model.positions import RelativePositionBias

MODES = ("el", "kv")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model needs beyond its layers. Decoder-only models have no encoder."""

    family: str
    decoder: LayerSpec
    decoder_layers: int
    vocab_size: int  # decoder / LM-head vocabulary
    max_positions: int | None  # None: relative positions only, no table to run past
    encoder: LayerSpec | None = None
    encoder_layers: int = 0
    encoder_vocab_size: int = 0
    position_offset: int = 0  # BART and mBART index their learned table from 2
    relative_buckets: int = 0  # > 0: T5's bucketed relative position bias instead of a position table
    relative_max_distance: int = 0
    embed_scale: float = 1.0
    layernorm_embedding: bool = False  # a LayerNorm right after the embeddings (BART, mBART)
    final_layer_norm: bool = False  # a norm after the last layer (mBART, Pegasus, T5, GPT-2)
    final_logits_bias: bool = False
    logits_scale: float = 1.0  # T5 with tied embeddings scales the decoder output by d_model**-0.5
    n_mels: int = 0  # > 0: an audio encoder (Whisper) reading log-mel features instead of token ids
    encoder_positions: int | None = None  # the audio encoder's frames after its stride-2 conv (1500)
    # (layer, head) pairs of cross-attention that follows the source in time (Whisper's word timestamps read them)
    alignment_heads: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.alignment_heads and self.encoder is None:
            raise CheckpointError("alignment_heads name cross-attention heads, which a decoder-only model has none of")
        L, h = self.decoder_layers, self.decoder.n_heads
        if bad := [list(p) for p in self.alignment_heads if not (0 <= p[0] < L and 0 <= p[1] < h)]:
            raise CheckpointError(
                f"generation_config.json alignment_heads names {bad[0]}, but the decoder has {L} layers of {h} "
                "heads; fix alignment_heads in generation_config.json"
            )

    @property
    def d_model(self) -> int:
        return self.decoder.d_model


class Stack(nn.Module):
    """Embeddings, layers and final norm of one encoder or decoder stack."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, n_layers: int, vocab_size: int, bidirectional: bool):
        super().__init__()
        d = spec.d_model
        self.embed_tokens = nn.Embedding(vocab_size, d)
        self.embed_positions = None
        if spec.max_positions is not None and not spec.relative_buckets:
            self.embed_positions = nn.Embedding(spec.max_positions + spec.position_offset, d)
        self.relative_bias = None
        if spec.relative_buckets:
            self.relative_bias = RelativePositionBias(
                layer.n_heads, spec.relative_buckets, spec.relative_max_distance, bidirectional
            )
        self.layernorm_embedding = nn.LayerNorm(d) if spec.layernorm_embedding else None
        self.layer_norm = make_norm(layer) if spec.final_layer_norm else None
        self.offset, self.scale = spec.position_offset, spec.embed_scale

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N, T] token ids at `positions` ([T] or [N, T]) -> [N, T, d]"""
        x = self.embed_tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.offset)
        return x if self.layernorm_embedding is None else self.layernorm_embedding(x)

    def position_bias(self, query_positions: torch.Tensor, key_length) -> torch.Tensor | None:
        """Relative position bias [h, T, R] for queries at `query_positions` [T]; None without one."""
        return None if self.relative_bias is None else self.relative_bias(query_positions, key_length)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.layer_norm is None else self.layer_norm(x)


class Encoder(Stack):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec, spec.encoder, spec.encoder_layers, spec.encoder_vocab_size, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(spec.encoder) for _ in range(spec.encoder_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S] ids and mask -> encoder output H [B, S, d]"""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids, positions)
        bias = additive_mask(attention_mask, x.dtype)[:, None, None, :]  # [B, 1, 1, S]
        relative = self.position_bias(positions, input_ids.shape[1])
        if relative is not None:
            bias = bias + relative[None]  # [B, h, S, S]
        for layer in self.layers:
            x = layer(x, bias)
        return self.finish(x)


class AudioEncoder(nn.Module):
    """Whisper's encoder: two convolutions over log-mel frames (the second halves them), fixed positions."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d = spec.d_model
        self.conv1 = nn.Conv1d(spec.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(spec.encoder_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(spec.encoder) for _ in range(spec.encoder_layers))
        self.layer_norm = make_norm(spec.encoder)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, 2 S] features -> encoder output H [B, S, d] (every frame attended)"""
        x = torch.nn.functional.gelu(self.conv1(input_features))
        x = torch.nn.functional.gelu(self.conv2(x)).transpose(1, 2)  # [B, S, d]
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x, None)
        return self.layer_norm(x)


class Decoder(Stack):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec, spec.decoder, spec.decoder_layers, spec.vocab_size, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(spec.decoder) for _ in range(spec.decoder_layers))

    def self_bias(self, key_mask: torch.Tensor, query_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Self-attention bias [N, h or 1, T, R] of T new tokens at cache indices `query_index` [T] over R keys.

        key_mask [N, R]: 1 where a cache entry is a real token (the new tokens' included), 0 on padding and unfilled
        slots; the new tokens are causal among themselves. A relative position bias is taken over cache indices.
        """
        keys = torch.arange(key_mask.shape[1], device=like.device)
        allowed = (keys[None, :] <= query_index[:, None])[None] & (key_mask[:, None, :] != 0)  # [N, T, R]
        bias = additive_mask(allowed, like.dtype)[:, None]  # [N, 1, T, R]
        relative = self.position_bias(query_index, key_mask.shape[1])
        return bias if relative is None else bias + relative.to(like.dtype)


class _LM(nn.Module):
    """The decoder and LM head shared by both kinds of model."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.decoder = Decoder(spec)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, spec.vocab_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output [N, T, d] -> float32 logits of the last position [N, V]."""
        h = self.decoder.finish(x[:, -1])
        if self.spec.logits_scale != 1.0:
            h = h * self.spec.logits_scale
        logits = self.lm_head(h)
        if self.spec.final_logits_bias:
            logits = logits + self.final_logits_bias
        return logits.float()

    def growing_self_bias(self, past_mask: torch.Tensor, T: int, like: torch.Tensor) -> torch.Tensor:
        """Self-attention bias [N, h or 1, T, t+T] of T new tokens after a growing cache masked by past_mask [N, t]."""
        query_index = torch.arange(T, device=like.device) + past_mask.shape[1]  # [T]
        return self.decoder.self_bias(with_new_tokens(past_mask, T), query_index, like)

    def _run_el(
        self, x, extend, self_bias, memory=None, memory_bias=None, shared=None, shared_bias=None, cross_probs=None
    ):
        """shared: [L, B, P, d], a decoder-only prompt's per-layer self-attention inputs. cross_probs: a list that
        receives each layer's cross-attention probabilities [N, T, h, S]."""
        for i, layer in enumerate(self.decoder.layers):
            prompt = None if shared is None else shared[i]
            x = layer.forward_el(x, extend(i), self_bias, memory, memory_bias, prompt, shared_bias, cross_probs)
        return self.logits(x)

    def _run_kv(self, x, extend, self_bias, cross_kv=None, memory_bias=None, cross_probs=None):
        """cross_kv: [K_0, V_0, K_1, V_1, ...], each [N, h, S, dh]; cross_probs as in `_run_el`."""
        for i, layer in enumerate(self.decoder.layers):
            cross = (cross_kv[2 * i], cross_kv[2 * i + 1]) if cross_kv is not None else (None, None)
            x = layer.forward_kv(x, extend(i), self_bias, *cross, memory_bias, cross_probs)
        return self.logits(x)


def alignment_heads(value) -> tuple[tuple[int, int], ...]:
    """A generation config's `alignment_heads` ([[layer, head], ...]) as `ModelSpec` holds them (an empty list: none).

    Raises:
        CheckpointError: not a list of [layer, head] integer pairs.
    """
    pairs = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(p, list | tuple) and len(p) == 2 and all(type(i) is int for i in p)
                            for p in pairs):  # fmt: skip
        raise CheckpointError(
            f"generation_config.json alignment_heads is {str(value)[:60]}; expected [[layer, head], ...] integers"
        )
    return tuple((layer, head) for layer, head in pairs)


def alignment_attention(cross_probs: list[torch.Tensor], heads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Per-layer cross-attention probabilities [N, T, h, S] -> the last position's, of `heads` only [N, A, S].

    One gather per layer (not per head): the graph's cost is its node count, the data is a few kB."""
    layers = sorted({layer for layer, _ in heads})
    grouped = [(layer, head) for layer in layers for layer_, head in heads if layer_ == layer]
    device = cross_probs[0].device
    picked = [
        cross_probs[layer][:, -1].index_select(
            1, torch.tensor([h for layer_, h in grouped if layer_ == layer], device=device)
        )
        for layer in layers
    ]  # each [N, A_layer, S]
    out = torch.cat(picked, dim=1) if len(picked) > 1 else picked[0]  # [N, A, S], heads grouped by layer
    order = [grouped.index(pair) for pair in heads]
    return out if order == sorted(order) else out.index_select(1, torch.tensor(order, device=device))


def with_new_tokens(past_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[N, t] cache mask -> [N, t+T]: T new tokens, each a real entry (a token always attends to itself)."""
    new = torch.ones(past_mask.shape[0], T, dtype=past_mask.dtype, device=past_mask.device)
    return torch.cat([past_mask, new], dim=1)


def next_positions(past_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[N, t] cache mask -> positions [N, T] of T new tokens: each row counts its own real entries."""
    # sum in float32 (exact below 2^24 tokens): TensorRT's ReduceSum takes no int64
    start = past_mask.float().sum(dim=1, keepdim=True).long()  # [N, 1]
    return start + torch.arange(T, device=past_mask.device)


def _growing_el(past_hidden: list, present: list):
    """`extend` for EL over growing per-layer caches [N, t, d]: collects each layer's [N, t+T, d]."""

    def extend(i):
        def rows(a):
            present.append(torch.cat([past_hidden[i], a], dim=1))
            return present[-1]

        return rows

    return extend


def _growing_kv(past_kv: list, present: list):
    """`extend` for K/V over growing per-layer caches [K_0, V_0, K_1, ...], each [N, h, t, dh]."""

    def extend(i):
        def keys_values(_a, k_new, v_new):
            k, v = torch.cat([past_kv[2 * i], k_new], dim=2), torch.cat([past_kv[2 * i + 1], v_new], dim=2)
            present.extend([k, v])
            return k, v

        return keys_values

    return extend


def _static_el(cache: torch.Tensor, position: torch.Tensor):
    """`extend` for EL over a preallocated cache [L, N, C, d], written at `position` in place."""

    def extend(i):
        def rows(a):
            cache[i].index_copy_(1, position, a)
            return cache[i]

        return rows

    return extend


def _static_kv(cache: torch.Tensor, position: torch.Tensor):
    """`extend` for K/V over a preallocated cache [L, 2, N, h, C, dh], written at `position`."""

    def extend(i):
        def keys_values(_a, k_new, v_new):
            cache[i, 0].index_copy_(2, position, k_new)
            cache[i, 1].index_copy_(2, position, v_new)
            return cache[i, 0], cache[i, 1]

        return keys_values

    return extend


class Seq2SeqLM(_LM):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.encoder = AudioEncoder(spec) if spec.n_mels else Encoder(spec)

    def cross_keys_values(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """kv mode: every layer's cross K/V of the encoder output. [B, S, d] -> [K_0, V_0, ...] [B, h, S, dh]"""
        return [t for layer in self.decoder.layers for t in layer.encoder_attn.keys_values(memory)]

    def _growing_start(self, input_ids, past_mask):
        """Embeddings [N, T, d] of T new tokens after a growing cache masked by past_mask [N, t] (each row at its
        own positions), and their self-attention bias."""
        x = self.decoder.embed(input_ids, next_positions(past_mask, input_ids.shape[1]))
        return x, self.growing_self_bias(past_mask, input_ids.shape[1], x)

    def _static_start(self, input_ids, key_mask, position, positions):
        """Embeddings of one new token per row at `positions` [N, 1], written at cache index `position` [1], and
        its self-attention bias over the slots key_mask [N, C] marks (this step's slot included)."""
        x = self.decoder.embed(input_ids, positions)
        return x, self.decoder.self_bias(key_mask, position, x)

    def step_el(self, input_ids, memory, memory_mask, past_mask, past_hidden, cross_probs=None):
        """EL decoder step.

        input_ids [N, T]; memory [B, S, d] (one copy per input, N = B*k); memory_mask [B, S]; past_mask [N, t];
        past_hidden: per layer [N, t, d] -> (logits [N, V], present_hidden: per layer [N, t+T, d]).
        cross_probs: a list that receives each layer's cross-attention probabilities [N, T, h, S].
        """
        present = []
        x, self_bias = self._growing_start(input_ids, past_mask)
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, :]  # [B, 1, S]
        extend = _growing_el(past_hidden, present)
        logits = self._run_el(x, extend, self_bias, memory=memory, memory_bias=memory_bias, cross_probs=cross_probs)
        return logits, present

    def step_el_static(self, input_ids, memory, memory_mask, cache, position, key_mask, positions):
        """EL step over a preallocated cache [L, N, C, d] written at `position` (int64 [1]); key_mask [N, C],
        positions [N, 1] -> logits [N, V]."""
        x, self_bias = self._static_start(input_ids, key_mask, position, positions)
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, :]
        return self._run_el(x, _static_el(cache, position), self_bias, memory=memory, memory_bias=memory_bias)

    def step_kv(self, input_ids, cross_kv, memory_mask, past_mask, past_kv, cross_probs=None):
        """Standard (HF/Optimum) decoder step.

        input_ids [N, T]; cross_kv [K_0, V_0, ...] each [N, h, S, dh] (repeated per row); memory_mask [N, S];
        past_mask [N, t]; past_kv [K_0, V_0, ...] each [N, h, t, dh] -> (logits [N, V], present_kv: each
        [N, h, t+T, dh]). cross_probs as in `step_el`.
        """
        present = []
        x, self_bias = self._growing_start(input_ids, past_mask)
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, None, :]  # [N, 1, 1, S]
        logits = self._run_kv(x, _growing_kv(past_kv, present), self_bias, cross_kv, memory_bias, cross_probs)
        return logits, present

    def step_kv_static(self, input_ids, cross_kv, memory_mask, cache, position, key_mask, positions):
        """Standard step over a preallocated K/V cache [L, 2, N, h, C, dh] written at `position`; key_mask
        [N, C], positions [N, 1]."""
        x, self_bias = self._static_start(input_ids, key_mask, position, positions)
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, None, :]
        return self._run_kv(x, _static_kv(cache, position), self_bias, cross_kv, memory_bias)


class DecoderOnlyLM(_LM):
    """A decoder-only model (GPT-2). The prompt runs once (prefill); then one token per step.

    EL: the prompt's per-layer self-attention inputs [L, B, P, d] are kept once per input and read
    by all its beams; only generated tokens are cached per row. K/V: the prompt's K/V are repeated
    per row and grow with the generated tokens, as HF/Optimum decode.
    """

    def _prompt(self, input_ids, attention_mask):
        """Positions as HF generate derives them from a left-padded mask, and the prompt's bias."""
        # cumsum in float32 (exact below 2^24 tokens): TensorRT's CumSum takes no int64
        positions = (attention_mask.float().cumsum(-1).long() - 1).masked_fill(attention_mask == 0, 0)  # [B, P]
        x = self.decoder.embed(input_ids, positions)
        keys = torch.arange(input_ids.shape[1], device=input_ids.device)
        allowed = (keys[None, :] <= keys[:, None])[None] & (attention_mask[:, None, :] != 0)  # [B, P, P]
        return x, additive_mask(allowed, x.dtype)[:, None]  # [B, 1, P, P]

    def prefill_el(self, input_ids, attention_mask):
        """[B, P] prompt -> (logits [B, V] of the next token, prompt_hidden [L, B, P, d]).

        The prompt attends to itself the standard way (cheaper than EL for a whole sequence); what
        is kept is each layer's self-attention input, the EL cache.
        """
        x, bias = self._prompt(input_ids, attention_mask)
        hidden = []

        def extend(i):
            def record(a, k, v):
                hidden.append(a)
                return k, v

            return record

        logits = self._run_kv(x, extend, bias)
        return logits, hidden

    def prefill_kv(self, input_ids, attention_mask):
        """[B, P] prompt -> (logits [B, V], past_kv [K_0, V_0, ...] each [B, h, P, dh])."""
        x, bias = self._prompt(input_ids, attention_mask)
        present = []

        def extend(i):
            def keys_values(_a, k, v):
                present.extend([k, v])
                return k, v

            return keys_values

        logits = self._run_kv(x, extend, bias)
        return logits, present

    def step_el(self, input_ids, position_ids, prompt_hidden, prompt_mask, past_mask, past_hidden):
        """EL step. input_ids, position_ids [N, 1]; prompt_hidden: per layer [B, P, d] and prompt_mask [B, P]
        (once per input); past_mask [N, t]; past_hidden: per layer [N, t, d] -> (logits [N, V], present_hidden:
        [N, t+1, d])."""
        present = []
        x = self.decoder.embed(input_ids, position_ids)
        self_bias = self.growing_self_bias(past_mask, 1, x)  # [N, 1, 1, t+1]
        shared_bias = additive_mask(prompt_mask, x.dtype)[:, None, :]  # [B, 1, P]
        extend = _growing_el(past_hidden, present)
        logits = self._run_el(x, extend, self_bias, shared=prompt_hidden, shared_bias=shared_bias)
        return logits, present

    def step_kv(self, input_ids, position_ids, past_mask, past_kv):
        """K/V step. past_mask [N, P+t] and past_kv [K_0, V_0, ...] each [N, h, P+t, dh]: the prompt's K/V per
        row, then the generated tokens' -> (logits [N, V], present_kv: each [N, h, P+t+1, dh])."""
        present = []
        x = self.decoder.embed(input_ids, position_ids)
        self_bias = self.growing_self_bias(past_mask, 1, x)  # [N, 1, 1, P+t+1]
        logits = self._run_kv(x, _growing_kv(past_kv, present), self_bias)
        return logits, present
