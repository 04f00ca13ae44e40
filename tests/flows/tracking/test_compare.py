"""`xmodal compare`: runs with different projector configs side by side, as a table and a plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.align import AlignParams, align
from flows.cli import app
from flows.tracking.compare import compare_runs
from flows.tracking.compare_view import comparison_figure, figure_panels
from tests_support import make_store


def test_compare_prints_runs_with_different_projector_configs(prefect_server, mlflow_uri, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    ids = [f"p{i}" for i in range(300)]
    src, tgt = make_store(tmp_path / "src.h5", ids, x), make_store(tmp_path / "tgt.h5", ids, y)
    runs = [align(AlignParams(source_store=src, target_store=tgt, projector=proj, train={"epochs": 3}, out_dir=str(tmp_path),
                              experiment="xmodal-compare-test"))["run_id"]
            for proj in ({"kind": "linear"}, {"kind": "mlp", "hidden": 32})]
    table = compare_runs("xmodal-compare-test", last=5)
    assert set(runs) <= set(table["run_id"]) and set(table["projector.kind"]) == {"linear", "mlp"}
    # what differs, named by the setting; no width shown for linear
    assert sorted(table["label"]) == ["projector.kind=linear", "projector.kind=mlp"]
    assert {"ridge_test_p2t_r1", "procrustes_test_p2t_r1"} <= set(table.columns)  # the baselines, beside it
    out = CliRunner().invoke(app, ["compare", "--experiment", "xmodal-compare-test", "--plot", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    assert all(r in out.output for r in runs) and "projector.kind=linear" in out.output
    assert "test: projector" in out.output and "test: ridge" in out.output and "p2t_r1" in out.output
    assert max(map(len, out.output.splitlines())) <= 160
    assert (tmp_path / "c.png").stat().st_size > 1000
    panels = json.loads((tmp_path / "c.json").read_text())["panels"]
    assert {"projector", "ridge", "procrustes"} <= set(next(p for p in panels if p["title"] == "p2t_r1")["methods"])


def test_a_misspelled_experiment_is_one_line_naming_those_that_exist(prefect_server, mlflow_uri, capsys):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    from flows.tracking.runs import experiment_id

    experiment_id("xmodal-spelled-right")
    with pytest.raises(SystemExit) as exit_:
        app(["compare", "--experiment", "xmodal-speled-right"])  # as the console script runs it
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("xmodal: error: ") and "'xmodal-speled-right'" in err and "xmodal-spelled-right" in err
    assert "Traceback" not in err


def test_compare_over_the_pipeline_experiment_shows_baselines_and_stage2(two_kinds, tmp_path):
    out = CliRunner().invoke(app, ["compare", "--experiment", "xmodal-names-test", "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert max(map(len, lines)) <= 160, max(lines, key=len)
    for block in ("stage 1: projector", "stage 1: ridge", "stage 1: procrustes", "stage 2"):
        assert block in lines, block  # one block per stage and method, each a title line
    for column in ("p2t_r1", "zeroshot_acc", "before_accuracy", "after_accuracy"):
        assert column in out.output, column
    table = compare_runs("xmodal-names-test")  # stage: pipeline, from the runs' tags
    # labelled by what differs, with the setting's name, nothing else
    assert sorted(table["label"]) == ["projector.kind=linear", "projector.kind=mlp"]
    assert table["stage2_after_accuracy"].notna().all() and table["stage1_ridge_zeroshot_acc"].notna().all()
    assert compare_runs("xmodal-names-test")["label"].tolist() == table["label"].tolist()  # stable between calls
    # the plot: small multiples, the projector beside ridge and Procrustes, stage 2 before/after
    fig = comparison_figure(table)
    panels = {p["title"]: p["methods"] for p in figure_panels(fig)}
    assert panels["p2t_r1"][:3] == ["projector", "ridge", "procrustes"]
    assert "projector after stage 2" in panels["p2t_r1"]
    assert panels["stage 2: accuracy"] == ["before", "after"]
    assert {"zeroshot_acc", "cosine"} <= set(panels)
    legend = fig.legends[0]  # outside every panel: below the lowest one
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lowest = min(ax.get_window_extent(renderer).y0 for ax in fig.axes if ax.get_visible())
    assert legend.get_window_extent(renderer).y1 <= lowest
    assert sorted(t.get_text().split(": ", 1)[1] for t in legend.get_texts()) == sorted(table["label"])
    w, h = fig.get_size_inches() * 100
    assert w <= 1400 and h <= 800  # a page, not a 2615 px strip
    sidecar = json.loads((tmp_path / "p.json").read_text())
    assert {p["title"] for p in sidecar["panels"]} == set(panels)


def test_align_runs_nested_under_pipelines_are_found_by_their_stage_experiment(two_kinds):
    """No 'xmodal-align-manifest_200' experiment exists: the pipelines logged their align runs in their own."""
    table = compare_runs("xmodal-align-manifest_200")
    runs = {r["align"]["run_id"] for _, r in two_kinds.values()}
    assert runs <= set(table["run_id"])
    assert {"test_p2t_r1", "ridge_test_p2t_r1", "procrustes_test_p2t_r1", "test_zeroshot_acc"} <= set(table.columns)
    assert sorted(table.loc[table["run_id"].isin(runs), "label"]) == ["projector.kind=linear", "projector.kind=mlp"]
