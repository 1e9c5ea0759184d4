"""The step decoder over a bundle's `decoder_step` graph, for any backend, mode and model kind.

Driven by the manifest: step inputs named `past_*` are caches fed back from the matching
`present_*` outputs and gathered on the device when beams reorder; they start empty, or from the
context (a decoder-only prompt's K/V). `position_ids` advance by one per step. Every other input is
context from the encoder or the prefill: context on the "batch" axis is passed once per input (EL:
the encoder output, or the prompt's hidden states, is never repeated per beam); context on the
"rows" axis (the K/V baseline's cross K/V, prompt K/V and masks) is repeated per row once, at start.
A context holding `logits` (a prefill's) gives the first token's logits; otherwise the decoder
prompt is fed one token per step.
"""

import torch

from el_export.contract.dtypes import torch_dtype
from el_export.runtime.base import Backend


class GraphDecoder:
    """Implements `el_export.search.decoder.StepDecoder` on a backend."""

    def __init__(self, backend: Backend, context: dict[str, torch.Tensor]):
        self.backend = backend
        self.graph = backend.manifest.graphs["decoder_step"]
        self.context = context
        self.state: dict[str, torch.Tensor] = {}

    def start(self, prompt_ids: torch.Tensor, rows_per_input: int) -> torch.Tensor:
        k = rows_per_input
        B = prompt_ids.shape[0]
        device = self.backend.device
        self.state = {}
        for spec in self.graph.inputs:
            if spec.name == "input_ids":
                continue
            if spec.name.startswith("past_") and spec.name not in self.context:
                shape = [0 if a == "past" else B * k if a == "rows" else a for a in spec.shape]
                self.state[spec.name] = torch.zeros(shape, dtype=torch_dtype(spec.dtype), device=device)
            elif "rows" in spec.shape:
                self.state[spec.name] = self.context[spec.name].repeat_interleave(k, dim=spec.shape.index("rows"))
            else:
                self.state[spec.name] = self.context[spec.name]
        if "logits" in self.context:  # the prompt already ran (decoder-only prefill)
            return self.context["logits"].repeat_interleave(k, dim=0)
        rows = prompt_ids.to(device).repeat_interleave(k, dim=0)  # [N, P]
        for p in range(rows.shape[1]):
            logits = self.step(rows[:, p : p + 1])
        return logits

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        outputs = self.backend.run("decoder_step", {"input_ids": input_ids, **self.state})
        for name in self.state:
            if name.startswith("past_"):
                self.state[name] = outputs["present_" + name.removeprefix("past_")]
        if "position_ids" in self.state:
            self.state["position_ids"] = self.state["position_ids"] + 1
        return outputs["logits"]

    def cache_bytes(self) -> int:
        """Bytes of the cache the next step reads: self-attention caches, cross K/V or the encoder output (a
        decoder-only prompt's hidden states or K/V), each held once; masks and positions are not cache. What the
        cache formula (`el_export.contract.cache.cache_bytes`) predicts, measured on the live tensors."""
        return sum(t.nbytes for t in self.state.values() if t.is_floating_point())

    def reorder(self, row_indices: torch.Tensor) -> None:
        row_indices = row_indices.to(self.backend.device)
        for spec in self.graph.inputs:
            if spec.name.startswith("past_"):
                self.state[spec.name] = self.state[spec.name].index_select(spec.shape.index("rows"), row_indices)
