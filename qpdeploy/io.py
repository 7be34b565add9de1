"""Artifact plumbing shared by every stage: atomic directories, hashes, JSON, versions.

Every artifact is written into a temporary sibling directory and renamed into place at
the end, so a crash or an error never leaves a half-written artifact that looks whole,
and an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import QPDeployError


INCOMPLETE_MARKER = ".qpdeploy-incomplete"  # in every temporary artifact until it is complete


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, kind: tuple[str, str] | None = None, inputs=()):
    """Yield a temporary directory that becomes ``out`` when the block exits cleanly.

    Args:
        out: final directory path.
        force: replace an existing ``out``; without it an existing path is an error
            raised before any work starts.
        kind, inputs: see :func:`claim_output` (the claim is shared with an enclosing one).

    The temporary directory holds :data:`INCOMPLETE_MARKER` until the block ends, so no
    reader takes it for an artifact. On an exception it is removed and ``out`` is
    untouched; leftovers of killed writers of ``out`` are removed on the next run.
    """
    with claim_output(out, force, kind, inputs) as claim:
        out = claim.out
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            (tmp / INCOMPLETE_MARKER).touch()
            yield tmp
            _ordinary_permissions(tmp)
            (tmp / INCOMPLETE_MARKER).unlink()
            claim.install(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_leftovers(out: Path) -> None:
    """Remove temporary and set-aside copies of ``out`` left by writers that died (the
    caller holds the lock on ``out``, so no live writer owns them)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _ordinary_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; artifacts get the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():  # a link into an input (a Triton repository's): never change its target
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


class OutputClaim:
    """The right to write one output path, held from the checks before the work to the
    final rename: an exclusive lock (``flock`` on a sibling lock file, released by the
    kernel if the process dies) and what the path was when the claim began."""

    def __init__(self, out: Path):
        self.out = out
        self.existed = out.exists() or out.is_symlink()
        self.depth = 0
        self._fd = None

    def acquire(self) -> None:
        """Take the lock or raise QPDeployError naming the other writer."""
        import fcntl

        lock = self.out.with_name(f".{self.out.name}.lock")
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise QPDeployError(f"another qpdeploy process (pid {owner}) is writing {self.out}; "
                                    "wait for it to finish") from None
            # The lock file may have been removed by its previous owner between our open
            # and our lock: then the lock is on an orphan inode; open the file again.
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd, self._lock = fd, lock

    def release(self) -> None:
        if self._fd is not None:
            self._lock.unlink(missing_ok=True)  # while still locked: no one else can hold it now
            os.close(self._fd)
            self._fd = None

    def install(self, tmp: Path) -> None:
        """Rename ``tmp`` to the output. An output that exists now but did not when the claim
        began was made by someone else meanwhile: it is never replaced."""
        out = self.out
        if out.exists() or out.is_symlink():
            if not self.existed:
                raise QPDeployError(f"output {out} appeared while this run was writing it; it was left as it is")
            # Move the old artifact aside first so that a failure between the two renames
            # still leaves one complete artifact on disk.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)


