"""Serving a generator through Triton: the requests that arrive together become as few searches as possible.

Triton's dynamic batcher hands the model the requests that arrived within `max_queue_delay_us` (up to
`max_batch_size` inputs). `BatchRunner` merges those with the same generation parameters (and the same
kind of input) into ONE `generate` call, so the EL decoder's one-encoder-copy-per-input is shared
across users; requests with different parameters form separate groups, each one call. Search treats
every input on its own (only padding depends on the neighbours), so each answer equals `generate` on
that input alone: the runner crops each input's rows back to what that call would return.

`serve` / `start` run the runner in PyTriton; `el_export.triton_repo` runs the same runner in a Triton
Python-backend model. Requests carry inputs as tensors and generation arguments as Triton request
parameters (HF names: num_beams, max_new_tokens, ...).
"""

import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from el_export.audio import load_audio
from el_export.errors import BackendError, ElExportError, InputError, InvalidArgumentError
from el_export.tokenizer import pad_ids, padding


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, per input of the batch (Triton adds the batch axis in front)."""

    name: str
    dtype: str  # numpy name: "bytes", "int64", "float32"
    shape: tuple[int, ...]  # -1: any length
    ragged: bool = False  # lengths may differ between the requests of one batch


TEXT_INPUTS = (
    TensorSpec("text", "bytes", (1,)),  # UTF-8 text (text bundles with a tokenizer)
    TensorSpec("input_ids", "int64", (-1,), ragged=True),
    TensorSpec("attention_mask", "int64", (-1,), ragged=True),  # optional, with input_ids: 0 on padding
)
SPEECH_INPUTS = (
    TensorSpec("audio", "bytes", (1,)),  # the bytes of a WAV or FLAC file at the model's sample rate
    TensorSpec("samples", "float32", (-1,), ragged=True),  # mono samples at the model's sample rate
)
OUTPUTS = (
    TensorSpec("text", "bytes", (-1,)),  # [R]: decoded (decoder-only: the continuation)
    TensorSpec("sequences", "int64", (-1, -1)),  # [R, T]: token ids as `generate` returns them
    TensorSpec("scores", "float32", (-1,)),  # [R]: beam search's sequences_scores; NaN for greedy and sampling
)

# Generation arguments a request may set (as Triton request parameters), with the types accepted.
PARAMETERS: dict[str, tuple[type, ...]] = {
    "num_beams": (int,), "num_return_sequences": (int,), "max_new_tokens": (int,), "min_new_tokens": (int,),
    "length_penalty": (float, int), "early_stopping": (bool, str), "no_repeat_ngram_size": (int,),
    "repetition_penalty": (float, int), "do_sample": (bool,), "temperature": (float, int), "top_k": (int,),
    "top_p": (float, int), "seed": (int,), "language": (str,), "task": (str,), "truncation": (bool,),
}  # fmt: skip


def model_inputs(manifest) -> tuple[TensorSpec, ...]:
    """The inputs a bundle's model takes: audio for speech bundles, text or token ids otherwise."""
    return SPEECH_INPUTS if manifest.audio else TEXT_INPUTS


@dataclass
class _Request:
    items: list  # per input: token ids (list[int]) or mono float32 samples
    kwargs: dict  # generation arguments
    key: tuple  # requests with equal keys share one search


