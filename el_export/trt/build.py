"""`el-export build`: a bundle's ONNX graphs -> TensorRT engines in `engines/`, through Polygraphy's loaders.

One engine per graph (`engines/encoder.plan` + `engines/decoder_step.plan`, or `prefill.plan`), each
with one optimization profile computed from the manifest and the user's limits. The engines appear
together or not at all (built in a temporary directory that replaces `engines/`), then the manifest
records them: files with their sha256, profiles, precision, TensorRT version and GPU.
"""

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from el_export.contract.files import file_entries, read_manifest, write_manifest, writing_bundle
from el_export.contract.manifest import MANIFEST, Manifest
from el_export.errors import BackendError, InvalidArgumentError, first_line
from el_export.trt.precision import PRECISIONS, PrecisionPlan, fp32_tensors, hold_fp32, plan_precision
from el_export.trt.profiles import Limits, axis_ranges, graph_profiles

ENGINES = "engines"
INSTALL = "on a GPU host, pip install tensorrt (and onnxruntime-gpu instead of onnxruntime; README: TensorRT)"


def import_tensorrt():
    """The tensorrt module, or a BackendError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed here ({e.name}): {INSTALL}") from None
    return tensorrt


def build_engines(
    bundle_dir: str | os.PathLike,
    precision: str | None = None,
    limits: Limits | None = None,
    workspace: int | None = None,
) -> Manifest:
    """Build a TensorRT engine for every graph of a bundle and record them in its manifest.

    Args:
        bundle_dir: a bundle written by `el-export export`.
        precision: "fp32", "fp16" or "bf16"; None: the bundle's own dtype.
        limits: the largest workload the engines must run (default `Limits()`).
        workspace: TensorRT's workspace memory pool limit in bytes (None: TensorRT's default).

    Returns:
        The updated manifest.

    Raises:
        BundleError: the bundle is missing or corrupted.
        InvalidArgumentError: limits past the model's positions, or a precision this bundle cannot give.
        BackendError: TensorRT or a GPU is missing, or TensorRT could not build a graph.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if manifest.quantization:
        raise InvalidArgumentError(
            f"{bundle_dir} holds ONNX Runtime int8 graphs (com.microsoft integer ops), which TensorRT's parser "
            "does not take; build from a float32 or float16 export"
        )
    limits = limits or Limits()
    profiles = graph_profiles(manifest, limits)
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise BackendError("building TensorRT engines needs an NVIDIA GPU, and none is visible here")
    own = next(p for p, d in PRECISIONS.items() if d == manifest.dtype)
    plan = plan_precision(manifest, precision or own, trt.__version__, manifest.fp32_modules.get("patterns", ()))
    pinned = {}
    with writing_bundle(bundle_dir / ENGINES, overwrite=True) as tmp:
        for name, graph in manifest.graphs.items():
            pinned[name] = build_engine(bundle_dir / graph.file, tmp / f"{name}.plan", profiles[name], plan, workspace)
        engine_files = {f"{ENGINES}/{k}": v for k, v in file_entries(tmp).items()}
    gpu = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    files = {k: v for k, v in manifest.files.items() if not k.startswith(f"{ENGINES}/")}
    engines = engines_record(manifest, plan, limits, trt.__version__, gpu, _fp32_record(manifest, plan, pinned))
    updated = replace(manifest, files={**files, **engine_files}, engines=engines)
    _replace_manifest(bundle_dir, updated)
    return updated


def engines_record(
    manifest: Manifest, plan: PrecisionPlan, limits: Limits, tensorrt_version: str, gpu: dict, fp32: dict
) -> dict:
    """The manifest's `engines` entry: what was built, for which GPU, and the profile of every graph."""
    return {
        "precision": plan.precision,
        "typing": "strong" if plan.strongly_typed else "weak",
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        "limits": limits.to_json(),
        "axes": {axis: list(r) for axis, r in axis_ranges(manifest, limits).items()},
        "fp32": fp32,
        "graphs": {
            name: {"file": f"{ENGINES}/{name}.plan", "profile": profile}
            for name, profile in graph_profiles(manifest, limits).items()
        },
    }


def build_engine(onnx_path: Path, plan_path: Path, profile: dict, plan: PrecisionPlan, workspace: int | None) -> int:
    """Build and save one engine; returns the number of layers pinned to fp32 (weak typing)."""
    import tensorrt as trt
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessNetwork,
        Profile,
    )
    from polygraphy.exception import PolygraphyException

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan.strongly_typed)
    pinned = []
    if plan.keep_fp32:
        seeds, names = fp32_tensors(onnx_path, plan.keep_fp32)
        network = PostprocessNetwork(
            network, lambda network: pinned.append(hold_fp32(trt, network, seeds, names)), name="hold fp32 modules"
        )
    trt_profile = Profile()
    for name, shapes in profile.items():
        trt_profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    config = CreateConfig(
        fp16=plan.flag == "fp16",
        bf16=plan.flag == "bf16",
        profiles=[trt_profile],
        precision_constraints="obey" if plan.keep_fp32 else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace} if workspace else None,
    )
    try:
        SaveBytes(EngineBytesFromNetwork(network, config=config), str(plan_path))()
    except PolygraphyException as e:
        first = first_line(e)
        raise BackendError(f"TensorRT could not build {onnx_path.name}: {first}") from None
    return sum(pinned)


def _fp32_record(manifest: Manifest, plan: PrecisionPlan, pinned: dict[str, int]) -> dict:
    """What stays fp32 in reduced-precision engines, and how."""
    if plan.precision == "fp32":
        return {}
    if plan.strongly_typed:  # the graphs' own types: export cast the modules
        return {**manifest.fp32_modules, "how": "graph types"} if manifest.fp32_modules else {}
    if not plan.keep_fp32:
        return {}
    return {
        "modules": list(plan.keep_fp32),
        "reason": manifest.fp32_modules.get("reason", ""),
        "how": "layer precision constraints",
        "layers": pinned,
    }


def _replace_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write the manifest beside the old one, then swap it in (one rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=".manifest-", dir=bundle_dir))
    try:
        write_manifest(tmp, manifest)
        os.replace(tmp / MANIFEST, bundle_dir / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
