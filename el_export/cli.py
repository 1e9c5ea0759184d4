"""The `el-export` command line: thin subcommands over the library.

Errors the user can fix (ElExportError) become one line on stderr and a non-zero exit code here,
and only here. Anything else is a bug and keeps its traceback.
"""

import argparse
import json
import math
import os
import re
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
    p.add_argument("--mode", choices=("el", "kv", "auto"), default="el",
                   help="decoder: EL-attention (default), K/V baseline, or auto: export both, time both on the "
                        "workload below, keep the faster")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="auto: inputs per generate call to time (default 8)")
    p.add_argument("--num-beams", type=int, help="auto: beams to time (default 4)")
    p.add_argument("--source-len", type=int, help="auto: source (or prompt) tokens to time (default 512 or fewer)")
    p.add_argument("--threads", type=int, help="auto: ONNX Runtime threads for the timing (default: all cores)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="graph precision; float16 keeps the modules a family knows to overflow in float32",
    )
    p.add_argument("--quantize", choices=("int8",), help="int8 weights (ONNX Runtime dynamic quantization; CPU)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 to 24 (default: the exporter's)")
    p.add_argument("--atol", type=float, help="accuracy check: absolute tolerance, replacing the default (scaled to "
                   "each output's peak and the model's width; see el_export/tolerance.py)")  # fmt: skip
    p.add_argument("--rtol", type=float, help="accuracy check: relative tolerance, replacing the default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing el-export bundle at --out")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=_export)

    p = sub.add_parser("generate", help="generate text (or transcripts) from a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("text", nargs="*", help="input texts, or audio files for speech bundles (or use --input-file)")
    p.add_argument("--input-file", type=Path,
                   help="one input per line; .jsonl lines: {'text': ..., 'id': ...} "
                        "(ids unique, strings or integers)")  # fmt: skip
    p.add_argument("--output", type=Path,
                   help="JSONL output: a header, then one record per input; an existing one is resumed (same bundle, "
                        "settings and inputs), one job at a time")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per search batch (default 8)")
    p.add_argument("--memory-limit", type=_gib, metavar="GiB",
                   help="cap on decoder state and encoder activations; larger batches are split")  # fmt: skip
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's positions")
    _add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    p.set_defaults(run=_generate)

    p = sub.add_parser(
        "compare",
        help="check a bundle against its PyTorch reference (graphs, then generate)",
        description="Check a bundle against the checkpoint it was exported from: each graph against its PyTorch "
        "module, then generate (greedy and beam search) against HF generate on the same inputs: text bundles a "
        "padded batch, speech bundles audio clips.",
        epilog="exit status: 0 every check passed (PASS), or in reduced precision (float16, bfloat16, int8) every "
        "sequence equals HF's (AGREE); 1 a check failed (FAIL: a graph outside its tolerance, or float32 tokens "
        "or scores unlike HF's); 8 reduced precision, graphs within tolerance, but tokens differ on some "
        "sequences (DIFFER); 2-7 the errors of every command.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--reference", required=True, help="the checkpoint the bundle was exported from")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=3, help="text bundles: inputs in the padded batch (default 3)")
    p.add_argument("--max-new-tokens", type=int,
                   help="default 16; speech bundles: the model's max_length (whole transcripts)")  # fmt: skip
    p.add_argument("--audio", nargs="+", type=Path, metavar="FILE",
                   help="speech bundles: WAV/FLAC clips (default: the clips shipped in el_export/clips)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the verdict and every check's figures as JSON")
    p.set_defaults(run=_compare)

    p = sub.add_parser("build", help="build TensorRT engines for a bundle (a GPU host with TensorRT)")
    p.add_argument("bundle", type=Path)
    precision = p.add_mutually_exclusive_group()
    for flag in ("fp16", "bf16"):
        precision.add_argument(f"--{flag}", dest="precision", action="store_const", const=flag,
                               help=f"{flag} engines (default: the bundle's own precision)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="inputs per call (default 8)")
    p.add_argument("--max-beams", type=int, default=4, help="beams per input (default 4)")
    p.add_argument("--max-source", type=int, help="source tokens (default: the model's positions)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--max-prompt", type=int, help="decoder-only prompt tokens (default: positions less new tokens)")
    p.add_argument("--workspace", type=float, metavar="GiB", help="TensorRT's workspace memory limit")
    p.add_argument("--json", action="store_true", help="print the manifest's engines entry as JSON")
    p.set_defaults(run=_build)

    p = sub.add_parser("inspect", help="describe a bundle and the cache bytes of el vs kv for a workload")
    p.add_argument("bundle", type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--source-len", type=int,
                   help="source (or prompt) length, at most the model's positions; default: all (T5: 512)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("demo", help="the main job end to end on the embedded default (Whisper tiny.en)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo", help="where checkpoint and bundles go")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_demo)

    p = sub.add_parser("serve", help="serve a bundle through Triton (shipped with PyTriton), with dynamic batching")
    p.add_argument("bundle", type=Path)
    _add_serving_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", "--http-port", dest="http_port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--log-file", type=Path, help="write the Triton server's full log there (default: its "
                   "warnings and errors on the console)")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime")
    p.set_defaults(run=_serve)

    p = sub.add_parser("triton-repo", help="write a Triton model repository (Python backend) serving a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="repository directory to create")
    _add_serving_arguments(p)
    p.add_argument("--backend", default="onnxruntime", help="el-export backend the model runs on")
    p.set_defaults(run=_triton_repo)

    p = sub.add_parser("bench", help="time and memory of el, kv, HF generate and CTranslate2 on the same workloads")
    p.add_argument("--workloads", default="W1,W3,W4,W2", help="comma-separated: W1 (BART), W2 (batch growth), "
                   "W3 (Whisper tiny.en), W4 (GPT-2)")  # fmt: skip
    p.add_argument("--work", type=Path, default=DEFAULT_OUT / "bench", help="checkpoints and bundles (reused)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench" / "report", help="bench.json and bench.png")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per engine (default: all cores)")
    p.add_argument("--time-cap", type=float, default=900, help="seconds one engine run may take")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_bench)

    p = sub.add_parser("import-ct2", help="import a CTranslate2 (faster-whisper) Whisper model as an HF checkpoint")
    p.add_argument("ct2_dir", type=Path, help="directory with model.bin, config.json, tokenizer.json")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.set_defaults(run=_import_ct2)
    return parser


def _gib(text: str) -> float:
    """--memory-limit: a finite number of GiB, at least one byte (argparse reports anything else)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 2**-30 <= value <= 2**60:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be a number of GiB from 2**-30 (one byte) to 2**60, got {text!r}")
    return value


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


def _add_serving_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", help="Triton model name (default: the bundle directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="inputs per model call (default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=5000,
                   help="how long a request waits for others to batch with, in µs (default 5000)")  # fmt: skip
    p.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                   help="run every request on its own")  # fmt: skip
    p.add_argument("--instances", type=int, default=1, help="model instances sharing the loaded bundle (default 1)")
    g = p.add_argument_group("request limits (a request over one is refused: HTTP 400, naming the flag)")
    g.add_argument("--max-num-beams", type=int, help="largest num_beams and num_return_sequences (default 16)")
    g.add_argument("--max-new-tokens-limit", type=int, help="largest max_new_tokens (default 512)")
    g.add_argument("--max-text-bytes", type=int, help="largest text input in UTF-8 bytes, checked before "
                   "tokenizing (default 262144)")  # fmt: skip


def serve_config(args: argparse.Namespace):
    """The serving arguments as a `ServeConfig`."""
    from el_export.serving.batching import RequestCaps
    from el_export.serving.server import ServeConfig

    name = args.model_name or re.sub(r"[^A-Za-z0-9._-]", "_", args.bundle.resolve().name)
    names = ("host", "http_port", "grpc_port", "metrics_port", "log_file")  # serve's; triton-repo has none
    ports = {k: getattr(args, k) for k in names if hasattr(args, k)}
    caps = {"max_num_beams": args.max_num_beams, "max_new_tokens": args.max_new_tokens_limit,
            "max_text_bytes": args.max_text_bytes}  # fmt: skip
    return ServeConfig(
        model_name=name, max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        dynamic_batching=args.dynamic_batching, instances=args.instances,
        caps=RequestCaps(**{k: v for k, v in caps.items() if v is not None}), **ports,
    )  # fmt: skip


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
    from el_export.export import check_options, export_model, load_checkpoint, load_feature_extractor

    workload_args = {"batch_size": args.batch_size, "num_beams": args.num_beams, "source_len": args.source_len}
    given = {k: v for k, v in workload_args.items() if v is not None}
    if args.mode != "auto" and (given or args.threads is not None):
        flags = [f"--{k.replace('_', '-')}" for k in given] + (["--threads"] if args.threads is not None else [])
        raise InvalidArgumentError(f"{', '.join(flags)} only apply to --mode auto (the workload it times)")
    out = args.out or DEFAULT_OUT / f"{Path(args.model.rstrip('/')).name}-{args.mode}"
    options = {name: getattr(args, name) for name in ("dtype", "quantize", "opset", "atol", "rtol")}
    check_options(mode=args.mode, **options)  # before the checkpoint loads
    hf_model, tokenizer = load_checkpoint(args.model)
    manifest = export_model(
        hf_model, out, mode=args.mode, tokenizer=tokenizer, feature_extractor=load_feature_extractor(args.model),
        overwrite=args.overwrite, source=args.model, auto_workload=given, threads=args.threads, **options,
    )  # fmt: skip
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    print(f"wrote {out} ({manifest.family}, mode {manifest.mode}, {len(manifest.files)} files)")
    if manifest.mode_choice:
        seconds, w = manifest.mode_choice["seconds"], manifest.mode_choice["workload"]
        print(
            f"auto: el {seconds['el']:.3f} s, kv {seconds['kv']:.3f} s for batch {w['batch_size']} x "
            f"{w['num_beams']} beams, source {w['source_len']}, {w['new_tokens']} new tokens: kept {manifest.mode}"
        )
    return 0


def _generate(args) -> int:
    from el_export.runtime.stream import JobOutput, Record, check_inputs, generate_batches, generate_file, read_records

    if args.batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    if not args.text and args.input_file is None:
        raise InvalidArgumentError("no inputs: give TEXT arguments or --input-file")
    if args.output is not None and (args.text or args.input_file is None):
        raise InvalidArgumentError("--output streams an --input-file; give the inputs in a file, not as arguments")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise InvalidArgumentError("--memory-limit must be a positive number of GiB")
    kwargs = {**generation_kwargs(args), "truncation": args.truncate}
    if args.output is not None:
        with JobOutput(args.output, inputs=args.input_file) as output:  # checked and locked before the bundle loads
            stats = generate_file(_load_generator(args), args.input_file, output, args.batch_size,
                                  progress=sys.stderr.isatty(), **kwargs)  # fmt: skip
        print(
            f"{stats.written} written, {stats.skipped} already in {args.output}, {stats.total} inputs", file=sys.stderr
        )
        return 0
    generator = _load_generator(args)
    if args.input_file is not None:
        check_inputs(args.input_file, generator, truncation=args.truncate)
        records = read_records(args.input_file)
    else:
        records = (Record(i, i, text) for i, text in enumerate(args.text, start=1))
    for results in generate_batches(generator, records, args.batch_size, **kwargs):
        for record, outputs in results:
            if args.json:
                ids = {"id": record.id} if args.input_file is not None else {}
                print(json.dumps({**ids, "input": record.text, "outputs": outputs}), flush=True)
            else:
                print("\n".join(outputs), flush=True)
    return 0


def _load_generator(args):
    import el_export

    generator = el_export.load(args.bundle, backend=args.backend)
    if args.memory_limit is not None:
        generator.memory_limit = int(args.memory_limit * 2**30)
    return generator


def _compare(args) -> int:
    from el_export.evaluation.compare import compare_bundle

    report = compare_bundle(
        args.bundle, args.reference, backend=args.backend, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, audio=args.audio,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return report.exit_code
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"compare {args.bundle} with {args.reference}"), title_justify="left")
    for column in ("check", "verdict", "detail"):  # wrapped, never cut: the details are the evidence
        table.add_column(column, overflow="fold", no_wrap=column == "verdict")
    for c in report.checks:
        table.add_row(Text(c.name), c.verdict, Text(c.detail))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(Text(report.summary()))
    return report.exit_code


def _build(args) -> int:
    from el_export.trt.build import build_engines
    from el_export.trt.profiles import Limits

    if args.workspace is not None and args.workspace <= 0:
        raise InvalidArgumentError("--workspace must be a positive number of GiB")
    limits = Limits(batch=args.max_batch, beams=args.max_beams, source=args.max_source,
                    new_tokens=args.max_new_tokens, prompt=args.max_prompt)  # fmt: skip
    workspace = int(args.workspace * 2**30) if args.workspace else None
    engines = build_engines(args.bundle, precision=args.precision, limits=limits, workspace=workspace).engines
    if args.json:
        print(json.dumps(engines, indent=2))
    else:
        files = ", ".join(entry["file"] for entry in engines["graphs"].values())
        print(f"built {files} ({engines['precision']}, TensorRT {engines['tensorrt']}, {engines['gpu']['name']})")
    return 0


def _inspect(args) -> int:
    from el_export.contract.cache import Workload, cache_bytes, human_bytes
    from el_export.contract.files import read_manifest

    manifest = read_manifest(args.bundle)
    dims = manifest.dims
    source_len = _inspect_source_len(args, manifest)
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


def _in_range(flag: str, value: int, high: int, why: str) -> int:
    if not 1 <= value <= high:
        raise InvalidArgumentError(f"--{flag} must be from 1 to {high} ({why}), got {value}")
    return value


def _inspect_source_len(args, manifest) -> int:
    """Check inspect's integer options and resolve the source (or prompt) length: a speech model's is its encoder
    frames; a position table bounds it, and is the default; relative positions (T5) have none: 512 by default."""
    int64 = 2**63 - 1
    for flag in ("batch-size", "num-beams", "max-new-tokens"):
        _in_range(flag, getattr(args, flag.replace("-", "_")), int64, "an ONNX dimension is int64")
    if manifest.audio:
        frames = manifest.graphs["encoder"].output("encoder_hidden").shape[1]
        if args.source_len is not None:
            raise InvalidArgumentError(f"a speech model's source is 30 s of audio ({frames} frames); drop --source-len")
        return frames
    positions = manifest.dims["max_positions"]
    if args.source_len is None:
        return positions or 512
    if positions is None:
        return _in_range("source-len", args.source_len, int64, "an ONNX dimension is int64")
    return _in_range("source-len", args.source_len, positions, f"the model has {positions} positions")


def _demo(args) -> int:
    from el_export.contract.cache import human_bytes
    from el_export.evaluation.demo import run_demo

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


def _serve(args) -> int:
    import el_export
    from el_export.serving.server import check_can_serve, start, stop_signals, wait

    config = serve_config(args)
    check_can_serve(config)  # in seconds, before the bundle loads: a taken port, a missing PyTriton
    with stop_signals() as received:  # a stop while the bundle loads or Triton starts: nothing is left behind
        server = start(el_export.load(args.bundle, backend=args.backend), config)
        try:
            if received:  # its KeyboardInterrupt was raised where Python ignores exceptions
                raise KeyboardInterrupt
            print(
                f"serving {args.bundle} as model {config.model_name!r} on http://{config.host}:{config.http_port} "
                f"and grpc {config.host}:{config.grpc_port} (Ctrl-C or SIGTERM stops)",
                file=sys.stderr,
                flush=True,
            )
            wait(server)
        finally:
            server.stop()
    return 0


def _triton_repo(args) -> int:
    from el_export.serving.triton_repo import write_repository

    model_dir = write_repository(args.bundle, args.out, serve_config(args), backend=args.backend)
    print(f"wrote {model_dir} (config.pbtxt, 1/model.py, 1/bundle)")
    return 0


def _bench(args) -> int:
    from el_export.evaluation.bench import WORKLOADS, run_bench

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS and w != "W2"]
    if unknown or not workloads:
        raise InvalidArgumentError(f"unknown workload {unknown[0] if unknown else ''!r}; choose from W1, W2, W3, W4")
    if args.threads < 1:
        raise InvalidArgumentError("--threads must be at least 1")
    report = run_bench(args.work, args.out, threads=args.threads, time_cap=args.time_cap, workloads=workloads,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    if args.json:
        print(json.dumps(report["summary"], indent=2))
        return 0
    rows = []
    for key, s in report["summary"].items():
        if not isinstance(s, dict) or "total_s" not in s:
            continue
        ratio = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        rows.append((key, f"{s['total_s']:.2f}", f"{s['tokens_per_s']:.1f}", ratio(s["speedup_vs_hf"]),
                     ratio(s["speedup_vs_ct2_float32"]), f"{s['peak_gib']:.2f}",
                     f"{s['step_vs_limit']:.2f}x" if "step_vs_limit" in s else "-"))  # fmt: skip
    _print_table(
        f"bench ({args.threads} threads; report in {args.out})",
        ("workload/engine", "total s", "tokens/s", "vs HF", "vs CT2 fp32", "peak GiB", "step/limit"),
        rows,
    )
    for engine, w2 in report.get("w2", {}).items():
        print(f"W2 {engine}: largest batch within 4 GiB = {w2['largest_batch']} ({w2['stopped_by']})")
    for key, value in report["summary"].items():
        if key.startswith("W3/") and "identical_transcripts" in value:
            print(f"{key}: {value['identical_transcripts']}/{value['clips']} identical transcripts")
    for engine, reason in report["skipped"].items():
        print(f"skipped {engine}: {reason}")
    return 0


def _import_ct2(args) -> int:
    from el_export.export.importers.ct2_whisper import import_whisper

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
