"""The running batch: inputs join it at step boundaries while memory allows, and leave it at the step their
search ends (DESIGN.md section 4).

A `Request` is one `generate` call's inputs; the scheduler admits them in pieces as room frees up (each piece
encoded, or prefilled, at once and started on a decoder of its own), and merges each piece into the running
batch of its rows-per-input (EL reads one encoder copy per input for all its k rows, so k is one per batch).
Each piece is a cohort: one `Search` over inputs with the same options. Every step, one decoder call runs all
rows of a running batch; each cohort advances on its rows' logits; the rows of inputs whose search is over
leave (and their caches, encoder rows and masks with them), and the inputs are answered. Search treats each
input on its own, so every answer equals `generate` on that input alone: scheduling changes speed, never
output. With `static`, a running batch takes no one until it is empty and keeps every row until its longest
member ends (the baseline a static batch is).
"""

import contextlib
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from el_export.errors import ElExportError, first_line
from el_export.search.options import GenerationOptions
from el_export.search.search import Search, SearchOutput, join_outputs, make_search

ADMIT_SHARE = 8  # with others running, wait until room for 1/ADMIT_SHARE of the batch cap: fewer, larger encodes


@dataclass
class Admission:
    """Some of a request's inputs, ready to decode: a decoder over their encoder outputs (or prefill), not yet
    started; their decoder prompts [b, P] on the device; their options; decoder-only prompts' mask (which the
    search reads); the left padding of encoder-decoder prompts of different lengths (which the decoder skips)."""

    decoder: Any
    prompt: torch.Tensor
    options: GenerationOptions
    prompt_mask: torch.Tensor | None = None
    prompt_padding: torch.Tensor | None = None


class Request:
    """One generate call's inputs in the scheduler.

    Args:
        count: inputs.
        rows_per_input: k (num_beams, or num_return_sequences without beams).
        bytes_per_input: each input's decoder state at its end (`memory.bytes_per_input`).
        prepare: inputs [start, stop) -> their `Admission` (runs the encoder or prefill).
        options: the options; fill values for the joined output come from them.
        streamer: fed as HF feeds it; the request is then admitted whole.
        on_input: called with (index, output) as each input (or, without compaction, each cohort) is answered.
    """

    def __init__(self, count: int, rows_per_input: int, bytes_per_input: int,
                 prepare: Callable[[int, int], Admission], options: GenerationOptions, streamer: Any = None,
                 on_input: Callable[[int, SearchOutput], None] | None = None):  # fmt: skip
        self.count, self.k, self.bytes_per_input = count, rows_per_input, bytes_per_input
        self.prepare, self.options, self.streamer, self.on_input = prepare, options, streamer, on_input
        # Inputs admitted together, when fixed: sampling draws for the rows of one cohort together, so its pieces
        # must not depend on timing; output_scores and a streamer see every row every step (the whole request).
        self.piece: int | None = None
        self.admitted = 0
        self.answered = 0
        self.parts: list[tuple[int, SearchOutput]] = []
        self.error: ElExportError | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.answered == self.count

    def result(self) -> SearchOutput:
        """The joined output of every input, as `generate` returns them. Raises the request's error, if any."""
        if self.error is not None:
            raise self.error
        return join_outputs(self.parts, self.options)

    def _answer(self, first: int, output: SearchOutput, inputs: int) -> None:
        self.parts.append((first, output))
        self.answered += inputs
        if self.on_input is not None:
            self.on_input(first, output)


class _Cohort:
    """A search over some of a request's inputs, and the rows it holds in the running batch."""

    def __init__(self, search: Search, request: Request, first: int):
        self.search, self.request, self.first = search, request, first
        self.rows, self.inputs = search.rows, search.inputs  # in the decoder (a static batch keeps ended ones)
        self.tokens: torch.Tensor | None = None  # the next input of its rows [rows, 1]

    def answer(self) -> None:
        """Hand the request what ended this step."""
        for index, output in self.search.finished:
            inputs = output.sequences.shape[0] // self.request.options.num_return_sequences
            self.request._answer(self.first + index, output, inputs)
        self.search.finished.clear()


class _Batch:
    """The running batch of one rows-per-input: one decoder, its cohorts in row order."""

    def __init__(self):
        self.decoder = None
        self.cohorts: list[_Cohort] = []
        self.stepped = False  # has run a step since it formed (an input joining it then joins a running search)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.cohorts)

    @property
    def inputs(self) -> int:
        return sum(c.inputs for c in self.cohorts)

    @property
    def bytes_per_input(self) -> int:
        """Merged rows are padded to the longest: each input costs what the costliest request's inputs cost."""
        return max((c.request.bytes_per_input for c in self.cohorts), default=0)


