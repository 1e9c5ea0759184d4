"""Long runs that lose nothing: stream an input file through a generator into a JSONL output, resumably.

Inputs are read lazily, twice: once to check every line before anything runs, once to generate (text
lines, or JSONL objects with "text" and an optional "id"; for speech bundles the text is an audio path).
The output starts with a header naming what produced it (the bundle's manifest sha256 and the
generation settings); each record carries its input's sha256. A job locks its output, so a second job
on it is refused; each batch is one write of whole lines and an fsync, cut back if the write fails.
On restart the header and every kept record are checked against this run (same bundle, settings and
inputs), and a last line cut off by a crash is removed first. Memory: one batch, plus the ids (and
input hashes) of the records.
"""

import contextlib
import errno
import fcntl
import itertools
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from el_export.contract.files import sha256, sha256_bytes
from el_export.contract.manifest import MANIFEST
from el_export.errors import InputError, InvalidArgumentError

JOB_FORMAT = 2  # 2: each output is {"text", "token_ids", "score"} (1: the text alone)
_HEADER_KEY = "el_export_job"
_HEADER_PREFIX = b'{"' + _HEADER_KEY.encode() + b'"'  # how every header line starts (json.dumps keeps key order)


@dataclass
class StreamStats:
    total: int
    skipped: int  # already in the output
    written: int


@dataclass(frozen=True)
class Record:
    """One input: its line in the file, its id (the JSONL "id", JSON type kept, or the line number), its text."""

    line: int
    id: str | int
    text: str

    @property
    def key(self) -> str:
        """The id as JSON: 1 and "1" are different ids."""
        return json.dumps(self.id)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


