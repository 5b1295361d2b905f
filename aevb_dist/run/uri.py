"""Storage URIs as strings (a `Path` would mangle `s3://`): their scheme, check and join.

Pure Python, so the config can check URIs without importing fsspec; `storage.py` opens them.
"""

from __future__ import annotations

import os
import posixpath
import re

SCHEMES = ("file", "memory", "s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """The URI's scheme, lower case; a plain path is `file`."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def check_uri(key: str, uri: str) -> None:
    """A storage URI is a plain path or one of the schemes we can reach through fsspec."""
    if scheme_of(uri) not in SCHEMES:
        raise ValueError(
            f"{key}={uri!r} has unknown scheme '{_SCHEME.match(uri).group(1)}://'; use a local path "
            "or one of: " + ", ".join(s + "://" for s in SCHEMES)
        )


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    return posixpath.join(uri.rstrip("/") if uri not in ("/", "") else uri, *parts)


def local_path(uri: str) -> str:
    """The absolute path of a local URI (a plain path or `file://`)."""
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def absolute_uri(uri: str) -> str:
    """A local URI as an absolute path (workers and Ray tasks run in other folders); others as they are."""
    return local_path(uri) if scheme_of(uri) == "file" else uri


# MLflow tracking stores: a folder (file store), a database through SQLAlchemy, or a tracking server.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(key: str, uri: str) -> None:
    if scheme_of(uri) not in TRACKING_SCHEMES:
        raise ValueError(
            f"{key}={uri!r} is not an MLflow tracking URI; use a local folder, sqlite:///path.db, "
            "http(s)://host:port (an MLflow server), or one of: " + ", ".join(s + "://" for s in TRACKING_SCHEMES)
        )


def absolute_tracking_uri(uri: str) -> str:
    """A local tracking store as an absolute path (the rank-0 worker runs in another folder): a folder, or
    sqlite:///relative.db (SQLAlchemy's three slashes: relative to the working folder) as sqlite:////abs.db."""
    scheme = scheme_of(uri)
    if scheme == "file":
        return local_path(uri)
    if scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        return "sqlite:///" + os.path.abspath(os.path.expanduser(relative))  # abspath starts with '/'
    return uri
