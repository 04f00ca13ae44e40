"""`sweep`: a grid over stage-1 settings runs as child align runs under one parent, and the best is promoted."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.align import AlignParams
from flows.cli import app
from flows.tracking.sweep import SweepParams, settings, sweep
from tests_support import make_store


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    ids = [f"s{i}" for i in range(240)]
    return make_store(d / "src.h5", ids, x), make_store(d / "tgt.h5", ids, y), d


def test_a_sweep_of_four_settings_is_four_child_runs_and_promotes_the_best(prefect_server, mlflow_uri, tiny_stores):
    src, tgt, d = tiny_stores
    # from a random start, 3 epochs: the learning rate decides how far each run gets
    base = AlignParams(source_store=src, target_store=tgt, train={"epochs": 3}, projector={"init": "random"},
                       out_dir=str(d / "align"), experiment="xmodal-sweep-test")
    out = sweep(SweepParams(base=base, grid={"projector.kind": ["linear", "mlp"], "train.lr": [1e-4, 1e-2]},
                            metric="test_cosine", register_model="sweep-test", alias="best"))
    client = MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    assert len(children) == 4 and {c.data.tags["xmodal.stage"] for c in children} == {"align"}
    names = sorted(c.info.run_name for c in children)
    assert names[0] == "sweep 1: projector.kind=linear, train.lr=0.0001" and len(set(names)) == 4
    assert {(c.data.params["projector.kind"], float(c.data.params["train.lr"])) for c in children} == \
        {("linear", 1e-4), ("linear", 1e-2), ("mlp", 1e-4), ("mlp", 1e-2)}
    scores = sorted(c.data.metrics["test_cosine"] for c in children)
    assert scores[-1] > scores[-2]  # a real winner, not a tie broken by order
    best = max(children, key=lambda c: c.data.metrics["test_cosine"])
    assert out["best"]["run_id"] == best.info.run_id
    assert client.get_model_version_by_alias("sweep-test", "best").run_id == best.info.run_id
    assert parent.data.tags["xmodal.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_test_cosine"] == pytest.approx(best.data.metrics["test_cosine"])


def test_a_misspelled_grid_field_is_refused_before_any_run(tiny_stores):
    src, tgt, d = tiny_stores
    base = AlignParams(source_store=src, target_store=tgt)
    with pytest.raises(ValueError, match="'train.lrr'.*no field 'lrr'"):
        settings(SweepParams(base=base, grid={"train.lrr": [1e-3]}))
    with pytest.raises(ValueError, match="train.lr: Input should be greater than 0"):
        settings(SweepParams(base=base, grid={"train.lr": [-1.0]}))
    assert [label for label, _ in settings(SweepParams(base=base, grid={"projector.hidden": [8, 16]}))] == \
        ["projector.hidden=8", "projector.hidden=16"]


def test_the_sweep_command_runs_a_grid(prefect_server, mlflow_uri, tiny_stores):
    src, tgt, d = tiny_stores
    out = CliRunner().invoke(app, ["sweep", src, tgt, "--grid", "projector.hidden=[8,16]", "--set", "train.epochs=1",
                                   "--set", "experiment=xmodal-sweep-cli-test", "--out-dir", str(d / "cli")])
    assert out.exit_code == 0, out.output
    assert "best: projector.hidden=" in out.output and "test_p2t_r1" in out.output
