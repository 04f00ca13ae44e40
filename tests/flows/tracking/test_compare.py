"""`xmodal compare`: runs with different projector configs side by side, as a table and a plot."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from flows.align import AlignParams, align
from flows.cli import app
from flows.tracking.compare import compare_runs
from tests_support import make_store


def test_compare_prints_runs_with_different_projector_configs(prefect_server, mlflow_uri, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    ids = [f"p{i}" for i in range(300)]
    src, tgt = make_store(tmp_path / "src.h5", ids, x), make_store(tmp_path / "tgt.h5", ids, y)
    runs = [align(AlignParams(source=src, target=tgt, projector=proj, train={"epochs": 3}, out_dir=str(tmp_path),
                              experiment="xmodal-compare-test"))["run_id"]
            for proj in ({"kind": "linear"}, {"kind": "mlp", "hidden": 32})]
    table = compare_runs("xmodal-compare-test", last=5)
    assert set(runs) <= set(table["run_id"]) and set(table["projector.kind"]) == {"linear", "mlp"}
    assert sorted(table["label"]) == ["kind=linear", "kind=mlp"]  # what differs; no width shown for linear
    assert {"ridge_test_p2t_r1", "procrustes_test_p2t_r1"} <= set(table.columns)  # the baselines, beside it
    out = CliRunner().invoke(app, ["compare", "--experiment", "xmodal-compare-test", "--plot", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    assert all(r in out.output for r in runs) and "linear" in out.output and "mlp" in out.output
    assert "test_p2t_r1" in out.output and (tmp_path / "c.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["compare", "--experiment", "no-such-experiment"])
    assert bad.exit_code != 0 and "no MLflow experiment 'no-such-experiment'" in str(bad.exception)


def test_compare_over_the_pipeline_experiment_shows_baselines_and_stage2(two_kinds, tmp_path):
    out = CliRunner().invoke(app, ["compare", "--experiment", "xmodal-names-test", "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    for column in ("stage1_p2t_r1", "stage1_ridge_p2t_r1", "stage1_procrustes_p2t_r1", "stage1_zeroshot_acc",
                   "stage2_before_accuracy", "stage2_after_accuracy"):
        assert column in out.output, column
    table = compare_runs("xmodal-names-test")  # stage: pipeline, from the runs' tags
    assert sorted(table["label"]) == ["kind=linear", "kind=mlp"]  # labelled by what differs, nothing else
    assert table["stage2_after_accuracy"].notna().all() and table["stage1_ridge_zeroshot_acc"].notna().all()


def test_align_runs_nested_under_pipelines_are_found_by_their_stage_experiment(two_kinds):
    """No 'xmodal-align-manifest_200' experiment exists: the pipelines logged their align runs in their own."""
    table = compare_runs("xmodal-align-manifest_200")
    runs = {r["align"]["run_id"] for _, r in two_kinds.values()}
    assert runs <= set(table["run_id"])
    assert {"test_p2t_r1", "ridge_test_p2t_r1", "procrustes_test_p2t_r1", "test_zeroshot_acc"} <= set(table.columns)
    assert sorted(table.loc[table["run_id"].isin(runs), "label"]) == ["kind=linear", "kind=mlp"]
