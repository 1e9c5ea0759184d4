"""How close an exported graph must be to the PyTorch module it came from: one home for every tolerance.

Per output, |a - b| <= atol + rtol |b| with atol = scale x the output's peak magnitude. EL regroups
sums (dot products of width d instead of d_h), so fp32 rounding grows with magnitude: on the tiny
test models (init std 0.5) fp32 PyTorch EL itself sits ~2e-5 x peak from a float64 evaluation, the
K/V path ~4e-6 x peak. Token parity with HF is checked separately and exactly.

float16 graphs are compared with the float16 PyTorch module, whose own rounding differs from ONNX
Runtime's (accumulation order, fused kernels): on the tiny T5 (init factor 4, activations ~15)
the two sit up to ~5% of peak apart, so the float16 check is a wiring check (a wrong graph is off by
O(peak)), not a precision claim.

TensorRT engines are compared with ONNX Runtime running the same graph, with the tolerances of the
engine's precision (an fp16 engine of a float32 graph: float16's).
"""

import numpy as np

GRAPH_TOLERANCE = {
    "float32": {"scale": 5e-5, "rtol": 1e-3},
    "float16": {"scale": 1e-1, "rtol": 5e-2},
    "bfloat16": {"scale": 2e-1, "rtol": 1e-1},  # 8 significant bits to fp16's 11: a wiring check too (TensorRT)
}
SCORE_TOLERANCE = 1e-4  # |sequences_scores - HF generate's|, fp32


def graph_atol(references, dtype: str) -> float:
    """The absolute tolerance for one output, from its reference values (one array or several)."""
    arrays = references if isinstance(references, list | tuple) else [references]
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    return GRAPH_TOLERANCE[dtype]["scale"] * max(1.0, peak)


def graph_close(got: np.ndarray, expected: np.ndarray, dtype: str) -> tuple[bool, float]:
    """(within tolerance, max abs error) for one output of one run."""
    if got.shape != expected.shape:
        return False, float("inf")
    error = float(np.abs(got - expected).max()) if got.size else 0.0
    ok = np.allclose(got, expected, atol=graph_atol(expected, dtype), rtol=GRAPH_TOLERANCE[dtype]["rtol"])
    return bool(ok), error
