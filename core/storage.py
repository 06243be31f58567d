"""Run directories in object stores (``s3://``, ``gs://``, any fsspec URL; ``file://`` for tests).

A job whose ``checkpoint.dir`` is a URI still writes everything on local disk first (the *staging*
dir, ``checkpoint.local_dir``) and this module copies it out:

- a checkpoint is saved locally by every learner rank, each node uploads its own files, and the
  driver writes ``state.json`` *last*. Object stores have no rename, so ``state.json`` is the
  commit marker: readers (resume, ``protege serve``, the job API) only see ``step_N/`` folders that
  have one, exactly as for local checkpoints. Deleting goes the other way (state.json first).
- metrics, samples, the spec and the plot are mirrored after every checkpoint and at the end, so a
  pod that disappears leaves its run readable in the bucket.
- resume and serving download what they need into a local cache.

fsspec does the talking (``s3fs`` / ``gcsfs`` are optional extras: ``pip install 'protege[s3]'``).
Only whole files are written, which every object store does atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def protocol(uri: str) -> str:
    return str(uri).split("://", 1)[0].lower()


def check_protocol(uri: str) -> None:
    """Raise ValueError unless fsspec knows ``uri``'s scheme. Cheap: imports no backend."""
    from fsspec.registry import known_implementations, registry

    proto = protocol(uri)
    if proto not in known_implementations and proto not in registry:
        raise ValueError(f"unknown storage scheme '{proto}://' (fsspec knows s3://, gs://, az://, file://, …)")


def filesystem(uri: str):
    """(fs, path) for ``uri``. A missing backend becomes a message that says what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(uri))
    except ImportError as err:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol(uri))
        hint = f"pip install 'protege[{extra}]'" if extra else str(err)
        raise RuntimeError(f"{uri}: the filesystem backend for {protocol(uri)}:// is not installed ({hint})") from err


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


# ------------------------------------------------------------------------------- files
def upload_tree(local: str | Path, uri: str, *, exclude: tuple[str, ...] = ()) -> int:
    """Copy every file under ``local`` to ``uri`` (same relative paths), skipping top-level entries
    named in ``exclude`` and hidden temp files. Returns bytes uploaded. (A checkpoint's commit
    marker is not uploaded here: ``checkpoints.commit_remote`` writes it after this returns.)"""
    fs, root = filesystem(uri)
    local = Path(local)
    files = sorted(
        p
        for p in local.rglob("*")
        if p.is_file() and p.relative_to(local).parts[0] not in exclude and not p.name.startswith(".")
    )
    total = 0
    made: set[str] = set()
    for f in files:
        dest = join(root, f.relative_to(local).as_posix())
        parent = dest.rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.put_file(str(f), dest)
        total += f.stat().st_size
    return total


def download_tree(uri: str, local: str | Path) -> Path:
    """Copy every file under ``uri`` into ``local`` (created). Returns ``local``."""
    fs, root = filesystem(uri)
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    prefix = root.rstrip("/") + "/"
    for src in fs.find(root):
        rel = src[len(prefix) :] if src.startswith(prefix) else Path(src).name
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(src, str(dest))
    return local


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()


def write_text(uri: str, text: str) -> None:
    """One PUT: atomic on object stores; on file:// a temp file and a rename."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if protocol(uri) in ("file", "local"):
        part = f"{path}.part-{os.getpid()}"
        fs.pipe_file(part, text.encode())
        os.replace(part, path)
    else:
        fs.pipe_file(path, text.encode())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str, *, marker: str | None = None) -> None:
    """Delete ``uri`` recursively; ``marker`` (relative) first, so a crash mid-delete never leaves a
    folder that still looks complete."""
    fs, path = filesystem(uri)
    if marker is not None and fs.exists(join(path, marker)):
        fs.rm_file(join(path, marker))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def subdirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri`` ([] if it does not exist)."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


# ------------------------------------------------------------------------------- caches
def cache_root() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache" / "protege"))


def local_copy(uri: str, *, kind: str = "models", group: str | None = None, keep: int | None = None) -> Path:
    """A local copy of the folder at ``uri``, downloaded once (a ``.complete`` marker guards against
    a download that was cut short). Used to serve a published checkpoint from a bucket.

    Copies of one ``group`` (a run) share a folder; with ``keep``, only the ``keep`` most recently
    downloaded stay, so a server that follows a long training run does not fill its disk with
    every version it ever served (the engine has already loaded the older ones)."""
    parts = str(uri).rstrip("/").rsplit("/", 2)[-2:]
    home = cache_root() / kind / hashlib.sha256(str(group or uri).encode()).hexdigest()[:16]
    dest = home / f"{hashlib.sha256(str(uri).encode()).hexdigest()[:8]}-{'-'.join(parts)}"
    if (dest / ".complete").is_file():
        return dest
    home.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=home))
    try:
        download_tree(uri, part)
        (part / ".complete").write_text(str(uri))
        shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(part, dest)
        except OSError:  # another process finished the same download first
            if not (dest / ".complete").is_file():
                raise
            shutil.rmtree(part, ignore_errors=True)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if keep is not None:
        done = sorted(
            (p for p in home.iterdir() if (p / ".complete").is_file()), key=lambda p: (p / ".complete").stat().st_mtime
        )
        for old in done[:-keep]:
            if old != dest:
                (old / ".complete").unlink(missing_ok=True)  # first: a half-deleted copy is never reused
                shutil.rmtree(old, ignore_errors=True)
    return dest
