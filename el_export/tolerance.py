"""How close an exported graph must be to the PyTorch module it came from: one home for every tolerance.

Per output, |got - expected| <= atol + rtol |expected|, with atol = scale x sqrt(d) x max(1, peak |expected|) for
float32 (d: the model's width, d_model). EL regroups attention's sums (dot products over d instead of d_h), so float32
rounding grows with the output's magnitude and about sqrt(d). The scale is set against float64: the same graphs,
evaluated in float64, are the reference, and the check compares two float32 evaluations (PyTorch and ONNX Runtime)
whose errors can add. `tools/el_precision.py` measures max |float32 - float64| / peak, PyTorch + ONNX Runtime,
divided by sqrt(d) (el graphs, seeded random BARTs, 2 layers per stack, ffn 4d, export's check shapes):

    .venv/bin/python tools/el_precision.py --onnx --widths 768:12 1024:16 128:4 256:8 --init-std 0.02 0.1 0.5
    .venv/bin/python tools/el_precision.py --onnx --widths 32:4 64:4 128:4 --init-std 0.5 --seeds 0 1 2 3 --modes el

| d / heads | init std 0.02 | init std 0.1 | init std 0.5 (the tiny test models' init) |
|-----------|---------------|--------------|-------------------------------------------|
| 32 / 4    |               |              | 5.7e-6 (worst of seeds 0-3)               |
| 64 / 4    |               |              | 7.3e-6 (worst of seeds 0-3)               |
| 128 / 4   | 5.3e-8        | 1.4e-7       | 5.8e-5 (seeds 0-3: 1.6e-6 to 5.8e-5)      |
| 256 / 8   | 5.5e-8        | 4.9e-7       | 4.6e-5                                    |
| 768 / 12  | 2.9e-8        | 6.3e-7       | 6.8e-4                                    |
| 1024 / 16 | 2.6e-8        | 2.2e-6       | 1.3e-5                                    |

The float32 scale, 3e-5, is 14x the worst figure with realistic weights (init std <= 0.1) at every width and 4x the
tiny test models' (d 32, 64); the ~1e-3 of peak it allows at d = 1024 is still far below a wiring error (O(peak)).
Weights as large as init std 0.5 at d >= 128 saturate attention: a rounding-sized change of a score flips which key
wins, so float32 itself lands anywhere up to ~2e-2 of peak from float64, depending on the seed; the check refuses
such a model until the user accepts its error with --atol. The K/V graphs, which sum over d_h, measure at most 2.1e-5
(d 768, init std 0.5). Token parity with HF is checked separately and exactly.

float16 graphs are compared with the float16 PyTorch module, whose own rounding differs from ONNX
Runtime's (accumulation order, fused kernels): on the tiny T5 (init factor 4, activations ~15)
the two sit up to ~5% of peak apart, so the float16 check is a wiring check (a wrong graph is off by
O(peak)), not a precision claim; its atol does not grow with d.

TensorRT engines are compared with ONNX Runtime running the same graph, with the tolerances of the
engine's precision (an fp16 engine of a float32 graph: float16's).
"""

from dataclasses import dataclass

import numpy as np

# scale x width**width_power x max(1, peak) is the atol; rtol as given.
GRAPH_TOLERANCE = {
    "float32": {"scale": 3e-5, "width_power": 0.5, "rtol": 1e-3},
    "float16": {"scale": 1e-1, "width_power": 0.0, "rtol": 5e-2},
    "bfloat16": {"scale": 2e-1, "width_power": 0.0, "rtol": 1e-1},  # 8 significant bits to fp16's 11 (TensorRT)
}
DEFAULT_WIDTH = 1024  # the widest measured, for callers that do not pass the model's d_model
SCORE_TOLERANCE = 1e-4  # |sequences_scores - HF generate's|, fp32
# The tests' other bounds, here so that no test declares its own:
BLOCK_TOLERANCE = 1e-5  # fp32 max abs, EL block vs the standard block (and our modules vs HF's) on the same weights
SEARCH_SCORE_TOLERANCE = 1e-5  # our search vs HF's on the very same logits: only the search's own float ops differ
REBATCHED_SCORE_TOLERANCE = 1e-5  # one input's scores when batched with other inputs (padding reorders the sums)


def graph_atol(references, dtype: str, width: int = DEFAULT_WIDTH) -> float:
    """The absolute tolerance for one output, from its reference values (one array or several) and the model's
    width (d_model)."""
    arrays = references if isinstance(references, list | tuple) else [references]
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    tol = GRAPH_TOLERANCE[dtype]
    return tol["scale"] * width ** tol["width_power"] * max(1.0, peak)


@dataclass(frozen=True)
class Closeness:
    """One output of one run against its reference: within tolerance, the worst error, where, and the bounds."""

    ok: bool
    error: float  # max |got - expected|
    where: tuple  # the index of that element (empty for a shape mismatch or an empty output)
    atol: float
    rtol: float

    def __str__(self) -> str:
        at = f" at {list(self.where)}" if self.where else ""
        return f"max abs error {self.error:.3g}{at}, tolerance atol {self.atol:.3g} + rtol {self.rtol:g} x |expected|"


def graph_close(got: np.ndarray, expected: np.ndarray, dtype: str, width: int = DEFAULT_WIDTH,
                atol: float | None = None, rtol: float | None = None) -> Closeness:  # fmt: skip
    """Whether one output of one run is within tolerance: tolerance.py's for `dtype` and `width`, or the `atol` /
    `rtol` given instead."""
    atol = graph_atol(expected, dtype, width) if atol is None else atol
    rtol = GRAPH_TOLERANCE[dtype]["rtol"] if rtol is None else rtol
    if got.shape != expected.shape:
        return Closeness(False, float("inf"), (), atol, rtol)
    if not got.size:
        return Closeness(True, 0.0, (), atol, rtol)
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    ok = bool(np.all(diff <= atol + rtol * np.abs(expected)))  # NaN anywhere fails
    return Closeness(ok, float(diff[where]), where, atol, rtol)
