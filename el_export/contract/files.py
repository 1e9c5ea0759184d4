"""Bundle directories: read a manifest and the files it lists (each once, its sha256 checked on the bytes used),
and write a bundle atomically.

A directory holding `manifest.json` and the files it names (graphs, external weights, tokenizer). Readers refuse a
file whose sha256 differs from the manifest, links or anything but plain files, and names that would leave the
directory. The runtime uses the bytes it checked (`read_file`): a file swapped after the check is never read.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from el_export.contract.manifest import FORMAT, MANIFEST, Manifest
from el_export.errors import BundleError, InvalidArgumentError, first_line


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entries(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in a directory being written as a bundle (manifest excluded)."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            entries[path.relative_to(directory).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return entries


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True, hash_files: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with `verify`, check that every file is there, a plain file of its
    size and (`hash_files`) sha256. A loader passes hash_files=False and hashes what it reads (`read_file`).

    Raises:
        BundleError: the directory, manifest or a file is missing, malformed or corrupted.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist; create one with `el-export export`")
    path = bundle_dir / MANIFEST
    if not os.path.lexists(path):
        raise BundleError(f"{bundle_dir} has no {MANIFEST}: not a bundle, or an export that did not finish")
    with _open(bundle_dir, MANIFEST) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except RecursionError:
        raise BundleError(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # malformed JSON, not UTF-8, or an integer past Python's digit limit
        raise BundleError(f"{path} is not valid JSON ({first_line(e)})") from None
    manifest = Manifest.from_json(data)
    if verify:
        for name, entry in manifest.files.items():
            with _open(bundle_dir, name) as f:
                _check_size(f, bundle_dir / name, entry)
                if hash_files and hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    raise _changed(bundle_dir / name)
    return manifest


def read_file(bundle_dir: str | os.PathLike, manifest: Manifest, name: str, verify: bool = True) -> bytes:
    """The bytes of listed file `name`, read once: what the sha256 was checked on is what the caller uses (a
    file swapped after the check is never read).

    Raises:
        BundleError: the file is missing, a link, not a regular file, or (with `verify`) changed.
    """
    bundle_dir = Path(bundle_dir)
    with _open(bundle_dir, name) as f:
        if verify:
            _check_size(f, bundle_dir / name, manifest.files[name])
        data = f.read()
    if verify and sha256_bytes(data) != manifest.files[name]["sha256"]:
        raise _changed(bundle_dir / name)
    return data


def _open(bundle_dir: Path, name: str):
    """Open `name` in the bundle for reading through no symbolic link, so nothing resolves outside the bundle
    (O_NOFOLLOW on every part, each opened relative to the last); FIFOs open without blocking and are refused."""
    path = bundle_dir / name
    parts = name.split("/")
    try:
        directory = os.open(bundle_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise BundleError(f"cannot open bundle directory {bundle_dir} ({e.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError as e:  # O_NOFOLLOW refuses a link with ELOOP, or with ENOTDIR where a directory was expected
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and any(
            os.path.islink(bundle_dir.joinpath(*parts[: i + 1])) for i in range(len(parts))
        ):
            raise BundleError(
                f"{path} is a symbolic link (or inside one); a bundle holds plain files: copy the file in, or re-export"
            ) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BundleError(f"bundle {bundle_dir} is missing {name}; re-export it") from None
        raise BundleError(f"cannot read {path} ({e.strerror})") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path} is not a regular file (a directory, FIFO or device); re-export the bundle")
    return os.fdopen(fd, "rb")


def _check_size(f, path: Path, entry: dict) -> None:
    """A size that differs from the manifest's is a changed file, found before reading it all."""
    if os.fstat(f.fileno()).st_size != entry["bytes"]:
        raise _changed(path)


def _changed(path: Path) -> BundleError:
    return BundleError(f"{path} does not match the sha256 in {MANIFEST}: the file is corrupted or was changed")


@contextmanager
def writing_bundle(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `out_dir` only if the block finishes.

    A failed export leaves nothing behind; an existing bundle is replaced only with `overwrite`, and nothing but an
    el-export bundle (or a directory inside one: its TensorRT engines) is ever replaced. The result gets the
    permissions the umask allows (mkdtemp's are 0700), so a server running as another user can read it.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise InvalidArgumentError(f"{out_dir} already exists; choose another --out or pass --overwrite")
        if out_dir.is_symlink() or not (_is_bundle(out_dir) or (out_dir.is_dir() and _is_bundle(out_dir.parent))):
            raise InvalidArgumentError(
                f"{out_dir} is not an el-export bundle (no manifest.json of format {FORMAT}); --overwrite replaces "
                "only bundles: choose another --out"
            )
    with replacing_directory(out_dir) as tmp:
        yield tmp


@contextmanager
def replacing_directory(out_dir: str | os.PathLike):
    """Yield a temporary directory beside `out_dir` that replaces it (or becomes it) only if the block finishes,
    with the permissions the umask allows; the caller has checked that `out_dir` may be replaced."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        _allow_umask(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "bundle")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_files(contents: dict[Path, bytes]) -> None:
    """Write each file's bytes beside it (flushed to disk), then rename every one over its destination: a failure
    while writing leaves every destination as it was, and no reader ever sees part of a file. New files get the
    permissions the umask allows. OSError propagates; the partial files are removed."""
    staged: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.partial")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask
            staged[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _is_bundle(path: Path) -> bool:
    """A real directory (not a link) whose manifest.json says it is an el-export bundle."""
    try:
        data = json.loads((path / MANIFEST).read_bytes()) if path.is_dir() and not path.is_symlink() else None
    except (OSError, ValueError):  # unreadable or not JSON: not a bundle to replace
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _allow_umask(directory: Path) -> None:
    """Give a directory tree the modes the umask allows: 0777 & ~umask for directories, 0666 & ~umask for files."""
    probe = directory / ".umask"
    probe.mkdir()  # mkdir applies the umask to 0777; reading it this way leaves the process umask untouched
    dirs = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dirs if path.is_dir() else dirs & 0o666)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