_CLAIMS: dict[Path, OutputClaim] = {}


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, force: bool = False, kind: tuple[str, str] | None = None, inputs=()):
    """Check an output path and hold the exclusive right to write it for the block.

    Checks, before any work: ``out`` does not equal, contain or lie inside any of
    ``inputs``; its location can be created and written; an existing ``out`` needs
    ``force``, and with ``kind = (header file, kind string)`` it must be an artifact of
    that kind (``--force`` never replaces anything else). Nested claims of the same path
    in one process share the outer claim.

    Raises:
        QPDeployError: one line naming the output and the problem.
    """
    path = Path(os.path.abspath(out))
    claim = _CLAIMS.get(path)
    if claim is None:
        check_output(path, force, kind, inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        claim = OutputClaim(path)
        claim.acquire()
        _CLAIMS[path] = claim
    claim.depth += 1
    try:
        yield claim
    finally:
        claim.depth -= 1
        if claim.depth == 0:
            del _CLAIMS[path]
            claim.release()


def check_output(out: str | os.PathLike, force: bool, kind: tuple[str, str] | None = None, inputs=(),
                 directory: bool = True) -> None:
    """The checks of :func:`claim_output`, without the lock (called before any long work);
    ``directory=False`` for an output file."""
    out = Path(os.path.abspath(out))
    for given in inputs:
        if given is not None and os.path.exists(given) and overlap(out, given):
            raise QPDeployError(f"output {out} {overlap(out, given)} the input {given}; choose another --out")
    _check_writable(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise QPDeployError(f"output {out} already exists (use --force to replace it)")
    if out.is_symlink():
        raise QPDeployError(f"output {out} is a symbolic link; --force replaces only real artifacts")
    if kind is not None:
        header, name = kind
        found = _kind_of(out / header) if out.is_dir() else None
        if found != name:
            raise QPDeployError(f"output {out} is not a {name} artifact; --force replaces only an artifact of "
                                "the kind this command writes")
    elif directory and not out.is_dir():
        raise QPDeployError(f"output {out} exists and is not a directory")


def overlap(out, other) -> str | None:
    """How ``out`` overlaps ``other`` once links are resolved: "is", "lies inside",
    "contains", or None."""
    a, b = Path(out).resolve(), Path(other).resolve()
    if a == b:
        return "is"
    return "lies inside" if b in a.parents else "contains" if a in b.parents else None


def _kind_of(header: Path):
    try:
        data = json.loads(header.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _check_writable(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a writable directory."""
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise QPDeployError(f"cannot create output {out}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise QPDeployError(f"cannot create output {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QPDeployError(f"cannot create output {out}: {parent} is not writable")


def write_file_atomic(path: str | os.PathLike, write) -> None:
    """Write a file through a temporary sibling renamed into place (never a half-written file).

    ``write(tmp_path)`` writes the content. Temporary siblings of ``path`` left by processes
    that died are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: str | os.PathLike, data) -> None:
    """Write pretty JSON with a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising a one-line QPDeployError when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise QPDeployError(f"missing file: {path}") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise QPDeployError(f"cannot read {path}: {exc.__class__.__name__}") from exc


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_artifact_header(path, file_name: str, kind: str, what: str, supported: int) -> dict:
    """Read the JSON header ``file_name`` of the artifact directory ``path`` and check it is a
    ``kind`` artifact of a format version this qpdeploy reads.

    Args:
        what: the artifact's name in messages ("quantized base", "scale pack", ...).

    Raises:
        QPDeployError: one line: not a directory, not that kind, or an unknown version.
    """
    path = Path(path)
    if not path.is_dir():
        raise QPDeployError(f"{what} not found: {path} is not a directory")
    if (path / INCOMPLETE_MARKER).exists():
        raise QPDeployError(f"{path} is an unfinished {what} (its writer died or is still running)")
    article = "an" if what[0] in "aeiou" else "a"
    if not (path / file_name).is_file():
        raise QPDeployError(f"{path} is not {article} qpdeploy {what} (it has no {file_name})")
    data = read_json(path / file_name)
    if not isinstance(data, dict):
        raise QPDeployError(f"{path / file_name}: expected a JSON object, got {type(data).__name__}")
    if data.get("kind") != kind:
        raise QPDeployError(f"{path} is not {article} qpdeploy {what} (kind {data.get('kind')!r})")
    check_format_version(what, data.get("format_version"), supported, path / file_name)
    return data


def check_format_version(kind: str, found, supported: int, path) -> None:
    """Refuse artifacts of an unknown or newer format version."""
    if not isinstance(found, int):
        raise QPDeployError(f"{path}: {kind} has no valid format_version (found {found!r})")
    if found > supported:
        raise QPDeployError(
            f"{path}: {kind} format version {found} is newer than this qpdeploy supports ({supported}); upgrade qpdeploy"
        )
    if found < 1:
        raise QPDeployError(f"{path}: unknown {kind} format version {found}")


def tensors_hash(tensors: dict, extra: bytes = b"") -> str:
    """SHA-256 over named tensors (sorted names, dtypes, shapes and raw bytes).

    A content hash: independent of how (or whether) the tensors were serialized.
    """
    import torch

    digest = hashlib.sha256(extra)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
