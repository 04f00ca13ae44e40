"""Constants shared by tests (a plain module: conftest files are not for importing)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "data" / "models" / "xmodal-tiny-vit.json"
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"


def make_store(path, ids, emb, normalized: bool = True) -> str:
    """A complete store written directly (no encoder): synthetic embeddings with known answers."""
    from encoders.store import StoreWriter

    attrs = {"encoder_spec": "synthetic", "weights_digest": "w", "manifest_digest": path.name,
             "normalized": normalized, "dataset": "synthetic", "modality": path.stem}
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs) as w:
        w.append(ids, emb, rows_done=len(ids))
        w.finish()
    return str(path)
