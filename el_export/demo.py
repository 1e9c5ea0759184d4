"""`el-export demo`: the main job end to end on the embedded default.

Until a real checkpoint is embedded, the default is a seeded tiny random-init BART (its text is
gibberish): a checkpoint is written, exported in `el` and `kv` modes, both bundles generate with
beam search, their tokens are checked against HF `generate`, and time and cache bytes are shown.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from el_export.cache import Workload, cache_bytes
from el_export.progress import Steps
from el_export.tiny import CORPUS, write_tiny_checkpoint


@dataclass
class DemoRow:
    text: str
    output: str
    same_as_hf: bool
    seconds: dict[str, float]  # mode -> generate time of this input
    cache_bytes: dict[str, int]  # mode -> decoder state at the end (formula)


def run_demo(out_dir: Path, num_beams: int = 4, max_new_tokens: int = 24, progress: bool = True) -> list[DemoRow]:
    import el_export
    from el_export.export import export_model, load_checkpoint

    steps = Steps(["checkpoint", "export el", "export kv", "generate"], enabled=progress)
    with steps:
        steps.start("checkpoint", "writing the embedded default: a seeded tiny random-init BART")
        checkpoint = write_tiny_checkpoint(out_dir / "tiny-bart")
        hf_model, tokenizer = load_checkpoint(str(checkpoint))
        generators = {}
        for mode in ("el", "kv"):
            steps.start(f"export {mode}", f"exporting the {mode} bundle")
            bundle = out_dir / f"tiny-bart-{mode}"
            export_model(hf_model, bundle, mode=mode, tokenizer=tokenizer, overwrite=True, progress=False)
            generators[mode] = el_export.load(bundle)
        steps.start("generate", f"generating with {num_beams} beams and checking against HF generate")
        rows = []
        kwargs = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
        for text in CORPUS:
            seconds, costs, sequences = {}, {}, {}
            for mode, generator in generators.items():
                ids, mask = generator.tokenizer.encode([text])
                start = time.perf_counter()
                out = generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
                seconds[mode] = time.perf_counter() - start
                sequences[mode] = out.sequences
                workload = Workload(1, num_beams, ids.shape[1], out.sequences.shape[1])
                costs[mode] = cache_bytes(mode, generator.manifest.dims, workload, kind=generator.manifest.kind).total
            with torch.no_grad():
                ref = hf_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            same = all(torch.equal(s, ref) for s in sequences.values())
            output = generators["el"].tokenizer.decode(sequences["el"])[0]
            rows.append(DemoRow(text, output, same, seconds, costs))
        steps.done()
    return rows
