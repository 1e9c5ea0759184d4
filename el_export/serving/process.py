"""The Triton server binary that ships in the PyTriton wheel, as a child process: started on a repository,
waited on until ready, stopped in order; and the small process helpers the tests and the load test share."""

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path

from el_export.errors import BackendError
from el_export.serving.stub import check_python_stub, python_stub

DRAIN_TIMEOUT_S = 30  # in-flight requests get this long to finish when the server is stopped
EXIT_TIMEOUT_S = 1  # then Triton waits this long for idle client connections to close


class TritonProcess:
    """The Triton server binary shipped in the PyTriton wheel, serving `repository` on `host` only.

    The Python backend gets the stub built for this Python (as PyTriton arranges it) and this environment's
    packages. Triton runs in a session of its own, so a terminal's Ctrl-C reaches only this process, which
    stops it in order (`stop`); it follows this process if that dies (PDEATHSIG). Its output goes to `log`
    (appended, in full), or to stderr: warnings and errors only, and without the CUDA driver line that every
    host without a GPU prints (GPU metrics and pinned memory are off there too: nothing to report).

    Raises:
        BackendError: PyTriton is not installed, or its stub cannot run this interpreter.
    """

    def __init__(self, repository: str | os.PathLike, host: str, http_port: int, grpc_port: int,
                 metrics_port: int | None = None, log: str | os.PathLike | None = None):  # fmt: skip
        try:
            import pytriton
        except ImportError:
            raise BackendError("the Triton server comes with PyTriton: pip install 'el-export[serve]'") from None
        check_python_stub()
        stub, env = python_stub()
        dist = Path(pytriton.__file__).parent / "tritonserver"
        self.host, self.http_port, self._stopped, self.process, self._copier = host, http_port, False, None, None
        self._last_lines: deque[str] = deque(maxlen=5)
        self._shm_prefix = f"el-export-{os.getpid()}-{secrets.token_hex(4)}-"  # what a killed server leaves: ours
        self._tmp = Path(tempfile.mkdtemp(prefix="el-export-triton-"))
        try:  # whatever stops the start (a signal included) removes what it made
            backends = Path(shutil.copytree(dist / "backends", self._tmp / "backends"))
            shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
            gpu = any(Path("/dev").glob("nvidia[0-9]*"))
            argv = [
                str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
                f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
                f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}", f"--log-info={log is not None}",
                "--model-control-mode=explicit", "--load-model=*",
            ]  # fmt: skip
            if metrics_port is None:
                argv.append("--allow-metrics=false")
            else:
                argv += [f"--metrics-address={host}", f"--metrics-port={metrics_port}", f"--allow-gpu-metrics={gpu}"]
            if not gpu:
                argv.append("--pinned-memory-pool-byte-size=0")
            self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_follow_parent)  # fmt: skip
            self._copier = threading.Thread(target=self._copy_output, args=(log, gpu), name="triton-log", daemon=True)
            self._copier.start()
        except BaseException:
            self._remove(grace=1)
            raise

    def wait_ready(self, path: str, timeout: float) -> None:
        """Poll `path` (`/v2/health/ready`, a model's ready URL) until it answers 200.

        Raises:
            BackendError: Triton exited first, or `timeout` seconds passed (with its last log lines).
        """
        _wait_ready(self.process, self._url(path), timeout, self.tail)

    def tail(self) -> str:
        """Triton's last log lines, on one line."""
        if self.process.poll() is not None and self._copier is not None:
            self._copier.join(timeout=5)  # its last words
        return " | ".join(self._last_lines)

    def stop(self) -> None:
        """Unload the models (in-flight requests finish, the stubs exit cleanly), SIGTERM, SIGKILL past a grace
        time; then remove what Triton leaves: its copy of the backends, its shared memory if it was killed."""
        if self._stopped:
            return
        self._stopped = True
        self._drain()
        self._remove(grace=EXIT_TIMEOUT_S + 15)

    def _remove(self, grace: float) -> None:
        """Triton's process group (SIGTERM, SIGKILL after `grace` s), its files, its shared memory."""
        if self.process is not None:
            stop_process_group(self.process, timeout=grace)
        if self._copier is not None:
            self._copier.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def _drain(self) -> None:
        """Unload every model, waiting up to `DRAIN_TIMEOUT_S`. Triton's own shutdown (SIGTERM) waits first for
        idle client connections to close, a keep-alive client's never do, and then leaves the models no time:
        it kills their stubs, which leaves their shared memory behind, and exits with a failure."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with contextlib.suppress(OSError, ValueError):  # Triton gone, or not answering: the SIGTERM follows
            for model in self._post("/v2/repository/index"):
                if model.get("state") == "READY":
                    self._post(f"/v2/repository/models/{urllib.parse.quote(model['name'])}/unload")
            while time.monotonic() < deadline and self.process.poll() is None:
                if not any(m.get("state") in ("READY", "UNLOADING") for m in self._post("/v2/repository/index")):
                    return
                time.sleep(0.1)

    def _post(self, path: str):
        request = urllib.request.Request(self._url(path), data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def _url(self, path: str) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}{path}"

    def _copy_output(self, log: str | os.PathLike | None, gpu: bool) -> None:
        sink = open(log, "a", encoding="utf-8", errors="replace") if log is not None else sys.stderr  # noqa: SIM115
        try:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                self._last_lines.append(line.strip())
                if not gpu and "CudaDriverHelper has not been initialized" in line:  # no GPU here to drive
                    continue
                sink.write(line)
                sink.flush()
        finally:
            if sink is not sys.stderr:
                sink.close()


def _follow_parent() -> None:
    """In Triton's process before it runs: SIGTERM when the thread that started it ends, a crash included."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    """Poll `url` until it answers 200.

    Raises:
        BackendError: the process exited first, or `timeout` seconds passed (with the log's last lines).
    """
    _wait_ready(process, url, timeout, lambda: _tail(log_path))


def _wait_ready(process: subprocess.Popen, url: str, timeout: float, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackendError(f"{Path(process.args[0]).name} exited with {process.returncode}: {tail()}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise BackendError(f"{Path(process.args[0]).name} was not ready within {timeout:.0f} s: {tail()}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (the OS picks them), for servers started next."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def _tail(log_path: Path, lines: int = 5) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started in its own session: SIGTERM to its process group (server and stubs), time to
    exit and clean up (its leader may be gone already, its children not), then SIGKILL to what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=timeout)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
