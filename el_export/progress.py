"""A progress display for long commands (export, demo): named steps, elapsed time, on stderr."""

import sys
import time


class Steps:
    """Print each step as it starts and how long the previous one took; silent when disabled."""

    def __init__(self, names: list[str], enabled: bool = True):
        from rich.console import Console

        self.total, self.enabled = len(names), enabled
        self.console = Console(stderr=True, highlight=False)
        self._index, self._started, self._status = 0, None, None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._status is not None:
            self._status.stop()
        if exc_type is not None and self.enabled and self._started is not None:
            self.console.print("[red]  failed[/red]")

    def start(self, _name: str, message: str) -> None:
        self._finish_previous()
        self._index += 1
        self._started = time.perf_counter()
        if self.enabled:
            text = f"[{self._index}/{self.total}] {message}"
            if sys.stderr.isatty():
                self._status = self.console.status(text)
                self._status.start()
            self._text = text

    def done(self) -> None:
        self._finish_previous()

    def _finish_previous(self) -> None:
        if self._started is None or not self.enabled:
            return
        if self._status is not None:
            self._status.stop()
            self._status = None
        self.console.print(f"{self._text}  [dim]{time.perf_counter() - self._started:.1f}s[/dim]")
        self._started = None
