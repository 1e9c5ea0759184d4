"""Long runs that lose nothing: stream an input file through a generator into a JSONL output, resumably.

Inputs are read lazily (text lines, or JSONL objects with "text" and an optional "id"; for speech
bundles the text is an audio path). Each result is one JSON line, written whole and flushed, with an
fsync per batch. On restart, records already in the output are kept and their inputs skipped; a last
line cut off by a crash is removed first. Memory stays bounded by one batch.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from el_export.errors import InvalidArgumentError


@dataclass
class StreamStats:
    total: int
    skipped: int  # already in the output
    written: int


def read_records(path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) per non-empty line; ids are the JSONL "id" field or the line number."""
    if not path.is_file():
        raise InvalidArgumentError(f"input file {path} does not exist")
    jsonl = path.suffix == ".jsonl"
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not jsonl:
                yield str(number), line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f"{path}:{number}: expected a JSON object with 'text' ({e})") from None
            if not isinstance(text, str):
                raise InvalidArgumentError(f"{path}:{number}: 'text' must be a string")
            yield str(record.get("id", number)), text


def completed_ids(output: Path) -> set[str]:
    """Ids already written; a trailing partial line (a crash mid-write) is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last record was not finished: drop it, it will be redone
        with open(output, "r+b") as f:
            f.truncate(end)
    ids = set()
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InvalidArgumentError(
                f"{output}:{number} is not a record written by el-export; use another --output"
            ) from None
    return ids


def generate_file(
    generator, inputs: Path, output: Path, batch_size: int, progress: bool = True, **kwargs
) -> StreamStats:
    """Generate for every input record not yet in `output`, appending one JSON line per input.

    Args:
        generator: a loaded `Generator`.
        inputs, output: the input file and the JSONL output (created, or resumed).
        batch_size: inputs per search batch.
        **kwargs: generation arguments (HF names).
    """
    if batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    done = completed_ids(output)
    total = sum(1 for _ in read_records(inputs))
    per_input = kwargs.get("num_return_sequences", 1)
    stats = StreamStats(total=total, skipped=0, written=0)
    bar = _progress(total, enabled=progress)
    with bar, open(output, "a", encoding="utf-8") as out:
        task = bar.add_task("generating", total=total)
        batch: list[tuple[str, str]] = []

        def flush():
            texts = [text for _, text in batch]
            results = generator.generate_text(texts, **kwargs)
            for i, (record_id, text) in enumerate(batch):
                line = {"id": record_id, "input": text, "outputs": results[i * per_input : (i + 1) * per_input]}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            stats.written += len(batch)
            bar.advance(task, len(batch))
            batch.clear()

        for record_id, text in read_records(inputs):
            if record_id in done:
                stats.skipped += 1
                bar.advance(task)
                continue
            batch.append((record_id, text))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return stats


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )  # fmt: skip
