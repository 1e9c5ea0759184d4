"""The step decoder over a bundle's `decoder_step` graph, for any backend, mode and model kind.

Driven by the manifest: step inputs named `past_*` are caches fed back from the matching
`present_*` outputs and gathered on the device when beams reorder; they start empty, or from the
context (a decoder-only prompt's K/V). `past_mask` (1 on a cache's real entries, 0 on padding)
gains a column of ones per step; it starts empty, or as the prompt's mask where the past is the
prompt's K/V. `position_ids` advance by one per step. Every other input is context from the encoder
or the prefill: context on the "batch" axis is passed once per input (EL: the encoder output, or the
prompt's hidden states, is never repeated per beam); context on the "rows" axis (the K/V baseline's
cross K/V, prompt K/V and masks) is repeated per row once, at start. A context holding `logits` (a
prefill's) gives the first token's logits; otherwise the decoder prompt is fed one token per step.

A running batch (`merge`, `reorder` with `input_indices`) pads each state tensor to the longer of two
along its variable axis: caches on the left (the index distance between real entries stays the
tokens' own, which T5's relative bias reads), encoder outputs and prompts on the right; masks mark
the padding, which is never attended.
"""

import torch
import torch.nn.functional as F

from el_export.contract.dtypes import torch_dtype
from el_export.errors import InvalidArgumentError
from el_export.runtime.base import Backend

LEFT_PADDED = ("past", "context")  # cache axes
RIGHT_PADDED = ("source", "prompt")  # encoder output and decoder-only prompt axes


def pad_to(tensor: torch.Tensor, axis: int, size: int, left: bool) -> torch.Tensor:
    """Zeros added along `axis` (before the entries when `left`) up to `size`."""
    missing = size - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    zeros = tensor.new_zeros(shape)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=axis)


def merge_tensors(first: torch.Tensor, second: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Two decoders' tensors of one input, `shape` its contract's axes: each padded to the longer of the two along
    every variable axis, then the second's rows (or inputs) after the first's."""
    for axis, name in enumerate(shape):
        if name in LEFT_PADDED or name in RIGHT_PADDED:
            size = max(first.shape[axis], second.shape[axis])
            first, second = (pad_to(t, axis, size, left=name in LEFT_PADDED) for t in (first, second))
    along = shape.index("rows") if "rows" in shape else shape.index("batch")
    return torch.cat([first, second], dim=along)


def check_mergeable(decoder, other) -> None:
    """Raises InvalidArgumentError unless `other` can join `decoder`'s running batch."""
    if type(other) is not type(decoder) or other.backend is not decoder.backend:
        raise InvalidArgumentError("merge joins decoders of one backend; start the new inputs on the same backend")
    if other.k != decoder.k:
        raise InvalidArgumentError(
            f"merge joins decoders with the same rows per input, got {decoder.k} and {other.k}; start both with one k"
        )


def is_row_cache(name: str) -> bool:
    """A per-row self-attention cache: the only state the rows (beams) of one input do not share."""
    return name.startswith("past_") and name != "past_mask"


class GraphDecoder:
    """Implements `el_export.search.decoder.RunningDecoder` on a backend."""

    def __init__(self, backend: Backend, context: dict[str, torch.Tensor]):
        self.backend = backend
        self.graph = backend.manifest.graphs["decoder_step"]
        self.specs = {spec.name: spec for spec in self.graph.inputs if spec.name != "input_ids"}  # the state's
        self.context = context
        self.state: dict[str, torch.Tensor] = {}
        self.k = 0

    @property
    def rows(self) -> int:
        return self.state["past_mask"].shape[0]

    @property
    def inputs(self) -> int:
        return self.rows // self.k

    def start(
        self, prompt_ids: torch.Tensor, rows_per_input: int, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = self.k = rows_per_input
        B = prompt_ids.shape[0]
        device = self.backend.device
        # A decoder prompt runs once per input (its k rows would compute the same), and is copied to k rows after.
        fed = k if "logits" in self.context else 1
        self.state = {}
        for name, spec in self.specs.items():
            if name == "past_mask" and "context" in spec.shape:  # the past is the prompt's K/V (decoder-only)
                self.state[name] = self.context["prompt_mask"].repeat_interleave(fed, dim=0)
            elif name.startswith("past_") and name not in self.context:
                shape = [0 if a == "past" else B * fed if a == "rows" else a for a in spec.shape]
                self.state[name] = torch.zeros(shape, dtype=torch_dtype(spec.dtype), device=device)
            elif "rows" in spec.shape:
                self.state[name] = self.context[name].repeat_interleave(fed, dim=spec.shape.index("rows"))
            else:
                self.state[name] = self.context[name]
        context, self.context = self.context, {}  # the state holds what is needed: dropped inputs are freed
        if "logits" in context:  # the prompt already ran (decoder-only prefill)
            return context["logits"].repeat_interleave(k, dim=0)
        rows = prompt_ids.to(device)  # [B, P]
        real = None if prompt_mask is None else prompt_mask.to(device)
        for p in range(rows.shape[1]):
            logits = self.step(rows[:, p : p + 1])
            if real is not None:  # a padding token's entry is never attended; positions count real entries
                self.state["past_mask"][:, -1] = real[:, p]
        if k > 1:
            for name, spec in self.specs.items():
                if "rows" in spec.shape:
                    self.state[name] = self.state[name].repeat_interleave(k, dim=spec.shape.index("rows"))
        return logits.repeat_interleave(k, dim=0)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step_outputs(input_ids)["logits"]

    def step_outputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`step`, returning every output of the graph (word timestamps read the alignment heads' attention)."""
        outputs = self.backend.run("decoder_step", {"input_ids": input_ids, **self.state})
        for name in self.state:
            if is_row_cache(name):
                self.state[name] = outputs["present_" + name.removeprefix("past_")]
        self.state["past_mask"] = F.pad(self.state["past_mask"], (0, 1), value=1)  # the new token is real
        if "position_ids" in self.state:
            self.state["position_ids"] = self.state["position_ids"] + 1
        return outputs

    def cache_bytes(self) -> int:
        """Bytes of the cache the next step reads: self-attention caches, cross K/V or the encoder output (a
        decoder-only prompt's hidden states or K/V), each held once; masks and positions are not cache. What the
        cache formula (`el_export.contract.cache.cache_bytes`) predicts, measured on the live tensors."""
        return sum(t.nbytes for t in self.state.values() if t.is_floating_point() or t.dtype == torch.int8)

    def reorder(self, row_indices: torch.Tensor, input_indices: torch.Tensor | None = None) -> None:
        """See `StepDecoder.reorder`. A beam reorder (inputs kept) gathers the row caches only: the rows of one
        input share their context, mask and position."""
        rows = row_indices.to(self.backend.device)
        inputs = None if input_indices is None else input_indices.to(self.backend.device)
        for name, spec in self.specs.items():
            if "rows" in spec.shape and (inputs is not None or is_row_cache(name)):
                self.state[name] = self.state[name].index_select(spec.shape.index("rows"), rows)
            elif "batch" in spec.shape and inputs is not None:
                self.state[name] = self.state[name].index_select(spec.shape.index("batch"), inputs)

    def merge(self, other: "GraphDecoder") -> None:
        """See `RunningDecoder.merge`."""
        check_mergeable(self, other)
        for name, spec in self.specs.items():
            self.state[name] = merge_tensors(self.state[name], other.state[name], spec.shape)
