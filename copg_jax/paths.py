"""Paths of a run's inputs and artefacts: local paths or URLs of any fsspec filesystem (gs://, s3://, ...).

Every file a run reads or writes goes through this module instead of `os` / `pathlib`, so a run folder on an
object store behaves like a local one. Paths are strings; `file://` URLs are local paths. What each kind of
place guarantees:

* local paths: a whole-file write (`write_bytes`) is atomic (a temporary file in the same folder, then
  `os.replace`); `rename` is atomic; exclusive creation is `O_EXCL`.
* URLs: a whole-object write is one PUT, atomic on object stores (a reader sees the old or the new object,
  never part of one); there is no append, and `rename` is copy-then-delete (not atomic; it moves what is
  there); exclusive creation (`create_exclusive`) is atomic where the filesystem implements fsspec's
  `pipe_file(mode="create")` with a precondition (gcsfs: `ifGenerationMatch=0`, s3fs: `If-None-Match`,
  memory://: within one process), and a check-then-write elsewhere (fsspec's default), which two writers
  can both pass.

Libraries that read only local files (a model folder they memory-map, a tokenizer folder, data files for
`datasets`) get a staged copy (`stage`): the URL's files are copied once under `staging_dir(url)` in the
local cache (`$COPG_CACHE_DIR`, default ~/.cache/copg_jax) and copied again when a file's size or version
(ETag, generation, mtime: what the store reports) changes; where the store reports no version the file is
copied on every use. Libraries that write only local files (TensorBoard, safetensors export, orbax on URLs
other than gs://) write into the staging folder and the files are uploaded (`upload`).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as globlib
import gzip
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://|::")
_WILDCARDS = "*?["
# fields of fsspec's `info` that change when an object's content does (by store)
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "updated", "created")


def normal(path: str | os.PathLike) -> str:
    """`path` as a string; a `file://` URL becomes the local path it names."""
    text = os.fspath(path)
    return text.removeprefix("file://") if text.startswith("file://") else text


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL of a filesystem other than the local one (`gs://b/x`, `memory://x`)."""
    return bool(_URL.search(normal(path)))


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is a local path (or a `file://` URL)."""
    return not is_url(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` / `parts`: "/"-joined for URLs, os.path.join for local paths."""
    base = normal(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path`."""
    path = normal(path)
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def _either(path: str | os.PathLike, local, method: str, **kwargs):
    """`local(path)` for a local path, else the fsspec filesystem's `method(path, **kwargs)`."""
    path = normal(path)
    if not is_url(path):
        return local(path)
    fs, p = _fs(path)
    return getattr(fs, method)(p, **kwargs)


def exists(path: str | os.PathLike) -> bool:
    return _either(path, os.path.exists, "exists")


def isfile(path: str | os.PathLike) -> bool:
    return _either(path, os.path.isfile, "isfile")


def isdir(path: str | os.PathLike) -> bool:
    return _either(path, os.path.isdir, "isdir")


def makedirs(path: str | os.PathLike) -> None:
    """Creates folder `path` and its parents (object stores have no folders: nothing to do there)."""
    _either(path, lambda p: os.makedirs(p, exist_ok=True), "makedirs", exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names of the entries of folder `path` (files and folders), sorted."""
    path = normal(path)
    if not is_url(path):
        return sorted(os.listdir(path))
    fs, p = _fs(path)
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False))


def remove(path: str | os.PathLike) -> None:
    """Removes a file, or a folder and everything under it."""
    path = normal(path)
    if not is_url(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=fs.isdir(p))


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves a file or folder (atomic locally; copy-then-delete on object stores)."""
    src, dst = normal(src), normal(dst)
    if not is_url(src):
        os.replace(src, dst)
        return
    fs, p = _fs(src)
    fs.mv(p, _fs(dst)[1], recursive=True)


def open(path: str | os.PathLike, mode: str = "rb", compression: str | None = None) -> IO:  # noqa: A001
    """`path` opened with `mode` (a file object; for URLs fsspec's, written when closed), decompressed or
    compressed on the fly with `compression="gzip"`."""
    path = normal(path)
    if not is_url(path):
        return gzip.open(path, mode) if compression == "gzip" else builtins.open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode, compression=compression)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def temp_beside(path: str | os.PathLike) -> str:
    """A name for a temporary file beside local `path`, to be renamed over it: unique to the writer, so that
    writers on several hosts sharing a folder (NFS) never write one file -- a process id is not unique
    there: each container's processes count from 1."""
    return f"{path}.{uuid.uuid4().hex}.tmp"


# a temporary file beside its target (`temp_beside`) untouched this long is an interrupted write's (a killed
# process: an exception removes its own); writes take seconds to minutes, each one flushing as it goes
STALE_TEMP_S = 3600.0


def remove_stale_temps(path: str | os.PathLike, now: float | None = None) -> list[str]:
    """Removes the temporary files of interrupted writes of local `path` (`temp_beside`'s names, untouched
    for STALE_TEMP_S: a cache of many GB would otherwise be left beside its target at every kill). Returns
    their paths."""
    now = time.time() if now is None else now
    removed = []
    folder, name = os.path.split(os.fspath(path))
    # listed, not globbed: fnmatch keeps every pattern it compiles, one per checkpoint step's file
    temp = re.compile(re.escape(name) + r"\.[0-9a-f]{32}\.tmp")
    try:
        found = [os.path.join(folder, e.name) for e in os.scandir(folder or ".") if temp.fullmatch(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        found = []
    for tmp in found:
        with contextlib.suppress(FileNotFoundError):
            if now - os.path.getmtime(tmp) > STALE_TEMP_S:
                os.remove(tmp)
                removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes of %s", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces `path` whole and atomically when the block ends without error
    (module docstring; locally a temporary file renamed over it), creating its folder."""
    path = normal(path)
    makedirs(parent(path))
    if is_url(path):
        fs, p = _fs(path)
        with fs.open(p, "wb") as f:  # the object is written when the file closes
            yield f
        return
    remove_stale_temps(path)
    tmp = temp_beside(path)
    try:
        with builtins.open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `path` whole and atomically (`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Creates `path` holding `data` unless it exists; returns whether this call created it (what is atomic
    where: module docstring)."""
    path = normal(path)
    makedirs(parent(path))
    if not is_url(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, p = _fs(path)
    try:
        fs.pipe_file(p, data, mode="create")
    except FileExistsError:
        return False
    return True


def modified(path: str | os.PathLike) -> float | None:
    """Last modification time of `path` (seconds since the epoch) by the filesystem's clock, None where the
    filesystem does not say."""
    path = normal(path)
    if not is_url(path):
        return os.path.getmtime(path)
    fs, p = _fs(path)
    try:
        return fs.modified(p).timestamp()
    except (NotImplementedError, AttributeError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------ staging and upload


def cache_root() -> str:
    """The local cache folder: $COPG_CACHE_DIR, default ~/.cache/copg_jax."""
    return os.environ.get("COPG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "copg_jax")


def staging_dir(url: str) -> str:
    """The local folder that mirrors `url`: `<cache>/staged/<protocol>/<path>` (a local path: itself)."""
    url = normal(url)
    if not is_url(url):
        return url
    fs, p = _fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return os.path.join(cache_root(), "staged", protocol, p.lstrip("/"))


def _version(info: dict) -> str | None:
    """What identifies an object's content (size and a version field), None when the store gives none."""
    version = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None}
    return json.dumps({"size": info.get("size"), **version}, sort_keys=True) if version else None


