"""Triton's Python-backend stub (from the PyTriton wheel) must match this interpreter: find the libpython it
loads and say in one line when it cannot run here."""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from el_export.errors import BackendError

_LIBPYTHON_VERSION = textwrap.dedent(
    """
    import ctypes, sys
    get_version = ctypes.CDLL(sys.argv[1]).Py_GetVersion  # a full path: that file, even where another is loaded
    get_version.restype = ctypes.c_char_p
    print(get_version().decode().split()[0])
    """
)


def python_stub() -> tuple[Path, dict[str, str]]:
    """PyTriton's Python-backend stub for this Python, and the environment Triton runs it in (as PyTriton
    arranges it: the wheel's libraries on LD_LIBRARY_PATH, this environment's Python first on PATH)."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = (
        dist
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    env = dict(os.environ)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return stub, env


def stub_library(stub: Path, env: dict[str, str]) -> tuple[str, str] | None:
    """(version, path) of the libpython that `stub` loads, as the dynamic loader resolves it; None if none is found.

    The loader finds the stub's `libpython3.X.so.1.0` by its own rules (this interpreter's library may
    be another file: a pyenv build carries its own), so `ldd` names the file, and a fresh process loads
    that file by its path to read its version.
    """
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env, timeout=60).stdout
    match = re.search(r"libpython\S*\s+=>\s+(/\S+)", linked)
    if match is None:
        return None
    path = match.group(1)
    result = subprocess.run([sys.executable, "-c", _LIBPYTHON_VERSION, path], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    return result.stdout.strip(), path


def stub_problem(library: tuple[str, str] | None, running: str, executable: str) -> str | None:
    """Why the stub cannot run with this interpreter (one line), or None when it can."""
    soname = f"libpython{'.'.join(running.split('.')[:2])}.so.1.0"
    if library is None:
        return (
            f"Triton's Python-backend stub needs {soname}, which is not installed "
            f"(Debian/Ubuntu: apt-get install lib{soname.removeprefix('lib').split('.so')[0]})"
        )
    version, path = library
    if version == running:
        return None
    major_minor = ".".join(version.split(".")[:2])
    system = Path(f"/usr/bin/python{major_minor}")
    remedy = f"{system} -m venv .venv" if system.exists() else f"a Python {version} that provides {path}"
    return (
        f"this environment runs Python {running} ({executable}) but Triton's Python-backend stub loads "
        f"Python {version} from {path}, and models fail to load with that mix; create the environment with "
        f"the Python that library belongs to: {remedy}"
    )


def check_python_stub() -> None:
    """Raises BackendError when Triton's Python-backend stub (from PyTriton) cannot run models here.

    Without `ldd` nothing can be checked, and Triton reports a mismatch itself when the model loads.
    """
    stub, env = python_stub()
    if not stub.is_file():
        raise BackendError(f"PyTriton ships no Python-backend stub for Python {platform.python_version()}")
    if shutil.which("ldd") is None:
        return
    problem = stub_problem(stub_library(stub, env), platform.python_version(), sys.executable)
    if problem is not None:
        raise BackendError(problem)
