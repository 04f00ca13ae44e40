"""Long steps say how far they are: stage 2 with a slowed optimizer step logs progress lines (epoch, batch,
running loss, ETA) to the Prefect run log at least once per interval; a typed run name is kept; sub-flows
get names that say what they do.

The interval is a setting (``XMODAL_PROGRESS_S``, default 60 s); here 1 s, so a run of ~8 s stands for a run of
~8 minutes at the default."""

from __future__ import annotations

import re
import time

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows.finetune import FinetuneParams, finetune
from projection.align.config import ProjectorConfig
from projection.align.projector import make_projector, save_projector
from projection.engine import loop
from tests_support import TINY_RN

INTERVAL_S = 1.0


def _logs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def test_a_slowed_stage2_logs_progress_at_least_once_per_interval(prefect_server, mlflow_uri, sample_data,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_PROGRESS_S", str(INTERVAL_S))
    real_step = loop.optimizer_step
    done_at = []  # when each optimizer step finished: the loop can only report between steps

    def slow_step(*args, **kwargs):  # a step as slow as a big encoder's, relative to the interval
        time.sleep(0.5)  # 16 steps: a fine-tuning of ~8 s, many 1 s intervals long whatever else the machine does
        out = real_step(*args, **kwargs)
        done_at.append(time.time())
        return out

    monkeypatch.setattr(loop, "optimizer_step", slow_step)
    manifest = sample_data["digits"].parent / "digits_80.csv"  # beside the images its paths name
    pd.read_csv(sample_data["digits"]).head(80).to_csv(manifest, index=False)
    projector = save_projector(make_projector(ProjectorConfig(kind="linear", d_in=64, d_out=16), seed=0),
                               tmp_path / "projector")
    params = FinetuneParams(projector_dir=str(projector), manifest=str(manifest), source_column="image",
                            source_encoder=f"open_clip:image:{TINY_RN}?batch_size=64", out_dir=str(tmp_path / "ft"),
                            config={"epochs": 2, "batch_size": 8, "unfreeze": "last_n", "last_n": 1, "patience": None},
                            experiment="xmodal-progress-test")
    state = finetune(params, return_state=True)
    assert state.is_completed(), state
    logs = _logs(state.state_details.flow_run_id)
    progress = sorted((log.timestamp, log.message) for log in logs if "running loss" in log.message)
    # both trainings of stage 2 report: the head on frozen features, then the fine-tuning
    assert any(m.startswith("stage 2, head on frozen features: epoch 1/2") for _, m in progress), progress
    assert any(m.startswith("stage 2, fine-tuning (last_n): epoch") for _, m in progress), progress
    line = re.compile(r"stage 2, .+: epoch \d+/2, batch \d+/\d+, running loss \d+\.\d{4}, \d+m\d\ds elapsed, ETA "
                      r"(\d+m\d\ds|\?)")
    assert all(line.fullmatch(m) for _, m in progress), progress
    tuned = [t for t, m in progress if m.startswith("stage 2, fine-tuning")]
    assert (tuned[-1] - tuned[0]).total_seconds() > 5 * INTERVAL_S  # a run many intervals long ...
    gaps = [(b - a).total_seconds() for a, b in zip(tuned, tuned[1:])]
    # ... never silent for longer than an interval plus the longest piece of work it cannot interrupt (a step,
    # or an epoch's validation and checkpoint on this shared machine); at the default 60 s and steps of
    # seconds, that is "at least once a minute"
    inside = [t for t in done_at if tuned[0].timestamp() <= t <= tuned[-1].timestamp()]  # the fine-tuning's steps
    stall = max(b - a for a, b in zip(inside, inside[1:]))
    assert max(gaps) <= INTERVAL_S + stall + 0.5, (gaps, stall)
    assert len(tuned) >= 5


def test_the_loop_reports_every_60_seconds_by_default(monkeypatch):
    monkeypatch.delenv("XMODAL_PROGRESS_S", raising=False)
    assert loop.LoopConfig(epochs=1, seed=0, device="cpu", weight_decay=0.0).progress_s == 60.0


def test_a_typed_pipeline_run_name_is_kept_in_prefect_and_mlflow(prefect_server, mlflow_uri, sample_data, tmp_path):
    """The name is checked in the flow run's name and the MLflow parent run; the stages are named by what they do."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import PipelineParams, pipeline

    small = sample_data["digits"].parent / "manifest_60.csv"
    pd.read_csv(sample_data["digits"]).head(60).to_csv(small, index=False)
    cfg = PipelineParams.model_validate({
        "manifest": str(small), "class_manifest": str(sample_data["digit_classes"]), "out_dir": str(tmp_path),
        "source_encoder": f"open_clip:image:{TINY_RN}?batch_size=256", "run_name": "my baseline, lr 1e-3",
        "align": {"projector": {"kind": "linear"}, "train": {"epochs": 1}}, "experiment": "xmodal-run-name-test"})
    state = pipeline(cfg, return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        children = client.read_flow_runs()
    assert run.name == "my baseline, lr 1e-3"
    assert MlflowClient().get_run(result["parent_run_id"]).info.run_name == "my baseline, lr 1e-3"
    names = {r.name for r in children if r.parent_task_run_id is not None}
    assert "extract manifest_60/image (xmodal-tiny-rn.json)" in names
    assert "align manifest_60: image -> caption, linear" in names


def test_progress_lines_read_as_a_person_would_say_them():
    from flows.tracking.runlog import items_line, progress_line

    line = progress_line("stage 2, fine-tuning (last_n)", {"epoch": 1.0, "epochs": 5.0, "batch": 40.0, "batches": 120.0,
                                                          "running_loss": 0.43121, "elapsed_s": 190.0, "eta_s": 725.0})
    assert line == ("stage 2, fine-tuning (last_n): epoch 2/5, batch 40/120, running loss 0.4312, 3m10s elapsed, "
                    "ETA 12m05s")
    assert items_line("extract fashion/image", 1200, 6000, 30.0) == \
        "extract fashion/image: 1,200/6,000 items, 40.0 items/s, 0m30s elapsed, ETA 2m00s"


def test_a_name_typed_in_the_run_form_is_kept_and_a_generated_one_replaced(monkeypatch):
    """The UI's Custom run form names the flow run before the flow's own ``flow_run_name`` runs."""
    from prefect.runtime import flow_run

    from flows.pipeline import PipelineParams, _flow_run_name

    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: {"params": PipelineParams()})
    monkeypatch.setitem(flow_run.FIELDS, "name", lambda: "nightly check, lite0")
    assert _flow_run_name() == "nightly check, lite0"
    monkeypatch.setitem(flow_run.FIELDS, "name", lambda: "gleeful-squid")  # Prefect's own: replaced
    assert _flow_run_name() == "fashion: image -> caption, mlp"
    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: {"params": {"run_name": "from the config"}})
    assert _flow_run_name() == "from the config"
