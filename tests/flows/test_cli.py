"""The `xmodal` command line as a user types it."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from encoders.store import StoreWriter
from flows.cli import app


def test_search_cli_returns_known_top_k_and_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"item-{i:02d}" for i in range(50)]
    with StoreWriter(tmp_path / "s.h5", dim=16, attrs={"encoder_spec": "x", "weights_digest": "w",
                                                       "manifest_digest": "m", "normalized": True}) as w:
        w.append(ids, emb, rows_done=50)
        w.finish()
    store = str(tmp_path / "s.h5")
    out = CliRunner().invoke(app, ["search", "item-07", "-t", store, "--source-store", store, "-k", "3"])
    assert out.exit_code == 0, out.output
    expected = [ids[i] for i in np.argsort(-(emb @ emb[7]))[:3]]
    lines = [line.split() for line in out.output.splitlines() if line.strip()[:1].isdigit()]
    assert [line[1] for line in lines] == expected and expected[0] == "item-07"
    too_many = CliRunner().invoke(app, ["search", "item-07", "-t", store, "--source-store", store, "-k", "51"])
    assert too_many.exit_code == 2 and "k=51" in too_many.output and "50 rows" in too_many.output
    empty = CliRunner().invoke(app, ["search", "  ", "-t", store, "--source-store", store])
    assert empty.exit_code == 2 and "empty query" in empty.output


def test_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"])
    for cmd in ("extract", "align", "finetune", "pipeline", "compare", "search", "contrastive", "demo", "build-data"):
        assert cmd in out.output
