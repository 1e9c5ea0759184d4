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
"""

from dataclasses import dataclass

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


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
    size = BYTES_PER_ELEMENT[dtype]
    if mode == "el":
        context = B * S * d if kind == "seq2seq" else L * B * S * d
        return CacheBytes(context=context * size, generated=L * N * T * d * size)
    if mode == "kv":
        return CacheBytes(context=2 * L * N * S * d_a * size, generated=2 * L * N * T * d_a * size)
    raise ValueError(f"unknown mode {mode!r}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
