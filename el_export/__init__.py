"""el-export: EL-attention decoders exported to ONNX / TensorRT, with a search runtime.

The top level imports nothing heavy; `load` pulls in the runtime on first use.
"""

from el_export.errors import (
    BackendError,
    BundleError,
    CheckpointError,
    ElExportError,
    ExportError,
    InputError,
    InvalidArgumentError,
    ResourceError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "CheckpointError",
    "ElExportError",
    "ExportError",
    "InputError",
    "InvalidArgumentError",
    "ResourceError",
    "UnsupportedModelError",
    "__version__",
    "load",
]


def load(bundle_dir, backend: str = "onnxruntime", **backend_options):
    """Load an exported bundle for generation.

    Args:
        bundle_dir: directory written by `el-export export`.
        backend: "onnxruntime" (default); further backends register in `el_export.runtime`.
        **backend_options: passed to the backend (for example `device`, `threads`).

    Returns:
        A `Generator` with `generate(...)` (HF `generate` semantics) and `generate_text(...)`.

    Raises:
        BundleError: the bundle is missing, corrupted or of another format version.
        BackendError: the backend is unknown or its package is not installed.
    """
    from el_export.runtime.generator import Generator

    return Generator.from_bundle(bundle_dir, backend=backend, **backend_options)
