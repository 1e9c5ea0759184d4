"""Transformer building blocks shared by every family, in both decoder modes.

Attribute names follow BART's checkpoints (self_attn, encoder_attn, fc1, fc2, *_layer_norm) so the
BART-like families load with a 1:1 copy; other families map their names onto these.
A family describes its wiring as data (`LayerSpec`); nothing here branches on a family name.

Additive attention biases (masks, causal masks, relative position biases) reach a layer as one
tensor broadcastable to [rows, heads, T, R] (T new tokens, R keys); the EL path lays it out for its
expanded queries itself.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from el_export.errors import UnsupportedModelError
from el_export.model.attention import MultiHeadAttention, el_attend, el_context, el_probabilities

ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class LayerSpec:
    """How one family wires a transformer layer."""

    d_model: int
    n_heads: int
    d_head: int
    d_ffn: int
    activation: str
    pre_norm: bool  # norm before each sublayer (mBART, Pegasus, T5, GPT-2) or after the residual (BART, Marian)
    norm: str = "layer"  # "layer" (LayerNorm) or "rms" (T5's scale-only RMS norm)
    norm_eps: float = 1e-5
    attention_bias: bool = True
    ffn_bias: bool = True
    gated_ffn: bool = False  # act(fc1 x) * fc_up x, as T5 v1.1's gated GELU
    query_scale: float | None = None  # None: 1/sqrt(d_head)
    cross_attention: bool = True  # decoder layers of decoder-only models have none

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.activation!r} is not implemented (supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    @property
    def scale(self) -> float:
        return self.d_head**-0.5 if self.query_scale is None else self.query_scale


class RMSNorm(nn.Module):
    """Scale-only RMS norm, accumulated in fp32 (T5's layer norm)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def make_norm(spec: LayerSpec) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(spec.d_model, spec.norm_eps)
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps)


def _attention(spec: LayerSpec) -> MultiHeadAttention:
    return MultiHeadAttention(spec.d_model, spec.n_heads, spec.d_head, spec.attention_bias, spec.scale)


def el_bias(bias: torch.Tensor | None, n_heads: int) -> torch.Tensor | None:
    """Per-row bias [N or 1, h or 1, T, R] -> [N or 1, T*h, R]: the row order of expanded queries (T outer, heads
    inner). Rows differ when they joined a running batch at different steps (their own masks)."""
    if bias is None:
        return None
    N, _, T, R = bias.shape
    return bias.expand(N, n_heads, T, R).transpose(1, 2).reshape(N, T * n_heads, R)


