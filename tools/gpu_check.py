"""GPU check: EL parity on the GPU, then the paper's BART CNN/DailyMail setting, side by side.

1. Parity: a seeded small BART, beams 4, batch 3 with padding, greedy and beam search: the torch
   backend's tokens (EL and K/V modes, fp32) must equal HF `generate`'s on the same device.
2. The paper's setting (Chen et al., ICML 2021, table on BART CNN/DailyMail) with a random-init
   BART-large-sized model: source 1024, beams 4, exactly 64 new tokens, fp16. Batch 32 in both modes,
   then, per mode, batches doubling from 32 until out of memory (or out of time): the largest batch
   that ran and its samples/s. For reference the paper reports, on a V100 16 GB: 5.7 samples/s with
   the standard cache at batch 32, 28.6 with EL-attention at batch 320 (5.0x), 8.0 with EL at batch 32.

Results go to OUT/gpu_check.json, rewritten after every measurement so a cut-off run keeps what it
measured. `--smoke` runs the same code on CPU with a tiny model in seconds (the test suite does).

    python tools/gpu_check.py --out results/            # on a CUDA machine, about 5 minutes on an H100
    python tools/gpu_check.py --out /tmp/x --smoke      # anywhere
"""

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from el_export.runtime.torch import load_torch
from el_export.testing.tiny import tiny_model

PAPER = {"gpu": "V100 16 GB", "kv_batch32": 5.7, "el_batch32": 8.0, "el_batch320": 28.6}
BART_LARGE = dict(
    vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
)  # fmt: skip
TINY = dict(
    vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(device: torch.device) -> dict:
    """EL and K/V tokens == HF generate on this device (fp32), greedy and beam search."""
    hf = tiny_model("bart", seed=0).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = hf.config.pad_token_id
    results = {}
    for variant, options in decoding_variants(device).items():
        generator = load_torch(hf, device=str(device), **options)
        for label, kwargs in (
            ("greedy", {"max_new_tokens": 16}),
            ("beam4", {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.8, "max_new_tokens": 16}),
        ):
            try:
                ours = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
            except Exception as e:  # record and go on: the other variants' figures still count
                results[f"{variant}_{label}"] = {"tokens_equal": False, "error": f"{type(e).__name__}: {e}"[:400]}
                continue
            with torch.no_grad():
                ref = hf.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), return_dict_in_generate=True,
                    output_scores=True, **kwargs,
                )  # fmt: skip
            same = ours.sequences.shape == ref.sequences.shape and torch.equal(ours.sequences, ref.sequences)
            entry = {"tokens_equal": bool(same)}
            if ours.sequences_scores is not None and same:
                entry["scores_max_abs_error"] = float((ours.sequences_scores - ref.sequences_scores).abs().max())
            results[f"{variant}_{label}"] = entry
    results["passed"] = all(v["tokens_equal"] for v in results.values())
    return results


def decoding_variants(device: torch.device) -> dict[str, dict]:
    """Both modes; each also with preallocated caches, and on CUDA with CUDA graphs."""
    variants = {"el": {"mode": "el"}, "kv": {"mode": "kv"}}
    extra = {"cuda_graphs": True} if device.type == "cuda" else {"static_cache": True}
    suffix = "graphs" if device.type == "cuda" else "static"
    variants.update({f"{m}_{suffix}": {"mode": m, **extra} for m in ("el", "kv")})
    return variants


