"""Runs a user can tell apart: flow run names and MLflow run names that say what differs, the whole config as
parent-run params, the summary on the pipeline's own flow run, experiments that open on the runs table.
(`two_kinds`, in conftest.py: two pipeline runs, linear and mlp.)"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId


def test_runs_that_differ_in_projector_kind_are_named_and_logged_apart(two_kinds):
    with get_client(sync_client=True) as pc:
        flow_names = {k: pc.read_flow_run(fid).name for k, (fid, _) in two_kinds.items()}
    assert flow_names["linear"] != flow_names["mlp"]
    assert all(f"image -> caption, {k}" in name and name.startswith("manifest_200") for k, name in flow_names.items())
    client = MlflowClient()
    parents = {k: client.get_run(r["parent_run_id"]) for k, (_, r) in two_kinds.items()}
    names = {k: p.info.run_name for k, p in parents.items()}
    assert names["linear"] != names["mlp"] and all(k in n for k, n in names.items())
    assert all(len(n) <= 24 for n in names.values()), names  # MLflow's runs table shows ~21 characters
    for parent in parents.values():  # the run a user opens first holds the summary, tables and plots
        files = {a.path for a in client.list_artifacts(parent.info.run_id)}
        files |= {a.path for a in client.list_artifacts(parent.info.run_id, "stage1")}
        assert {"summary.md", "stage1/metrics.csv", "stage1/loss_curve.png", "stage1/similarity.png"} <= files, files
    params = {k: p.data.params for k, p in parents.items()}
    assert (params["linear"]["align.projector.kind"], params["mlp"]["align.projector.kind"]) == ("linear", "mlp")
    differ = {key for key in params["mlp"] if params["mlp"][key] != params["linear"].get(key)}
    assert differ == {"align.projector.kind"}  # the whole config is there, and only the kind differs
    assert {"align.train.epochs", "finetune.config.unfreeze", "align.loss.terms", "target_encoder"} <= set(params["mlp"])
    tags = parents["mlp"].data.tags
    assert tags["mlflow.source.name"].startswith("xmodal pipeline flow")
    exp = client.get_experiment(parents["mlp"].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI opens the runs table


def test_the_pipeline_option_registers_the_runs_projector(two_kinds):
    _, result = two_kinds["mlp"]
    version = MlflowClient().get_model_version_by_alias("digits-names-test", "champion")
    assert version.run_id == result["align"]["run_id"] and result["registered"]["version"] == version.version
    assert int(two_kinds["linear"][1]["registered"]["version"]) == int(version.version) - 1  # the alias moved on


def test_the_pipeline_flow_run_holds_its_summary(two_kinds):
    fid, result = two_kinds["mlp"]
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(flow_run_filter=None, artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fid])))
    summary = [a for a in arts if a.key == "pipeline-summary"]
    assert len(summary) == 1, [a.key for a in arts]
    text = str(summary[0].data)
    for needed in ("**Stores**", "manifest_200/image", "| ridge |", "| procrustes |", "| projector |",
                   result["parent_run_id"], "models:/digits-names-test@champion"):
        assert needed in text, needed