def read_records(path: Path) -> Iterator[Record]:
    """One Record per non-blank line, each checked; a bad line is an InputError naming FILE:LINE.

    Raises:
        InvalidArgumentError: the file is missing, unreadable or not a regular file.
        InputError: a line is not UTF-8, not a JSON object with a string "text", has an id that is not a
            string or an integer, or an empty text.
    """
    jsonl = path.suffix == ".jsonl"
    with _open_input(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            if not jsonl:
                yield _checked(Record(number, number, line.rstrip("\r\n")), where)
                continue
            value = _parse_json(line, where)
            if not isinstance(value, dict):
                raise InputError(f'{where}: expected a JSON object with "text", got {_json_type(value)}')
            if "text" not in value:
                raise InputError(f'{where}: no "text" field; each line must be {{"text": ..., "id": ...}}')
            if not isinstance(value["text"], str):
                raise InputError(f'{where}: "text" must be a string, not {_json_type(value["text"])}')
            record_id = value.get("id", number)
            if isinstance(record_id, bool) or not isinstance(record_id, str | int):
                raise InputError(f'{where}: "id" must be a string or an integer, not {_json_type(record_id)}')
            yield _checked(Record(number, record_id, value["text"]), where)


def check_inputs(path: Path, generator, truncation: bool = False, written: dict[str, str] | None = None) -> int:
    """Read the whole input file once, before anything runs: every line valid, ids unique, each input within
    the model's positions (unless truncating) and, resuming, each written record's input unchanged and present.

    Args:
        written: id key -> input sha256 of the records already in the output.

    Returns:
        The number of records.
    """
    written = written or {}
    lines: dict[str, int] = {}  # id key -> line
    limit = generator.max_source_positions
    count_tokens = not (truncation or limit is None or generator.manifest.audio or generator.tokenizer is None)
    for record in read_records(path):
        if record.key in lines:
            raise InputError(
                f"{path}:{record.line}: id {record.key} is also the id of line {lines[record.key]}; ids must be "
                "unique (a resumed run finds records by id)"
            )
        lines[record.key] = record.line
        if record.key in written:
            if written[record.key] != record.sha256:
                raise InputError(
                    f"the input of record id {record.key} changed ({path}:{record.line} is not the input it was "
                    "generated from); restore it, or use another --output"
                )
            continue
        if count_tokens:
            tokens = generator.tokenizer.encode([record.text])[0].shape[1]  # no limit given: the length alone
            if tokens > limit:
                raise InputError(
                    f"{path}:{record.line}: input is {tokens} tokens but the model takes at most {limit}; "
                    "shorten it or pass --truncation to cut it"
                )
    for key in written:
        if key not in lines:
            raise InputError(
                f"the output holds record id {key}, which is not in {path}: it was written from another input "
                "file; use that --input-file, or another --output"
            )
    return len(lines)


def generate_records(
    generator, records: Iterable[Record], batch_size: int, **kwargs
) -> Iterator[list[tuple[Record, list[dict]]]]:
    """(record, its outputs) of the records answered at each step, in the order they finish: every record goes
    through one running batch (see `runtime/scheduler.py`), read `batch_size` at a time (each such group tokenized
    and encoded together, in pieces as memory frees up), the next group read while the last is still decoding."""
    truncation = kwargs.pop("truncation", False)
    records = iter(records)
    scheduler = generator.scheduler()
    answered: list[tuple[Record, list[dict]]] = []
    in_flight = []
    with generator.backend.generating():
        while True:
            waiting = any(request.admitted < request.count for request in in_flight)  # keep one group waiting
            if not waiting and (batch := list(itertools.islice(records, batch_size))):
                in_flight.append(records_request(generator, batch, answered, truncation, kwargs))
                scheduler.submit(in_flight[-1])
            if not scheduler.busy:
                break
            scheduler.step()
            for request in in_flight:
                if request.error is not None:
                    raise request.error
            in_flight = [request for request in in_flight if not request.done]
            if answered:  # the requests' callbacks append to this very list
                yield list(answered)
                answered.clear()


def records_request(generator, batch: list[Record], answered: list, truncation: bool, kwargs: dict, audio=None):
    """The `Request` of one group of records (a scheduler's or a `BackgroundScheduler`'s to run); as each record's
    input ends, (record, its outputs) is appended to `answered`. Speech bundles read each record's text as an
    audio path, or take `audio` (one mono float32 array per record, at the model's rate) when given."""
    if generator.tokenizer is None:
        raise InvalidArgumentError("this model has no tokenizer (none was exported); pass token ids to generate()")
    manifest, prompt = generator.manifest, 0
    if manifest.audio:  # audio paths in: nothing to truncate
        call = {"audio": [r.text for r in batch] if audio is None else audio}
    else:
        input_ids, mask = generator.tokenizer.encode([r.text for r in batch], max_length=generator.max_source_positions,
                                                     truncation=truncation)  # fmt: skip
        call = {"input_ids": input_ids, "attention_mask": mask}
        if manifest.kind == "decoder-only":
            prompt = input_ids.shape[1]
    R = kwargs.get("num_return_sequences", 1)

    def on_input(first: int, out) -> None:  # one input, or (sampling) a cohort of inputs
        outputs = output_dicts(generator, out, prompt, kwargs)
        for i in range(len(outputs) // R):
            answered.append((batch[first + i], outputs[i * R : (i + 1) * R]))

    return generator.request(**call, on_input=on_input, **kwargs)


def output_dicts(generator, out, prompt: int, kwargs: dict) -> list[dict]:
    """One {"text", "token_ids", "score"} per sequence of a `SearchOutput`. token_ids are the sequence as generate
    returns it (decoder-only: the continuation, after the `prompt` columns) up to its first end token, so they hold
    no padding; text is them decoded; score is beam search's sequences_scores, None for greedy search and
    sampling."""
    manifest = generator.manifest
    eos = kwargs.get("eos_token_id", manifest.generation_defaults.get("eos_token_id"))
    eos = manifest.special_tokens.get("eos_token_id") if eos is None else eos
    ends = {eos} if isinstance(eos, int) else set(eos or ())
    first = 0 if prompt else 1  # an encoder-decoder's sequence opens with its start token (BART's is eos)
    outputs = []
    for i, row in enumerate(out.sequences[:, prompt:].tolist()):
        end = next((j + 1 for j in range(first, len(row)) if row[j] in ends), len(row))
        ids = row[:end]
        score = None if out.sequences_scores is None else float(out.sequences_scores[i])
        outputs.append({"text": generator.tokenizer.decode(torch.tensor([ids]))[0], "token_ids": ids, "score": score})
    return outputs


def record_json(record: Record, outputs: list[dict]) -> dict:
    """A result, in the one shape of `generate --json` lines and `--output` records."""
    return {"id": record.id, "input_sha256": record.sha256, "input": record.text, "outputs": outputs}


class JobOutput:
    """The JSONL output of one job: a regular file, opened and locked so a second job on it is refused.

    Open it before loading the bundle (a bad path or a busy output fails at once); a file this job created
    and left empty is removed on close.

    Raises:
        InvalidArgumentError: the path is not a regular file or a new file in an existing directory, is the
            input file itself, cannot be opened for writing, or is locked by another job.
    """

    def __init__(self, path: Path, inputs: Path | None = None):
        self.path = Path(path)
        _check_output_path(self.path, inputs)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK  # non-blocking: a FIFO swapped in never hangs
        try:
            try:
                self.fd, self.created = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                self.fd, self.created = os.open(self.path, flags), False
        except OSError as e:
            raise InvalidArgumentError(
                f"cannot write --output {self.path} ({e.strerror}); choose a writable location"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):  # replaced after the check above
                raise InvalidArgumentError(f"--output {self.path} is not a regular file; give a file path")
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(os.fstat(self.fd), self.path):  # removed by a job that just finished with it
                raise InvalidArgumentError(f"--output {self.path} was removed while it was opened; rerun")
        except BlockingIOError:
            self.created = False  # not locked: the file is the other job's
            self.close()
            pid = _flock_holder(self.path)
            by = f" (pid {pid})" if pid else ""
            raise InvalidArgumentError(
                f"{self.path} is being written by another el-export job{by}; wait for it to finish or use another "
                "--output"
            ) from None
        except BaseException:
            self.close()
            raise
        self._header: bytes | None = None  # set by resume()

    def __enter__(self) -> "JobOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.created and os.fstat(self.fd).st_size == 0:  # nothing written: leave nothing behind
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1

    def resume(self, job: dict) -> dict[str, str]:
        """Check the output against this job and return its records (id key -> input sha256).

        A last line cut off by a crash is removed. An empty output gets the header with its first records.

        Raises:
            InvalidArgumentError: the output is not a job output, an older el-export's, or was written from
                another bundle or other generation settings.
        """
        self._header = (json.dumps({_HEADER_KEY: job}) + "\n").encode()
        done: dict[str, str] = {}
        with os.fdopen(os.dup(self.fd), "rb") as f:  # a duplicate: closing it keeps the lock
            f.seek(0)
            first = f.readline()
            if not first.endswith(b"\n"):  # empty, or one unfinished line
                if not (_HEADER_PREFIX.startswith(first) or first.startswith(_HEADER_PREFIX)):
                    raise InvalidArgumentError(f"{self.path} is not an el-export job output; use another --output")
                os.ftruncate(self.fd, 0)  # this job's first write, cut off by a crash
                return done
            header = self._read_header(first)
            end = len(first)
            for number, line in enumerate(f, start=2):
                if not line.endswith(b"\n"):  # the last record was not finished: drop it, it will be redone
                    os.ftruncate(self.fd, end)
                    break
                key, sha = self._read_record(line, number)
                if key in done:
                    raise InvalidArgumentError(
                        f"{self.path}:{number}: record id {key} appears twice; the file was changed outside "
                        "el-export: use another --output"
                    )
                done[key] = sha
                end += len(line)
        if not done:  # a header alone holds no results: start afresh, whatever this run's settings
            os.ftruncate(self.fd, 0)
            return done
        self._check_job(header, job)
        return done

    def append(self, records: list[tuple[Record, list[dict]]]) -> None:
        """Append records (after the header, if the output is empty) as one write of whole lines and an fsync;
        on any failure the file is cut back to what it held."""
        assert self._header is not None, "resume() the output before appending to it"
        size = os.fstat(self.fd).st_size
        lines = [json.dumps(record_json(r, outputs), ensure_ascii=False) + "\n" for r, outputs in records]
        data = memoryview((self._header if size == 0 else b"") + "".join(lines).encode("utf-8"))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
        except BaseException as e:  # ENOSPC, EIO, or an interrupt between two writes: keep whole records only
            with contextlib.suppress(OSError):  # should this fail too, a resumed run cuts the unfinished line
                os.ftruncate(self.fd, size)
            if isinstance(e, OSError):
                raise InvalidArgumentError(
                    f"writing {self.path} failed ({e.strerror or errno.errorcode.get(e.errno, e)}); the records "
                    "before this batch are kept: free space (or fix the file system) and rerun to resume"
                ) from None
            raise

    def _read_header(self, line: bytes) -> dict:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        header = value.get(_HEADER_KEY) if isinstance(value, dict) else None
        if isinstance(header, dict):
            return header
        if isinstance(value, dict) and "id" in value and "outputs" in value:
            raise InvalidArgumentError(
                f"{self.path} was written by an older el-export (no job header: it cannot be checked "
                "against this run); move it away or use another --output"
            )
        raise InvalidArgumentError(f"{self.path} is not an el-export job output; use another --output")

    def _check_job(self, header: dict, job: dict) -> None:
        if header.get("format") != JOB_FORMAT:
            raise InvalidArgumentError(
                f"{self.path} is job format {header.get('format')!r}; this el-export reads format {JOB_FORMAT}: "
                "use the el-export that wrote it, or another --output"
            )
        if header.get("bundle_sha256") != job["bundle_sha256"]:
            raise InvalidArgumentError(
                f"{self.path} was written from another bundle (manifest sha256 {str(header.get('bundle_sha256'))[:12]}"
                f", this one's {job['bundle_sha256'][:12]}); resume it with that bundle, or use another --output"
            )
        old, new = header.get("generation"), json.loads(json.dumps(job["generation"]))
        if old != new:
            old = old if isinstance(old, dict) else {}
            key = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
            raise InvalidArgumentError(
                f"{self.path} was written with {key}={old.get(key, 'unset')}, this run has "
                f"{key}={new.get(key, 'unset')}; resume with the settings it was written with, or use another --output"
            )

    def _read_record(self, line: bytes, number: int) -> tuple[str, str]:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        record_id = value.get("id") if isinstance(value, dict) else None
        if isinstance(record_id, bool) or not isinstance(record_id, str | int) or "input_sha256" not in value:
            raise InvalidArgumentError(
                f"{self.path}:{number} is not a record written by el-export; use another --output"
            )
        return json.dumps(record_id), value["input_sha256"]


def generate_file(
    generator, inputs: Path, output: JobOutput, batch_size: int, progress: bool = True, **kwargs
) -> StreamStats:
    """Generate for every input record not yet in `output`, appending one JSON line per input.

    Every input is checked (and, resuming, the output against this run) before anything is generated.

    Args:
        generator: a loaded `Generator`.
        inputs: the input file.
        output: the open JSONL output (new, or resumed).
        batch_size: inputs read, tokenized and encoded together (they join the running batch as memory allows).
        **kwargs: generation arguments (HF names, and `truncation`).

    Raises:
        InputError: a bad input line, duplicate ids, an input too long, or an input changed since it was written.
        InvalidArgumentError: the output does not match this run, or writing it failed (whole records are kept).
    """
    if batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    bundle_sha256 = sha256(Path(generator.backend.bundle_dir) / MANIFEST)  # the manifest hashes every file
    done, stats = start_job(bundle_sha256, generator, inputs, output, kwargs)
    with progress_bar(stats.total, enabled=progress) as bar:
        task = bar.add_task("generating", total=stats.total, completed=stats.skipped)
        todo = (r for r in read_records(inputs) if r.key not in done)
        for results in generate_records(generator, todo, batch_size, **kwargs):
            output.append(results)
            stats.written += len(results)
            bar.advance(task, len(results))
    return stats


def start_job(
    bundle_sha256: str, generator, inputs: Path, output: JobOutput, kwargs: dict
) -> tuple[dict[str, str], StreamStats]:
    """Resume `output` as this job's (the sha256 of the bundle's manifest, and the generation settings) and check
    every input, against it too; the records already written (id key -> input sha256) and the stats so far.

    `generator` need only check inputs (its manifest and tokenizer): the graphs may run elsewhere.
    """
    job = {"format": JOB_FORMAT, "bundle_sha256": bundle_sha256, "generation": dict(sorted(kwargs.items()))}
    done = output.resume(job)
    total = check_inputs(inputs, generator, kwargs.get("truncation", False), written=done)
    return done, StreamStats(total=total, skipped=len(done), written=0)


def _open_input(path: Path):
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InvalidArgumentError(f"input file {path} does not exist") from None
    except OSError as e:
        raise InvalidArgumentError(f"cannot read --input-file {path} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise InvalidArgumentError(
            f"--input-file {path} is {_file_kind(mode)}, not a regular file (it is read twice: to check, then to "
            "generate); save the inputs to a file"
        )
    try:
        return open(path, "rb")
    except OSError as e:
        raise InvalidArgumentError(f"cannot read --input-file {path} ({e.strerror})") from None


def _check_output_path(path: Path, inputs: Path | None) -> None:
    """A regular file, or a new name in an existing directory; never the input file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.absolute().parent.is_dir():
            raise InvalidArgumentError(
                f"--output {path}: directory {path.absolute().parent} does not exist; create it or choose another path"
            ) from None
        return
    except OSError as e:
        raise InvalidArgumentError(f"cannot write --output {path} ({e.strerror}); choose a writable location") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(
            f"--output {path} is {_file_kind(st.st_mode)}, not a regular file; give a file path (to print the "
            "results instead, leave out --output)"
        )
    if inputs is not None and _same_file(st, inputs):
        raise InvalidArgumentError(f"--output {path} is the --input-file itself; give another path for the results")


def _same_file(st: os.stat_result, path: Path) -> bool:
    """Whether `path` names the file `st` describes (through any link); False when it names nothing."""
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _flock_holder(path: Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (Linux); None where it cannot be told."""
    try:
        st = os.stat(path)
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" (waiters have "->" before FLOCK)
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4] != "0":
            return int(fields[4])
    return None


def _checked(record: Record, where: str) -> Record:
    if not record.text.strip():
        raise InputError(f"{where}: input is empty; give non-empty text or remove the line")
    try:
        json.dumps(record.id, ensure_ascii=False).encode("utf-8")
        record.text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: holds an unpaired surrogate escape (not Unicode text); fix or remove it") from None
    return record


def _parse_json(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); expected {{"text": ...}}') from None
    except RecursionError:
        raise InputError(f'{where}: JSON nested too deeply to read; expected a flat {{"text": ...}} object') from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise InputError(f"{where}: a number on this line is too long to read ({e.args[0].split(':')[0]})") from None


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")]  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def progress_bar(total: int, enabled: bool):
    """A progress bar of inputs on stderr: done of total, inputs/s, time left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text("" if task.speed is None else f"{task.speed:.1f} inputs/s")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )  # fmt: skip
