"""The memory guard: split a batch into chunks whose decoder state fits, or refuse with the numbers.

Uses the same cache-size model as `inspect` (`cache.py`) plus the search's working set (a few
copies of the [rows, vocab] scores), against the memory available on the backend's device.
"""

from pathlib import Path

import torch

from el_export.cache import BYTES_PER_ELEMENT, Workload, cache_bytes, human_bytes
from el_export.errors import ResourceError

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


def bytes_per_input(manifest, rows_per_input: int, source_len: int, max_length: int) -> int:
    """Decoder state of one input at the end of decoding, plus its share of the search's working set."""
    workload = Workload(1, rows_per_input, source_len, max_length)
    cache = cache_bytes(manifest.mode, manifest.dims, workload, manifest.dtype, manifest.kind).total
    search = SEARCH_COPIES * rows_per_input * manifest.dims["vocab_size"] * BYTES_PER_ELEMENT["float32"]
    return cache + search


def inputs_per_chunk(batch: int, per_input: int, limit: int | None, device: torch.device) -> int:
    """How many inputs to decode at once; `limit` (bytes) caps what the device reports available.

    Raises:
        ResourceError: not even one input fits.
    """
    budget = int(available_bytes(device) * HEADROOM)
    if limit is not None:
        budget = min(budget, limit)
    if per_input > budget:
        raise ResourceError(
            f"one input needs about {human_bytes(per_input)} of decoder state but {human_bytes(budget)} is available "
            f"({'the memory limit' if limit is not None and limit <= budget else 'free memory'}); "
            "lower num_beams or max_new_tokens, or raise --memory-limit"
        )
    return max(1, min(batch, budget // per_input))
