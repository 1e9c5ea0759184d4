"""TensorRT optimization profiles, computed from a bundle's graph contracts and the user's limits.

Each symbolic axis of the contracts gets one range (min, opt, max), and every graph input's profile
follows from the axes it names: the same axis has the same range in every graph. opt is the max for
batch and rows (what a throughput run fills) and the middle of the range for lengths.

    batch   B inputs                    [1, B]
    rows    N = B x beams               [1, B x beams]
    source  S source tokens             [1, S]  (fixed where the encoder's output fixes it: Whisper)
    past    t tokens already decoded    [0, decoder prompt + new tokens - 1]  (decoder-only: new tokens - 1)
    prompt  P prompt tokens (GPT-2)     [1, P]  (default: the positions less new tokens, at least half)
    context prompt + past (GPT-2 K/V)   [1, P + new tokens - 1]
"""

from dataclasses import asdict, dataclass

from el_export.contract.manifest import Manifest
from el_export.errors import InvalidArgumentError

DEFAULT_SOURCE = 512  # source (or prompt) tokens when the model has no position limit (T5's relative positions)

# The `el-export build` option that raises each axis's limit, for errors that say how to rebuild.
AXIS_OPTIONS = {
    "batch": "--max-batch-size",
    "rows": "--max-batch-size and --max-beams",
    "source": "--max-source",
    "past": "--max-new-tokens",
    "prompt": "--max-prompt",
    "context": "--max-prompt and --max-new-tokens",
}


@dataclass(frozen=True)
class Limits:
    """The largest workload the engines must run.

    Args:
        batch: inputs per call.
        beams: beams per input (rows = batch x beams).
        source: source tokens; None: the model's positions (DEFAULT_SOURCE without a limit).
        new_tokens: tokens generated per sequence.
        prompt: decoder-only prompt tokens; None: the model's positions less new_tokens.
        decoder_prompt: encoder-decoder decoder prompt tokens (start token, Whisper's task tokens).
    """

    batch: int = 8
    beams: int = 4
    source: int | None = None
    new_tokens: int = 128
    prompt: int | None = None
    decoder_prompt: int = 4

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidArgumentError(f"limit {name} must be a positive integer, got {value!r}")

    def to_json(self) -> dict:
        return asdict(self)


def axis_ranges(manifest: Manifest, limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis the graphs' inputs name.

    Raises:
        InvalidArgumentError: a limit is past the model's positions.
    """
    positions = manifest.dims.get("max_positions")
    B, N = limits.batch, limits.batch * limits.beams
    ranges = {"batch": (1, B, B), "rows": (1, N, N)}
    if manifest.kind == "seq2seq":
        if fixed := fixed_axes(manifest).get("source"):  # Whisper: 30 s of audio, always
            ranges["source"] = (fixed, fixed, fixed)
        else:
            S = limits.source or positions or DEFAULT_SOURCE
            if positions and S > positions:
                raise InvalidArgumentError(f"--max-source {S} is past the model's {positions} positions")
            ranges["source"] = _length(1, S)
        decoded = limits.decoder_prompt + limits.new_tokens
        ranges["past"] = _length(0, min(decoded, positions or decoded) - 1)
    else:
        P, T = limits.prompt, limits.new_tokens
        if P is None:  # what the positions leave, but at least half of them
            P = max(positions - T, positions // 2) if positions else DEFAULT_SOURCE
            T = min(T, positions - P) if positions else T
        if positions and P + T > positions:
            raise InvalidArgumentError(
                f"--max-prompt {P} plus --max-new-tokens {T} is past the model's {positions} positions"
            )
        ranges.update(prompt=_length(1, P), past=_length(0, T - 1), context=_length(1, P + T - 1))
    named = {axis for graph in manifest.graphs.values() for s in graph.inputs for axis in s.shape}
    return {axis: r for axis, r in ranges.items() if axis in named}


def graph_profiles(manifest: Manifest, limits: Limits) -> dict[str, dict[str, dict[str, list[int]]]]:
    """graph -> input -> {"min", "opt", "max"} shapes: one optimization profile per graph, as data."""
    ranges = axis_ranges(manifest, limits)
    profiles = {}
    for name, graph in manifest.graphs.items():
        profiles[name] = {
            spec.name: {
                key: [a if isinstance(a, int) else ranges[a][i] for a in spec.shape]
                for i, key in enumerate(("min", "opt", "max"))
            }
            for spec in graph.inputs
        }
    return profiles


def fixed_axes(manifest: Manifest) -> dict[str, int]:
    """Axes that one graph's input names but the graph producing that tensor fixes (Whisper's source)."""
    produced = {s.name: s.shape for graph in manifest.graphs.values() for s in graph.outputs}
    fixed = {}
    for graph in manifest.graphs.values():
        for spec in graph.inputs:
            for axis, size in zip(spec.shape, produced.get(spec.name, ()), strict=False):
                if isinstance(axis, str) and isinstance(size, int):
                    fixed[axis] = size
    return fixed


def _length(low: int, high: int) -> tuple[int, int, int]:
    high = max(low, high)
    return (low, (low + high + 1) // 2, high)
