"""`el_export.serve`: the documented serving API, whose home is `el_export.serving` (kept for existing code)."""

from el_export.serving.batching import BatchRunner, RequestCaps
from el_export.serving.server import ServeConfig, Server, check_can_serve, serve, start, stop_signals, wait

__all__ = [
    "BatchRunner",
    "RequestCaps",
    "ServeConfig",
    "Server",
    "check_can_serve",
    "serve",
    "start",
    "stop_signals",
    "wait",
]
