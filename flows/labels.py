"""Per-id columns for stage 1, read from manifests: class labels, task columns, target content ids.

Labels may live in any manifest given to `align` (a label manifest, or the source or target
store's own manifest) and may be strings; class prompts are matched to them by value. Every
failure is one line naming the column, the manifests searched and what was expected, raised
before a run folder or an MLflow run exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from encoders.manifest import Manifest, ManifestError
from encoders.store import EmbeddingStore


def _manifest_of(store: EmbeddingStore) -> str | None:
    path = store.attrs.get("manifest_path")
    return str(path) if path and Path(str(path)).is_file() else None


def read_column(manifests: list[str], ids: list[str], column: str, what: str) -> np.ndarray:
    """Values of `column` for `ids` from the first manifest that has the column.

    what: what the column should hold, for the error line (e.g. "class labels").
    """
    searched = []
    for path in dict.fromkeys(m for m in manifests if m):
        manifest = Manifest.read(path)
        if column not in manifest.frame.columns:
            searched.append(f"{path} (columns: {', '.join(map(str, manifest.frame.columns))})")
            continue
        table = manifest.frame.drop_duplicates("id").set_index("id")[column]
        values = table.reindex([str(i) for i in ids])
        missing = values[values.isna() | (values.astype(str) == "")].index.tolist()
        if missing:
            raise ManifestError(f"column {column!r} of {path} has no {what} for {len(missing)} id(s), e.g. {missing[:3]}")
        return values.to_numpy()
    raise ManifestError(f"column {column!r} (expected: {what}) is in none of the manifests: {'; '.join(searched) or 'none given'}")


def stage1_manifests(label_manifest: str | None, src: EmbeddingStore, tgt: EmbeddingStore) -> list[str]:
    """Where labels are looked for, in order: the given manifest, the source's, the target's."""
    return [m for m in (label_manifest, _manifest_of(src), _manifest_of(tgt)) if m]


def class_embeddings(class_store: str, column: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) class-prompt embeddings and, for each label, its row; prompts matched to labels by value."""
    cs = EmbeddingStore(class_store)
    manifest = _manifest_of(cs)
    if manifest is None:
        raise ManifestError(f"class store {class_store} names no readable manifest to take its {column!r} labels from")
    names = read_column([manifest], list(cs.ids), column, "one class label per prompt")
    keys = [str(v) for v in names]
    if len(set(keys)) != len(keys):
        raise ManifestError(f"class store {class_store}: column {column!r} repeats a label; expected one prompt per class")
    row = {k: i for i, k in enumerate(keys)}
    unknown = sorted({str(v) for v in labels} - set(row))
    if unknown:
        raise ManifestError(f"labels {unknown[:5]} in column {column!r} have no prompt in class store {class_store} "
                            f"(its labels: {keys[:10]})")
    return cs.embeddings(), np.array([row[str(v)] for v in labels], dtype=np.int64)


def content_ids(store: EmbeddingStore, ids: list[str]) -> list[str] | None:
    """What each row's target IS (its text or file path), so duplicate targets tie exactly; None if unknown."""
    manifest, column = _manifest_of(store), store.attrs.get("modality")
    if manifest is None or not column:
        return None
    try:
        return [str(v) for v in read_column([manifest], ids, str(column), "target contents")]
    except ManifestError:
        return None