def run_once(generator, batch: int, source_len: int, new_tokens: int, device: torch.device, label: str = "") -> dict:
    """One generate call of `batch` inputs; raises torch.cuda.OutOfMemoryError when it does not fit."""
    vocab = generator.manifest.dims["encoder_vocab_size"]
    ids = torch.randint(4, vocab, (batch, source_len), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = generator.generate(
        input_ids=ids, attention_mask=mask, num_beams=4, min_new_tokens=new_tokens, max_new_tokens=new_tokens
    )
    sync(device)
    seconds = time.perf_counter() - start
    generated = out.sequences.shape[1] - 1
    assert generated == new_tokens, f"expected {new_tokens} new tokens, got {generated}"
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    result = {
        "batch": batch,
        "seconds": round(seconds, 3),
        "samples_per_s": round(batch / seconds, 2),
        "peak_gib": peak,
    }
    print(f"  {label or generator.manifest.mode} {result}", flush=True)
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def paper_setting(device, dims, source_len, new_tokens, batches, budget_s, report, save) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        hf = BartForConditionalGeneration(BartConfig(**dims)).eval()
    dtype = "float16" if device.type == "cuda" else "float32"
    generators = {
        variant: load_torch(hf, device=str(device), dtype=dtype, **options)
        for variant, options in decoding_variants(device).items()
    }
    del hf
    free(device)
    for variant, generator in generators.items():
        generator.encoder_batch_size = 16
        try:
            run_once(generator, 2, source_len, 4, device, variant)  # warm-up: kernels, allocator
        except Exception:
            if variant in ("el", "kv"):
                raise  # the variants' own runs below record their errors
    paper = report["paper_setting"] = {
        "model": "random-init BART-large-sized" if dims is BART_LARGE else "tiny (smoke)",
        "dims": dims, "source_len": source_len, "num_beams": 4, "new_tokens": new_tokens, "dtype": dtype,
        "encoder_batch_size": 16,
    }  # fmt: skip
    first = batches[0]
    for variant, generator in generators.items():  # twice: the second run is steady state (graphs captured)
        try:
            for _ in range(2):
                paper[f"{variant}_batch{first}"] = run_once(generator, first, source_len, new_tokens, device, variant)
                free(device)
        except Exception as e:  # record and go on: the other variants' figures still count
            if variant in ("el", "kv"):
                raise
            paper[f"{variant}_batch{first}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        save()
    for variant in generators:
        if variant != "kv" and "error" not in paper[f"{variant}_batch{first}"]:
            paper[f"{variant}_vs_kv_batch{first}"] = round(
                paper[f"{variant}_batch{first}"]["samples_per_s"] / paper[f"kv_batch{first}"]["samples_per_s"], 2
            )
    for mode in ("el", "kv"):  # the largest batch of each mode (dynamic caches); half of the budget each
        generator = generators[mode]
        started = time.perf_counter()
        largest, stop = paper[f"{mode}_batch{first}"], "end of the batch list"
        for batch in batches[1:]:
            if time.perf_counter() - started + 2.5 * largest["seconds"] > budget_s / 2:
                stop = f"time budget (next would be batch {batch})"
                break
            try:
                result = run_once(generator, batch, source_len, new_tokens, device, mode)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if (
                    not isinstance(e, torch.cuda.OutOfMemoryError)
                    and "out of memory" not in str(e).lower()
                    and "ALLOC_FAILED" not in str(e)
                ):
                    raise
                stop = f"out of memory at batch {batch}"
                result = None
            free(device)  # outside the except block: its traceback no longer holds the failed run's tensors
            if result is None:
                break
            largest = result
        paper[f"{mode}_largest"] = {**largest, "stopped_by": stop}
        save()
    kv_first = paper[f"kv_batch{first}"]["samples_per_s"]
    paper[f"el_largest_vs_kv_batch{first}"] = round(paper["el_largest"]["samples_per_s"] / kv_first, 2)
    paper["el_largest_vs_kv_largest"] = round(
        paper["el_largest"]["samples_per_s"] / paper["kv_largest"]["samples_per_s"], 2
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=300, help="time for the largest-batch searches")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "paper_reference": PAPER,
    }
    path = args.out / "gpu_check.json"

    def save():
        path.write_text(json.dumps(report, indent=2) + "\n")

    start = time.perf_counter()
    report["parity"] = parity(device)
    save()
    print(f"parity: {'PASS' if report['parity']['passed'] else 'FAIL'} {report['parity']}", flush=True)
    if args.smoke:
        paper_setting(device, TINY, 16, 8, [4, 8, 16], args.budget_s, report, save)
    else:
        batches = [32 * 2**i for i in range(10)]  # 32 .. 16384
        paper_setting(device, BART_LARGE, 1024, 64, batches, args.budget_s, report, save)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(report["paper_setting"], indent=2))
    return 0 if report["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
