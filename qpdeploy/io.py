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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes ``out`` when the block exits cleanly.

    Args:
        out: final directory path.
        force: replace an existing ``out``; without it an existing path is an error
            raised before any work starts.

    On an exception the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _ordinary_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old artifact aside first so that a failure between the two renames
        # still leaves one complete artifact on disk.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _ordinary_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; artifacts get the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_output(out: str | os.PathLike, force: bool) -> None:
    """Refuse an existing output path unless ``force`` (called before any long work)."""
    out = Path(out)
    if out.exists() and not force:
        raise QPDeployError(f"output {out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QPDeployError(f"output {out} exists and is not a directory")


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
    data = read_json(path / file_name)
    if data.get("kind") != kind:
        article = "an" if what[0] in "aeiou" else "a"
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
