"""Storage URIs → filesystems. Every read and write of datasets, runs and checkpoints goes through here.

URIs stay `str` (a `Path` would mangle `s3://`). Plain paths and `file://` are local;
`memory://`, `s3://` and `gs://` go through fsspec. An S3-compatible endpoint comes from the
config (`run.s3_endpoint_url`) or the environment (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`);
credentials come from the environment and are never stored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

import fsspec
import fsspec.implementations.local

from aevb_dist.console import first_line, say, unfixable_by_waiting
from aevb_dist.run.uri import check_uri, join, local_path, scheme_of

T = TypeVar("T")

__all__ = [
    "Folder",
    "check_uri",
    "exists",
    "is_local",
    "join",
    "move_tree",
    "pyarrow_filesystem",
    "ray_train_storage",
    "replace_folder",
    "resolve",
    "run_folder",
    "s3_endpoint",
    "scheme_of",
    "StorageUnavailable",
    "unwritable_error",
    "with_retries",
]


def s3_endpoint(endpoint_url: Optional[str] = None) -> Optional[str]:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def resolve(uri: str, endpoint_url: Optional[str] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    check_uri("uri", uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), local_path(uri)
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise ValueError(f"{uri}: s3:// needs the s3fs package: pip install 'aevb-dist[s3]'") from None
        endpoint = s3_endpoint(endpoint_url)
        fs = fsspec.filesystem(
            "s3",
            client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            # Other processes (workers, resumed runs) write here: never trust a cached listing.
            use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
        )
        return fs, uri[len("s3://") :].rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as err:
        raise ValueError(f"{uri}: {scheme}:// needs an fsspec backend that is not installed ({err})") from None
    return fs, path.rstrip("/") if path != "/" else path


@dataclass(frozen=True)
class Folder:
    """A folder resolved once: the URI as the user wrote it, its filesystem, and the path inside it.
    Passed around (and pickled to workers) instead of re-resolving a URI in every function."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def open(cls, uri: str, endpoint_url: Optional[str] = None) -> "Folder":
        fs, path = resolve(uri, endpoint_url)
        return cls(uri, fs, path)

    def file(self, name: str) -> str:
        """The path (inside `fs`) of `name` in this folder."""
        return f"{self.path}/{name}"


def run_folder(run_cfg) -> Folder:
    """The run folder `{run.storage_uri}/{run.name}` of a config's `run` section."""
    return Folder.open(join(run_cfg.storage_uri, run_cfg.name), run_cfg.s3_endpoint_url)


def exists(uri: str, endpoint_url: Optional[str] = None) -> bool:
    fs, path = resolve(uri, endpoint_url)
    return fs.exists(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disk: files can be renamed and appended to, which object stores cannot do."""
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def move_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a folder: a rename where the filesystem has one, else file by file (object stores)."""
    if is_local(fs):
        fs.mv(src, dst, recursive=True)
        return
    for path in fs.find(src):
        fs.copy(path, dst + path[len(src) :])
    fs.rm(src, recursive=True)


@contextlib.contextmanager
def replace_folder(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """Yields a hidden staging folder beside `root` to write into. When the block ends without an
    error, the staging folder replaces `root` whole; when it fails, it is removed. Readers of `root`
    never see a partial result, and a failure leaves nothing behind."""
    parent, base = root.rstrip("/").rsplit("/", 1) if "/" in root.strip("/") else ("", root.strip("/"))
    staging = f"{parent}/.{base}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        if fs.exists(root):
            fs.rm(root, recursive=True)
        move_tree(fs, staging, root)
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)


class StorageUnavailable(ValueError):
    """Storage stayed unreachable for longer than the configured limit."""


def with_retries(action: Callable[[], T], what: str, limit_s: float) -> T:
    """`action()`, retried with exponential backoff (0.5 s doubling to 8 s) while storage fails, for up to
    `limit_s` seconds; then StorageUnavailable, one line naming the storage error. A missing file, a
    refused permission, a full disk or a read-only file system is an answer, not an outage: raised at once."""
    start, delay, warned = time.monotonic(), 0.5, False
    while True:
        try:
            return action()
        except Exception as err:  # connection refused or reset, timeouts, 5xx: botocore's, s3fs's, the OS's
            if isinstance(err, (FileNotFoundError, PermissionError)) or unfixable_by_waiting(err):
                raise
            waited = time.monotonic() - start
            cause = f"{type(err).__name__}: {first_line(err)}"
            if waited >= limit_s:
                raise StorageUnavailable(
                    f"storage unreachable for {waited:.0f} s while {what} (run.storage_retry_s={limit_s:g}): {cause}"
                ) from None
            if not warned:
                say(f"warning: {what} failed ({cause}); retrying for up to {limit_s:g} s")
                warned = True
            time.sleep(min(delay, max(limit_s - waited, 0.0)))
            delay = min(delay * 2, 8.0)


def unwritable_error(
    err: OSError,
    where: str,
    what: str,
    needed_bytes: Optional[int] = None,
    bound: str = "about",
    folder: Optional[str] = None,
) -> ValueError:
    """One line for storage that waiting cannot fix (`console.unfixable_by_waiting`): which folder (`where`,
    as the user knows it; `folder`, the URI whose free space is told, when `where` is not one), and for a full
    disk the space `what` needs (`bound`: about, up to) against what is free there."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ValueError(f"cannot write {what} to {where}: {err.strerror or first_line(err)}")
    free = _free_bytes(folder or where)
    needs = f"needs {bound} {_mib(needed_bytes)}" if needed_bytes is not None else "did not fit"
    room = f", {_mib(free)} free" if free is not None else ""
    return ValueError(
        f"no space left in {where}: {what} {needs}{room} ({err.strerror}); free some space "
        "there or write elsewhere, then run the same command again"
    )


@contextlib.contextmanager
def unwritable_told(
    where: str,
    what: str,
    needed_bytes: Optional[int] = None,
    bound: str = "about",
    folder: Optional[str] = None,
):
    """Writes within: storage that waiting cannot fix (a full or read-only disk, a refused permission) is
    `unwritable_error`'s one line; other errors pass as they are (the callers' retries handle outages)."""
    try:
        yield
    except OSError as err:
        if not unfixable_by_waiting(err):
            raise
        raise unwritable_error(err, where, what, needed_bytes, bound, folder) from None


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _free_bytes(where: str) -> Optional[int]:
    """Free bytes of the local file system holding `where` (or its nearest existing parent)."""
    if scheme_of(where) != "file":
        return None
    path = local_path(where)
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/"))
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow view of an fsspec filesystem (what Ray Train's `storage_filesystem` takes)."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_train_storage(run: Folder) -> tuple[str, Optional[object]]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig, whose `name` is the run folder's
    own: its parent, and the filesystem wrapped for pyarrow (what Ray Train takes) unless local."""
    parent = run.path.rsplit("/", 1)[0] or "/"
    return (parent, None) if is_local(run.fs) else (parent, pyarrow_filesystem(run.fs))
