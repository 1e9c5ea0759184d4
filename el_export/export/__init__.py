"""Export: the only part of el-export that touches `transformers`, `onnx` and `onnxscript`.

`checkpoint` reads a Hugging Face checkpoint; `graphs` wraps the shared modules as graphs with IO contracts;
`onnx` exports, checks and writes the bundle; `auto` times both modes; `importers/` turns other formats into
checkpoints.
"""

from el_export.export.checkpoint import checkpoint_directory, load_checkpoint, load_feature_extractor
from el_export.export.onnx import check_options, describe, export_model

__all__ = [
    "check_options",
    "checkpoint_directory",
    "describe",
    "export_model",
    "load_checkpoint",
    "load_feature_extractor",
]
