"""A dataset's index: `_index.json` beside its shards, so that opening a dataset of thousands of shards
costs one listing and one small read instead of one footer read per file (on every worker).

`aevb-dist prepare` writes it (from the footers it just wrote); the reader uses it when the files it
lists are exactly the index's, and otherwise reads the footers (a dataset written by someone else, or
changed since). The driver opens the dataset once and hands its description to the workers, so a
worker makes no storage request to open it. A sha256 of the index's content guards against a
corrupted index, as the metadata checksum guards the footers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

INDEX_NAME = "_index.json"  # a leading "_": the reader's listing skips it, like Spark's _SUCCESS
FORMAT = 1


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def index_bytes(description: dict) -> bytes:
    """The index file's content: the dataset's description with its format and checksum."""
    body = {"format": FORMAT, **description}
    return json.dumps({**body, "sha256": _digest(body)}, sort_keys=True).encode()


def parse_index(data: bytes, where: str) -> dict:
    """The description an index holds; a ValueError naming `where` when it is not one we wrote, whole."""
    try:
        body = json.loads(data)
        digest = body.pop("sha256")
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ValueError(
            f"{where}: not a readable dataset index (run `aevb-dist prepare` again, or delete it to read the footers)"
        ) from None
    if digest != _digest(body) or body.pop("format", None) != FORMAT:
        raise ValueError(
            f"{where}: the dataset index does not match its checksum: the file is corrupted "
            f"(delete it to read the footers, or prepare the dataset again)"
        )
    return body


def read_index(fs, root: str) -> Optional[dict]:
    """The description in `{root}/_index.json`, or None where there is none."""
    path = f"{root}/{INDEX_NAME}"
    try:
        data = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError):  # no index, or `root` is a single Parquet file
        return None
    return parse_index(data, path)