class _Residual(nn.Module):
    """Residual wiring and the feed-forward sublayer, shared by encoder and decoder layers."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.pre_norm = spec.pre_norm
        self.fc1 = nn.Linear(spec.d_model, spec.d_ffn, bias=spec.ffn_bias)
        self.fc_up = nn.Linear(spec.d_model, spec.d_ffn, bias=spec.ffn_bias) if spec.gated_ffn else None
        self.fc2 = nn.Linear(spec.d_ffn, spec.d_model, bias=spec.ffn_bias)
        self.final_layer_norm = make_norm(spec)
        self.act = ACTIVATIONS[spec.activation]

    def sublayer_input(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What a sublayer reads (and what EL self-attention caches)."""
        return norm(x) if self.pre_norm else x

    def residual(self, norm: nn.Module, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        return x + fx if self.pre_norm else norm(x + fx)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.final_layer_norm
        u = self.sublayer_input(norm, x)
        h = self.act(self.fc1(u)) if self.fc_up is None else self.act(self.fc1(u)) * self.fc_up(u)
        out = self.fc2(h.to(self.fc2.weight.dtype))
        if out.dtype == x.dtype:
            return self.residual(norm, x, out)
        # fc2 kept in fp32 where fp16 overflows (T5): add in fp32, clamp into fp16's range, as HF does
        limit = torch.finfo(x.dtype).max - 1000
        return self.residual(norm, x.to(out.dtype), out).clamp(-limit, limit).to(x.dtype)


class EncoderLayer(_Residual):
    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.self_attn = _attention(spec)
        self.self_attn_layer_norm = make_norm(spec)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, S, d], bias additive, broadcastable to [B, h, S, S] -> [B, S, d]"""
        norm = self.self_attn_layer_norm
        a = self.sublayer_input(norm, x)
        k, v = self.self_attn.keys_values(a)
        x = self.residual(norm, x, self.self_attn.attend_kv(a, k, v, bias))
        return self.feed_forward(x)


class DecoderLayer(_Residual):
    """Self-attention, cross-attention (encoder-decoders), feed-forward; one method per decoder mode."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.self_attn = _attention(spec)
        self.self_attn_layer_norm = make_norm(spec)
        if spec.cross_attention:
            self.encoder_attn = _attention(spec)
            self.encoder_attn_layer_norm = make_norm(spec)

    def forward_el(
        self, x, extend, self_bias, memory=None, memory_bias=None, shared=None, shared_bias=None, cross_probs=None
    ):
        """EL mode: caches the self-attention input, reads the encoder output H itself.

        x [N, T, d]. `extend` takes this step's cache rows a [N, T, d] (the self-attention input,
        cached instead of K and V) and returns every per-row key row, [N, R, d]; self_bias
        [N or 1, h or 1, T, R]. memory [B, S, d] is the encoder output, read once per input by its k = N/B
        rows (memory_bias [B, 1, S]); `shared` [B, P, d] is a decoder-only prompt's self-attention
        input, attended to with the per-row keys under one softmax (shared_bias [B, 1, P]).
        `cross_probs`, a list, receives this layer's cross-attention probabilities [N, T, h, S] (word timestamps
        read them). Returns x [N, T, d].
        """
        T = x.shape[1]
        norm, attn = self.self_attn_layer_norm, self.self_attn
        a = self.sublayer_input(norm, x)  # [N, T, d]
        rows = extend(a)  # [N, R, d]
        ctx = el_attend(
            attn.expand_query(a), shared=shared, shared_bias=shared_bias, rows=rows,
            rows_bias=el_bias(self_bias, attn.n_heads),
        )  # fmt: skip
        x = self.residual(norm, x, attn.el_output(ctx, T))
        if memory is not None:
            norm, attn = self.encoder_attn_layer_norm, self.encoder_attn
            c = self.sublayer_input(norm, x)
            p = el_probabilities(attn.expand_query(c), shared=memory, shared_bias=memory_bias)  # [N, T*h, S]
            if cross_probs is not None:
                cross_probs.append(p.view(p.shape[0], T, attn.n_heads, -1))
            x = self.residual(norm, x, attn.el_output(el_context(p, shared=memory), T))
        return self.feed_forward(x)

    def forward_kv(self, x, extend, self_bias, cross_k=None, cross_v=None, memory_bias=None, cross_probs=None):
        """Standard mode (HF/Optimum): per-row K/V caches; cross K/V [N, h, S, dh] per row.

        `extend` takes this step's self-attention input a [N, T, d] and its K and V [N, h, T, dh], and
        returns all keys and values attended to, each [N, h, R, dh]; self_bias broadcastable to
        [N, h, T, R]. `cross_probs` as in `forward_el`. Returns x [N, T, d].
        """
        norm, attn = self.self_attn_layer_norm, self.self_attn
        a = self.sublayer_input(norm, x)
        k, v = extend(a, *attn.keys_values(a))
        x = self.residual(norm, x, attn.attend_kv(a, k, v, self_bias))
        if cross_k is not None:
            norm = self.encoder_attn_layer_norm
            c = self.sublayer_input(norm, x)
            p = self.encoder_attn.probabilities(c, cross_k, memory_bias)  # [N, h, T, S]
            if cross_probs is not None:
                cross_probs.append(p.transpose(1, 2))
            x = self.residual(norm, x, self.encoder_attn.kv_output(p, cross_v))
        return self.feed_forward(x)
