"""Serving a generator through Triton: the requests that arrive together become as few searches as possible.

Triton's dynamic batcher hands the model the requests that arrived within `max_queue_delay_us` (up to
`max_batch_size` inputs). `BatchRunner` merges those with the same generation parameters (and the same
kind of input) into ONE `generate` call, so the EL decoder's one-encoder-copy-per-input is shared
across users; requests with different parameters form separate groups, each one call. Search treats
every input on its own (only padding depends on the neighbours), so each answer equals `generate` on
that input alone: the runner crops each input's rows back to what that call would return.

`serve` / `start` run the Triton server that ships in the PyTriton wheel with a Python-backend model
(`el_export.triton_forward`) that forwards each batch to this process, where the runner answers it;
`el_export.triton_repo` runs the same runner inside a Triton Python-backend model. Requests carry inputs
as tensors and generation arguments as Triton request parameters (HF names: num_beams, max_new_tokens,
...). A refused request gets its own one-line error (HTTP 400, gRPC INVALID_ARGUMENT); its neighbours
in the batch get their answers.
"""

import contextlib
import errno
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from el_export.audio import load_audio
from el_export.errors import BackendError, ElExportError, InputError, InvalidArgumentError, first_line
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


@dataclass(frozen=True)
class RequestCaps:
    """The most one request may ask for, so that no client makes the server search or tokenize without bound.
    Each is refused in one line that names its flag (`serve` and `triton-repo` take the same ones)."""

    max_num_beams: int = 16  # num_beams and num_return_sequences: rows per input
    max_new_tokens: int = 512
    max_text_bytes: int = 262_144  # per text input, UTF-8, checked before tokenizing

    FLAGS: ClassVar[dict[str, str]] = {"max_num_beams": "--max-num-beams", "max_new_tokens": "--max-new-tokens-limit",
                                       "max_text_bytes": "--max-text-bytes"}  # fmt: skip

    def check(self) -> None:
        """Raises InvalidArgumentError for a cap below 1."""
        for name, flag in self.FLAGS.items():
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{flag} must be at least 1, got {getattr(self, name)}")

    def refuse(self, name: str, value: int, cap_name: str) -> InvalidArgumentError:
        """The one-line error for `name` = `value` over the cap `cap_name`."""
        cap, flag = getattr(self, cap_name), self.FLAGS[cap_name]
        return InvalidArgumentError(f"{name} {value} is over this server's limit of {cap}; ask for at most {cap}, "
                                    f"or start the server with a higher {flag}")  # fmt: skip


@dataclass
class _Request:
    items: list  # per input: token ids (list[int]) or mono float32 samples
    kwargs: dict  # generation arguments
    key: tuple  # requests with equal keys share one search


class BatchRunner:
    """Requests -> answers, with one `generate` call per group of requests that can share it.

    Args:
        generator: a loaded `Generator` (thread-safe: one runner may serve several model instances).
        caps: the most one request may ask for (default: `RequestCaps()`).
    """

    def __init__(self, generator, caps: RequestCaps | None = None):
        self.generator = generator
        self.caps = caps or RequestCaps()
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
            refused it (without traceback). One request's error never fails another.
        """
        results: list[dict | ElExportError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        parsed: dict[int, _Request] = {}
        for i, (data, parameters) in enumerate(requests):
            try:
                parsed[i] = self._parse(data, parameters or {}, i)
            except ElExportError as e:
                results[i] = _detached(e)
                continue
            groups.setdefault(parsed[i].key, []).append(i)
        for members in groups.values():
            try:
                answers = self._search([parsed[i] for i in members])
            except ElExportError as e:
                if len(members) == 1:
                    results[members[0]] = _detached(e)
                    continue
                answers = []  # find the request at fault: the others still get their answers
                for i in members:
                    try:
                        answers.extend(self._search([parsed[i]]))
                    except ElExportError as alone:
                        answers.append(_detached(alone))
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
        return results

    def _parse(self, data: dict, parameters: dict, index: int) -> _Request:
        kwargs = _check_parameters(parameters, self.caps)
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
        cap = self.caps.max_text_bytes
        for value in values[:, 0]:  # before decoding or tokenizing: both cost memory in proportion
            size = len(value) if isinstance(value, bytes) else len(str(value).encode())
            if size > cap:
                raise InputError(f"a text input is {size} bytes, over this server's limit of {cap}; send "
                                 "less text, or start the server with a higher --max-text-bytes")  # fmt: skip
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


def _detached(error: ElExportError) -> ElExportError:
    """`error` without its traceback and chained errors. Kept past its `except` block (in the results), those
    hold the failed call's frames, whose locals (a long text's token ids) a reference cycle through the
    results then keeps alive until a full garbage collection, which big allocations of ints never trigger."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def _check_parameters(parameters: dict, caps: RequestCaps) -> dict:
    """Request parameters -> generation arguments, with every unknown name, wrong type or value over a cap refused."""
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
    for name, cap in (("num_beams", "max_num_beams"), ("num_return_sequences", "max_num_beams"),
                      ("max_new_tokens", "max_new_tokens")):  # fmt: skip
        if kwargs.get(name, 0) > getattr(caps, cap):
            raise caps.refuse(name, kwargs[name], cap)
    return kwargs


