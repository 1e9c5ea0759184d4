"""Run one function from several threads at once, as concurrent clients or model instances do."""

import threading
from collections.abc import Callable


def run_in_threads(target: Callable[[int], None], n: int, timeout: float = 60) -> None:
    """`target(i)` for i in range(n), each on a thread of its own, all started before any is joined."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
