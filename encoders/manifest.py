"""Manifests: a table with an ``id`` column and, per modality, a path column or a text column.

Paths resolve relative to the manifest file, so a dataset folder can move as a whole. Problems
that can be seen without decoding anything (duplicate ids, empty cells) are found here, up front,
and reported per row; corrupt files surface later, per item, during extraction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class ManifestError(ValueError):
    """The manifest itself is unusable (missing file or column); names the file and column."""


@dataclass
class Manifest:
    path: Path
    frame: pd.DataFrame  # id column as str, original row order

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist")
        try:
            frame = _read_table(path)
        except ManifestError:
            raise
        except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, ValueError) as exc:
            raise ManifestError(f"manifest {path} cannot be read as a table: {str(exc).splitlines()[0]}") from None
        if "id" not in frame.columns:
            raise ManifestError(f"manifest {path} has no 'id' column (columns: {', '.join(map(str, frame.columns))})")
        if frame.empty:
            raise ManifestError(f"manifest {path} has no rows (only a header): nothing to embed; add rows or "
                                "check that the right file was given")
        # A null id (Parquet None/NaN) becomes "" and is reported per row as "empty id", like a CSV blank.
        frame["id"] = [("" if _blank(v) else str(v)) for v in frame["id"]]
        return cls(path, frame.reset_index(drop=True))

    @property
    def name(self) -> str:
        """Dataset name: the manifest's folder (data/digits/manifest.csv -> 'digits')."""
        return self.path.absolute().parent.name if self.path.stem == "manifest" else self.path.stem

    def __len__(self) -> int:
        return len(self.frame)

    def require(self, column: str) -> pd.Series:
        if column not in self.frame.columns:
            raise ManifestError(f"manifest {self.path} has no column {column!r} "
                                f"(columns: {', '.join(map(str, self.frame.columns))})")
        return self.frame[column]

    def values(self, column: str, kind: str) -> list:
        """Raw items for a modality: absolute paths for images, strings for texts."""
        col = self.require(column)
        if kind == "image":
            root = self.path.parent
            return [None if _blank(v) else str((root / str(v)) if not Path(str(v)).is_absolute() else Path(str(v)))
                    for v in col]
        return [None if _blank(v) else str(v) for v in col]

    def digest(self, column: str) -> str:
        """Content of the rows that matter for one modality: editing another column keeps stores valid."""
        h = hashlib.sha256()
        for i, v in zip(self.frame["id"], self.require(column)):
            h.update(f"{i}\x1f{v}\x1e".encode())
        return h.hexdigest()

    def static_errors(self, column: str) -> dict[int, str]:
        """Row -> reason, for problems visible without decoding: duplicate ids, empty cells."""
        errors: dict[int, str] = {}
        first: dict[str, int] = {}
        for row, (i, v) in enumerate(zip(self.frame["id"], self.require(column))):
            if not i.strip():
                errors[row] = f"empty id at manifest row {row}"
                continue
            if i in first:
                errors[row] = f"duplicate id (first at row {first[i]})"
                continue
            first[i] = row
            if _blank(v):
                errors[row] = f"empty {column}"
        return errors


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={"id": str},
                           keep_default_na=False, na_values=[])
    raise ManifestError(f"manifest {path}: unknown format {path.suffix!r} (use .csv or .parquet)")


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())
