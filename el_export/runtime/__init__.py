"""Runtime backends: each runs a bundle's graphs on torch tensors, behind one interface.

Backends are imported lazily by name, so the package imports without their dependencies; a
backend whose package is missing says what to install.
"""

import importlib

from el_export.errors import BackendError
from el_export.runtime.base import Backend

BACKENDS = {  # name -> (module, class, what to install when its import fails)
    "onnxruntime": ("el_export.runtime.onnxruntime", "OnnxRuntimeBackend", "pip install onnxruntime"),
    "tensorrt": ("el_export.runtime.tensorrt", "TensorRTBackend", "pip install tensorrt (on a GPU host)"),
}


def make_backend(name: str, bundle_dir, manifest, **options) -> Backend:
    """Instantiate backend `name` for a bundle.

    Raises:
        BackendError: unknown backend name, or its package is not installed.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(f"backend {name!r} needs a package that is not installed ({e.name}): {install}") from None
    return getattr(module, class_name)(bundle_dir, manifest, **options)
