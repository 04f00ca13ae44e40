"""`xmodal build-index`: the Prefect flow builds, tunes and saves the index beside the store, and search uses it."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from encoders.store import StoreWriter
from flows.cli import app
from projection.search.exact import search


def test_build_index_cli_saves_a_tuned_index_that_search_then_uses(prefect_server, tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 24)).astype(np.float32)
    x = centres[rng.integers(0, 40, 8000)] + 0.6 * rng.standard_normal((8000, 24)).astype(np.float32)
    store = tmp_path / "g.h5"
    with StoreWriter(store, dim=24, attrs={"dataset": "t", "modality": "image", "encoder_spec": "test:none"}) as w:
        w.append([f"v{i:04d}" for i in range(8000)], x, rows_done=8000)
        w.finish()
    out = CliRunner().invoke(app, ["build-index", str(store), "--kind", "ivf_flat"])
    assert out.exit_code == 0, out.output
    side = json.loads((tmp_path / "g.h5.faiss.json").read_text())
    assert side["plan"]["factory"].startswith("IVF") and side["tuning"]["recall_at_k"] >= 0.95
    assert f"nprobe {side['nprobe']}" in out.output and (tmp_path / "g.h5.faiss").stat().st_size == side["index_bytes"]
    hits = search("v0123", target_store=store, source_store=store, k=3, ann_min_rows=1000)
    assert hits.method == f"faiss {side['plan']['factory']}" and hits[0][0] == "v0123"
