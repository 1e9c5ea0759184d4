"""Where does `kv` beat `el`? End-to-end time of both bundles of one model over a grid of workloads, in one process.

    .venv/bin/python tools/mode_sweep.py graphs/bench/bart-el graphs/bench/bart-kv

The bundles come from `el-export bench` (its --work folder) or `el-export export --mode el|kv`. Each point runs
both modes with `el_export.export.auto.time_generator` (best of --repeats after a warm-up, the same seeded inputs,
exactly --new-tokens generated) and prints el/kv: the measurement `el-export export --mode auto` makes for one
workload before keeping the faster mode.
"""

import argparse
import itertools
import sys
from pathlib import Path

import el_export
from el_export.contract.cache import Workload
from el_export.export.auto import time_generator


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
    print("| batch | beams | source | el s | kv s | el/kv |\n|---|---|---|---|---|---|")
    for batch, beams, source in itertools.product(*(map(int, s.split(",")) for s in (args.batch, args.beams,
                                                                                      args.source))):  # fmt: skip
        workload = Workload(batch, beams, source, args.new_tokens)
        el, kv = (time_generator(generators[mode], workload, args.repeats) for mode in ("el", "kv"))
        print(f"| {batch} | {beams} | {source} | {el:.2f} | {kv:.2f} | {el / kv:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