class BatchRunner:
    """Requests -> answers, with one `generate` call per group of requests that can share it.

    Args:
        generator: a loaded `Generator` (thread-safe: one runner may serve several model instances).
    """

    def __init__(self, generator):
        self.generator = generator
        manifest = generator.manifest
        self.speech = bool(manifest.audio)
        self.decoder_only = manifest.kind == "decoder-only"
        pad, self.padding_side = padding(manifest)
        self.pad_token_id = 0 if pad is None else pad
        defaults = {**manifest.special_tokens, **manifest.generation_defaults}
        eos = defaults.get("eos_token_id")
        self.eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else eos, dtype=torch.int64)

    def __call__(self, requests: list[tuple[dict, dict | None]]) -> list[dict | ElExportError]:
        """Answer a batch of requests.

        Args:
            requests: per request, its input tensors by name (each with the batch axis first) and
                its parameters (generation arguments under HF's names).

        Returns:
            Per request, its output tensors by name (`OUTPUTS`, batch axis first), or the error that
            refused it. One request's error never fails another.
        """
        results: list[dict | ElExportError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        parsed: dict[int, _Request] = {}
        for i, (data, parameters) in enumerate(requests):
            try:
                parsed[i] = self._parse(data, parameters or {}, i)
            except ElExportError as e:
                results[i] = e
                continue
            groups.setdefault(parsed[i].key, []).append(i)
        for members in groups.values():
            try:
                answers = self._search([parsed[i] for i in members])
            except ElExportError as e:
                if len(members) == 1:
                    results[members[0]] = e
                    continue
                answers = []  # find the request at fault: the others still get their answers
                for i in members:
                    try:
                        answers.extend(self._search([parsed[i]]))
                    except ElExportError as alone:
                        answers.append(alone)
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
        return results

    def _parse(self, data: dict, parameters: dict, index: int) -> _Request:
        kwargs = _check_parameters(parameters)
        truncation = kwargs.pop("truncation", False)
        names = sorted(name for name, value in data.items() if value is not None)
        kinds = ("audio", "samples") if self.speech else ("text", "input_ids")
        given = [name for name in kinds if name in names]
        if len(given) != 1 or not set(names) <= {*kinds, "attention_mask"}:
            raise InvalidArgumentError(f"give exactly one of the inputs {' or '.join(kinds)}; got {', '.join(names)}")
        if "attention_mask" in names and given != ["input_ids"]:
            raise InvalidArgumentError("attention_mask goes with input_ids")
        values = np.asarray(data[given[0]])
        if values.ndim != 2 or values.shape[0] == 0:
            raise InputError(f"input {given[0]} must be [batch, length], got shape {list(values.shape)}")
        read = {"text": self._text_items, "input_ids": self._input_ids_items, "audio": self._audio_items,
                "samples": self._samples_items}[given[0]]  # fmt: skip
        items = read(values, data.get("attention_mask"), truncation)
        key = tuple(sorted(kwargs.items()))
        if kwargs.get("do_sample") and "seed" in kwargs:  # a seeded draw depends on the batch: run it alone
            key += ("alone", index)
        if self.decoder_only and "max_new_tokens" not in kwargs:  # max_length counts the padded prompt
            key += ("prompt", max(len(ids) for ids in items))
        return _Request(items, kwargs, key)

    def _text_items(self, values: np.ndarray, mask, truncation: bool) -> list[list[int]]:
        tokenizer = self.generator.tokenizer
        if tokenizer is None:
            raise InvalidArgumentError("this bundle has no tokenizer: send input_ids instead of text")
        texts = [_utf8(value) for value in values[:, 0]]
        max_length = self.generator.max_source_positions
        return [tokenizer.encode([text], max_length=max_length, truncation=truncation)[0][0].tolist() for text in texts]

    def _input_ids_items(self, values: np.ndarray, mask, truncation: bool) -> list[list[int]]:
        if not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {values.dtype}")
        if mask is None:
            return [row.tolist() for row in values]
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise InputError(f"attention_mask {list(mask.shape)} does not match input_ids {list(values.shape)}")
        return [row[keep != 0].tolist() for row, keep in zip(values, mask, strict=True)]

    def _audio_items(self, values: np.ndarray, mask, truncation: bool) -> list[np.ndarray]:
        rate = self.generator.manifest.audio["sampling_rate"]
        return [load_audio(value if isinstance(value, bytes) else bytes(value), rate) for value in values[:, 0]]

    def _samples_items(self, values: np.ndarray, mask, truncation: bool) -> list[np.ndarray]:
        return [row.astype(np.float32) for row in values]

    def _search(self, requests: list[_Request]) -> list[dict]:
        """One `generate` call over every input of `requests`; each request's rows cropped back out."""
        items = [item for request in requests for item in request.items]
        kwargs = requests[0].kwargs
        if self.speech:
            out = self.generator.generate(audio=items, **kwargs)
            prompt_width = 1  # the decoder prompt: only its first token (BART's start) may be an eos
        else:
            if any(len(ids) == 0 for ids in items):
                raise InputError("an input has no tokens; give at least one token per input")
            input_ids, mask = pad_ids(items, self.pad_token_id, self.padding_side)
            out = self.generator.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            prompt_width = input_ids.shape[1] if self.decoder_only else 1
        sequences = out.sequences.cpu()  # [B * R, W]
        R = sequences.shape[0] // len(items)
        ends = self._row_ends(sequences, out.beam_indices, prompt_width)  # [B * R]
        scores = torch.full((sequences.shape[0],), math.nan)
        if out.sequences_scores is not None:
            scores = out.sequences_scores.cpu().float()
        answers, row = [], 0
        for request in requests:
            per_input = []
            for item in request.items:
                rows = slice(row, row + R)
                start = prompt_width - len(item) if self.decoder_only else 0  # drop the batch's left padding
                per_input.append((sequences[rows, start : int(ends[rows].max())], scores[rows], len(item)))
                row += R
            answers.append(self._answer(per_input))
        return answers

    def _row_ends(self, sequences: torch.Tensor, beam_indices, prompt_width: int) -> torch.Tensor:
        """Per row, the column after its last token: what `generate` on its input alone would keep."""
        if beam_indices is not None:  # -1 past each hypothesis' end
            steps = beam_indices.shape[1]
            return sequences.shape[1] - steps + (beam_indices.cpu() >= 0).sum(dim=1)
        generated = sequences[:, prompt_width:]
        is_eos = torch.isin(generated, self.eos)  # a row ends at its first eos, or runs to the last column
        first = is_eos.int().argmax(dim=1)
        return torch.where(is_eos.any(dim=1), prompt_width + first + 1, sequences.shape[1])

    def _answer(self, per_input: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict:
        """One request's output tensors: [n, R] texts and scores, [n, R, T] sequences (right-padded)."""
        width = max(seqs.shape[1] for seqs, _, _ in per_input)
        sequences = torch.stack(
            [
                torch.nn.functional.pad(seqs, (0, width - seqs.shape[1]), value=self.pad_token_id)
                for seqs, _, _ in per_input
            ]
        )
        tokenizer = self.generator.tokenizer
        texts = []
        for seqs, _, prompt_length in per_input:
            generated = seqs[:, prompt_length:] if self.decoder_only else seqs
            decoded = tokenizer.decode(generated) if tokenizer is not None else [""] * seqs.shape[0]
            texts.append([text.encode() for text in decoded])
        return {
            "text": np.array(texts, dtype=np.object_),
            "sequences": sequences.numpy(),
            "scores": torch.stack([scores for _, scores, _ in per_input]).numpy().astype(np.float32),
        }


def _check_parameters(parameters: dict) -> dict:
    """Request parameters -> generation arguments, with every unknown name or wrong type refused."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise InvalidArgumentError(f"unknown parameter {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    for name, value in parameters.items():
        types = PARAMETERS[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise InvalidArgumentError(f"parameter {name} must be {' or '.join(t.__name__ for t in types)}")
    kwargs = dict(parameters)
    if isinstance(kwargs.get("early_stopping"), str) and kwargs["early_stopping"] != "never":
        raise InvalidArgumentError("parameter early_stopping must be true, false or 'never'")
    return kwargs


def _utf8(value) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InputError("text inputs must be UTF-8") from None


# --- serving through PyTriton ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Where and how `serve` listens and batches."""

    model_name: str = "el-export"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 8  # inputs per model call
    max_queue_delay_us: int = 5000  # how long a request waits for others to batch with
    dynamic_batching: bool = True  # False: every request runs on its own
    instances: int = 1  # model instances (threads sharing the one loaded generator)
    log_file: Path | None = None  # the Triton server's log; None: the console

    def check(self) -> None:
        """Raises InvalidArgumentError for values Triton would refuse later, less clearly."""
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.model_name):
            raise InvalidArgumentError(f"model name {self.model_name!r}: use letters, digits, '.', '_' and '-'")
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not 0 < getattr(self, name) < 65536:
                raise InvalidArgumentError(f"{name.replace('_', ' ')} {getattr(self, name)} is not a port number")
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise InvalidArgumentError("the HTTP, gRPC and metrics ports must differ")
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise InvalidArgumentError("max batch size and instances must be at least 1, the queue delay at least 0")


def start(generator, config: ServeConfig | None = None):
    """Start serving `generator` through Triton (PyTriton) in the background.

    Args:
        generator: a loaded `Generator`.
        config: addresses, batching and instances (default: `ServeConfig()`).

    Returns:
        The running `pytriton.triton.Triton`; call `.stop()` (or use it as a context manager).

    Raises:
        BackendError: PyTriton is not installed, or its Python-backend stub cannot run this interpreter.
        InvalidArgumentError: an invalid configuration.
    """
    config = config or ServeConfig()
    config.check()
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise BackendError(f"serving needs PyTriton ({e.name} is missing): pip install 'el-export[serve]'") from None
    check_python_stub()
    runner = BatchRunner(generator)
    inputs = [Tensor(name=s.name, dtype=_NUMPY[s.dtype], shape=s.shape, optional=True)
              for s in model_inputs(generator.manifest)]  # fmt: skip
    outputs = [Tensor(name=s.name, dtype=_NUMPY[s.dtype], shape=s.shape) for s in OUTPUTS]
    batcher = None  # no dynamic batcher: Triton runs each request on its own
    if config.dynamic_batching:
        batcher = DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us)
    host = config.host
    server = TritonConfig(
        http_address=host, http_port=config.http_port, grpc_address=host, grpc_port=config.grpc_port,
        metrics_address=host, metrics_port=config.metrics_port, exit_timeout_secs=5, log_verbose=0,
        log_file=config.log_file,
    )  # fmt: skip
    triton = Triton(config=server)
    try:
        triton.bind(
            model_name=config.model_name,
            infer_func=[_pytriton_infer(runner) for _ in range(config.instances)],
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=config.max_batch_size, batcher=batcher),
        )
        triton.run()
    except BaseException:
        triton.stop()
        raise
    return triton


