"""The cache-size model: bytes each decoder mode holds for a workload, by formula.

One home for the formula; `inspect`, the memory guard and the benchmarks use it. With L decoder
layers, B inputs, k beams (N = B k rows), source or prompt length S, T generated tokens, width d and
attention width d_a = heads x head width:

    encoder-decoder   context (what cross-attention reads)     generated (self-attention)
      el              B S d      the encoder output, once        L N T d     each layer's input
      kv              2 L N S d_a  K and V per layer and row     2 L N T d_a K and V
    decoder-only      context (the prompt's part)
      el              L B S d    prompt hidden states, once      L N T d
      kv              2 L N S d_a                                2 L N T d_a

The encoder (or a decoder-only model's prefill) runs before decoding, one layer alive at a time, with h
heads: its attention is O(S^2), the rest O(S d). Per input:

    encoder activations   ATTENTION_COPIES h S^2 (float32)  +  LINEAR_COPIES S d
"""

from dataclasses import dataclass

from el_export.contract.dtypes import BYTES

# [h, S, S] tensors alive at once per input in one layer (scores, mask-added scores, softmax), measured on ONNX
# Runtime CPU at S = 2000: BART 2.0, GPT-2 2.3, T5 3 per input plus its relative bias, shared by the batch.
# Counted in float32 even for float16 graphs, whose softmax may run in float32.
ATTENTION_COPIES = 4
# d-wide vectors alive per position: the layer's input, Q, K, V, the attention output and the residual (6), and
# the feed-forward's hidden before and after its activation (2 x 4 d: the manifest records no FFN width, and
# 4 d is what the families ship).
LINEAR_COPIES = 14


@dataclass(frozen=True)
class Workload:
    batch_size: int
    num_beams: int
    source_len: int  # encoder input length, or prompt length for decoder-only models
    new_tokens: int

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_beams


@dataclass(frozen=True)
class CacheBytes:
    context: int  # encoder output / cross K-V, or the prompt's part
    generated: int  # the generated tokens' self-attention cache

    @property
    def total(self) -> int:
        return self.context + self.generated


def cache_bytes(mode: str, dims: dict, workload: Workload, dtype: str = "float32", kind: str = "seq2seq") -> CacheBytes:
    """Bytes of decoder state at the end of decoding `workload` in `mode` ("el" or "kv")."""
    L, d, d_a = dims["decoder_layers"], dims["d_model"], dims["heads"] * dims["d_head"]
    B, N, S, T = workload.batch_size, workload.rows, workload.source_len, workload.new_tokens
    size = BYTES[dtype]
    if mode == "el":
        context = B * S * d if kind == "seq2seq" else L * B * S * d
        return CacheBytes(context=context * size, generated=L * N * T * d * size)
    if mode == "kv":
        return CacheBytes(context=2 * L * N * S * d_a * size, generated=2 * L * N * T * d_a * size)
    raise ValueError(f"unknown mode {mode!r}")


def encoder_bytes(dims: dict, batch: int, source_len: int, dtype: str = "float32") -> int:
    """Peak activation bytes of one encoder (or prefill) call over `batch` inputs of `source_len` positions.
    Relative positions (T5) have no length limit, so this is the only bound on how long an input may be."""
    attention = ATTENTION_COPIES * batch * dims["heads"] * source_len**2 * BYTES["float32"]
    linear = LINEAR_COPIES * batch * source_len * dims["d_model"] * BYTES[dtype]
    return attention + linear


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
