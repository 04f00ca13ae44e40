"""What a store is on disk: its paths, attributes, errors, and the byte form its checksums cover.

A store ``S.h5`` lives as up to four paths side by side:

    S.h5            the finished store users read: complete and verified, or absent
    S.h5.partial/   the store being built: append-only raw files + a commit record (journal.py)
    S.h5.tmp        the final HDF5 while it is assembled and verified (assemble.py); discarded on rerun
    S.h5.lock       the writers' lock (lock.py)

The final file's layout (unchanged since format 1, what every reader sees)::

    /ids            (N,)   UTF-8 strings, chunked, resizable
    /embeddings     (N, D) float32 | float16, chunked (chunk_rows, D), resizable
    /errors/ids     (E,)   ids of manifest rows that produced no embedding
    /errors/reasons (E,)   why (missing file, corrupt image, empty text, duplicate id, ...)
    attrs: format_version, dataset, modality, encoder_spec, weights_digest, weights_origin, dim,
           dtype, compute_dtype, normalized, manifest_digest, library_versions (JSON), created,
           rows_done, n, n_errors, complete

Checksums: the journal's raw files and the final HDF5 are compared through one byte form, so a
CRC computed while appending can be recomputed from the HDF5 content: an id is the line
``json.dumps(id) + "\\n"``, an error the line ``json.dumps([id, reason]) + "\\n"``, embeddings
their C-order bytes in the store dtype.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
# Attributes that must match for a partial store to be continued, or a finished one reused.
IDENTITY_ATTRS = ("encoder_spec", "weights_digest", "manifest_digest", "dtype", "dim", "normalized", "compute_dtype")
# What an identity attribute meant before it was recorded (stores written before compute_dtype existed ran fp32).
IDENTITY_DEFAULTS = {"compute_dtype": "fp32"}
# Set by the writer, never taken from a caller's attrs.
COUNTERS = ("n", "n_errors", "rows_done", "complete")
REFRESH_HINT = "rerun extract with refresh (--refresh) to rebuild it"


class StoreError(RuntimeError):
    """A store that cannot be used as asked (incomplete, locked, damaged, other inputs): the message names it."""


class StoreLocked(StoreError):
    """Another process holds the store (a writer, or a reader of a store being replaced) past the wait."""


class StoreFull(StoreError):
    """No room on the store's filesystem: every committed batch is kept and a rerun resumes (disk.py)."""


def partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "open_clip_torch", "transformers", "h5py", "numpy", "xmodal"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def to_attr(v: Any) -> Any:
    """A Python value as an HDF5 attribute (None -> "", dicts and lists -> JSON)."""
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def plain(v: Any) -> Any:
    """An HDF5 attribute (or JSON value) as plain Python, for comparison and JSON."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return "" if v is None else v


def identity_mismatch(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The identity attributes in which two stores differ (empty: the same inputs)."""
    return [k for k in IDENTITY_ATTRS
            if plain(have.get(k, IDENTITY_DEFAULTS.get(k))) != plain(want.get(k, IDENTITY_DEFAULTS.get(k)))]


def id_lines(ids: Iterable[str]) -> bytes:
    return "".join(json.dumps(str(i)) + "\n" for i in ids).encode()


def error_lines(errors: Iterable[tuple[str, str]]) -> bytes:
    return "".join(json.dumps([str(a), str(b)]) + "\n" for a, b in errors).encode()


def parse_lines(data: bytes) -> list:
    return [json.loads(line) for line in data.split(b"\n") if line]


class Crc:
    """A running ``zlib.crc32`` and byte count over one stream (an int: it survives a restart as JSON)."""

    def __init__(self, crc: int = 0, length: int = 0):
        self.crc, self.length = crc, length

    def update(self, data: bytes | memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.length += len(data)

    def pair(self) -> tuple[int, int]:
        return self.crc, self.length
