"""The one filesystem layer every stage writes through: local folders and object stores alike.

Prepare, train and eval write their outputs (`data.output_dir`, `experiment.output_dir`) only
through these functions, so that the same code serves a local path, NFS, and any URI pyarrow
opens (`s3://`, `gs://`, `hdfs://`, `file://`; other fsspec schemes such as `memory://` through
fsspec). A plain `os.makedirs("s3://b/x")` would create a local folder named `s3:`.

Paths are strings: a local path, or a URI whose `?query` (filesystem options such as
`endpoint_override`) is kept at the end by `join`, as `data_pipeline.inputs` keeps it.
Credentials come from the environment, as for inputs (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).

Atomicity: on a local filesystem (a plain path or `file://`), `write_bytes` writes a temporary
file, fsyncs it and renames it into place. Object stores have no rename, but a single object
appears whole or not at all, so `write_bytes` there is one PUT; a *folder* is never atomic on
them, which is why callers upload a folder first and write the object that marks it finished
(a manifest, a completion marker) last (`upload_folder(..., last=...)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from data_pipeline import local_cache

# Parallel uploads/downloads of a folder's files (object stores are latency bound).
IO_THREADS = 8


def is_uri(path: str) -> bool:
    """True for `scheme://...` (file:// included), False for a plain local path."""
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `path` and the path on it (a URI's query selects options)."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), path
    try:
        return pafs.FileSystem.from_uri(path)  # type: ignore[no-any-return]
    except pa.ArrowInvalid as e:
        if "Unrecognized filesystem" not in str(e):
            raise
    import fsspec.core  # schemes pyarrow lacks (memory://, az://, ...): through fsspec

    fs, fs_path = fsspec.core.url_to_fs(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs_path


def local_path(path: str) -> str | None:
    """The plain local path of `path` (a local path or `file://` URI), else None. Decided
    from the scheme alone: resolving an s3:// URI may ask the network for its region."""
    if not is_uri(path):
        return path
    if path.startswith("file://"):
        return filesystem(path)[1]
    return None


def join(base: str, *names: str) -> str:
    """`base/name/...`; a URI keeps its `//` and its `?query` stays at the end."""
    if not is_uri(base):
        return os.path.join(base, *names)
    root, sep, query = base.partition("?")
    parts = [root.rstrip("/")] + [n.strip("/") for n in names if n]
    return "/".join(parts) + sep + query


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound  # type: ignore[no-any-return]


def makedirs(path: str) -> None:
    """Create a folder and its parents (object stores have no folders: a no-op there, which
    also keeps S3 free of empty `folder/` marker objects)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(p, exist_ok=True)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()  # type: ignore[no-any-return]


def read_json(path: str) -> Any | None:
    """The JSON object stored at `path`, or None when there is no such file."""
    if not exists(path):
        return None
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: readers see the old content or the new, never a part.

    Local: a temporary file in the same folder, fsynced, renamed over `path`. Object store: one
    PUT (an object appears whole or not at all).
    """
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically (`write_bytes`)."""
    write_bytes(path, json.dumps(obj, indent=2).encode())


def list_files(path: str) -> list[str]:
    """Every file under the folder `path`, as sorted paths relative to it ([] if none)."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True))
    root = p.rstrip("/") + "/"
    return sorted(i.path[len(root) :] for i in infos if i.type == pafs.FileType.File)


def list_dir(path: str) -> list[str]:
    """The names directly under the folder `path` (files and folders), sorted ([] if none)."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def delete(path: str) -> None:
    """Delete a file or a whole folder (prefix); nothing if it does not exist."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def suffixed(path: str, suffix: str) -> str:
    """`path` + `suffix` (a sibling name such as `out.rejects.jsonl`), before a URI's query."""
    root, sep, query = path.partition("?") if is_uri(path) else (path, "", "")
    return root.rstrip("/") + suffix + sep + query


def move_file(local: str, dest: str) -> None:
    """Move one local file to `dest`: renamed on a local filesystem, uploaded elsewhere."""
    fs, p = filesystem(dest)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        os.replace(local, p)
        return
    _put(local, fs, p)
    os.remove(local)


def put_file(local: str, dest: str) -> None:
    """Copy one local file to `dest` (any filesystem); see `write_bytes` for atomicity."""
    fs, p = filesystem(dest)
    _put(local, fs, p)


def get_file(src: str, local: str) -> None:
    """Copy the file `src` (any filesystem) to the local path `local`, streaming."""
    fs, p = filesystem(src)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    pafs.copy_files(p, local, fs, pafs.LocalFileSystem())


def upload_folder(local: str, dest: str, last: Iterable[str] = ()) -> list[str]:
    """Copy every file of the local folder `local` under `dest`, the names in `last` at the end.

    `last` (paths relative to `local`) are uploaded one by one, in order, once every other file
    is there: a reader that checks for them never finds them next to a partial folder.

    Returns:
        The uploaded files, relative to `local`, in sorted order.
    """
    names = list_files(local)
    final = [n for n in last if n in names]
    bulk = [n for n in names if n not in final]
    fs, root = filesystem(dest)

    def put(name: str) -> None:
        _put(os.path.join(local, name), fs, f"{root.rstrip('/')}/{name}")

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(put, bulk))  # list(): re-raises the first failure
    for name in final:
        put(name)
    return names


def _put(src: str, fs: pafs.FileSystem, dest: str) -> None:
    """One file upload; tests replace it to fail or stop midway."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, dest)
        return
    pafs.copy_files(src, dest, pafs.LocalFileSystem(), fs)


def download_folder(src: str, local: str) -> None:
    """Copy every file under `src` (any filesystem) into the local folder `local`."""
    fs, root = filesystem(src)
    names = list_files(src)
    if not names:
        raise FileNotFoundError(f"{src}: no files there")

    def get(name: str) -> None:
        target = os.path.join(local, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(f"{root.rstrip('/')}/{name}", target, fs, pafs.LocalFileSystem())

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(get, names))


def cached_copy(
    uri: str, cache_dir: str | None = None, required: str | None = None, download: bool = True
) -> str:
    """A local folder holding the remote folder `uri`, downloaded once per node and version.

    The copy is named by the URI and every remote file's size and modification time, so a
    changed folder is fetched again and an unchanged one never. It lives in a `local_cache`:
    filled atomically, held by this process, the cache kept within its disk budget.

    Args:
        uri: the folder on any filesystem (`s3://...`).
        cache_dir: where copies live; default `<tmp>/ift-cache`.
        required: a file that must exist in the folder (e.g. `config.json`).
        download: False: return a copy already there, never download.

    Raises:
        FileNotFoundError: The folder is empty, lacks `required`, or (`download` False) has
            no copy yet.
    """
    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    prefix = root.rstrip("/") + "/"
    if required and prefix + required not in {f[0] for f in files}:
        raise FileNotFoundError(f"{uri}: no {required} there")
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    key = hashlib.sha256(json.dumps([uri.partition("?")[0], files]).encode()).hexdigest()[:24]
    base = cache_dir or model_cache_dir()
    try:
        return local_cache.cached(
            base, key, (lambda tmp: download_folder(uri, tmp)) if download else None
        )
    except local_cache.NotCached:
        raise FileNotFoundError(f"{uri}: not downloaded yet") from None


def model_cache_dir() -> str:
    """Where `cached_copy` keeps its copies by default (`ift cache` lists and prunes it)."""
    return os.path.join(tempfile.gettempdir(), "ift-cache")


def staging_dir(dest: str) -> str:
    """A local folder name for building what goes to `dest` before it is uploaded.

    `dest` itself when it is local (then the folder can be renamed into place); for a URI, a
    name under the system temporary folder (`$TMPDIR`) derived from the URI, so that a rerun
    finds, and can clean up, what a killed run left.
    """
    path = local_path(dest)
    if path is not None:
        return path
    digest = hashlib.sha256(dest.partition("?")[0].encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "ift-staging", digest)
