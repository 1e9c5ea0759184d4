"""How far EL's float32 graphs sit from a float64 evaluation of the same graphs: the figures behind tolerance.py.

    .venv/bin/python tools/el_precision.py                      # d 768 / 12 heads and 1024 / 16, PyTorch only
    .venv/bin/python tools/el_precision.py --onnx --widths 768:12

Each point is a seeded random BART of that width (`--layers` per stack, ffn 4d), run by its el and kv graphs on
export's check shapes in float32 and, as the reference, in float64; with `--onnx` the float32 graph is also exported
and run by ONNX Runtime. It prints max |float32 - float64| / peak |float64| per graph output: the scale in
tolerance.py must cover the sum of PyTorch's and ONNX Runtime's figures, with room to spare.
"""

import argparse
import copy
import itertools
import tempfile
from pathlib import Path

import torch


def relative_errors(model, mode: str, onnx: bool) -> dict[str, tuple[float, float | None]]:
    """(torch, onnxruntime) error / peak of every output of every graph of `model` (float32) vs float64."""
    import onnxruntime as ort

    from el_export.export.graphs import graphs_for, sample_inputs
    from el_export.export.onnx import CHECK_SIZES, export_graph

    wide = copy.deepcopy(model).double()
    errors = {}
    for graph, reference in zip(graphs_for(model, mode), graphs_for(wide, mode), strict=True):
        session = None
        if onnx:
            path = Path(tempfile.mkdtemp()) / f"{graph.name}.onnx"
            export_graph(graph, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for sizes in CHECK_SIZES:
            inputs = sample_inputs(graph, sizes, seed=1)
            with torch.no_grad():
                got = graph.run(inputs)
                exact = reference.run([t.double() if t.is_floating_point() else t for t in inputs])
            ran = session.run(None, {s.name: t.numpy() for s, t in zip(graph.inputs, inputs, strict=True)}) if session \
                else [None] * len(got)  # fmt: skip
            for spec, g, e, r in zip(graph.outputs, got, exact, ran, strict=True):
                peak = float(e.abs().max()) or 1.0
                torch_error = float((g.double() - e).abs().max()) / peak
                ort_error = float((torch.from_numpy(r).double() - e).abs().max()) / peak if r is not None else None
                key = f"{graph.name}.{spec.name}"
                old = errors.get(key, (0.0, None))
                errors[key] = (max(old[0], torch_error), None if ort_error is None else max(old[1] or 0.0, ort_error))
    return errors


def main() -> int:
    from transformers import BartConfig, BartForConditionalGeneration

    from el_export.families import build_from_hf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["768:12", "1024:16"], help="d_model:heads")
    parser.add_argument("--init-std", nargs="+", type=float, default=[0.02, 0.1], help="weight init std")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="torch seeds of the random weights")
    parser.add_argument("--modes", nargs="+", default=["el", "kv"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--onnx", action="store_true", help="also export and run the float32 graphs in ONNX Runtime")
    args = parser.parse_args()
    print("| d | heads | init std | seed | mode | output | torch fp32 | onnxruntime fp32 | sum / sqrt(d) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width, std, seed in itertools.product(args.widths, args.init_std, args.seeds):
        d, heads = map(int, width.split(":"))
        config = BartConfig(d_model=d, encoder_attention_heads=heads, decoder_attention_heads=heads,
                            encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, encoder_layers=args.layers,
                            decoder_layers=args.layers, vocab_size=args.vocab, max_position_embeddings=64,
                            init_std=std)  # fmt: skip
        torch.manual_seed(seed)
        model, _ = build_from_hf(BartForConditionalGeneration(config).eval())
        for mode in args.modes:
            for output, (t, o) in relative_errors(model, mode, args.onnx).items():
                worst = (t + (o or 0.0)) / d**0.5  # the check compares the two: their errors can add
                ran = f"{o:.1e}" if o is not None else "-"
                row = [d, heads, std, seed, mode, output, f"{t:.1e}", ran, f"{worst:.1e}"]
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
