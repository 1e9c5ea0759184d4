"""Transformer building blocks shared by every family, in both decoder modes.

Attribute names follow BART's checkpoints (self_attn, encoder_attn, fc1, fc2, *_layer_norm) so the
BART-like families load with a 1:1 copy; other families rename when they map their weights.
A family describes its wiring as data (`LayerSpec`); nothing here branches on a family name.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from el_export.attention import MultiHeadAttention, el_attend
from el_export.errors import UnsupportedModelError

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
    pre_norm: bool  # LayerNorm before each sublayer (mBART, Pegasus) or after the residual (BART, Marian)
    norm_eps: float = 1e-5
    attention_bias: bool = True
    query_scale: float | None = None  # None: 1/sqrt(d_head)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.activation!r} is not implemented (supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    @property
    def scale(self) -> float:
        return self.d_head**-0.5 if self.query_scale is None else self.query_scale


def _attention(spec: LayerSpec) -> MultiHeadAttention:
    return MultiHeadAttention(spec.d_model, spec.n_heads, spec.d_head, spec.attention_bias, spec.scale)


class _Residual(nn.Module):
    """Residual wiring shared by the layers: pre-norm x + f(norm(x)), or post-norm norm(x + f(x))."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.pre_norm = spec.pre_norm
        self.fc1 = nn.Linear(spec.d_model, spec.d_ffn)
        self.fc2 = nn.Linear(spec.d_ffn, spec.d_model)
        self.final_layer_norm = nn.LayerNorm(spec.d_model, eps=spec.norm_eps)
        self.act = ACTIVATIONS[spec.activation]

    def sublayer_input(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What a sublayer reads (and what EL self-attention caches)."""
        return norm(x) if self.pre_norm else x

    def residual(self, norm: nn.Module, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        return x + fx if self.pre_norm else norm(x + fx)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.final_layer_norm
        return self.residual(norm, x, self.fc2(self.act(self.fc1(self.sublayer_input(norm, x)))))


class EncoderLayer(_Residual):
    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.self_attn = _attention(spec)
        self.self_attn_layer_norm = nn.LayerNorm(spec.d_model, eps=spec.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, S, d], bias additive [B, 1, 1, S] -> [B, S, d]"""
        norm = self.self_attn_layer_norm
        a = self.sublayer_input(norm, x)
        k, v = self.self_attn.keys_values(a)
        x = self.residual(norm, x, self.self_attn.attend_kv(a, k, v, bias))
        return self.feed_forward(x)


class DecoderLayer(_Residual):
    """Self-attention, cross-attention, feed-forward; one method per decoder mode."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.self_attn = _attention(spec)
        self.self_attn_layer_norm = nn.LayerNorm(spec.d_model, eps=spec.norm_eps)
        self.encoder_attn = _attention(spec)
        self.encoder_attn_layer_norm = nn.LayerNorm(spec.d_model, eps=spec.norm_eps)

    def forward_el(self, x, extend, self_bias, memory, memory_bias):
        """EL mode: caches the self-attention input, reads the encoder output H itself.

        x [N, T, d]; memory [B, S, d] shared by the k = N/B rows of each input; `extend` takes this
        step's cache rows a [N, T, d] (the self-attention input, cached instead of K and V) and
        returns every row attended to, [N, R, d]. Returns x [N, T, d].
        """
        T = x.shape[1]
        norm, attn = self.self_attn_layer_norm, self.self_attn
        a = self.sublayer_input(norm, x)  # [N, T, d]
        rows = extend(a)  # [N, R, d]
        if self_bias is not None:  # [T, R] -> [T*h, R], the row order of expanded queries
            self_bias = self_bias.repeat_interleave(attn.n_heads, dim=0)
        ctx = el_attend(attn.expand_query(a), rows=rows, rows_bias=self_bias)
        x = self.residual(norm, x, attn.el_output(ctx, T))
        norm, attn = self.encoder_attn_layer_norm, self.encoder_attn
        c = self.sublayer_input(norm, x)
        ctx = el_attend(attn.expand_query(c), shared=memory, shared_bias=memory_bias)
        x = self.residual(norm, x, attn.el_output(ctx, T))
        return self.feed_forward(x)

    def forward_kv(self, x, extend, self_bias, cross_k, cross_v, memory_bias):
        """Standard mode (HF/Optimum): per-row K/V caches; cross K/V [N, h, S, dh] per row.

        `extend` takes this step's K and V [N, h, T, dh] and returns all keys and values attended
        to, each [N, h, R, dh]. Returns x [N, T, d].
        """
        norm, attn = self.self_attn_layer_norm, self.self_attn
        a = self.sublayer_input(norm, x)
        k, v = extend(*attn.keys_values(a))
        x = self.residual(norm, x, attn.attend_kv(a, k, v, self_bias))
        norm = self.encoder_attn_layer_norm
        c = self.sublayer_input(norm, x)
        x = self.residual(norm, x, self.encoder_attn.attend_kv(c, cross_k, cross_v, memory_bias))
        return self.feed_forward(x)
