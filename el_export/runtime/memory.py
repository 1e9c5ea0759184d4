"""The memory guard: split a batch into chunks whose decoder state fits, encode (or prefill) each chunk in parts
whose activations fit, or refuse with the numbers.

Uses the same cache-size model as `inspect` (`cache.py`) plus the search's working set (a few
copies of the [rows, vocab] scores), and `cache.encoder_bytes` for the encoder, against the memory
available on the backend's device.
"""

import math
import numbers
from pathlib import Path

import torch

from el_export.contract.cache import Workload, cache_bytes, encoder_bytes, human_bytes
from el_export.contract.dtypes import BYTES
from el_export.errors import InvalidArgumentError, ResourceError

SEARCH_COPIES = 8  # logits, log-probs, processed scores, top-k candidates...: fp32 [rows, vocab] each
HEADROOM = 0.8  # use at most this share of what the device reports available


def available_bytes(device: torch.device) -> int:
    """Free memory on `device` (CUDA: free device memory; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(limit: float | None, device: torch.device) -> tuple[int, str]:
    """Bytes one call may use (a share of what `device` reports available, capped by `limit`), and which bounds it.

    Raises:
        InvalidArgumentError: `limit` is not a positive, finite number.
    """
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit) or limit <= 0
    ):
        raise InvalidArgumentError(f"memory_limit must be a positive, finite number of bytes, got {limit!r}")
    free = int(available_bytes(device) * HEADROOM)
    if limit is not None and limit <= free:
        return int(limit), "the memory limit"
    return free, "free memory"


def bytes_per_input(manifest, rows_per_input: int, source_len: int, max_length: int) -> int:
    """Decoder state of one input at the end of decoding, plus its share of the search's working set."""
    workload = Workload(1, rows_per_input, source_len, max_length)
    cache = cache_bytes(manifest.mode, manifest.dims, workload, manifest.dtype, manifest.kind).total
    search = SEARCH_COPIES * rows_per_input * manifest.dims["vocab_size"] * BYTES["float32"]
    return cache + search


def inputs_per_chunk(batch: int, per_input: int, limit: float | None, device: torch.device) -> int:
    """How many inputs to decode at once; `limit` (bytes) caps what the device reports available.

    Raises:
        ResourceError: not even one input fits.
    """
    budget, bound = budget_bytes(limit, device)
    if per_input > budget:
        raise ResourceError(
            f"one input needs about {human_bytes(per_input)} of decoder state but {human_bytes(budget)} is available "
            f"({bound}); lower num_beams or max_new_tokens, or raise --memory-limit"
        )
    return max(1, min(batch, budget // per_input))


def inputs_per_encoder_call(
    manifest, batch: int, source_len: int, limit: float | None, device: torch.device, longest: int = 0
) -> int:
    """How many inputs to encode (or prefill) at once so that the activations fit. Inputs are padded to one
    length, so if one cannot fit none can: the refusal names `longest`, the input that sets the length.

    Raises:
        ResourceError: not even one input fits.
    """
    per_input = encoder_bytes(manifest.dims, 1, source_len, manifest.dtype)
    budget, bound = budget_bytes(limit, device)
    if per_input > budget:
        part = "prefill" if manifest.kind == "decoder-only" else "encoder"
        length, fix = (f"{source_len} encoder frames", "free memory") if manifest.audio else (
            f"{source_len} tokens", "shorten it")  # fmt: skip
        raise ResourceError(
            f"input {longest} is {length}: its {part} needs about {human_bytes(per_input)} but {human_bytes(budget)} "
            f"is available ({bound}); {fix} or raise --memory-limit"
        )
    return max(1, min(batch, budget // per_input))
