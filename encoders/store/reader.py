"""Reading an embedding store: a read-only view that refuses what is incomplete, and the join of
two stores by id that stage 1 reads.

The finished store (``<store>.h5``) is complete by construction (writer.py). With
``allow_incomplete=True`` and no finished store yet, the view reads the committed prefix of the
partial store (``<store>.h5.partial/``, journal.py) straight from its raw files: the rows its
commit record counts, never the bytes of a batch still being written. Every read is wrapped so a
damaged file is one ``StoreError`` line naming it and what to do, never a raw h5py traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from encoders.store import journal
from encoders.store.format import IDENTITY_ATTRS, REFRESH_HINT, StoreError, partial_dir, plain


class EmbeddingStore:
    """Read-only view. Opens the file per call, so it can cross a fork (DataLoader workers, Dask)."""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self._partial: Path | None = None  # the partial store read instead of a finished one
        part = partial_dir(self.path)
        if not self.path.is_file() and part.is_dir():
            try:
                self._rec = journal.read_record(part)
                self._partial = part
            except StoreError:
                if not self.path.is_file():  # not finished a moment ago either: it is damaged
                    raise
        if self._partial is not None:
            self.attrs = journal.store_attrs(self._rec)
            n_ids = shape0 = int(self._rec["n"])
            dim = int(self.attrs["dim"])
        elif self.path.is_file():
            with self._reading():
                with h5py.File(self.path, "r") as f:
                    self.attrs = {k: plain(v) for k, v in f.attrs.items()}
                    n_ids, (shape0, dim) = f["ids"].shape[0], f["embeddings"].shape
        else:
            raise StoreError(f"store {self.path} does not exist")
        if not self.attrs.get("complete") and not allow_incomplete:
            raise StoreError(f"store {self.path} is incomplete ({self.attrs.get('n')} rows so far; "
                             "its extraction did not finish). Rerun the extraction to complete it, "
                             "or pass allow_incomplete=True to read the rows it has.")
        self.n = int(self.attrs.get("n", n_ids))
        if n_ids < self.n or shape0 < self.n:
            raise StoreError(f"store {self.path} is inconsistent: {n_ids} ids, {shape0} embedding rows, "
                             f"but n={self.n}")
        self.dim = int(dim)
        self._ids: np.ndarray | None = None
        self._index: dict[str, int] | None = None

    @contextmanager
    def _reading(self):
        """Any failure to read is the store's damage, said in one line with the way out."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            where = self._partial or self.path
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"store {where} is damaged or not a readable xmodal store ({first}); "
                             f"{REFRESH_HINT}") from None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.path}, n={self.n}, dim={self.dim}, encoder={self.attrs.get('encoder_spec')})"

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            with self._reading():
                if self._partial is not None:
                    ids = journal.read_ids(self._partial, self._rec)
                    self._ids = np.empty(len(ids), dtype=object)
                    self._ids[:] = ids
                else:
                    with h5py.File(self.path, "r") as f:
                        self._ids = f["ids"].asstr()[: self.n].astype(object)
        return self._ids

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.ids)}
        return self._index

    @property
    def digest(self) -> str:
        """Identifies the content: encoder weights x manifest x spec."""
        import hashlib

        key = "|".join(str(self.attrs.get(k, "")) for k in IDENTITY_ATTRS)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def errors(self):
        import pandas as pd

        with self._reading():
            if self._partial is not None:
                rows = journal.read_errors(self._partial, self._rec)
                return pd.DataFrame({"id": [a for a, _ in rows], "reason": [b for _, b in rows]})
            with h5py.File(self.path, "r") as f:
                e = int(self.attrs.get("n_errors", f["errors/ids"].shape[0]))
                return pd.DataFrame({"id": f["errors/ids"].asstr()[:e], "reason": f["errors/reasons"].asstr()[:e]})

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Contiguous rows as float32: the fast path (HDF5 reads slices, not index lists, quickly)."""
        stop = min(stop, self.n)
        with self._reading():
            if self._partial is not None:
                return journal.read_rows(self._partial, self._rec, start, stop).astype(np.float32)
            with h5py.File(self.path, "r") as f:
                return f["embeddings"][start:stop].astype(np.float32, copy=False)  # (stop - start, D)

    def iter_chunks(self, rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings) blocks in store order; memory stays at one block."""
        ids = self.ids
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            yield ids[start:stop], self.read_rows(start, stop)

    def embeddings(self) -> np.ndarray:
        return self.read_rows(0, self.n)

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """Embeddings for ``ids`` in the order given; names the ids it does not hold."""
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise KeyError(f"store {self.path} has no ids {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        rows = np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        return self.take(rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by position in any order: read the covering slice once, select in memory."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dim), np.float32)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo == rows.size and (np.diff(rows) == 1).all():
            return self.read_rows(lo, hi)  # in order and contiguous (two stores of one manifest): no indexed copy
        if (hi - lo) <= 4 * rows.size + 4096:
            return self.read_rows(lo, hi)[rows - lo]
        out = np.empty((rows.size, self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        step = 65536
        for start in range(lo, hi, step):
            sel = (sorted_rows >= start) & (sorted_rows < start + step)
            if sel.any():
                block = self.read_rows(start, min(start + step, hi))
                out[order[sel]] = block[sorted_rows[sel] - start]
        return out


@dataclass
class PairedStores:
    """Two stores joined by id: row i of the pair is source row ``src_rows[i]`` and target row ``tgt_rows[i]``.

    ``read_rows`` makes it a chunk reader for training on data larger than memory;
    ``arrays`` loads it all when it fits.
    """

    source: EmbeddingStore
    target: EmbeddingStore
    ids: np.ndarray
    src_rows: np.ndarray
    tgt_rows: np.ndarray
    dropped_source: int
    dropped_target: int

    def __len__(self) -> int:
        return len(self.ids)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.source.take(self.src_rows[start:stop]), self.target.take(self.tgt_rows[start:stop])

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pairs at positions ``rows`` (e.g. one split), read by covering slices."""
        return self.source.take(self.src_rows[rows]), self.target.take(self.tgt_rows[rows])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.read_rows(0, len(self))


def join_stores(source: str | Path | EmbeddingStore, target: str | Path | EmbeddingStore, *,
                require_same_ids: bool = False, allow_disjoint: bool = False) -> PairedStores:
    """Align two stores by id, in the source store's order.

    Stores made from one manifest usually differ only by the rows each could not embed; those
    are dropped and counted. ``require_same_ids`` turns any difference into an error;
    ``allow_disjoint`` accepts stores with no id in common (semi-supervised alignment uses the rest).
    """
    src = source if isinstance(source, EmbeddingStore) else EmbeddingStore(source)
    tgt = target if isinstance(target, EmbeddingStore) else EmbeddingStore(target)
    tindex = tgt.index
    src_rows, tgt_rows = [], []
    for i, k in enumerate(src.ids):
        j = tindex.get(k)
        if j is not None:
            src_rows.append(i)
            tgt_rows.append(j)
    if not src_rows and not allow_disjoint:
        raise StoreError(f"stores {src.path} and {tgt.path} share no ids "
                         f"(e.g. {list(src.ids[:2])} vs {list(tgt.ids[:2])}); were they built from the same manifest?")
    if require_same_ids and (len(src_rows) != len(src) or len(src_rows) != len(tgt)):
        raise StoreError(f"stores {src.path} ({len(src)} rows) and {tgt.path} ({len(tgt)} rows) do not hold "
                         f"the same ids: {len(src_rows)} in common")
    s, t = np.asarray(src_rows, np.int64), np.asarray(tgt_rows, np.int64)
    return PairedStores(src, tgt, src.ids[s], s, t, len(src) - len(s), len(tgt) - len(t))
