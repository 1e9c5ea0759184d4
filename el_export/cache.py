"""The cache-size model: bytes each decoder mode holds for a workload, by formula.

One home for the formula; `inspect`, the memory guard and the benchmarks use it. With L decoder
layers, B inputs, k beams (N = B k rows), source length S, T decoded tokens, width d and attention
width d_a = heads x head width:

    el  cross: B S d            (the encoder output, once per input)
    kv  cross: 2 L N S d_a      (K and V of every layer, per row: 2 L k times more when d_a = d)
    el  self:  L N T d          (each layer's input)
    kv  self:  2 L N T d_a      (K and V of every layer)
"""

from dataclasses import dataclass

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Workload:
    batch_size: int
    num_beams: int
    source_len: int
    new_tokens: int

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_beams


@dataclass(frozen=True)
class CacheBytes:
    cross: int
    self_attention: int

    @property
    def total(self) -> int:
        return self.cross + self.self_attention


def cache_bytes(mode: str, dims: dict, workload: Workload, dtype: str = "float32") -> CacheBytes:
    """Bytes of decoder state at the end of decoding `workload` in `mode` ("el" or "kv")."""
    L, d, d_a = dims["decoder_layers"], dims["d_model"], dims["heads"] * dims["d_head"]
    B, N, S, T = workload.batch_size, workload.rows, workload.source_len, workload.new_tokens
    size = BYTES_PER_ELEMENT[dtype]
    if mode == "el":
        return CacheBytes(cross=B * S * d * size, self_attention=L * N * T * d * size)
    if mode == "kv":
        return CacheBytes(cross=2 * L * N * S * d_a * size, self_attention=2 * L * N * T * d_a * size)
    raise ValueError(f"unknown mode {mode!r}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
