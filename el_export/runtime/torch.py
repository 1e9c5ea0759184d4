"""PyTorch backend: runs the very graph modules that export turns into ONNX, on CPU or CUDA.

Built from the checkpoint through the same family and graph code as export, so what it computes is
what the bundle computes; the search code is the same as for every backend. Caches stay on the
device; fp16 / bf16 by casting the modules (logits stay fp32, as in the graphs).
"""

import torch
from torch import nn

from el_export.bundle import Manifest
from el_export.errors import BackendError, InvalidArgumentError
from el_export.runtime.base import Backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, graphs: list[nn.Module], manifest: Manifest, device: str = "cpu"):
        super().__init__(None, manifest, device)
        self.graphs = {g.name: g for g in graphs}

    def _run_impl(self, graph_name, feeds, axes):
        graph = self.graphs[graph_name]
        with torch.no_grad():
            out = graph(*(feeds[spec.name] for spec in graph.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {spec.name: tensor for spec, tensor in zip(graph.outputs, out, strict=True)}


def load_torch(model, mode: str = "el", device: str = "cpu", dtype: str = "float32", tokenizer=None):
    """A Generator that runs the EL (or K/V) step modules in PyTorch.

    Args:
        model: a checkpoint directory (or hub id) or a loaded `transformers` model.
        mode: "el" or "kv".
        device: "cpu", "cuda" or "cuda:N".
        dtype: "float32", "float16" or "bfloat16" for weights and activations.
        tokenizer: an HF fast tokenizer for `generate_text` (loaded with the checkpoint when a path).

    Raises:
        InvalidArgumentError, BackendError, CheckpointError, UnsupportedModelError.
    """
    from el_export.export import describe, load_checkpoint
    from el_export.families import build_from_hf
    from el_export.generator import Generator
    from el_export.graphs import graphs_for
    from el_export.seq2seq import MODES
    from el_export.tokenizer import Tokenizer

    if mode not in MODES:
        raise InvalidArgumentError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("the torch backend was asked for CUDA, but torch sees no CUDA device here")
    if isinstance(model, str):
        model, tokenizer = load_checkpoint(model)
    built, family = build_from_hf(model)
    built = built.to(device=device, dtype=DTYPES[dtype])
    graphs = [g.eval() for g in graphs_for(built, mode)]
    manifest = describe(model, graphs, family)
    backend = TorchBackend(graphs, manifest, device=str(device))
    return Generator(manifest, backend, tokenizer=Tokenizer.from_hf(tokenizer, manifest))