class Scheduler:
    """Runs requests over running batches of decoder rows.

    Args:
        budget: bytes the decoder state of every running batch may take together.
        max_batch: inputs in flight at most (None: as memory allows).
        max_rows: decoder rows in flight at most (None: as memory allows).
        static: admit only into an empty batch and keep every row until the batch ends (the static baseline).
    """

    def __init__(self, budget: int, max_batch: int | None = None, max_rows: int | None = None, static: bool = False):
        self.budget, self.max_batch, self.max_rows, self.static = budget, max_batch, max_rows, static
        self.waiting: deque[Request] = deque()
        self.batches: dict[int, _Batch] = {}
        # steps run; inputs admitted into a batch that was running; inputs that left a batch others still ran in;
        # the most inputs one step ran; the rows all steps ran (rows / steps: the mean batch a step computes)
        self.stats = {"steps": 0, "joined_running": 0, "left_early": 0, "peak_inputs": 0, "row_steps": 0}

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(b.cohorts for b in self.batches.values())

    def run(self) -> None:
        """Step until every submitted request is answered."""
        while self.busy:
            self.step()

    def step(self) -> None:
        """Admit what fits, then one decoder step of every running batch."""
        self._admit()
        for batch in self.batches.values():
            if batch.cohorts:
                self._step(batch)

    # ---- admission ---------------------------------------------------------------------------------------

    def _running(self) -> tuple[int, int, int]:
        """Inputs, rows and bytes in flight."""
        inputs = rows = used = 0
        for batch in self.batches.values():
            inputs, rows = inputs + batch.inputs, rows + batch.rows
            used += batch.inputs * batch.bytes_per_input
        return inputs, rows, used

    def _room(self, request: Request) -> int:
        """How many of the request's waiting inputs may join now."""
        inputs, rows, used = self._running()
        batch = self.batches.get(request.k) or _Batch()
        per_input = max(request.bytes_per_input, batch.bytes_per_input)
        used += batch.inputs * (per_input - batch.bytes_per_input)  # joining pads the batch's inputs to its size too
        room = (self.budget - used) // per_input
        if self.max_batch is not None:
            room = min(room, self.max_batch - inputs)
        if self.max_rows is not None:
            room = min(room, (self.max_rows - rows) // request.k)
        return max(0, room)

    def _admit(self) -> None:
        forming = not any(b.cohorts for b in self.batches.values())  # a static batch forms only when all are empty
        while self.waiting:
            request = self.waiting[0]
            idle = not any(b.cohorts for b in self.batches.values())
            if self.static and not forming:
                return
            wanted = request.count - request.admitted
            room = max(self._room(request), 1 if idle else 0)  # one input always runs (the guard refused worse)
            if request.piece is not None:
                need = min(request.piece, wanted)
                if room < need and not idle:
                    return
                room = need  # alone, it runs: the memory guard sized the piece
            cap = self.max_batch or room
            if room < min(wanted, max(1, cap // ADMIT_SHARE)) and not idle:
                return
            n = min(room, wanted)
            self._start(request, request.admitted, request.admitted + n)
            if request.admitted == request.count or request.error is not None:
                self.waiting.popleft()

    def _start(self, request: Request, start: int, stop: int) -> None:
        request.admitted = stop
        try:
            admission = request.prepare(start, stop)
            k = request.k
            if request.streamer is not None:  # HF: the expanded prompt, once, before the first step
                request.streamer.put(admission.prompt.repeat_interleave(k, dim=0).cpu())
            logits = admission.decoder.start(admission.prompt, k, admission.prompt_padding)
            search = make_search(admission.prompt, admission.options, logits.shape[-1], logits.device,
                                 admission.prompt_mask, request.streamer, compact=not self.static)  # fmt: skip
            cohort = _Cohort(search, request, start)
            advance = search.advance(logits)
        except ElExportError as error:
            request.error = error
            return
        cohort.answer()
        if search.done:
            return
        if advance.rows is not None:
            admission.decoder.reorder(advance.rows, advance.inputs)
        cohort.tokens, cohort.rows, cohort.inputs = advance.tokens, search.rows, search.inputs
        batch = self.batches.setdefault(k, _Batch())
        if batch.cohorts and batch.stepped:
            self.stats["joined_running"] += search.inputs
        if batch.decoder is None:
            batch.decoder = admission.decoder
        else:
            batch.decoder.merge(admission.decoder)
        batch.cohorts.append(cohort)

    # ---- one step ----------------------------------------------------------------------------------------

    def _step(self, batch: _Batch) -> None:
        """One decoder call over the batch's rows; each cohort advances on its rows' logits; then one gather drops
        the rows of inputs that ended and reorders beams (the inputs' context is gathered only when one left)."""
        self.stats["steps"] += 1
        batch.stepped = True
        before = batch.inputs
        self.stats["peak_inputs"] = max(self.stats["peak_inputs"], before)
        self.stats["row_steps"] += batch.rows
        logits = batch.decoder.step(torch.cat([c.tokens for c in batch.cohorts]))
        device = logits.device
        rows, inputs, kept = [], [], []
        reordered = left = False
        row = first_input = 0
        for cohort in batch.cohorts:
            n, b = cohort.rows, cohort.inputs
            advance = None
            if not cohort.search.done:
                advance = cohort.search.advance(logits[row : row + n])
                cohort.answer()
            if cohort.search.done and not self.static:
                left = True  # all its rows leave
            else:
                ended = advance is None or cohort.search.done  # a static batch keeps an ended cohort's rows as they are
                kept_rows = None if ended else advance.rows
                kept_inputs = None if ended else advance.inputs
                rows.append(torch.arange(n, device=device) if kept_rows is None else kept_rows.to(device))
                rows[-1] = rows[-1] + row
                inputs.append(torch.arange(b, device=device) if kept_inputs is None else kept_inputs.to(device))
                inputs[-1] = inputs[-1] + first_input
                reordered |= kept_rows is not None
                left |= kept_inputs is not None
                if not cohort.search.done:
                    cohort.tokens, cohort.rows, cohort.inputs = advance.tokens, cohort.search.rows, cohort.search.inputs
                kept.append(cohort)
            row, first_input = row + n, first_input + b
        if self.static and all(c.search.done for c in kept):
            kept = []  # the static batch's longest member ended: it ends
        batch.cohorts = kept
        if not kept:
            batch.decoder, batch.stepped = None, False  # frees the caches
            return
        if left:
            self.stats["left_early"] += before - batch.inputs
        if left or reordered:
            batch.decoder.reorder(torch.cat(rows), torch.cat(inputs) if left else None)


class BackgroundScheduler:
    """A scheduler on a thread of its own, fed from any thread: each `submit` joins the running batch at the next
    step boundary, even while others are mid-search, and `wait` returns as soon as that request is answered.

    A step that fails (a backend error) fails the requests then in flight with it, and the thread goes on with
    the next ones.

    Args:
        make_scheduler: builds the `Scheduler` (again after a failed step), e.g. `Generator.scheduler`.
        around: a context manager factory held around each step (e.g. `backend.generating`).
    """

    def __init__(self, make_scheduler: Callable[[], Scheduler], around: Callable[[], Any] | None = None):
        self._make, self._around = make_scheduler, around
        self._scheduler = make_scheduler()
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._in_flight: list[Request] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="el-export-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Request:
        request.answered_event = threading.Event()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the scheduler was stopped")
            self._incoming.append(request)
            self._lock.notify()
        return request

    def wait(self, request: Request) -> SearchOutput:
        """Block until `request` is answered; its output (or its error, raised)."""
        request.answered_event.wait()
        return request.result()

    def stop(self) -> None:
        """End the thread; requests not yet answered fail with a one-line error."""
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=30)
        with self._lock:
            for request in self._incoming + self._in_flight:
                if not request.done:
                    request.error = ElExportError("the server is stopping: the request was not answered; send it again")
                request.answered_event.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._incoming and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
            with self._around() if self._around else contextlib.nullcontext():  # held while busy, not per step
                self._run_while_busy()

    def _run_while_busy(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                incoming, self._incoming = self._incoming, []
            for request in incoming:
                self._scheduler.submit(request)
                self._in_flight.append(request)
            if not self._scheduler.busy:
                return
            try:
                self._scheduler.step()
            except Exception as error:  # every request in flight fails with it; the thread goes on
                if not isinstance(error, ElExportError):  # a bug: its traceback goes to the log
                    traceback.print_exc()
                failure = error
                if not isinstance(error, ElExportError):
                    failure = ElExportError(f"generation failed: {first_line(error)}")
                for request in self._in_flight:
                    if not request.done:
                        request.error = failure
                self._scheduler = self._make()
            self._in_flight = [r for r in self._in_flight if not self._settle(r)]

    @staticmethod
    def _settle(request: Request) -> bool:
        if request.done:
            request.answered_event.set()
        return request.done
