"""The `el-export` command line: thin subcommands over the library.

Errors the user can fix (ElExportError) become one line on stderr and a non-zero exit code here,
and only here. Anything else is a bug and keeps its traceback.
"""

import argparse
import json
import sys
from pathlib import Path

from el_export.errors import ElExportError, InvalidArgumentError

DEFAULT_OUT = Path("graphs")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ElExportError as e:
        print(f"el-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("el-export: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="el-export",
        description="Export HF generation models with EL-attention decoders to ONNX, and generate from the bundles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a checkpoint to a bundle of ONNX graphs")
    p.add_argument("model", help="local checkpoint directory (or a hub id when a hub is reachable)")
    p.add_argument("--out", type=Path, help="bundle directory to create (default: graphs/<name>-<mode>)")
    p.add_argument("--mode", choices=("el", "kv"), default="el", help="decoder: EL-attention (default) or K/V baseline")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="graph precision; float16 keeps the modules a family knows to overflow in float32",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=_export)

    p = sub.add_parser("generate", help="generate text from a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("text", nargs="*", help="input texts (or use --input-file)")
    p.add_argument("--input-file", type=Path, help="one input per line; .jsonl files take the 'text' field")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per search batch (default 8)")
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's positions")
    _add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    p.set_defaults(run=_generate)

    p = sub.add_parser("compare", help="check a bundle against its PyTorch reference (graphs, then generate)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--reference", required=True, help="the checkpoint the bundle was exported from")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_compare)

    p = sub.add_parser("inspect", help="describe a bundle and the cache bytes of el vs kv for a workload")
    p.add_argument("bundle", type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--source-len", type=int, help="source (or prompt) length; default: the model's max positions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("demo", help="the main job end to end on the embedded default (Whisper tiny.en)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo", help="where checkpoint and bundles go")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_demo)

    p = sub.add_parser("import-ct2", help="import a CTranslate2 (faster-whisper) Whisper model as an HF checkpoint")
    p.add_argument("ct2_dir", type=Path, help="directory with model.bin, config.json, tokenizer.json")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.set_defaults(run=_import_ct2)
    return parser


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (HF generate semantics; unset means the checkpoint's default)")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--num-return-sequences", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--early-stopping", choices=("true", "false", "never"))
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation arguments the user set, under HF's names."""
    names = (
        "num_beams", "num_return_sequences", "max_new_tokens", "min_new_tokens", "length_penalty",
        "no_repeat_ngram_size", "repetition_penalty", "do_sample", "temperature", "top_k", "top_p", "seed",
    )  # fmt: skip
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.early_stopping is not None:
        kwargs["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return kwargs


def _export(args) -> int:
    from el_export.export import export_model, load_checkpoint, load_feature_extractor

    out = args.out or DEFAULT_OUT / f"{Path(args.model.rstrip('/')).name}-{args.mode}"
    hf_model, tokenizer = load_checkpoint(args.model)
    manifest = export_model(
        hf_model, out, mode=args.mode, dtype=args.dtype, opset=args.opset, tokenizer=tokenizer,
        feature_extractor=load_feature_extractor(args.model), overwrite=args.overwrite, source=args.model,
    )  # fmt: skip
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
    else:
        print(f"wrote {out} ({manifest.family}, mode {manifest.mode}, {len(manifest.files)} files)")
    return 0


def read_inputs(texts: list[str], input_file: Path | None) -> list[str]:
    if input_file is not None:
        if not input_file.is_file():
            raise InvalidArgumentError(f"input file {input_file} does not exist")
        lines = [line for line in input_file.read_text().splitlines() if line.strip()]
        if input_file.suffix == ".jsonl":
            try:
                texts = texts + [json.loads(line)["text"] for line in lines]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidArgumentError(
                    f"{input_file}: every line must be a JSON object with 'text' ({e})"
                ) from None
        else:
            texts = texts + lines
    if not texts:
        raise InvalidArgumentError("no inputs: give TEXT arguments or --input-file")
    return texts


def _generate(args) -> int:
    import el_export

    texts = read_inputs(args.text, args.input_file)
    if args.batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    generator = el_export.load(args.bundle, backend=args.backend)
    kwargs = generation_kwargs(args)
    per_input = kwargs.get("num_return_sequences", 1)
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        outputs = generator.generate_text(batch, truncation=args.truncate, **kwargs)
        for i, text in enumerate(batch):
            results = outputs[i * per_input : (i + 1) * per_input]
            if args.json:
                print(json.dumps({"input": text, "outputs": results}), flush=True)
            else:
                print("\n".join(results), flush=True)
    return 0


def _compare(args) -> int:
    from el_export.compare import compare_bundle

    checks = compare_bundle(
        args.bundle, args.reference, backend=args.backend, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    if args.json:
        print(json.dumps([vars(c) for c in checks], indent=2))
    else:
        rows = [(c.name, "PASS" if c.passed else "FAIL", c.detail) for c in checks]
        _print_table(f"compare {args.bundle} with {args.reference}", ("check", "result", "detail"), rows)
    return 0 if all(c.passed for c in checks) else 1


def _inspect(args) -> int:
    from el_export.bundle import read_manifest
    from el_export.cache import Workload, cache_bytes, human_bytes

    manifest = read_manifest(args.bundle)
    dims = manifest.dims
    source_len = args.source_len or dims["max_positions"] or 512  # relative positions have no limit
    for name in ("batch_size", "num_beams", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    workload = Workload(args.batch_size, args.num_beams, source_len, args.max_new_tokens)
    costs = {mode: cache_bytes(mode, dims, workload, manifest.dtype, manifest.kind) for mode in ("el", "kv")}
    if args.json:
        print(json.dumps({
            "manifest": manifest.to_json(),
            "workload": vars(workload),
            "cache_bytes": {m: {"context": c.context, "generated": c.generated, "total": c.total}
                            for m, c in costs.items()},
        }, indent=2))  # fmt: skip
        return 0
    print(f"bundle      {args.bundle}")
    print(f"model       {manifest.family} ({manifest.kind}), mode {manifest.mode}, {manifest.dtype}")
    print("dims        " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    for name, graph in manifest.graphs.items():
        io = lambda specs: ", ".join(f"{s.name}{list(s.shape)}" for s in specs)  # noqa: E731
        print(f"graph       {name}: {io(graph.inputs)} -> {io(graph.outputs)}")
    total = sum(f["bytes"] for f in manifest.files.values())
    print(f"files       {len(manifest.files)} ({human_bytes(total)}), tokenizer: {manifest.tokenizer or 'none'}")
    print("exporter    " + ", ".join(f"{k} {v}" for k, v in manifest.exporter.items()))
    print(f"generation  {json.dumps(manifest.generation_defaults)}")
    el, kv = costs["el"], costs["kv"]
    rows = [
        ("prompt (per layer)" if manifest.kind == "decoder-only" else "encoder output / cross K-V",
         human_bytes(el.context), human_bytes(kv.context), f"{kv.context / el.context:.1f}x"),
        ("generated tokens", human_bytes(el.generated), human_bytes(kv.generated),
         f"{kv.generated / el.generated:.1f}x"),
        ("total", human_bytes(el.total), human_bytes(kv.total), f"{kv.total / el.total:.1f}x"),
    ]  # fmt: skip
    title = (
        f"decoder cache: batch {workload.batch_size}, beams {workload.num_beams}, source {source_len}, "
        f"{workload.new_tokens} new tokens ({manifest.dtype})"
    )
    _print_table(title, ("cache", "el", "kv", "kv / el"), rows)
    return 0


def _demo(args) -> int:
    from el_export.cache import human_bytes
    from el_export.demo import run_demo

    if args.num_beams < 1:
        raise InvalidArgumentError("--num-beams must be at least 1")
    rows = run_demo(args.out, num_beams=args.num_beams)
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=2))
    else:
        table = [
            (r.clip, r.transcript, "yes" if r.same_as_hf else "NO", f"{r.seconds['el']:.2f}s",
             f"{r.seconds['kv']:.2f}s", human_bytes(r.cache_bytes["el"]), human_bytes(r.cache_bytes["kv"]))
            for r in rows
        ]  # fmt: skip
        _print_table(
            f"demo: Whisper tiny.en, {args.num_beams} beams, EL vs the K/V baseline (cache: decoder state, formula)",
            ("clip", "EL transcript", "= HF", "el time", "kv time", "el cache", "kv cache"),
            table,
        )
    return 0 if all(r.same_as_hf for r in rows) else 1


def _import_ct2(args) -> int:
    from el_export.ct2_whisper import import_whisper

    print(f"wrote {import_whisper(args.ct2_dir, args.out)}")
    return 0


def _print_table(title: str, columns: tuple[str, ...], rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=60)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # pipes get the whole table


if __name__ == "__main__":
    sys.exit(main())
