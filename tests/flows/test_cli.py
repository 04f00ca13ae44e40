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


def test_loss_and_set_parsers():
    import pytest
    import typer

    from flows.cli import apply_sets, parse_loss

    assert parse_loss("mse=1,infonce=0.1") == {"mse": 1.0, "infonce": 0.1}
    assert parse_loss("mse") == {"mse": 1.0} and parse_loss("mse, cosine=0.5") == {"mse": 1.0, "cosine": 0.5}
    with pytest.raises(typer.BadParameter, match="'infonce=x'"):
        parse_loss("mse=1,infonce=x")
    cfg = apply_sets({"train": {"lr": 1e-3}}, ["train.lr=3e-4", "projector.hidden=64", "baselines.ridge_alphas=[1, 10]",
                                               "label_column=species"])
    assert cfg == {"train": {"lr": 3e-4}, "projector": {"hidden": 64}, "baselines": {"ridge_alphas": [1, 10]},
                   "label_column": "species"}
    with pytest.raises(typer.BadParameter, match="key=value"):
        apply_sets({}, ["train.lr"])


def test_align_cli_passes_what_users_tune(prefect_server, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests_support import make_store

    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(120)]
    x = rng.normal(size=(120, 6)).astype(np.float32)
    a, b = make_store(tmp_path / "a.h5", ids, x), make_store(tmp_path / "b.h5", ids, np.tanh(x[:, :4]))
    res = CliRunner().invoke(app, ["align", a, b, "--steps", "30", "--lr", "0.003", "--batch-size", "16",
                                   "--split-seed", "7", "--hidden", "32", "--depth", "2", "--ridge-alphas", "0.1,10",
                                   "--loss", "mse=1,cosine=0.5", "--set", "train.weight_decay=0",
                                   "--out-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("xmodal-align-synthetic").experiment_id])[0]
    p = run.data.params
    assert (p["train.steps"], p["train.lr"], p["train.batch_size"], p["split.seed"]) == ("30", "0.003", "16", "7")
    assert (p["projector.hidden"], p["projector.depth"], p["train.weight_decay"]) == ("32", "2", "0.0")
    assert p["baselines.ridge_alphas"] == "[0.1, 10.0]" and p["loss.terms"] == '{"mse": 1.0, "cosine": 0.5}'
    assert run.data.metrics["ridge_alpha"] in (0.1, 10.0)


def test_build_data_takes_the_fashion_size():
    """`--fashion 0` (all 70,000 rows) reaches data.build from the CLI, as `python -m data.build --fashion 0` does."""
    out = CliRunner().invoke(app, ["build-data", "--help"])
    assert out.exit_code == 0 and "--fashion" in out.output and "70,000" in out.output
    bad = CliRunner().invoke(app, ["build-data", "--fashion", "many"])
    assert bad.exit_code == 2 and "--fashion" in bad.output