def _utf8(value) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InputError("text inputs must be UTF-8") from None


# --- serving: Triton in front, this process answering ------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Where and how `serve` listens and batches, and what one request may ask for."""

    model_name: str = "el-export"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 8  # inputs per model call
    max_queue_delay_us: int = 5000  # how long a request waits for others to batch with
    dynamic_batching: bool = True  # False: every request runs on its own
    instances: int = 1  # model instances (stub processes, answered by the one loaded generator)
    log_file: Path | None = None  # the Triton server's log; None: warnings and errors on the console
    caps: RequestCaps = field(default_factory=RequestCaps)

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
        self.caps.check()

    def ports(self) -> dict[str, int]:
        """The ports to listen on, by the flag that sets each."""
        return {"--port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raises InvalidArgumentError, naming the port and its flag (the keys of `ports`), when one cannot be listened
    on: taken by another process, privileged, or `host` not an address of this machine. Triton itself would wait
    two minutes for a server that never comes up."""
    for flag, port in ports.items():
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise InvalidArgumentError(f"--host {host}: not an address to listen on ({first_line(e)})") from None
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no obstacle
            try:
                s.bind(address)
            except OSError as e:
                message = _BIND_ERRORS.get(e.errno, "cannot listen on {host} port {port} ({flag}): {error}")
                message = message.format(port=port, flag=flag, host=host, error=first_line(e))
                raise InvalidArgumentError(message) from None


_BIND_ERRORS = {
    errno.EADDRINUSE: "port {port} ({flag}) is in use on {host}: stop what listens there, or choose another {flag}",
    errno.EACCES: "port {port} ({flag}) needs privileges on {host}: choose one above 1023 with {flag}",
    errno.EADDRNOTAVAIL: "--host {host} is not an address of this machine: use 127.0.0.1 (this machine only) or "
    "0.0.0.0 (every interface)",
}


def check_can_serve(config: ServeConfig) -> None:
    """Everything `start` needs but the generator, checked in seconds (before a bundle loads).

    Raises:
        InvalidArgumentError: an invalid configuration, or a port that cannot be listened on.
        BackendError: PyTriton (which ships the Triton server) is missing, or its stub cannot run this Python.
    """
    config.check()
    try:
        import pytriton  # noqa: F401  (the Triton server binary and its Python backend come in its wheel)
    except ImportError as e:
        raise BackendError(f"serving needs PyTriton ({e.name} is missing): pip install 'el-export[serve]'") from None
    check_python_stub()
    check_ports_free(config.host, config.ports())


def start(generator, config: ServeConfig | None = None) -> "Server":
    """Start serving `generator` through Triton in the background; returns once the model is ready.

    Call it from a thread that outlives the server (the main thread): Triton follows the thread that started
    it when that thread ends, a crash included.

    Args:
        generator: a loaded `Generator`.
        config: addresses, batching, instances and request caps (default: `ServeConfig()`).

    Returns:
        The running `Server`; call `.stop()` (or use it as a context manager).

    Raises:
        BackendError: PyTriton is not installed, its Python-backend stub cannot run this interpreter, or Triton
            exited or was not ready in time (the message ends with its last log lines).
        InvalidArgumentError: an invalid configuration, or a port that cannot be listened on.
    """
    config = config or ServeConfig()
    check_can_serve(config)
    return Server(BatchRunner(generator, config.caps), config)


def serve(generator, config: ServeConfig | None = None) -> None:
    """Serve `generator` until SIGINT or SIGTERM: `start`, then `wait`. Raises as they do (KeyboardInterrupt for
    a signal before the server is up: what `start` made is gone by then)."""
    with stop_signals() as received:
        server = start(generator, config)
        try:
            if received:  # its KeyboardInterrupt was raised where Python ignores exceptions
                raise KeyboardInterrupt
            wait(server)
        finally:
            server.stop()


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Inside, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (a SIGTERM would otherwise end
    the process on the spot, leaving what `start` made); yields the list of the signals received."""
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def wait(server: "Server") -> None:
    """Block until SIGINT or SIGTERM, then stop the server `start` returned.

    Raises:
        BackendError: Triton stopped without being asked to (its log says why).
    """
    with stop_signals() as received:
        try:
            status = server.wait()
        except KeyboardInterrupt:
            if not received:
                raise
        finally:
            server.stop()
    if not received:
        raise BackendError(f"the Triton server stopped on its own (exit status {status}); its log says why")


FORWARDING_MODEL_PY = '''"""Triton Python-backend model written by `el-export serve`: batches go to the server."""

from el_export.triton_forward import ForwardingModel as TritonPythonModel  # noqa: F401  (Triton looks it up here)
'''

READY_TIMEOUT_S = 120.0  # Triton up and every model instance connected


class Server:
    """Triton (HTTP, gRPC, metrics, the dynamic batcher) with a Python-backend model whose instances forward
    each batch over a Unix socket to this process, where `runner` answers it: the loaded bundle is shared by
    every instance. `stop()` ends it; it is also a context manager.

    Args:
        runner: answers the batches.
        config: addresses, batching, instances, the log.

    Raises:
        BackendError: Triton exited or was not ready within `READY_TIMEOUT_S` (with its last log lines).
    """

    def __init__(self, runner: BatchRunner, config: ServeConfig):
        from el_export.triton_repo import TritonProcess, model_config

        self.config, self._triton, self._listener, self._stopped = config, None, None, False
        self._root = Path(tempfile.mkdtemp(prefix="el-export-serve-"))  # 0700: the socket, its key in the config
        self._address, self._authkey = str(self._root / "runner.sock"), secrets.token_bytes(32)
        try:  # whatever stops the start (a signal included) removes what it made
            if len(self._address.encode()) > 107:  # a Unix socket's path: 108 bytes with its NUL
                raise BackendError(f"{tempfile.gettempdir()} is too long a path for a Unix socket: set TMPDIR to "
                                   "a shorter directory (/tmp)")  # fmt: skip
            self._listener = Listener(self._address, family="AF_UNIX", authkey=self._authkey)
            threading.Thread(target=self._accept, args=(runner,), name="el-export-accept", daemon=True).start()
            model_dir = self._root / "models" / config.model_name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "1" / "model.py").write_text(FORWARDING_MODEL_PY, encoding="utf-8")
            parameters = {"el_export_address": self._address, "el_export_authkey": self._authkey.hex()}
            text = model_config(model_inputs(runner.generator.manifest), config, parameters)
            (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
            self._triton = TritonProcess(self._root / "models", config.host, config.http_port, config.grpc_port,
                                         metrics_port=config.metrics_port, log=config.log_file)  # fmt: skip
            self._triton.wait_ready(f"/v2/models/{config.model_name}/ready", READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def wait(self) -> int:
        """Block until Triton exits; its exit status."""
        return self._triton.process.wait()

    def stop(self) -> None:
        """Stop Triton (in-flight requests finish first), then this side: the socket and the repository."""
        if self._stopped:
            return
        self._stopped = True
        if self._triton is not None:
            self._triton.stop()
        if self._listener is not None:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:  # the accepting thread: ends
                wake.connect(self._address)  # (no handshake: this side never waits for one)
            self._listener.close()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def _accept(self, runner: BatchRunner) -> None:
        """One thread per model instance that connects, until the server stops."""
        while not self._stopped:
            try:
                connection = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a client without the key, or `stop` waking this
                continue
            if self._stopped:
                connection.close()
                return
            threading.Thread(target=_answer_batches, args=(runner, connection), daemon=True).start()


def _answer_batches(runner: BatchRunner, connection) -> None:
    """One model instance's batches, until it disconnects: outputs, a one-line message per refused request, or
    None for a bug in el-export (the batch fails with a 500; the traceback goes to this process's stderr, and
    the server goes on serving the other batches)."""
    with connection:
        while True:
            try:
                batch = connection.recv()
            except (EOFError, OSError):
                return
            try:
                replies = [r if isinstance(r, dict) else str(r) for r in runner(batch)]
            except Exception:
                traceback.print_exc()
                replies = None
            del batch  # the inputs (a long text) go now, not with the next batch
            try:
                connection.send(replies)
            except OSError:
                return


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