def _stage_file(fs: fsspec.AbstractFileSystem, remote: str, local: str) -> None:
    """Copies object `remote` of `fs` to `local` unless the copy there is of the same version."""
    marker = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.copg-staged")
    version = _version(fs.info(remote))
    if version is not None and os.path.isfile(local):
        try:
            with builtins.open(marker) as f:
                if f.read() == version:
                    return
        except OSError:
            pass
    os.makedirs(os.path.dirname(local), exist_ok=True)
    remove_stale_temps(local)
    tmp = temp_beside(local)
    fs.get_file(remote, tmp)
    os.replace(tmp, local)
    if version is not None:
        with builtins.open(marker, "w") as f:
            f.write(version)


def stage(path: str | os.PathLike) -> str:
    """A local path holding what `path` holds (a file, a folder or a glob of files): `path` itself when it
    is local, else its copy under `staging_dir(path)` (module docstring). Staged files no longer in the
    folder or glob are removed from the copy.

    Raises:
      FileNotFoundError: nothing at `path`.
    """
    path = normal(path)
    if not is_url(path):
        return path
    fs, p = _fs(path)
    local = staging_dir(path)
    if any(c in p for c in _WILDCARDS):
        base = p[: min(p.index(c) for c in _WILDCARDS if c in p)].rsplit("/", 1)[0]
        remote_files = [f for f in fs.glob(p) if fs.isfile(f)]
        root = staging_dir(fs.unstrip_protocol(base))
    elif fs.isdir(p):
        base, remote_files, root = p, [f for f in fs.find(p) if not f.endswith("/")], local
    elif fs.isfile(p):
        _stage_file(fs, p, local)
        return local
    else:
        raise FileNotFoundError(f"{path} does not exist")
    wanted = set()
    for remote in remote_files:
        target = os.path.join(root, os.path.relpath("/" + remote.lstrip("/"), "/" + base.lstrip("/")))
        _stage_file(fs, remote, target)
        wanted.add(target)
    for name in globlib.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(name) and name not in wanted:
            os.remove(name)
    return local


def upload(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copies local file or folder `local` to `url` (file by file; each file one whole-object write)."""
    local, url = normal(local), normal(url)
    if os.path.isfile(local):
        makedirs(parent(url))
        fs, p = _fs(url)
        fs.put_file(local, p)
        return
    for folder, _, files in os.walk(local):
        for name in files:
            source = os.path.join(folder, name)
            upload(source, join(url, *os.path.relpath(source, local).split(os.sep)))
