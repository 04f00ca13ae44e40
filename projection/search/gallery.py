"""A gallery: one store loaded once, searchable in its own space and in spaces it is projected into.

Why load once: `xmodal search` reopens the store, the encoder and the projector on every call
(seconds); a service answers in milliseconds only if all of that happens at start. The gallery
keeps its rows in memory as unit vectors (exact search, the reference) unless the store holds at
least ``ann_min_rows`` rows and has a saved FAISS index beside it (projection/search/index.py),
which is then searched instead and the rows are not loaded at all.

A *space* is where a query is compared: ``"native"`` is the store's own space (image -> image,
sketch -> projector -> image); a projected space is the gallery passed once through a projector
(image -> caption projector: the gallery lands in caption space, and a text embedding is the
query). Each gallery row's file comes from the manifest the store was extracted from (the
``manifest_path`` and ``modality`` attributes), so results can show and link the product itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.store import EmbeddingStore
from projection.search.index import (ANN_MIN_ROWS, AnnIndex, build, choose_index, exact_rows, load_for_store, tune_nprobe,
                                     unit_rows)


@dataclass
class Hit:
    rank: int
    row: int
    id: str
    score: float


class Space:
    """Unit rows in memory (exact) or an ANN index over the same rows; ``search`` -> (scores, rows)."""

    def __init__(self, name: str, dim: int, rows: np.ndarray | None = None, ann: AnnIndex | None = None):
        if (rows is None) == (ann is None):
            raise ValueError("a space holds either its rows (exact) or an index")
        self.name, self.dim, self.rows, self.ann = name, dim, rows, ann

    @property
    def method(self) -> str:
        if self.ann is None:
            return "exact"
        return f"faiss {self.ann.plan.factory}" + (f", nprobe {self.ann.nprobe}" if self.ann.nprobe else "")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = unit_rows(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ValueError(f"query has {q.shape[1]} dims but the gallery's {self.name} space has {self.dim}")
        if self.ann is not None:
            return self.ann.search(q, k)
        return exact_rows(q, self.rows, k)


class Gallery:
    """A store's ids, files and spaces. ``search(vector, k, space)`` -> ranked ``Hit``s."""

    def __init__(self, store: str | Path | EmbeddingStore, *, ann_min_rows: int = ANN_MIN_ROWS,
                 files_column: str | None = None):
        self.store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
        self.ann_min_rows = ann_min_rows
        self.ids = [str(i) for i in self.store.ids]
        ann = load_for_store(self.store) if self.store.n >= ann_min_rows else None
        rows = None if ann is not None else unit_rows(self.store.embeddings())  # (N, D)
        self.spaces: dict[str, Space] = {"native": Space("native", self.store.dim, rows=rows, ann=ann)}
        self.files = self._files(files_column)

    def __len__(self) -> int:
        return self.store.n

    def _files(self, column: str | None) -> list[Path | None]:
        """Row -> the file it was embedded from (None where unknown): the manifest's paths, resolved."""
        manifest_path = self.store.attrs.get("manifest_path")
        column = column or self.store.attrs.get("modality")
        if not manifest_path or not column or not Path(manifest_path).is_file():
            return [None] * self.store.n
        from encoders.manifest import Manifest
        from projection.search.exact import looks_like_image_path

        m = Manifest.read(manifest_path)
        if column not in m.frame.columns or not looks_like_image_path(str(m.frame[column].iloc[0])):
            return [None] * self.store.n  # a text column (a caption gallery): no files to show
        by_id = dict(zip(m.frame["id"], m.values(column, "image")))
        return [Path(by_id[i]) if by_id.get(i) else None for i in self.ids]

    def blocks(self, block: int = 65536):
        """(start, (rows, D) float32) over the store, from memory when loaded."""
        native = self.spaces["native"]
        for start in range(0, self.store.n, block):
            yield start, (native.rows[start:start + block] if native.rows is not None
                          else self.store.read_rows(start, start + block))

    def add_projected(self, name: str, project, dim: int) -> Space:
        """Pass every row once through ``project`` ((B, D) -> (B, dim) numpy) into a new space ``name``.

        The projected rows stay in memory (n x dim float32); at ``ann_min_rows`` rows or more an
        in-memory FAISS index is built over them with the same choice as a saved one (not saved:
        it depends on the projector as much as on the store).
        """
        out = np.empty((self.store.n, dim), np.float32)
        for start, block in self.blocks():
            out[start:start + len(block)] = project(block)
        out = unit_rows(out)
        if self.store.n >= self.ann_min_rows:
            ann = build(lambda a, b: out[a:b], self.store.n, dim, choose_index(self.store.n, dim, flat_below=self.ann_min_rows))
            sample = np.random.default_rng(0).choice(self.store.n, min(300, self.store.n), replace=False)
            tune_nprobe(ann, out[sample], exact_rows(out[sample], out, 10)[1])  # nprobe for recall@10 >= 0.95
            space = Space(name, dim, ann=ann)
        else:
            space = Space(name, dim, rows=out)
        self.spaces[name] = space
        return space

    def search(self, vector: np.ndarray, k: int = 10, space: str = "native") -> list[Hit]:
        if space not in self.spaces:
            raise ValueError(f"the gallery has no {space!r} space (it has: {', '.join(self.spaces)})")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, rows = self.spaces[space].search(vector, min(k, self.store.n))
        return [Hit(rank=r + 1, row=int(i), id=self.ids[int(i)], score=float(s))
                for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]
