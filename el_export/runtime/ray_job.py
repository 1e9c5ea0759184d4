"""The batch job on a Ray cluster: `stream.py`'s resumable JSONL job, its inputs run by Ray actors on many machines.

The driver (the `el-export generate --ray` process) is the job's one writer. It checks the output and every input
as the single-machine job does (the same header: either job resumes the other's output), reads each file of the
bundle once, checked against its sha256, into Ray's object store, and hands each worker groups of `batch_size`
records (for speech bundles, each audio file's bytes, read and checked on the driver: no node needs the driver's
paths). A worker is an actor: it writes the bundle to a private directory, loads it with `el_export.load` (which
checks every file's sha256 again) and runs the groups in flight on it through one running batch (a
`BackgroundScheduler`: a group joins at a step boundary, so the batch stays full across groups). Each group's
records come back to the driver, which appends them as one write and fsync.

Faults are Ray's to handle: a worker lost with its node is restarted on another (`max_restarts`) and the groups
that were in flight on it run again there (`max_task_retries=-1`); the driver counts the inputs of every group
whose task ran more than once (Ray's attempt number). A task's result reaches the driver once and a record is
written only if it is not in the output yet, so nothing is written twice; a killed driver loses nothing written,
and the rerun resumes.
"""

import contextlib
import itertools
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from el_export.contract.files import read_file, read_manifest, sha256_bytes
from el_export.contract.manifest import MANIFEST
from el_export.errors import BundleError, ElExportError, InvalidArgumentError, first_line
from el_export.runtime.stream import (
    JobOutput,
    Record,
    StreamStats,
    progress_bar,
    read_records,
    records_request,
    start_job,
)

RAY_INSTALL = 'pip install "el-export[ray]"'
MAX_RESTARTS = 16  # times one worker is replaced (a node lost costs one per worker on it); a crash every time ends it
GROUPS_PER_WORKER = 2  # groups in flight on a worker: one joins its running batch while the other drains
GENERATOR_SETTINGS = ("max_batch", "max_rows", "batching", "memory_limit")  # `Generator` attributes a worker takes
_PROBE_SECONDS = 10  # ray.init retries an address that answers nothing for minutes: try it first


@dataclass
class RayStats(StreamStats):
    retried: int = 0  # inputs whose group Ray ran again after its worker was lost
    workers: int = 0
    nodes: int = 0  # nodes the workers answered from


def import_ray():
    """The `ray` module, or a one-line InvalidArgumentError saying what to install."""
    try:
        import ray
    except ImportError:
        raise InvalidArgumentError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


