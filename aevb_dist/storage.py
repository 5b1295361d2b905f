"""Storage URIs → filesystems. Every read and write of datasets, runs and checkpoints goes through here.

URIs stay `str` (a `Path` would mangle `s3://`). Plain paths and `file://` are local;
`memory://`, `s3://` and `gs://` go through fsspec. An S3-compatible endpoint comes from the
config (`run.s3_endpoint_url`) or the environment (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`);
credentials come from the environment and are never stored.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Optional

import fsspec
import fsspec.implementations.local

from aevb_dist.config import check_uri

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def s3_endpoint(endpoint_url: Optional[str] = None) -> Optional[str]:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def resolve(uri: str, endpoint_url: Optional[str] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    check_uri("uri", uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise ValueError(f"{uri}: s3:// needs the s3fs package: pip install 'aevb-dist[s3]'") from None
        endpoint = s3_endpoint(endpoint_url)
        fs = fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            # Other processes (workers, resumed runs) write here: never trust a cached listing.
            use_listings_cache=False, skip_instance_cache=True,
            config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
        )
        return fs, uri[len("s3://"):].rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as err:
        raise ValueError(f"{uri}: {scheme}:// needs an fsspec backend that is not installed ({err})") from None
    return fs, path.rstrip("/") if path != "/" else path


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    return posixpath.join(uri.rstrip("/") if uri not in ("/", "") else uri, *parts)


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
        fs.copy(path, dst + path[len(src):])
    fs.rm(src, recursive=True)


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow view of an fsspec filesystem (what Ray Train's `storage_filesystem` takes)."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
