"""Tensor dtypes as the manifest spells them: the one table of names, sizes and torch / numpy types.

torch and numpy are imported on use, so reading a manifest needs neither.
"""

NAMES = ("int64", "float32", "float16", "bfloat16", "int8")  # int8: an int8 bundle's quantized encoder output
FLOAT_NAMES = ("float32", "float16", "bfloat16")
BYTES = {"int64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def torch_dtype(name: str):
    """The torch dtype of a manifest dtype name."""
    import torch

    return getattr(torch, name)


def name_of(dtype) -> str:
    """The manifest name of a torch (or numpy) dtype: `torch.float16` -> "float16"."""
    return str(dtype).removeprefix("torch.")


def numpy_dtype(name: str) -> type:
    """The numpy scalar type of a manifest dtype name (numpy has no bfloat16: such tensors are bound by torch alone)."""
    import numpy as np

    if name == "bfloat16":
        raise ValueError("numpy has no bfloat16")
    return np.dtype(name).type
