"""An encoder-decoder language model assembled from the shared layers, as plain data + modules.

Module names mirror BART's checkpoint layout (encoder.layers.0.self_attn.q_proj, lm_head, ...), so
families map weights with a rename table at most. The decoder runs one step in either mode:
`el` (EL-attention: caches layer inputs, reads the encoder output once per input) or `kv`
(the HF/Optimum baseline: per-row self K/V and per-row cross K/V).
"""

from dataclasses import dataclass

import torch
from torch import nn

from el_export.attention import additive_mask
from el_export.layers import DecoderLayer, EncoderLayer, LayerSpec

MODES = ("el", "kv")


@dataclass(frozen=True)
class Seq2SeqSpec:
    """Everything a BART-like encoder-decoder needs beyond its layers."""

    family: str
    encoder: LayerSpec
    decoder: LayerSpec
    encoder_layers: int
    decoder_layers: int
    vocab_size: int  # decoder / LM-head vocabulary
    encoder_vocab_size: int
    max_positions: int
    position_offset: int = 0  # BART and mBART index their learned table from 2
    embed_scale: float = 1.0
    layernorm_embedding: bool = False  # a LayerNorm right after the embeddings (BART, mBART)
    final_layer_norm: bool = False  # a LayerNorm after the last layer (mBART, Pegasus)
    final_logits_bias: bool = False

    @property
    def d_model(self) -> int:
        return self.decoder.d_model


class Embeddings(nn.Module):
    """Token embedding x scale + absolute position embedding (+ LayerNorm)."""

    def __init__(self, spec: Seq2SeqSpec, vocab_size: int):
        super().__init__()
        d = spec.d_model
        self.embed_tokens = nn.Embedding(vocab_size, d)
        self.embed_positions = nn.Embedding(spec.max_positions + spec.position_offset, d)
        self.layernorm_embedding = nn.LayerNorm(d) if spec.layernorm_embedding else None
        self.offset, self.scale = spec.position_offset, spec.embed_scale

    def embed(self, input_ids: torch.Tensor, start) -> torch.Tensor:
        """[N, T] token ids at positions start..start+T-1 -> [N, T, d]"""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device) + (start + self.offset)
        x = self.embed_tokens(input_ids) * self.scale + self.embed_positions(positions)
        return x if self.layernorm_embedding is None else self.layernorm_embedding(x)


