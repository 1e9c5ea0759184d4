"""Symbolic axes: bind a graph's axes ("batch", "rows", "past", ...) to sizes from its inputs, and size its
outputs from them ("past+1")."""

import re

from el_export.contract.dtypes import torch_dtype
from el_export.contract.manifest import GraphEntry
from el_export.errors import BackendError

_DERIVED = re.compile(r"^(\w+)\+(\d+)$")  # "past+1": an axis defined by another one


def resolve_axes(graph: GraphEntry, feeds: dict, graph_name: str) -> dict[str, int]:
    """Bind every symbolic axis of a graph's inputs (name -> torch tensor) to a size, checking that they agree."""
    axes: dict[str, int] = {}
    for spec in graph.inputs:
        tensor = feeds.get(spec.name)
        if tensor is None:
            raise BackendError(f"{graph_name}: input {spec.name!r} was not given")
        if tensor.dtype != torch_dtype(spec.dtype):
            raise BackendError(f"{graph_name}: input {spec.name!r} is {tensor.dtype}, the graph takes {spec.dtype}")
        if tensor.dim() != len(spec.shape):
            raise BackendError(
                f"{graph_name}: input {spec.name!r} has {tensor.dim()} dims, expected {list(spec.shape)}"
            )
        for axis, size in zip(spec.shape, tensor.shape, strict=True):
            if isinstance(axis, int):
                if size != axis:
                    raise BackendError(
                        f"{graph_name}: input {spec.name!r} has size {size} where the graph fixes {axis}"
                    )
            elif axes.setdefault(axis, size) != size:
                raise BackendError(
                    f"{graph_name}: axis {axis!r} is {size} in {spec.name!r} but {axes[axis]} in an earlier input"
                )
    return axes


def output_shape(shape: tuple, axes: dict[str, int]) -> list[int]:
    out = []
    for axis in shape:
        if isinstance(axis, int):
            out.append(axis)
        elif axis in axes:
            out.append(axes[axis])
        elif (m := _DERIVED.match(axis.replace(" ", ""))) and m.group(1) in axes:
            out.append(axes[m.group(1)] + int(m.group(2)))
        else:
            raise BackendError(f"output axis {axis!r} cannot be derived from the inputs")
    return out
