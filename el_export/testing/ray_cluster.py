"""A Ray cluster of several nodes on this machine, for the tests and the scaling benchmark of `generate --ray`.

Each node is a `ray start --block` of our own, in a session of its own, on 127.0.0.1 with its own `--num-cpus` and
ports. Ray's worker processes start sessions of their own too, so a node's processes are found as the tree below
its `ray start` (read from /proc before anything is signalled): killing a node kills exactly its processes, and
closing the cluster kills every process it started, whatever happened before.
"""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RAY = Path(sys.executable).with_name("ray")  # the venv's: its nodes run this Python, with el-export installed


class LocalCluster:
    """A head node (`head_cpus` CPUs for workers) and the nodes `add_node` starts; a context manager. A driver
    joins it at `address` with the environment `env`.

    Raises:
        RuntimeError: a node did not join within `timeout` seconds (the tail of its log says why).
    """

    def __init__(self, head_cpus: int = 0, timeout: float = 120.0):
        self.timeout = timeout
        # short: Ray's Unix sockets live under it, and a socket path holds at most 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="elray", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # token authentication, with a token of its own: what a driver needs to join is `env` alone
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
        self.nodes: list[subprocess.Popen] = []  # the head first
        try:
            self._start("--head", "--port", str(self.port), "--num-cpus", str(head_cpus), "--include-dashboard=false",
                        "--temp-dir", str(self.root))  # fmt: skip
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_node(self, cpus: int) -> subprocess.Popen:
        """Start a node of `cpus` CPUs that joins the head, and wait until it has."""
        return self._start("--address", self.address, "--num-cpus", str(cpus))

    def kill_node(self, node: subprocess.Popen) -> int:
        """SIGKILL every process of `node` (its raylet, its agents, its workers); the number killed."""
        victims = _tree(node.pid)
        for pid in victims:
            _kill(pid)
        node.wait(timeout=30)
        return len(victims)

    def node_running(self, name: str) -> subprocess.Popen | None:
        """The first node (head last) with a process whose command line starts with `name`, e.g. "ray::Worker"
        (Ray names an actor's process after its class)."""
        for node in [*self.nodes[1:], *self.nodes[:1]]:
            if node.poll() is None and any(_cmdline(pid).startswith(name) for pid in _tree(node.pid)):
                return node
        return None

    def alive(self) -> int:
        """The nodes the head counts as alive."""
        out = subprocess.run([_RAY, "status", "--address", self.address], capture_output=True, text=True,
                             timeout=60, env=self.env).stdout  # fmt: skip
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(line.strip().startswith("1 node_") for line in active.splitlines())

    def close(self) -> None:
        """Kill every process the cluster started, then remove its files."""
        trees = {node.pid: _tree(node.pid) for node in self.nodes}  # all read before any is signalled
        for pids in trees.values():
            for pid in pids:
                _kill(pid)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=30)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _start(self, *args: str) -> subprocess.Popen:
        ports = [item for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                   "--runtime-env-agent-port", "--metrics-export-port")
                 for item in (flag, str(_free_port()))]  # fmt: skip
        log = self.root / f"node{len(self.nodes)}.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(
                [_RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *ports, *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
            )  # fmt: skip
        self.nodes.append(node)
        deadline = time.monotonic() + self.timeout
        while self.alive() < len(self.nodes):  # one at a time: nodes starting together take the same socket names
            if node.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray node {len(self.nodes) - 1} did not join {self.address}:\n{tail}")
            time.sleep(0.5)
        return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> set[int]:
    """The processes of `pid`'s process group and every descendant of them (Ray's workers start new sessions)."""
    parents: dict[int, tuple[int, int]] = {}  # pid -> (parent, process group)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            parents[int(entry)] = (int(fields[1]), int(fields[2]))
    found = {p for p, (_, group) in parents.items() if group == pid}
    while more := {p for p, (parent, _) in parents.items() if parent in found} - found:
        found |= more
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