class Encoder(Embeddings):
    def __init__(self, spec: Seq2SeqSpec):
        super().__init__(spec, spec.encoder_vocab_size)
        self.layers = nn.ModuleList(EncoderLayer(spec.encoder) for _ in range(spec.encoder_layers))
        self.layer_norm = nn.LayerNorm(spec.d_model) if spec.final_layer_norm else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S] ids and mask -> encoder output H [B, S, d]"""
        x = self.embed(input_ids, 0)
        bias = additive_mask(attention_mask, x.dtype)[:, None, None, :]  # [B, 1, 1, S]
        for layer in self.layers:
            x = layer(x, bias)
        return x if self.layer_norm is None else self.layer_norm(x)


class Decoder(Embeddings):
    def __init__(self, spec: Seq2SeqSpec):
        super().__init__(spec, spec.vocab_size)
        self.layers = nn.ModuleList(DecoderLayer(spec.decoder) for _ in range(spec.decoder_layers))
        self.layer_norm = nn.LayerNorm(spec.d_model) if spec.final_layer_norm else None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.layer_norm is None else self.layer_norm(x)


class Seq2SeqLM(nn.Module):
    def __init__(self, spec: Seq2SeqSpec):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, spec.vocab_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output [N, T, d] -> float32 logits of the last position [N, V]."""
        return (self.lm_head(self.decoder.finish(x[:, -1])) + self.final_logits_bias).float()

    def cross_keys_values(self, memory: torch.Tensor) -> torch.Tensor:
        """kv mode: every layer's cross K/V of the encoder output. [B, S, d] -> [L, 2, B, h, S, dh]"""
        kv = [torch.stack(layer.encoder_attn.keys_values(memory)) for layer in self.decoder.layers]
        return torch.stack(kv)

    def step_el(self, input_ids, memory, memory_mask, past_hidden):
        """EL decoder step.

        input_ids [N, T]; memory [B, S, d] (one copy per input, N = B*k); memory_mask [B, S];
        past_hidden [L, N, t, d] -> (logits [N, V], present_hidden [L, N, t+T, d]).
        """
        t = past_hidden.shape[2]
        new_rows = []

        def extend(i):
            def rows(a):  # layer i attends to its cached rows and this step's
                new_rows.append(a)
                return torch.cat([past_hidden[i], a], dim=1)

            return rows

        self_bias = _causal_bias(input_ids.shape[1], t, memory)
        logits = self._decode_el(input_ids, t, extend, self_bias, memory, memory_mask)
        return logits, torch.cat([past_hidden, torch.stack(new_rows)], dim=2)

    def step_el_static(self, input_ids, memory, memory_mask, cache, position):
        """EL step over a preallocated cache: fixed shapes, for CUDA graphs; no O(t) copy per step.

        input_ids [N, 1]; cache [L, N, C, d] receives this step's rows at `position` (int64 [1], on
        the device) in place; keys past `position` are masked. Returns logits [N, V].
        """

        def extend(i):
            def rows(a):
                cache[i].index_copy_(1, position, a)
                return cache[i]

            return rows

        self_bias = _filled_bias(cache.shape[2], position, memory)
        return self._decode_el(input_ids, position, extend, self_bias, memory, memory_mask)

    def _decode_el(self, input_ids, start, extend, self_bias, memory, memory_mask):
        x = self.decoder.embed(input_ids, start)  # [N, T, d]
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, :]  # [B, 1, S]
        for i, layer in enumerate(self.decoder.layers):
            x = layer.forward_el(x, extend(i), self_bias, memory, memory_bias)
        return self.logits(x)

    def step_kv(self, input_ids, cross_kv, memory_mask, past_kv):
        """Standard (HF/Optimum) decoder step.

        input_ids [N, T]; cross_kv [L, 2, N, h, S, dh] (repeated per row); memory_mask [N, S];
        past_kv [L, 2, N, h, t, dh] -> (logits [N, V], present_kv [L, 2, N, h, t+T, dh]).
        """
        t = past_kv.shape[4]
        present = []

        def extend(i):
            def keys_values(k_new, v_new):
                k, v = torch.cat([past_kv[i, 0], k_new], dim=2), torch.cat([past_kv[i, 1], v_new], dim=2)
                present.append(torch.stack([k, v]))
                return k, v

            return keys_values

        self_bias = _causal_bias(input_ids.shape[1], t, cross_kv)
        logits = self._decode_kv(input_ids, t, extend, self_bias, cross_kv, memory_mask)
        return logits, torch.stack(present)

    def step_kv_static(self, input_ids, cross_kv, memory_mask, cache, position):
        """Standard step over a preallocated K/V cache [L, 2, N, h, C, dh], written at `position`."""

        def extend(i):
            def keys_values(k_new, v_new):
                cache[i, 0].index_copy_(2, position, k_new)
                cache[i, 1].index_copy_(2, position, v_new)
                return cache[i, 0], cache[i, 1]

            return keys_values

        self_bias = _filled_bias(cache.shape[4], position, cross_kv)
        return self._decode_kv(input_ids, position, extend, self_bias, cross_kv, memory_mask)

    def _decode_kv(self, input_ids, start, extend, self_bias, cross_kv, memory_mask):
        x = self.decoder.embed(input_ids, start)
        memory_bias = additive_mask(memory_mask, x.dtype)[:, None, None, :]  # [N, 1, 1, S]
        for i, layer in enumerate(self.decoder.layers):
            x = layer.forward_kv(x, extend(i), self_bias, cross_kv[i, 0], cross_kv[i, 1], memory_bias)
        return self.logits(x)


def _filled_bias(capacity: int, position: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Additive bias [1, C] over a preallocated cache: keys 0..position are filled, the rest masked."""
    keys = torch.arange(capacity, device=like.device)
    return additive_mask(keys <= position, like.dtype)[None, :]


def _causal_bias(T: int, t: int, like: torch.Tensor) -> torch.Tensor | None:
    """Causal additive bias [T, t+T] for T new tokens after t cached ones; None for one token."""
    if T == 1:
        return None
    keys = torch.arange(t + T, device=like.device)
    queries = torch.arange(T, device=like.device)[:, None] + t
    return additive_mask(keys[None, :] <= queries, like.dtype)
