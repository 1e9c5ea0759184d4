"""What el-export prints besides its results: its own warnings, and how much transformers and ONNX Runtime log.

Every change to a logger is scoped (a context manager that restores what it found), so a library call never
leaves the caller's logging changed. The command's `--quiet` / `--verbose` is one setting (`verbosity`) that the
scoped changes read: quiet hides el-export's warnings, verbose lets the libraries' INFO lines through.
"""

import importlib.util
import logging
import sys
import warnings
from contextlib import ExitStack, contextmanager

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_ORT_INFO, _ORT_WARNING, _ORT_ERROR = 1, 2, 3  # ONNX Runtime's severities (0 verbose ... 4 fatal)
_state = {"verbosity": NORMAL, "ort_severity": _ORT_WARNING}  # ONNX Runtime has no getter: we track what we set


def quiet() -> bool:
    return _state["verbosity"] == QUIET


def verbose() -> bool:
    return _state["verbosity"] == VERBOSE


def warn(message: str) -> None:
    """A warning the user should read, on stderr beside the progress display and the CLI's errors (not with
    --quiet)."""
    if not quiet():
        print(f"el-export: warning: {message}", file=sys.stderr)


def onnxruntime_session_severity() -> int:
    """The log severity of the runtime's ONNX Runtime sessions: errors only, INFO with --verbose."""
    return _ORT_INFO if verbose() else _ORT_ERROR


@contextmanager
def logger_level(name: str, level: int):
    """`logging.getLogger(name)` at `level` for the block (at most INFO with --verbose), restored after it."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(min(level, logging.INFO) if verbose() else level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextmanager
def quiet_transformers():
    """transformers' warnings off for the block (its notes on loading and on generate's arguments are not
    el-export's findings: el-export reports what matters in its own lines); restored after it."""
    _configure_transformers()
    with logger_level("transformers", logging.ERROR):
        yield


@contextmanager
def verbosity(level: str):
    """The command's --quiet / --verbose, for the block: el-export's warnings and Python's warnings hidden (quiet),
    transformers' and ONNX Runtime's logging at ERROR (quiet) or INFO (verbose); everything restored after it."""
    saved = _state["verbosity"]
    _state["verbosity"] = level
    try:
        with ExitStack() as stack:
            if level == QUIET:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                stack.enter_context(logger_level("el_export", logging.ERROR))  # its notes (audio resampled, ...)
            if level != NORMAL and importlib.util.find_spec("transformers") is not None:
                _configure_transformers()
                stack.enter_context(logger_level("transformers", logging.ERROR if level == QUIET else logging.INFO))
            if level != NORMAL and importlib.util.find_spec("onnxruntime") is not None:
                stack.enter_context(_onnxruntime_severity(_ORT_ERROR if level == QUIET else _ORT_INFO))
            yield
    finally:
        _state["verbosity"] = saved


def _configure_transformers() -> None:
    """transformers sets its logger's level once, when first used: have that done before a level is changed, or
    its setup would undo the change."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()


@contextmanager
def _onnxruntime_severity(severity: int):
    import onnxruntime as ort

    saved = _state["ort_severity"]
    ort.set_default_logger_severity(severity)
    _state["ort_severity"] = severity
    try:
        yield
    finally:
        ort.set_default_logger_severity(saved)
        _state["ort_severity"] = saved