@contextlib.contextmanager
def connected(address: str):
    """Ray, connected for the block: "local" starts a private instance on this machine (stopped at the end),
    "auto" joins the cluster `ray start` began on this machine (or RAY_ADDRESS), anything else is a cluster's
    address (host:port, or a Ray Client ray://host:port). The driver leaves a cluster it joined running.

    Raises:
        InvalidArgumentError: Ray is not installed, or no cluster answers at the address.
    """
    ray = import_ray()
    options = {"logging_level": logging.ERROR, "log_to_driver": True}  # Ray's notes stay out of the job's stderr
    if address == "local":
        options.update(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    else:
        if address != "auto":
            _probe(address)
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(
            f"cannot join a Ray cluster at --ray {address} ({first_line(e)}); start one (ray start --head), give its "
            "address (host:port), or use --ray local"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _probe(address: str) -> None:
    """Refuse at once an address where nothing listens (ray.init would retry it for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError(f"--ray {address} is not host:port (or auto, or local); give the head's address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_SECONDS).close()
    except OSError as e:
        raise InvalidArgumentError(
            f"cannot reach a Ray cluster at --ray {address} ({e.strerror or first_line(e)}); start one (ray start "
            "--head), give its address, or use --ray local"
        ) from None


def bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    """Every file of the bundle (the manifest among them), each read once and checked against its sha256: what
    the workers get.

    Raises:
        BundleError: the bundle is missing, changed or malformed.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True, hash_files=False)  # hashed below, as read
    files = {name: read_file(bundle_dir, manifest, name) for name in manifest.files}
    files[MANIFEST] = (bundle_dir / MANIFEST).read_bytes()
    return files


class Worker:
    """One Ray actor: the bundle loaded once, at its first group, and one running batch that every group in flight
    on it joins.

    Each task carries the bundle's ObjectRef (nested, so Ray hands it over unresolved): a worker restarted on
    another node loads it from the group it is given again, and an error in loading reaches the driver as itself.
    """

    def __init__(self, bundle_sha256: str, backend: str, threads: int, settings: dict, version: str):
        self.spec = (bundle_sha256, backend, threads, settings, version)
        self.lock = threading.Lock()
        self.loaded = None  # (generator, its BackgroundScheduler)

    def run(self, bundle: list, items: list[tuple[int, str, bytes | None]], kwargs: dict) -> tuple[list, int, str]:
        """[the ObjectRef of `bundle_files`] and (line, text, audio bytes or None) of each record of a group ->
        ((line, its outputs) of each record, the attempt (0 unless Ray runs this task again after its worker was
        lost), this node's id)."""
        generator, scheduler = self._load(bundle)
        kwargs = dict(kwargs)
        truncation = kwargs.pop("truncation", False)
        records = [Record(line, line, text) for line, text, _ in items]
        audio = _samples(generator, items) if generator.manifest.audio else None
        answered: list[tuple[Record, list[dict]]] = []
        request = records_request(generator, records, answered, truncation, kwargs, audio)
        scheduler.wait(scheduler.submit(request))
        return [(record.line, outputs) for record, outputs in answered], *_attempt_and_node()

    def _load(self, bundle: list):
        import ray

        import el_export
        from el_export.runtime.scheduler import BackgroundScheduler

        with self.lock:  # the groups in flight arrive together
            if self.loaded is None:
                bundle_sha256, backend, threads, settings, version = self.spec
                if el_export.__version__ != version:
                    raise InvalidArgumentError(
                        f"node {socket.gethostname()} runs el-export {el_export.__version__}, the driver {version}: "
                        "install the same el-export on every node"
                    )
                generator = _load_bundle(ray.get(bundle[0]), bundle_sha256, backend, threads)
                for name, value in settings.items():
                    setattr(generator, name, value)
                scheduler = BackgroundScheduler(generator.scheduler, around=generator.backend.generating)
                self.loaded = generator, scheduler
            return self.loaded


def _load_bundle(files: dict[str, bytes], bundle_sha256: str, backend: str, threads: int):
    """Write the bundle to a private directory, load it (every file checked against the manifest's sha256) and
    remove the directory: the backends run the bytes they read."""
    import torch

    import el_export

    if sha256_bytes(files.get(MANIFEST, b"")) != bundle_sha256:
        raise BundleError(f"the bundle's {MANIFEST} reached this worker changed (not sha256 {bundle_sha256[:12]})")
    torch.set_num_threads(threads)
    options = {"threads": threads} if backend == "onnxruntime" else {}
    with tempfile.TemporaryDirectory(prefix="el-export-bundle-") as directory:
        for name, data in files.items():
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
                raise BundleError(f"bundle file name {name!r} leaves the bundle directory")
            path = Path(directory, *parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return el_export.load(directory, backend=backend, **options)


def _samples(generator, items) -> list:
    """Each record's audio bytes -> mono float32 samples at the model's rate, errors naming the record's path."""
    from el_export.runtime.audio import load_audio, mono_waveform
    from el_export.runtime.speech import MAX_RECORDING_SECONDS, RECORDING_LIMIT

    rate = generator.manifest.audio["sampling_rate"]
    return [
        mono_waveform(load_audio(data, rate, MAX_RECORDING_SECONDS, RECORDING_LIMIT, name=text), f"audio {text}")
        for _, text, data in items
    ]


def _attempt_and_node() -> tuple[int, str]:
    """The current task's attempt number (0 on its first run: Ray's own count, kept by its core worker; Ray has no
    public call for it, so `tests/runtime/test_ray_job.py` checks that it counts a node's loss) and node id."""
    import ray

    attempt = ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()
    return attempt, ray.get_runtime_context().get_node_id()


def generate_file_ray(
    bundle_dir: Path,
    inputs: Path,
    output: JobOutput,
    batch_size: int,
    *,
    address: str,
    workers: int | None = None,
    threads: int | None = None,
    backend: str = "onnxruntime",
    settings: dict | None = None,
    progress: bool = True,
    **kwargs,
) -> RayStats:
    """`stream.generate_file` on a Ray cluster: every input record not yet in `output` generated by `workers`
    actors (unset: as many as the cluster's nodes hold at `threads` CPUs each), one JSON line appended per input.

    Args:
        bundle_dir: the bundle, read here and shipped to the workers through Ray's object store.
        address: "local", "auto", or a cluster's address (see `connected`).
        threads: CPUs each worker takes (its backend's threads; unset: 1); a tensorrt worker takes a GPU as well.
        settings: `Generator` attributes each worker sets (GENERATOR_SETTINGS).
        **kwargs: generation arguments (HF names, and `truncation`).

    Raises:
        InputError: a bad input line or audio file, duplicate ids, an input too long, or an input changed since
            it was written.
        InvalidArgumentError: bad arguments, no cluster at the address, more workers than its nodes hold, an
            output that does not match this run, or a failed write (whole records are kept).
        ElExportError: a worker's error, or a worker lost more than MAX_RESTARTS times.
    """
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("--threads-per-worker", threads)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
    threads, settings = threads or 1, dict(settings or {})
    if unknown := sorted(set(settings) - set(GENERATOR_SETTINGS)):
        raise InvalidArgumentError(f"unknown generator settings {unknown}; choose from {list(GENERATOR_SETTINGS)}")
    import_ray()  # before any work: a missing Ray is one line
    from el_export.runtime.generator import Generator

    checker = Generator.for_inputs(bundle_dir)
    files = bundle_files(bundle_dir)
    bundle_sha256 = sha256_bytes(files[MANIFEST])
    done, stats = start_job(bundle_sha256, checker, inputs, output, kwargs)
    stats = RayStats(**vars(stats))
    if stats.skipped == stats.total:
        return stats
    with connected(address) as ray:
        gpus = backend == "tensorrt"
        room = _room(ray, threads, gpus)
        count = workers or max(1, room)
        if count > room:  # a worker that cannot be placed would hold its groups for ever
            each = f"{threads} CPU{'s' if threads > 1 else ''}{' and a GPU' if gpus else ''}"
            raise InvalidArgumentError(
                f"the cluster has room for {room} workers of {each}, not --workers {count}: lower --workers or "
                "--threads-per-worker, or add nodes"
            )
        actor = ray.remote(Worker).options(
            num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS,
            max_task_retries=-1, max_concurrency=GROUPS_PER_WORKER + 1, scheduling_strategy="SPREAD",
        )  # fmt: skip
        from el_export import __version__

        bundle = ray.put(files)
        del files
        actors = [actor.remote(bundle_sha256, backend, threads, settings, __version__) for _ in range(count)]
        stats.workers = count
        todo = (r for r in read_records(inputs) if r.key not in done)
        _run(ray, actors, [bundle], todo, checker, batch_size, kwargs, output, done, stats, progress)
    return stats


def _room(ray, threads: int, gpus: bool) -> int:
    """How many workers of `threads` CPUs (and a GPU each, with `gpus`) the cluster's live nodes can hold."""
    room = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            fits = int(resources.get("CPU", 0) // threads)
            room += min(fits, int(resources.get("GPU", 0))) if gpus else fits
    return room


def _run(ray, actors, bundle, todo, checker, batch_size, kwargs, output, done, stats, progress) -> None:
    """Keep GROUPS_PER_WORKER groups in flight on every worker; append each group's records as it is answered."""
    audio = checker.manifest.audio
    pending: dict = {}  # ObjectRef -> (actor, records)
    nodes: set[str] = set()

    def send(actor) -> None:
        if group := list(itertools.islice(todo, batch_size)):
            pending[actor.run.remote(bundle, _items(group, audio), kwargs)] = (actor, group)

    for _ in range(GROUPS_PER_WORKER):
        for actor in actors:
            send(actor)
    with progress_bar(stats.total, enabled=progress) as bar:
        task = bar.add_task("generating", total=stats.total, completed=stats.skipped)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, group = pending.pop(ref)
            answers, attempt, node = _result(ray, ref)
            nodes.add(node)
            by_line = {record.line: record for record in group}
            if sorted(line for line, _ in answers) != sorted(by_line):
                raise ElExportError(f"a worker answered lines {sorted(line for line, _ in answers)} for the group of "
                                    f"lines {sorted(by_line)}; this is a bug: rerun to resume")  # fmt: skip
            results = [(by_line[line], outputs) for line, outputs in answers if by_line[line].key not in done]
            output.append(results)
            done.update((record.key, record.sha256) for record, _ in results)
            stats.written += len(results)
            if attempt:
                stats.retried += len(group)
                bar.update(task, description=f"generating ({stats.retried} retried)")
            bar.advance(task, len(results))
            send(actor)
    stats.nodes = len(nodes)


def _items(group: list[Record], audio) -> list[tuple[int, str, bytes | None]]:
    """What a worker gets of each record: its line, its text and (speech bundles) its audio file's bytes."""
    if not audio:
        return [(record.line, record.text, None) for record in group]
    from el_export.runtime.audio import read_audio_file
    from el_export.runtime.speech import MAX_RECORDING_SECONDS, RECORDING_LIMIT

    rate = audio["sampling_rate"]
    return [(r.line, r.text, read_audio_file(r.text, rate, MAX_RECORDING_SECONDS, RECORDING_LIMIT)) for r in group]


def _result(ray, ref):
    """A task's value; a worker's error raised as itself, a worker lost too often as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None
    except ray.exceptions.RayActorError as e:
        raise ElExportError(
            f"a Ray worker was lost more than {MAX_RESTARTS} times ({first_line(e)}); the records written are "
            "kept: rerun to resume"
        ) from None