def serve(generator, config: ServeConfig | None = None) -> None:
    """Serve `generator` until SIGINT or SIGTERM: `start`, then `wait`. Raises as they do."""
    wait(start(generator, config))


def wait(triton) -> None:
    """Block until SIGINT or SIGTERM, then stop the server `start` returned.

    Raises:
        BackendError: Triton stopped without being asked to (its log says why).
    """
    stopping = []

    def interrupt(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        triton.serve()  # returns when Triton or the model stops, or (stopping it) on KeyboardInterrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        triton.stop()
    if not stopping:
        raise BackendError("the Triton server stopped on its own; its log says why")


_NUMPY = {"bytes": np.bytes_, "int64": np.int64, "float32": np.float32}


def _pytriton_infer(runner: BatchRunner):
    """A PyTriton inference callable over `runner` (one per model instance)."""

    def infer(requests):
        results = runner([(request.data, request.parameters) for request in requests])
        errors = [f"request {i + 1} of {len(results)}: {r}" for i, r in enumerate(results) if isinstance(r, Exception)]
        if errors:  # PyTriton answers a whole batch with one error: name the request(s) at fault
            raise InvalidArgumentError("; ".join(errors))
        return results

    return infer


# --- the Python-backend stub must match this interpreter ---------------------------------------------------

_LIBPYTHON_VERSION = textwrap.dedent(
    """
    import ctypes, sys
    get_version = ctypes.CDLL(sys.argv[1]).Py_GetVersion  # a full path: that file, even where another is loaded
    get_version.restype = ctypes.c_char_p
    print(get_version().decode().split()[0])
    """
)


def python_stub() -> tuple[Path, dict[str, str]]:
    """PyTriton's Python-backend stub for this Python, and the environment Triton runs it in (as PyTriton
    arranges it: the wheel's libraries on LD_LIBRARY_PATH, this environment's Python first on PATH)."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = (
        dist
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    env = dict(os.environ)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return stub, env


def stub_library(stub: Path, env: dict[str, str]) -> tuple[str, str] | None:
    """(version, path) of the libpython that `stub` loads, as the dynamic loader resolves it; None if none is found.

    The loader finds the stub's `libpython3.X.so.1.0` by its own rules (this interpreter's library may
    be another file: a pyenv build carries its own), so `ldd` names the file, and a fresh process loads
    that file by its path to read its version.
    """
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env, timeout=60).stdout
    match = re.search(r"libpython\S*\s+=>\s+(/\S+)", linked)
    if match is None:
        return None
    path = match.group(1)
    result = subprocess.run([sys.executable, "-c", _LIBPYTHON_VERSION, path], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    return result.stdout.strip(), path


def stub_problem(library: tuple[str, str] | None, running: str, executable: str) -> str | None:
    """Why the stub cannot run with this interpreter (one line), or None when it can."""
    soname = f"libpython{'.'.join(running.split('.')[:2])}.so.1.0"
    if library is None:
        return (
            f"Triton's Python-backend stub needs {soname}, which is not installed "
            f"(Debian/Ubuntu: apt-get install lib{soname.removeprefix('lib').split('.so')[0]})"
        )
    version, path = library
    if version == running:
        return None
    major_minor = ".".join(version.split(".")[:2])
    system = Path(f"/usr/bin/python{major_minor}")
    remedy = f"{system} -m venv .venv" if system.exists() else f"a Python {version} that provides {path}"
    return (
        f"this environment runs Python {running} ({executable}) but Triton's Python-backend stub loads "
        f"Python {version} from {path}, and models fail to load with that mix; create the environment with "
        f"the Python that library belongs to: {remedy}"
    )


def check_python_stub() -> None:
    """Raises BackendError when Triton's Python-backend stub (from PyTriton) cannot run models here.

    Without `ldd` nothing can be checked, and Triton reports a mismatch itself when the model loads.
    """
    stub, env = python_stub()
    if not stub.is_file():
        raise BackendError(f"PyTriton ships no Python-backend stub for Python {platform.python_version()}")
    if shutil.which("ldd") is None:
        return
    problem = stub_problem(stub_library(stub, env), platform.python_version(), sys.executable)
    if problem is not None:
        raise BackendError(problem)
