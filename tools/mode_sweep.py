"""Where does `kv` beat `el`? End-to-end time of both bundles of one model over a grid of workloads, in one process.

    .venv/bin/python tools/mode_sweep.py graphs/bench/bart-el graphs/bench/bart-kv

The bundles come from `el-export bench` (its --work folder) or `el-export export --mode el|kv`. Each point runs
both modes (best of --repeats after a warm-up) on the same random inputs, exactly --new-tokens generated, and
prints el/kv. `el-export export --mode auto` makes this measurement for one workload and keeps the faster mode.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

import el_export


def timed(generator, ids, beams: int, new_tokens: int, repeats: int) -> float:
    kwargs = dict(num_beams=beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    generator.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **{**kwargs, "max_new_tokens": 2,
                       "min_new_tokens": 2})  # fmt: skip
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generator.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("el", type=Path)
    parser.add_argument("kv", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--source", default="64,512")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per point")
    args = parser.parse_args()
    generators = {mode: el_export.load(path, threads=args.threads) for mode, path in (("el", args.el), ("kv", args.kv))}
    vocab = generators["el"].manifest.dims["vocab_size"]
    print("| batch | beams | source | el s | kv s | el/kv |\n|---|---|---|---|---|---|")
    for batch, beams, source in itertools.product(*(map(int, s.split(",")) for s in (args.batch, args.beams,
                                                                                      args.source))):  # fmt: skip
        ids = torch.randint(4, vocab - 1, (batch, source), generator=torch.Generator().manual_seed(batch + source))
        el, kv = (timed(generators[mode], ids, beams, args.new_tokens, args.repeats) for mode in ("el", "kv"))
        print(f"| {batch} | {beams} | {source} | {el:.2f} | {kv:.2f} | {el / kv:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
