"""One exception hierarchy. The CLI turns these into a one-line message and an exit code.

Anything else that escapes is a bug in el-export and stays a traceback.
"""


class ElExportError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class UnsupportedModelError(ElExportError):
    """The checkpoint's architecture cannot be rewritten to EL-attention (or is not implemented)."""

    exit_code = 3


class CheckpointError(ElExportError):
    """The checkpoint is missing, unreadable or inconsistent."""

    exit_code = 2


class BundleError(ElExportError):
    """A bundle is missing files, corrupted, of another format version, or otherwise not loadable."""

    exit_code = 4


class InvalidArgumentError(ElExportError):
    """Arguments to generate / export / a CLI command are invalid."""

    exit_code = 2


class InputError(ElExportError):
    """Model inputs are invalid: empty, too long for the model, wrong dtype or sample rate."""

    exit_code = 2


class ExportError(ElExportError):
    """Exporting a graph failed or produced a graph that fails its checks."""

    exit_code = 5


class BackendError(ElExportError):
    """A runtime backend is missing, or refused the graphs or shapes it was given."""

    exit_code = 6


class ResourceError(ElExportError):
    """A workload cannot fit the memory available (or the limit given), even one input at a time."""

    exit_code = 7


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty): what a
    one-line error quotes from a third-party exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
