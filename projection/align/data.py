"""Paired (source, target) embeddings: splits, validation, and batch iteration.

Splits are a pure function of (id, seed), so they survive row reordering and can be
stored with a run as an id -> split table. Pair sources share one duck-typed interface
(`__len__`, `d_in`, `d_out`, `check_dims`, `batches`) so the trainer does not care whether
the data fit in memory. Bad rows are rejected with the store name and row/id in the
message, because "NaN in batch" is useless when embeddings come from a 1M-row HDF5.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from projection.engine.checkpoint import tensor_digest
from projection.engine.loop import MIN_BATCH, batch_indices, num_batches

SPLITS = ("train", "val", "test")
# Above the in-memory budget the closed-form baselines fit on the first this many train (val) pairs:
# ridge's cost is one pass plus a (D_src, D_src) eigh, so 200k rows fix it as well as 800k would.
BASELINE_TRAIN_ROWS, BASELINE_VAL_ROWS = 200_000, 50_000


# ---------------------------------------------------------------- splits


def _id_hash(seed: int, id_) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{id_}".encode(), digest_size=8).digest(), "little")


def make_split(ids: Sequence, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """{'train','val','test'} -> sorted row indices into `ids`.

    Ids are ordered by a seeded hash and cut into exact counts (round(frac * N)), so the
    assignment of an id depends only on the id set and the seed, never on row order.
    """
    ids = list(ids)
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("ids must be unique (as strings) to define a split")
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    # Tie-break on str(id) so even a 64-bit hash collision cannot make order matter.
    order = sorted(range(len(ids)), key=lambda i: (_id_hash(seed, ids[i]), str(ids[i])))
    n_test, n_val = round(test_frac * len(ids)), round(val_frac * len(ids))
    cuts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: np.sort(np.asarray(cuts[name], dtype=np.int64)) for name in SPLITS}


class SplitTooSmall(ValueError):
    """Too few pairs for a split every stage needs: said before any training, with what to change."""


def check_split(split: dict[str, np.ndarray], val_frac: float) -> None:
    """train and test must hold pairs (and val, when val_frac > 0): a 1- or 5-row store failed after training."""
    need = ("train", "test") + (("val",) if val_frac > 0 else ())
    empty = [name for name in need if len(split[name]) == 0]
    if empty:
        sizes = ", ".join(f"{name} {len(split[name])}" for name in SPLITS)
        raise SplitTooSmall(f"{sum(len(v) for v in split.values())} pairs are too few to split ({sizes}): the "
                            f"{' and '.join(empty)} split would be empty; add rows, or raise split.test_frac / "
                            "split.val_frac")


def split_assignment(ids: Sequence, split: dict[str, np.ndarray]) -> dict[str, str]:
    """id (as str) -> split name."""
    out: dict[str, str] = {}
    for name, idx in split.items():
        for i in idx:
            out[str(ids[int(i)])] = name
    return out


def save_split(ids: Sequence, split: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write id -> split as CSV (columns id,split) or JSON (object), chosen by suffix."""
    path = Path(path)
    table = split_assignment(ids, split)
    if path.suffix == ".json":
        path.write_text(json.dumps(table, indent=0))
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "split"])
            w.writerows(table.items())
    return path


def load_split(path: str | Path, ids: Sequence) -> dict[str, np.ndarray]:
    """Read a saved split back as row indices into `ids` (which may be reordered)."""
    path = Path(path)
    if path.suffix == ".json":
        table = json.loads(path.read_text())
    else:
        with path.open(newline="") as f:
            table = {row["id"]: row["split"] for row in csv.DictReader(f)}
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, id_ in enumerate(ids):
        name = table.get(str(id_))
        if name is None:
            raise ValueError(f"id {id_!r} (row {i}) is not in the saved split {path}")
        if name not in out:
            raise ValueError(f"unknown split name {name!r} for id {id_!r} in {path}")
        out[name].append(i)
    return {name: np.asarray(v, dtype=np.int64) for name, v in out.items()}


# ---------------------------------------------------------------- validation


def check_finite(a: np.ndarray | torch.Tensor, side: str, ids: Sequence | None = None, offset: int = 0) -> None:
    """Raise naming the first row with a NaN/inf; `offset` maps chunk rows to global rows."""
    a = a.numpy() if torch.is_tensor(a) else np.asarray(a)
    # by blocks: np.isfinite of the whole array is an (N, D) bool copy (90 MB at 70k x 1280)
    finite = np.concatenate([np.isfinite(a[s : s + 65536]).all(axis=1) for s in range(0, len(a), 65536)] or
                            [np.ones(0, bool)])
    if not finite.all():
        bad = int(np.argmin(finite))
        row = offset + bad
        who = f"row {row}" + (f" (id {ids[row]!r})" if ids is not None else "")
        raise ValueError(f"{side} embeddings contain NaN/inf at {who}; {int((~finite).sum())} bad row(s) in this block")


