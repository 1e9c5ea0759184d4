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

from el_export import __version__, logs
from el_export.errors import ElExportError, InvalidArgumentError

DEFAULT_OUT = Path("graphs")  # git-ignored
UNSET = "unset: the checkpoint's default"
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's: 0, then up by 0.2 to 1 on each fallback
RECORD = (
    'one JSON line per input: {"id", "input_sha256", "input", "outputs": [{"text", "token_ids", "score"}]}; id: '
    "the input file's id (else its line, or the argument's number); token_ids: the generated sequence (decoder-only: "
    "the continuation) up to its end token; score: beam search's sequence score, null for greedy and sampling"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.quiet and args.verbose:
            raise InvalidArgumentError("--quiet and --verbose contradict each other; pass one of them")
        with logs.verbosity(logs.QUIET if args.quiet else logs.VERBOSE if args.verbose else logs.NORMAL):
            return args.run(args) or 0
    except ElExportError as e:
        print(f"el-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("el-export: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="el-export",
        description="Export HF generation models with EL-attention decoders to ONNX, and generate from the bundles.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"el-export {__version__}",
                        help="print el-export's version and exit")  # fmt: skip
    _add_verbosity_arguments(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the command to run (el-export COMMAND --help: its options)")  # fmt: skip

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    p = add("export", help="export a checkpoint to a bundle of ONNX graphs")
    p.add_argument("model", help="local checkpoint directory (or a hub id when a hub is reachable)")
    p.add_argument("--out", type=Path, help="bundle directory to create (default: graphs/<name>-<mode>)")
    p.add_argument("--mode", choices=("el", "kv", "auto"), default="el",
                   help="decoder: el (EL-attention), kv (the K/V-cache baseline), or auto (export both, time both on "
                        "the workload below, keep the faster)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="auto: inputs per generate call to time (unset: 8)")
    p.add_argument("--num-beams", type=int, help="auto: beams to time (unset: 4)")
    p.add_argument("--source-len", type=int, help="auto: source (or prompt) tokens to time, at most the model's "
                   "positions (unset: 512, or fewer to fit)")  # fmt: skip
    p.add_argument("--threads", type=int, help="auto: ONNX Runtime threads for the timing (unset: all cores)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="graph precision; float16 keeps the modules a family knows to overflow in float32",
    )
    p.add_argument("--quantize", choices=("int8",),
                   help="int8 weight products for ONNX Runtime on CPU (README 'int8') (unset: float weights)")
    p.add_argument("--quantize-recipe", metavar="NAME|FILE",
                   help="with --quantize int8: a built-in recipe (default, tensor) or a recipe JSON file: per "
                        "graph row or tensor activation scales, the modules kept float32 and why (unset: default)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 to 24 (unset: the exporter's)")
    p.add_argument("--atol", type=float, help="accuracy check: absolute tolerance (unset: scaled to each output's "
                   "peak and the model's width; see el_export/tolerance.py)")  # fmt: skip
    p.add_argument("--rtol", type=float, help="accuracy check: relative tolerance (unset: el_export/tolerance.py's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing el-export bundle at --out")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=_export)

    p = add("generate", help="generate text (or transcripts) from a bundle")
    p.add_argument("bundle", type=Path, help="bundle directory (written by el-export export)")
    p.add_argument("text", nargs="*", help="input texts, or audio files for speech bundles (or use --input-file)")
    p.add_argument("--input-file", type=Path,
                   help="one input per line; .jsonl lines: {'text': ..., 'id': ...} "
                        "(ids unique, strings or integers)")  # fmt: skip
    p.add_argument("--output", type=Path,
                   help="JSONL output: a header, then the --json records; an existing one is resumed (same bundle, "
                        "settings and inputs), one job at a time")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime", help="runtime: onnxruntime, or tensorrt (el-export build)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="inputs read, tokenized and encoded together; they join the running batch as memory allows",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="most inputs in flight in the running batch (unset: as memory allows)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        help="most decoder rows (inputs x beams) in flight (unset: as memory allows)",
    )
    p.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="continuous: inputs join the running batch at step boundaries and leave it when their search "
        "ends; static: each batch runs until its longest input ends (the baseline)",
    )
    p.add_argument("--memory-limit", type=_gib, metavar="GiB",
                   help="cap on decoder state and encoder activations; larger batches are split (unset: the memory "
                        "the device has free)")  # fmt: skip
    p.add_argument("--truncation", action="store_true", help="cut inputs longer than the model's positions")
    p.add_argument("--truncate", dest="truncation", action="store_true", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--ray", metavar="ADDRESS|auto|local",
                   help="run the --input-file/--output job on a Ray cluster: its head's host:port, auto (the cluster "
                        "`ray start` began here), or local (a private Ray on this machine); needs el-export[ray]")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --ray: worker actors, each loading the bundle once (unset: as many as the nodes hold)")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="with --ray: CPUs (backend threads) each worker takes (unset: 1)")  # fmt: skip
    _add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help=f"print {RECORD}")
    p.set_defaults(run=_generate)

    p = add(
        "transcribe",
        help="transcribe (or translate) audio of any length with a Whisper bundle into txt, srt, vtt, json files",
        description="Long-form transcription as openai-whisper's `whisper` command runs it: 30 s windows moved by "
        "the timestamps the model predicts, each decoded at the first of --temperature that passes the thresholds. "
        "Options and defaults are openai-whisper's (--num-beams is its --beam_size, under HF's name).",
        epilog="Every input is checked (it exists, its WAV/FLAC header reads, no two share a name) before any is "
        "transcribed. Transcripts are written as each --batch-size group of inputs ends, each file whole (written "
        "beside itself, then renamed over any old one). When an input fails, the ones before it stay written and "
        "the error says how many; nothing is written for it or for those after it.",
    )
    p.add_argument("bundle", type=Path, help="a Whisper bundle directory (written by el-export export)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR",
                   help="WAV or FLAC files, or directories: each .wav and .flac in one (sorted, not in "
                        "subfolders)")  # fmt: skip
    p.add_argument("--output-format", "-f", choices=("txt", "srt", "vtt", "json", "all"), default="all",
                   help="what to write; all: the four formats (openai-whisper's default)")  # fmt: skip
    p.add_argument("--output-dir", "-o", type=Path, default=Path("."),
                   help="where <input name>.<format> are written (created if missing; transcripts there of the same "
                        "names are replaced)")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime", help="runtime: onnxruntime, or tensorrt (el-export build)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="inputs transcribed together (their windows share the running batch); each group's "
                        "transcripts are written when it ends")  # fmt: skip
    g = p.add_argument_group("decoding (openai-whisper's options and defaults)")
    g.add_argument("--word-timestamps", action="store_true",
                   help="time every word (json: each segment's words; srt, vtt: each segment's cue from its first "
                        "word to its last)")  # fmt: skip
    g.add_argument("--num-beams", type=int, default=5,
                   help="beams at temperature 0, 1 for greedy; 5 is openai-whisper's and faster-whisper's beam size "
                        "(HF's default is the checkpoint's, greedy)")  # fmt: skip
    g.add_argument("--condition-on-previous-text", action=argparse.BooleanOptionalAction, default=True,
                   help="prompt each window with the text before it: steadier style and names (openai-whisper's "
                        "default; HF's is off), but a window that repeats itself can pass that on")  # fmt: skip
    g.add_argument("--temperature", type=float, nargs="+", metavar="T", default=TEMPERATURES,
                   help="temperatures tried in turn until a window's text passes the thresholds; above 0 samples "
                        "(openai-whisper's 0, raised by 0.2 on each fallback)")  # fmt: skip
    g.add_argument("--compression-ratio-threshold", type=_optional_float, metavar="X", default=2.4,
                   help="fall back when the text's gzip compression ratio is above X (it repeats itself); none: "
                        "off")  # fmt: skip
    g.add_argument("--logprob-threshold", type=_optional_float, metavar="X", default=-1.0,
                   help="fall back when the average log probability of the tokens is below X; none: off")  # fmt: skip
    g.add_argument("--no-speech-threshold", type=_optional_float, metavar="X", default=0.6,
                   help="skip a window as silence when its no-speech probability is above X and its average log "
                        "probability below --logprob-threshold; none: off")  # fmt: skip
    g.add_argument("--language", help="multilingual models: the language spoken, e.g. en or de (unset: detected)")
    g.add_argument("--task", choices=("transcribe", "translate"),
                   help="multilingual models: translate into English (unset: transcribe)")  # fmt: skip
    g.add_argument("--initial-prompt", metavar="TEXT",
                   help="text the first window continues (names, spelling, punctuation), tokenized with the bundle's "
                        "tokenizer (unset: none)")  # fmt: skip
    p.set_defaults(run=_transcribe)

    p = add(
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
    p.add_argument("bundle", type=Path, help="bundle directory to check")
    p.add_argument("--reference", required=True, help="the checkpoint the bundle was exported from")
    p.add_argument("--backend", default="onnxruntime", help="runtime: onnxruntime, or tensorrt (el-export build)")
    p.add_argument("--num-beams", type=int, default=4, help="beams of the beam-search check")
    p.add_argument("--batch-size", type=int, default=3, help="text bundles: inputs in the padded batch")
    p.add_argument("--max-new-tokens", type=int,
                   help="unset: 16; speech bundles: the model's max_length (whole transcripts)")  # fmt: skip
    p.add_argument("--audio", nargs="+", type=Path, metavar="FILE",
                   help="speech bundles: WAV/FLAC clips (unset: the clips shipped in el_export/clips)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the verdict and every check's figures as JSON")
    p.set_defaults(run=_compare)

    p = add("build", help="build TensorRT engines for a bundle (a GPU host with TensorRT)")
    p.add_argument("bundle", type=Path, help="bundle directory; the engines are written into it")
    precision = p.add_mutually_exclusive_group()
    for flag in ("fp16", "bf16"):
        precision.add_argument(f"--{flag}", dest="precision", action="store_const", const=flag,
                               help=f"{flag} engines (unset: the bundle's own precision)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=8, help="most inputs per call the engines take")
    p.add_argument("--max-batch", dest="max_batch_size", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--max-beams", type=int, default=4, help="most beams per input")
    p.add_argument("--max-source", type=int, help="most source tokens (unset: the model's positions)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most generated tokens")
    p.add_argument("--max-prompt", type=int, help="most decoder-only prompt tokens (unset: positions less new tokens)")
    p.add_argument("--workspace", type=float, metavar="GiB",
                   help="TensorRT's workspace memory limit (unset: TensorRT's default)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the manifest's engines entry as JSON")
    p.set_defaults(run=_build)

    p = add("inspect", help="describe a bundle and the cache bytes of el vs kv for a workload")
    p.add_argument("bundle", type=Path, help="bundle directory to describe")
    p.add_argument("--batch-size", type=int, default=8, help="workload: inputs per call")
    p.add_argument("--num-beams", type=int, default=4, help="workload: beams per input")
    p.add_argument("--source-len", type=int,
                   help="workload: source (or prompt) length, at most the model's positions (unset: all of them; "
                        "T5: 512)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64, help="workload: generated tokens")
    p.add_argument("--json", action="store_true", help="print the manifest, workload and cache bytes as JSON")
    p.set_defaults(run=_inspect)

    p = add("demo", help="the main job end to end on the embedded default (Whisper tiny.en)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo", help="where checkpoint and bundles go")
    p.add_argument("--num-beams", type=int, default=5, help="beams per clip")
    p.add_argument("--json", action="store_true", help="print one row per clip as JSON")
    p.set_defaults(run=_demo)

    p = add("serve", help="serve a bundle through Triton (shipped with PyTriton), with dynamic batching")
    p.add_argument("bundle", type=Path, help="bundle directory to serve")
    _add_serving_arguments(p, "model instances sharing the loaded bundle and its running batch (default: 8 "
                           "with --batching inflight, which batches the model calls in flight at once; 1 with "
                           "group)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 127.0.0.1 is this machine only")
    p.add_argument("--port", "--http-port", dest="http_port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--log-file", type=Path, help="write the Triton server's full log there (unset: its "
                   "warnings and errors on the console)")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime", help="runtime: onnxruntime, or tensorrt (el-export build)")
    p.set_defaults(run=_serve)

    p = add("triton-repo", help="write a Triton model repository (Python backend) serving a bundle")
    p.add_argument("bundle", type=Path, help="bundle directory (copied into the repository)")
    p.add_argument("--out", type=Path, help="repository directory to create; the model is OUT/<model-name> (unset: "
                   "graphs/triton/<model-name>, which git ignores)")  # fmt: skip
    _add_serving_arguments(p, "model instances, each a process with its own copy of the bundle and its own running "
                           "batch (default 1)")  # fmt: skip
    p.add_argument("--backend", default="onnxruntime", help="el-export backend the model runs on")
    p.set_defaults(run=_triton_repo)

    p = add("bench", help="time and memory of el, kv, HF generate and CTranslate2 on the same inputs",
            description="With BUNDLE: your model on your inputs, el vs kv (the other mode, exported from --reference) "
            "vs HF generate on --reference vs CTranslate2 float32, each engine in its own process, outputs compared "
            "with HF's. Without: the built-in workloads W1-W7 (docs/benchmarks.md).")  # fmt: skip
    p.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE", help="your bundle (none: the built-in workloads)")
    p.add_argument("--reference", metavar="CKPT",
                   help="BUNDLE: the checkpoint it was exported from (HF generate runs it; the other mode and "
                        "CTranslate2 are made from it)")  # fmt: skip
    p.add_argument("--input-file", type=Path, metavar="FILE",
                   help="BUNDLE: one input per line, or .jsonl {'text': ...}; audio paths for speech bundles "
                        "(unset: a few built-in sentences, or the shipped clips)")  # fmt: skip
    p.add_argument("--num-beams", type=int, metavar="K", help="BUNDLE: beams (unset: 4)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="BUNDLE: unset: 32; speech: whole transcripts")
    p.add_argument("--batch-size", type=int, metavar="B", help="BUNDLE: inputs per generate call (unset: 8)")
    p.add_argument("--workloads", help="built-in: comma-separated W1 (BART), W2 (batch growth), W3 (Whisper "
                   "tiny.en), W4 (GPT-2), W5, W6 (varied lengths: Whisper, BART), W7, W7p (long-form Whisper on "
                   "5.5 min of speech; W7p with previous text) (unset: all but W7, W7p)")  # fmt: skip
    p.add_argument("--profile", choices=("full", "smoke"),
                   help="built-in: full measures; smoke runs the harness on tiny models (unset: full)")  # fmt: skip
    p.add_argument("--work", type=Path, help="checkpoints and bundles made for the bench, reused (unset: "
                   "graphs/bench, with BUNDLE graphs/bench/<bundle name>)")  # fmt: skip
    p.add_argument("--out", type=Path, help="bench.json and bench.png (unset: graphs/bench/report, with BUNDLE "
                   "<work>/report)")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per engine (this machine's cores)")
    p.add_argument("--time-cap", type=float, default=900, help="seconds one engine run may take")
    p.add_argument("--json", action="store_true", help="print the summary as JSON, not the table")
    p.set_defaults(run=_bench)

    p = add("import-ct2", help="import a CTranslate2 (faster-whisper) Whisper model as an HF checkpoint")
    p.add_argument("ct2_dir", type=Path, help="directory with model.bin, config.json, tokenizer.json")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a checkpoint import-ct2 wrote, or empty; nothing else")  # fmt: skip
    p.set_defaults(run=_import_ct2)
    for p in sub.choices.values():  # before or after the command: el-export --quiet export ... = export --quiet ...
        _add_verbosity_arguments(p, default=argparse.SUPPRESS)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in el-export's one-line form, exit status 2 (as InvalidArgumentError)."""

    def error(self, message: str):
        self.exit(InvalidArgumentError.exit_code, f"el-export: error: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default; an option whose default is unset (None) says in its help what
    that means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def _add_verbosity_arguments(p: argparse.ArgumentParser, default) -> None:
    """--quiet / --verbose, on the main parser (default False) and on every command (default SUPPRESS, so that a
    command's parser does not reset what was given before the command)."""
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress display and no warnings (el-export's, transformers', ONNX Runtime's)")  # fmt: skip
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also transformers' and ONNX Runtime's INFO logs")  # fmt: skip


def _gib(text: str) -> float:
    """--memory-limit: a finite number of GiB, at least one byte (argparse reports anything else)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 2**-30 <= value <= 2**60:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be a number of GiB from 2**-30 (one byte) to 2**60, got {text!r}")
    return value


def _token_ids(text: str) -> list[int]:
    """Token ids separated by ',' (argparse reports anything else; the search checks the values)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids separated by ',' (e.g. 1,2), got {text!r}") from None


def _token_id_lists(text: str) -> list[list[int]]:
    """--bad-words-ids: lists of token ids separated by ';' (e.g. "1,2;7")."""
    return [_token_ids(part) for part in text.split(";")]


def _optional_float(text: str) -> float | None:
    """A finite number, or "none" (off) (argparse reports anything else)."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or none, got {text!r}")
    return value


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (HF generate semantics and names)")
    g.add_argument("--num-beams", type=int, help=f"beams per input; 1: greedy search or sampling ({UNSET})")
    g.add_argument("--num-return-sequences", type=int, help=f"outputs per input, at most --num-beams ({UNSET})")
    g.add_argument("--max-new-tokens", type=int, help=f"most tokens generated, the prompt not counted ({UNSET})")
    g.add_argument("--min-new-tokens", type=int, help=f"fewest tokens generated, the prompt not counted ({UNSET})")
    g.add_argument("--max-length", type=int,
                   help=f"longest sequence, prompt included; --max-new-tokens wins over it ({UNSET})")  # fmt: skip
    g.add_argument("--min-length", type=int, help=f"shortest sequence, prompt included ({UNSET})")
    g.add_argument("--length-penalty", type=float,
                   help=f"beam search: the exponent of the length that scores are divided by ({UNSET})")  # fmt: skip
    g.add_argument("--early-stopping", choices=("true", "false", "never"),
                   help=f"beam search: stop once num_beams hypotheses end (true), by HF's heuristic (false), or "
                        f"when no better one can be found (never) ({UNSET})")  # fmt: skip
    g.add_argument("--no-repeat-ngram-size", type=int, help=f"no n-gram of this size occurs twice ({UNSET})")
    g.add_argument("--repetition-penalty", type=float,
                   help=f"penalise the tokens already in the sequence; 1.0 is off ({UNSET})")  # fmt: skip
    g.add_argument("--bad-words-ids", type=_token_id_lists, metavar="IDS",
                   help=f"token sequences never to generate: ids separated by ',', sequences by ';' (e.g. 1,2;7) "
                        f"({UNSET})")  # fmt: skip
    g.add_argument("--decoder-start-token-id", type=int, help=f"encoder-decoders: the decoder's first token ({UNSET})")
    g.add_argument("--forced-bos-token-id", type=int, help=f"the token forced first after the start ({UNSET})")
    g.add_argument("--forced-eos-token-id", type=_token_ids, metavar="IDS",
                   help=f"the token(s) forced when max_length is reached, ids separated by ',' ({UNSET})")  # fmt: skip
    g.add_argument("--do-sample", action="store_true", default=None, help=f"sample instead of searching ({UNSET})")
    g.add_argument("--temperature", type=float, help=f"sampling: divide the logits by this ({UNSET})")
    g.add_argument("--top-k", type=int, help=f"sampling: only the k likeliest tokens ({UNSET})")
    g.add_argument("--top-p", type=float,
                   help=f"sampling: only the likeliest tokens whose probabilities sum to p ({UNSET})")  # fmt: skip
    g.add_argument("--seed", type=int, help="sampling: the random generator's seed (unset: a different draw each run)")
    g.add_argument("--language", help="multilingual Whisper: the language, e.g. en or de (unset: detected)")
    g.add_argument("--task", choices=("transcribe", "translate"), help=f"multilingual Whisper ({UNSET})")


def _add_serving_arguments(p: argparse.ArgumentParser, instances_help: str) -> None:
    p.add_argument("--model-name", help="Triton model name (unset: the bundle directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most inputs per model call")
    p.add_argument("--max-queue-delay-us", type=int, default=5000,
                   help="how long a request waits for others to batch with, in µs")  # fmt: skip
    p.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="batch requests that arrive together (--no-dynamic-batching: each on its own)")  # fmt: skip
    p.add_argument("--instances", type=int, help=instances_help)
    p.add_argument("--batching", choices=("inflight", "group"), default="inflight",
                   help="inflight: requests join the running batch at step boundaries and leave it when "
                   "their search ends; group: one generate call per group of equal parameters in a model call, "
                   "answered when its longest input ends")  # fmt: skip
    p.add_argument("--max-batch", type=int, metavar="N", help="most inputs in flight in the running batch (unset: as "
                   "memory allows)")  # fmt: skip
    p.add_argument("--max-rows", type=int, metavar="N", help="most decoder rows (inputs x beams) in flight (unset: "
                   "as memory allows)")  # fmt: skip
    g = p.add_argument_group("request limits (a request over one is refused: HTTP 400, naming the flag)")
    g.add_argument("--max-num-beams", type=int, help="largest num_beams and num_return_sequences (default 16)")
    g.add_argument("--max-new-tokens-limit", type=int, help="largest max_new_tokens (default 512)")
    g.add_argument("--max-text-bytes", type=int, help="largest text input in UTF-8 bytes, checked before "
                   "tokenizing (default 262144)")  # fmt: skip
    g.add_argument("--max-audio-seconds", type=float, help="longest audio input (speech bundles), an upload checked "
                   "from its header before decoding (default 3600)")  # fmt: skip


def serve_config(args: argparse.Namespace):
    """The serving arguments as a `ServeConfig`."""
    from el_export.serving.batching import RequestCaps
    from el_export.serving.server import ServeConfig

    name = args.model_name or re.sub(r"[^A-Za-z0-9._-]", "_", args.bundle.resolve().name)
    names = ("host", "http_port", "grpc_port", "metrics_port", "log_file")  # serve's; triton-repo has none
    ports = {k: getattr(args, k) for k in names if hasattr(args, k)}
    caps = {"max_num_beams": args.max_num_beams, "max_new_tokens": args.max_new_tokens_limit,
            "max_text_bytes": args.max_text_bytes, "max_audio_seconds": args.max_audio_seconds}  # fmt: skip
    return ServeConfig(
        model_name=name, max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        dynamic_batching=args.dynamic_batching, instances=args.instances, batching=args.batching,
        max_batch=args.max_batch, max_rows=args.max_rows,
        caps=RequestCaps(**{k: v for k, v in caps.items() if v is not None}), **ports,
    )  # fmt: skip


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation arguments the user set, under HF's names."""
    names = (
        "num_beams", "num_return_sequences", "max_new_tokens", "min_new_tokens", "max_length", "min_length",
        "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "bad_words_ids", "decoder_start_token_id",
        "forced_bos_token_id", "forced_eos_token_id", "do_sample", "temperature", "top_k", "top_p", "seed",
        "language", "task",
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
    options = {name: getattr(args, name) for name in ("dtype", "quantize", "quantize_recipe", "opset", "atol", "rtol")}
    check_options(mode=args.mode, **options)  # before the checkpoint loads
    hf_model, tokenizer = load_checkpoint(args.model)
    manifest = export_model(
        hf_model, out, mode=args.mode, tokenizer=tokenizer, feature_extractor=load_feature_extractor(args.model),
        overwrite=args.overwrite, source=args.model, auto_workload=given, threads=args.threads,
        progress=not logs.quiet(), **options,
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
    from el_export.runtime.stream import (
        JobOutput,
        Record,
        check_inputs,
        generate_file,
        generate_records,
        read_records,
        record_json,
    )

    if args.batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    if not args.text and args.input_file is None:
        raise InvalidArgumentError("no inputs: give TEXT arguments or --input-file")
    if args.output is not None and (args.text or args.input_file is None):
        raise InvalidArgumentError("--output streams an --input-file; give the inputs in a file, not as arguments")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise InvalidArgumentError("--memory-limit must be a positive number of GiB")
    for flag in ("max_batch", "max_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    kwargs = {**generation_kwargs(args), "truncation": args.truncation}
    if args.ray is not None:
        return _generate_on_ray(args, kwargs)
    if given := _given_flags(args, "workers", "threads_per_worker"):
        raise InvalidArgumentError(f"{given[0]} is for a Ray job; add --ray ADDRESS|auto|local")
    if args.output is not None:
        with JobOutput(args.output, inputs=args.input_file) as output:  # checked and locked before the bundle loads
            stats = generate_file(_load_generator(args), args.input_file, output, args.batch_size,
                                  progress=sys.stderr.isatty() and not logs.quiet(), **kwargs)  # fmt: skip
        print(
            f"{stats.written} written, {stats.skipped} already in {args.output}, {stats.total} inputs", file=sys.stderr
        )
        return 0
    generator = _load_generator(args)
    if args.input_file is not None:
        check_inputs(args.input_file, generator, truncation=args.truncation)
        records = read_records(args.input_file)
    else:
        records = (Record(i, i, text) for i, text in enumerate(args.text, start=1))
    ready, order = {}, []  # printed in input order, as soon as every earlier record is
    for results in generate_records(generator, _noting(records, order), args.batch_size, **kwargs):
        ready.update((record.line, (record, outputs)) for record, outputs in results)
        while order and order[0] in ready:
            record, outputs = ready.pop(order.pop(0))
            if args.json:
                print(json.dumps(record_json(record, outputs)), flush=True)
            else:
                print("\n".join(output["text"] for output in outputs), flush=True)
    return 0


def _generate_on_ray(args, kwargs: dict) -> int:
    from el_export.runtime.ray_job import generate_file_ray
    from el_export.runtime.stream import JobOutput

    if args.output is None:
        raise InvalidArgumentError("--ray runs a job: give --input-file and --output (the JSONL the job appends to)")
    with JobOutput(args.output, inputs=args.input_file) as output:  # checked and locked before the bundle is read
        stats = generate_file_ray(
            args.bundle, args.input_file, output, args.batch_size, address=args.ray, workers=args.workers,
            threads=args.threads_per_worker, backend=args.backend, settings=_generator_settings(args),
            progress=sys.stderr.isatty() and not logs.quiet(), **kwargs,
        )  # fmt: skip
    print(
        f"{stats.written} written, {stats.skipped} already in {args.output}, {stats.total} inputs; {stats.workers} "
        f"Ray workers on {stats.nodes} nodes, {stats.retried} inputs retried (run again after a worker was lost)",
        file=sys.stderr,
    )
    return 0


def _generator_settings(args) -> dict:
    """The `Generator` attributes the generate flags set (`ray_job.GENERATOR_SETTINGS`)."""
    limit = None if args.memory_limit is None else int(args.memory_limit * 2**30)
    return {"max_batch": args.max_batch, "max_rows": args.max_rows, "batching": args.batching, "memory_limit": limit}


def _noting(records, order: list):
    """The records, each one's line appended to `order` as it is read."""
    for record in records:
        order.append(record.line)
        yield record


def _load_generator(args):
    import el_export

    generator = el_export.load(args.bundle, backend=args.backend)
    for name, value in _generator_settings(args).items():
        setattr(generator, name, value)
    return generator


def _transcribe(args) -> int:
    import el_export
    from el_export.contract.files import read_manifest
    from el_export.runtime.transcripts import FORMATS, find_audio, transcribe_files

    for flag in ("batch_size", "num_beams"):
        if getattr(args, flag) < 1:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not all(math.isfinite(t) and t >= 0 for t in args.temperature):
        raise InvalidArgumentError(f"--temperature takes numbers >= 0, got {' '.join(map(str, args.temperature))}")
    if args.initial_prompt is not None and not args.initial_prompt.strip():
        raise InvalidArgumentError("--initial-prompt is empty; give the text to continue, or drop it")
    manifest = read_manifest(args.bundle, verify=False)  # the load below verifies it; this only asks what it is
    if not manifest.audio:
        raise InvalidArgumentError(f"{args.bundle} is a {manifest.family} bundle; transcribe takes a Whisper bundle")
    notes = not logs.quiet()
    skipped = lambda path, why: notes and print(f"el-export: note: skipped {path}: {why}", file=sys.stderr)  # noqa: E731
    files = find_audio(args.inputs, manifest.audio["sampling_rate"], on_skip=skipped)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"cannot create --output-dir {args.output_dir} ({e.strerror})") from None
    generator = el_export.load(args.bundle, backend=args.backend)
    kwargs = {
        "word_timestamps": args.word_timestamps, "num_beams": args.num_beams,
        "condition_on_prev_tokens": args.condition_on_previous_text,
        "temperature": args.temperature[0] if len(args.temperature) == 1 else tuple(args.temperature),
        **{name: getattr(args, name) for name in ("compression_ratio_threshold", "logprob_threshold",
                                                   "no_speech_threshold", "language", "task")
           if getattr(args, name) is not None},
    }  # fmt: skip
    if args.initial_prompt is not None:
        kwargs["prompt_ids"] = _prompt_ids(generator, args.bundle, args.initial_prompt)
    formats = list(FORMATS) if args.output_format == "all" else [args.output_format]
    with _audio_progress(enabled=sys.stderr.isatty() and notes) as bar:
        task = bar.add_task("transcribing", total=sum(f.seconds for f in files))
        written = transcribe_files(generator, files, args.output_dir, formats, batch_size=args.batch_size,
                                   on_progress=lambda done, _: bar.update(task, completed=done), **kwargs)  # fmt: skip
    count = len(written) // len(formats)
    print(f"wrote {count} transcript{'s' * (count != 1)} ({', '.join(formats)}) to {args.output_dir}", file=sys.stderr)
    return 0


def _prompt_ids(generator, bundle: Path, text: str):
    """--initial-prompt as HF's `prompt_ids`: int64 [P], [<|startofprev|>] + the text's tokens."""
    import torch

    if generator.tokenizer is None:
        raise InvalidArgumentError(
            f"--initial-prompt needs a tokenizer and {bundle} has none: re-export it with its checkpoint's tokenizer"
        )
    return torch.tensor(generator.tokenizer.prompt_ids(text), dtype=torch.int64)


def _audio_progress(enabled: bool):
    """A progress bar over seconds of audio, on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s of audio"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )  # fmt: skip


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
    limits = Limits(batch=args.max_batch_size, beams=args.max_beams, source=args.max_source,
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
    if manifest.quantization:
        record = manifest.quantization
        for name, got in record["graphs"].items():
            kept = ", ".join(f"{m} ({why})" for m, why in got["float32"].items()) or "none"
            memory = f", memory products {got['memory_products']}" if got.get("memory_products") else ""
            print(f"int8        {name}: recipe {record['recipe']['name']}, {got['activations']} activation scales, "
                  f"{len(got['int8'])} modules int8{memory}; float32: {kept}")
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
    rows = run_demo(args.out, num_beams=args.num_beams, progress=not logs.quiet())
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

    config = serve_config(args)
    out = args.out or DEFAULT_OUT / "triton" / config.model_name
    model_dir = write_repository(args.bundle, out, config, backend=args.backend)
    print(f"wrote {model_dir} (config.pbtxt, 1/model.py, 1/bundle)")
    return 0


def _bench(args) -> int:
    from el_export.evaluation import bench

    if args.threads < 1:
        raise InvalidArgumentError("--threads must be at least 1")
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.bundle is None:
        if given := _given_flags(args, "reference", "input_file", "num_beams", "max_new_tokens", "batch_size"):
            raise InvalidArgumentError(f"{', '.join(given)} only apply to a BUNDLE; give one, or drop them")
        profile = bench.PROFILES[args.profile or "full"]
        workloads = [w.strip() for w in (args.workloads or "W1,W3,W4,W5,W6,W2").split(",") if w.strip()]
        unknown = [w for w in workloads if w not in profile.workloads and w != "W2"]
        if unknown or not workloads:
            known = ", ".join(sorted([*profile.workloads, "W2"]))
            raise InvalidArgumentError(
                f"unknown workload {unknown[0] if unknown else ''!r} in the {profile.name} profile; choose {known}"
            )
        out = args.out or DEFAULT_OUT / "bench" / "report"
        report = bench.run_bench(args.work or DEFAULT_OUT / "bench", out, threads=args.threads,
                                 time_cap=args.time_cap, workloads=workloads, profile=profile.name,
                                 progress=progress)  # fmt: skip
        title = f"bench ({args.threads} threads; report in {out})"
    else:
        if given := _given_flags(args, "workloads", "profile"):
            raise InvalidArgumentError(f"{', '.join(given)} choose built-in workloads; with a BUNDLE the workload "
                                       "is its inputs (--input-file)")  # fmt: skip
        for flag in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be at least 1")
        work = args.work or DEFAULT_OUT / "bench" / args.bundle.resolve().name
        out = args.out or work / "report"
        report = bench.run_bundle_bench(
            args.bundle, work, out, reference=args.reference, input_file=args.input_file,
            num_beams=args.num_beams or 4, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or 8,
            threads=args.threads, time_cap=args.time_cap, progress=progress,
        )  # fmt: skip
        title = f"bench {args.bundle} ({report['inputs']} inputs, {args.threads} threads; report in {out})"
    if args.json:
        print(json.dumps(report["summary"], indent=2))
        return 0
    rows = []
    for key, s in report["summary"].items():
        if not isinstance(s, dict) or "total_s" not in s:
            continue
        ratio = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        same = f"{s['identical_to_hf']}/{s['compared']}" if "identical_to_hf" in s else "-"
        rows.append((key, f"{s['total_s']:.2f}", f"{s['tokens_per_s']:.1f}", ratio(s["speedup_vs_hf"]),
                     ratio(s["speedup_vs_ct2_float32"]), f"{s['peak_gib']:.2f}", same,
                     f"{s['step_vs_limit']:.2f}x" if "step_vs_limit" in s else "-"))  # fmt: skip
    _print_table(
        title,
        ("workload/engine", "total s", "tokens/s", "vs HF", "vs CT2 fp32", "peak GiB", "same as HF", "step/limit"),
        rows,
    )
    for engine, w2 in report.get("w2", {}).items():
        print(f"W2 {engine}: largest batch within 4 GiB = {w2['largest_batch']} ({w2['stopped_by']})")
    for key, value in report["summary"].items():
        if key.startswith("W3/") and "clips" in value:  # the W3 pair lines (engine entries hold counts too)
            print(f"{key}: {value['identical_transcripts']}/{value['clips']} identical transcripts")
        if key.startswith(("W7/", "W7p/")) and "real_time_factor" in value:  # long-form: speed and accuracy
            same = value.get("identical_tokens_and_timestamps")
            same = "" if same is None else f", tokens and timestamps as HF's on {same}/{value['recordings']}"
            print(f"{key}: real-time factor {value['real_time_factor']:.3f}, WER {value['wer']:.1%}{same}")
    for engine, reason in report["skipped"].items():
        print(f"skipped {engine}: {reason}")
    return 0


def _given_flags(args, *names: str) -> list[str]:
    """The flags among `names` given on the command line (their default is None)."""
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def _import_ct2(args) -> int:
    from el_export.export.importers.ct2_whisper import import_whisper

    print(f"wrote {import_whisper(args.ct2_dir, args.out, overwrite=args.overwrite)}")
    return 0


def _print_table(title: str, columns: tuple[str, ...], rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold", max_width=60)  # long cells wrap: nothing is cut to "…"
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # pipes get the whole table


if __name__ == "__main__":
    sys.exit(main())
