"""`el-export serve`: the Triton server that ships in the PyTriton wheel, with a Python-backend model
(`serving.forward`) whose instances forward each batch over a Unix socket to this process, where one
`BatchRunner` answers it: the loaded bundle, and with in-flight batching its running batch, are shared by every
instance. Requests carry inputs as tensors
and generation arguments as Triton request parameters (HF names).
"""

import contextlib
import errno
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from pathlib import Path

from el_export.errors import BackendError, InvalidArgumentError, first_line
from el_export.serving.batching import BATCHING, BatchRunner, RequestCaps
from el_export.serving.stub import check_python_stub


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
    # model instances (stub processes, answered by the one loaded generator); None: `model_instances`
    instances: int | None = None
    batching: str = BATCHING[0]  # "inflight": model calls join one running batch; "group": one generate per group
    max_batch: int | None = None  # inputs in flight (generator.max_batch); None: as memory allows
    max_rows: int | None = None  # decoder rows in flight (generator.max_rows); None: as memory allows
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
        if self.max_batch_size < 1 or self.model_instances < 1 or self.max_queue_delay_us < 0:
            raise InvalidArgumentError("max batch size and instances must be at least 1, the queue delay at least 0")
        if self.batching not in BATCHING:
            raise InvalidArgumentError(f"--batching {self.batching}: choose {' or '.join(BATCHING)}")
        for flag, value in (("--max-batch", self.max_batch), ("--max-rows", self.max_rows)):
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{flag} must be at least 1, got {value}")
        self.caps.check()

    @property
    def model_instances(self) -> int:
        """`instances`, or when unset 8 for in-flight batching (it batches only the model calls in flight at once:
        each instance has one; with 4 a bart-base-sized model's load test queued in Triton at 0.76x offline
        throughput, 8 reached 0.81x and 16 0.84x, but 16 stubs take Triton 21 s to stop) and 1 for group
        batching."""
        if self.instances is not None:
            return self.instances
        return INFLIGHT_INSTANCES if self.batching == "inflight" else 1

    def ports(self) -> dict[str, int]:
        """The ports to listen on, by the flag that sets each."""
        return {"--port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}


INFLIGHT_INSTANCES = 8  # serve's default instances with in-flight batching


def make_runner(generator, config: "ServeConfig") -> BatchRunner:
    """The `BatchRunner` `config` asks for, with its `max_batch` / `max_rows` (when set) on the generator."""
    if config.max_batch is not None:
        generator.max_batch = config.max_batch
    if config.max_rows is not None:
        generator.max_rows = config.max_rows
    return BatchRunner(generator, config.caps, config.batching)


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
        config: addresses, batching, instances and request caps (default: `ServeConfig()`); its `max_batch` and
            `max_rows` are set on `generator`.

    Returns:
        The running `Server`; call `.stop()` (or use it as a context manager).

    Raises:
        BackendError: PyTriton is not installed, its Python-backend stub cannot run this interpreter, or Triton
            exited or was not ready in time (the message ends with its last log lines).
        InvalidArgumentError: an invalid configuration, or a port that cannot be listened on.
    """
    config = config or ServeConfig()
    check_can_serve(config)
    return Server(make_runner(generator, config), config)


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

from el_export.serving.forward import ForwardingModel as TritonPythonModel  # noqa: F401  (Triton looks it up here)
'''

READY_TIMEOUT_S = 120.0  # Triton up and every model instance connected


class Server:
    """Triton (HTTP, gRPC, metrics, the dynamic batcher) with a Python-backend model whose instances forward
    each batch over a Unix socket to this process, where `runner` answers it: the loaded bundle is shared by
    every instance. `stop()` ends it (and the runner's scheduler thread); it is also a context manager.

    Args:
        runner: answers the batches; closed by `stop()`.
        config: addresses, batching, instances, the log.

    Raises:
        BackendError: Triton exited or was not ready within `READY_TIMEOUT_S` (with its last log lines).
    """

    def __init__(self, runner: BatchRunner, config: ServeConfig):
        from el_export.serving.process import TritonProcess
        from el_export.serving.triton_repo import model_config

        self.config, self._runner, self._triton, self._listener, self._stopped = config, runner, None, None, False
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
            text = model_config(runner.generator.manifest, config, parameters, config.model_instances)
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
        """Stop Triton (in-flight requests finish first), then this side: the runner's scheduler thread, the socket
        and the repository."""
        if self._stopped:
            return
        self._stopped = True
        if self._triton is not None:
            self._triton.stop()
        if self._listener is not None:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:  # the accepting thread: ends
                wake.connect(self._address)  # (no handshake: this side never waits for one)
            self._listener.close()
        self._runner.close()
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