def _check_pair_shapes(x: np.ndarray, y: np.ndarray, source_name: str, target_name: str) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"{source_name!r} and {target_name!r} must be 2-D (N, D), got {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"row count mismatch: {source_name!r} has {x.shape[0]} rows, {target_name!r} has {y.shape[0]}")


def _check_dims(d_in: int, d_out: int, want_in: int, want_out: int, source_name: str, target_name: str) -> None:
    if d_in != want_in:
        raise ValueError(f"source {source_name!r} has dim {d_in} but the projector expects d_in={want_in}")
    if d_out != want_out:
        raise ValueError(f"target {target_name!r} has dim {d_out} but the projector expects d_out={want_out}")


def _to_float_tensor(a) -> torch.Tensor:
    t = a.detach().cpu() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(torch.float32).contiguous()


# ---------------------------------------------------------------- pair sources


class InMemoryPairs:
    """All pairs as two float32 tensors; batches are index-gathers on one tensor (fast)."""

    def __init__(self, x, y, ids: Sequence | None = None, source_name: str = "source", target_name: str = "target"):
        self.x, self.y = _to_float_tensor(x), _to_float_tensor(y)  # (N, D_src), (N, D_tgt)
        self.ids, self.source_name, self.target_name = ids, source_name, target_name
        _check_pair_shapes(self.x, self.y, source_name, target_name)
        if ids is not None and len(ids) != self.x.shape[0]:
            raise ValueError(f"got {len(ids)} ids for {self.x.shape[0]} pairs")
        check_finite(self.x, f"source {source_name!r}", ids)
        check_finite(self.y, f"target {target_name!r}", ids)
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def d_in(self) -> int:
        return self.x.shape[1]

    @property
    def d_out(self) -> int:
        return self.y.shape[1]

    def check_dims(self, d_in: int, d_out: int) -> None:
        _check_dims(self.d_in, self.d_out, d_in, d_out, self.source_name, self.target_name)

    def subset(self, indices) -> "InMemoryPairs":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        ids = None if self.ids is None else [self.ids[int(i)] for i in idx]
        return InMemoryPairs(self.x[idx], self.y[idx], ids, self.source_name, self.target_name)

    def num_batches(self, batch_size: int) -> int:
        return num_batches(len(self), batch_size)

    def digest(self) -> str:
        return tensor_digest(self.x, self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled by the loop's last-batch rule when a generator is given (training), every row in
        order otherwise (evaluation). Data are moved once per device."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.x.to(device), self.y.to(device))
        x, y = self._on_device[key]
        n = len(self)
        if generator is None:
            for s in range(0, n, batch_size):
                yield x[s : s + batch_size], y[s : s + batch_size]
            return
        for idx in batch_indices(n, batch_size, generator):
            idx = idx.to(x.device)
            yield x[idx], y[idx]  # (B, D_src), (B, D_tgt)


def gather_pairs(reader: "PairReader", row_sets: Sequence, chunk_rows: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(x (n_k, D_src), y (n_k, D_tgt))] for each set of pair positions, in one pass of contiguous reads.

    Why: loading all pairs, then indexing each split out of them held the data twice (and the
    reader's covering-slice read a third time): at 70k x (1280 + 384) float32 that was 1.4 GB for
    0.47 GB of pairs. Here each split's arrays are allocated once at their final size and filled
    chunk by chunk, so the peak is the splits plus one chunk (8192 rows: 42 MB at D = 1280, read
    and indexed, where a 65,536-row chunk held 0.87 GB at 70k pairs). Rows come out in ascending position.
    """
    sets = [np.sort(np.asarray(r, dtype=np.int64)) for r in row_sets]
    x0, y0 = reader.read_rows(0, 1)
    out = [(np.empty((len(r), x0.shape[1]), np.float32), np.empty((len(r), y0.shape[1]), np.float32)) for r in sets]
    filled = [0] * len(sets)
    n = len(reader)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        picks = [(k, r[np.searchsorted(r, start) : np.searchsorted(r, stop)]) for k, r in enumerate(sets)]
        picks = [(k, p) for k, p in picks if len(p)]
        if not picks:
            continue
        x, y = reader.read_rows(start, stop)  # (chunk, D_src), (chunk, D_tgt)
        for k, p in picks:
            f = filled[k]
            out[k][0][f : f + len(p)] = x[p - start]
            out[k][1][f : f + len(p)] = y[p - start]
            filled[k] += len(p)
    return out


class PairReader(Protocol):
    def __len__(self) -> int: ...
    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


class ArrayReader:
    """PairReader over in-memory arrays; for tests and for wrapping memmaps."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.x[start:stop]), np.asarray(self.y[start:stop])


class ChunkedPairs:
    """Pairs streamed from a reader in contiguous chunks, for data larger than memory.

    Contiguous reads keep HDF5 fast; randomness comes from shuffling chunk order per epoch
    and rows within each chunk. Leftover rows carry into the next chunk so every batch but
    the last is full (contrastive losses depend on batch size). `indices` restricts to a
    split: chunks are still read contiguously and filtered.
    """

    def __init__(
        self,
        reader: PairReader,
        chunk_rows: int,
        indices=None,
        ids: Sequence | None = None,
        source_name: str = "source",
        target_name: str = "target",
    ):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.reader, self.chunk_rows = reader, chunk_rows
        self.ids, self.source_name, self.target_name = ids, source_name, target_name
        n_rows = len(reader)
        if ids is not None and len(ids) != n_rows:
            raise ValueError(f"got {len(ids)} ids for a reader of {n_rows} rows")
        self.mask = None
        if indices is not None:
            self.mask = np.zeros(n_rows, dtype=bool)
            self.mask[np.asarray(indices, dtype=np.int64)] = True
        self._len = n_rows if self.mask is None else int(self.mask.sum())
        self.chunks = [
            (s, min(s + chunk_rows, n_rows))
            for s in range(0, n_rows, chunk_rows)
            if self.mask is None or self.mask[s : s + chunk_rows].any()
        ]
        if n_rows == 0:
            raise ValueError("reader is empty")
        x0, y0 = reader.read_rows(0, 1)
        _check_pair_shapes(np.asarray(x0), np.asarray(y0), source_name, target_name)
        self._d_in, self._d_out = x0.shape[1], y0.shape[1]

    def __len__(self) -> int:
        return self._len

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self._d_out

    def check_dims(self, d_in: int, d_out: int) -> None:
        _check_dims(self.d_in, self.d_out, d_in, d_out, self.source_name, self.target_name)

    def num_batches(self, batch_size: int) -> int:
        return num_batches(len(self), batch_size)

    def digest(self) -> str:
        """One pass over the rows (only when a checkpoint needs it): resuming on other data is refused."""
        h = hashlib.sha256()
        for start, stop in self.chunks:
            h.update(tensor_digest(*self._read(start, stop)).encode())
        return h.hexdigest()

    def _read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.reader.read_rows(start, stop)
        x, y = np.asarray(x), np.asarray(y)
        _check_pair_shapes(x, y, self.source_name, self.target_name)
        if x.shape[0] != stop - start:
            raise ValueError(f"reader returned {x.shape[0]} rows for range [{start}, {stop})")
        if x.shape[1] != self._d_in or y.shape[1] != self._d_out:
            raise ValueError(f"rows [{start}, {stop}) have dims ({x.shape[1]}, {y.shape[1]}), expected ({self._d_in}, {self._d_out})")
        check_finite(x, f"source {self.source_name!r}", self.ids, offset=start)
        check_finite(y, f"target {self.target_name!r}", self.ids, offset=start)
        if self.mask is not None:
            keep = self.mask[start:stop]
            x, y = x[keep], y[keep]
        return _to_float_tensor(x), _to_float_tensor(y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = range(len(self.chunks)) if generator is None else torch.randperm(len(self.chunks), generator=generator).tolist()
        carry_x = carry_y = None
        for c in order:
            x, y = self._read(*self.chunks[c])  # (n_chunk, D_src), (n_chunk, D_tgt)
            if generator is not None:
                perm = torch.randperm(x.shape[0], generator=generator)
                x, y = x[perm], y[perm]
            s = 0  # the batches are those of cat([carry, chunk]), without copying the chunk (0.44 GB at 1280 + 384):
            if carry_x is not None:  # only the batch that straddles the two is built
                s = batch_size - len(carry_x)
                if s > x.shape[0]:  # a chunk shorter than the gap: keep carrying
                    carry_x, carry_y = torch.cat([carry_x, x]), torch.cat([carry_y, y])
                    continue
                yield torch.cat([carry_x, x[:s]]).to(device), torch.cat([carry_y, y[:s]]).to(device)
            n_full = s + ((x.shape[0] - s) // batch_size) * batch_size
            for b in range(s, n_full, batch_size):
                yield x[b : b + batch_size].to(device), y[b : b + batch_size].to(device)
            carry_x, carry_y = (x[n_full:], y[n_full:]) if n_full < x.shape[0] else (None, None)
        if carry_x is not None and (len(carry_x) >= MIN_BATCH or generator is None or len(self) < batch_size):
            yield carry_x.to(device), carry_y.to(device)  # the last-batch rule of projection.engine.loop
