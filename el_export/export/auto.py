"""`--mode auto`: export both decoders, time each on the workload the bundle will serve, keep the faster.

EL reads the encoder output once per input but spends h times the K/V baseline's attention-score FLOPs, and K/V
reads a copy of K and V per beam. Which costs less depends on batch, beams, lengths and the device: on 2 CPU cores
(tools/mode_sweep.py, bart-base sized) kv is up to 17% faster at batch 1 with 4 beams, el 10% faster at batch 8 x 4
beams x source 512, and el holds 8x the batch in a fixed memory budget. So the choice is measured, not modelled.
"""

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from el_export.contract.cache import Workload
from el_export.contract.files import write_manifest, writing_bundle
from el_export.contract.manifest import Manifest
from el_export.errors import InvalidArgumentError
from el_export.families import family_for
from el_export.model.models import MODES

DEFAULTS = {"batch_size": 8, "num_beams": 4, "source_len": 512, "new_tokens": 16}


def check_workload(given: dict, hf_model) -> None:
    """Refuse, before anything is exported, a workload that `resolve_workload` would refuse after the first export:
    the model's config alone decides (its positions, kind, and whether it reads audio).

    Raises:
        InvalidArgumentError: an unknown field, a count below 1, or a source past the model's positions.
    """
    family = family_for(hf_model.config)
    spec = family.spec_from_config(hf_model.config)
    _checked(given, spec.max_positions, family.kind, speech=spec.n_mels > 0)


def resolve_workload(given: dict, manifest: Manifest) -> Workload:
    """The workload to time: what was given, else the defaults (the source cut to the model's positions; a speech
    model's source is its fixed 30 s of encoder frames)."""
    values = _checked(given, manifest.dims.get("max_positions"), manifest.kind, speech=bool(manifest.audio))
    if manifest.audio:
        frames = manifest.graphs["encoder"].input("input_features").shape[2]
        return Workload(**{**values, "source_len": frames // 2})  # the encoder's stride-2 convolution
    return Workload(**values)


def _checked(given: dict, max_positions: int | None, kind: str, speech: bool) -> dict:
    """The workload's fields (defaults filled in, a text source cut to fit the positions), each checked."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise InvalidArgumentError(f"auto mode: unknown workload fields {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    values = {**DEFAULTS, **given}
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"auto mode: {name} must be a positive integer, got {value!r}")
    if speech:
        if "source_len" in given:
            raise InvalidArgumentError("auto mode: a speech model's source is 30 s of audio; drop --source-len")
        return values
    room = max_positions or None
    if room and kind == "decoder-only":
        room -= values["new_tokens"]
    if room and "source_len" not in given:
        values["source_len"] = min(values["source_len"], room)
    if room and values["source_len"] > room:
        raise InvalidArgumentError(
            f"auto mode: source length {values['source_len']} does not fit the model's {max_positions} "
            "positions; give a smaller --source-len"
        )
    return values


def time_bundle(bundle: Path, workload: Workload, threads: int | None = None, repeats: int = 2) -> float:
    """`time_generator` on the bundle, loaded for ONNX Runtime with `threads` (default: all cores)."""
    import el_export

    return time_generator(el_export.load(bundle, **({"threads": threads} if threads else {})), workload, repeats)


def time_generator(generator, workload: Workload, repeats: int = 2) -> float:
    """Best end-to-end seconds of `repeats` generate calls on seeded random inputs of the workload's shape, after
    a one-token warm-up at that shape; exactly `new_tokens` are generated so both modes do the same work."""
    manifest, rng = generator.manifest, torch.Generator().manual_seed(0)
    if manifest.audio:
        _, mels, frames = manifest.graphs["encoder"].input("input_features").shape
        inputs = {"input_features": torch.randn(workload.batch_size, mels, frames, generator=rng)}
    else:
        vocab = manifest.dims.get("encoder_vocab_size") or manifest.dims["vocab_size"]
        ids = torch.randint(0, vocab, (workload.batch_size, workload.source_len), generator=rng)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = {"num_beams": workload.num_beams, "min_new_tokens": workload.new_tokens,
              "max_new_tokens": workload.new_tokens}  # fmt: skip
    generator.generate(**inputs, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generator.generate(**inputs, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def export_auto(hf_model, out_dir, workload: dict | None = None, *, overwrite: bool = False, threads: int | None = None,
                **export_options) -> Manifest:  # fmt: skip
    """Export `el` and `kv`, time both on the workload (`DEFAULTS` updated by `workload`) with ONNX Runtime, and
    write the faster as the bundle at `out_dir`; its manifest's `mode_choice` records the workload and both
    timings. Both are written inside the bundle's temporary directory: a failure leaves nothing behind."""
    from el_export.export import export_model

    check_workload(workload or {}, hf_model)  # before the first export, which takes minutes on a real model
    with writing_bundle(out_dir, overwrite=overwrite) as tmp:  # both modes are exported inside it
        manifests, seconds = {}, {}
        for mode in MODES:
            manifests[mode] = export_model(hf_model, tmp / mode, mode=mode, **export_options)
            if mode == MODES[0]:
                resolved = resolve_workload(workload or {}, manifests[mode])
            seconds[mode] = round(time_bundle(tmp / mode, resolved, threads), 4)
        chosen = min(MODES, key=seconds.get)
        choice = {
            "chosen": chosen,
            "seconds": seconds,
            "workload": {k: getattr(resolved, k) for k in DEFAULTS},
            "backend": "onnxruntime",
            "threads": threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        for entry in (tmp / chosen).iterdir():
            os.replace(entry, tmp / entry.name)
        for mode in MODES:
            shutil.rmtree(tmp / mode)
        manifest = replace(manifests[chosen], mode_choice=choice)
        write_manifest(tmp, manifest)
    return manifest
