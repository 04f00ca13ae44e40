"""Bad input refused early: a misspelled loss by the Prefect server at submission (the schema names the losses),
a missing path on the flow's first line in one message naming the field."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.utilities.callables import parameter_schema

from flows.align import AlignParams, align
from flows.errors import is_user_error, one_line
from projection.align.config import LOSS_NAMES


def test_the_align_schema_lists_the_loss_names():
    schema = parameter_schema(align.fn).model_dump_for_openapi()
    terms = schema["definitions"]["LossConfig"]["properties"]["terms"]
    assert terms["propertyNames"]["enum"] == list(LOSS_NAMES)


def test_the_server_refuses_a_misspelled_loss_at_submission(prefect_server):
    good = {"source_store": "a.h5", "target_store": "b.h5", "loss": {"terms": {"mse": 1.0}}}
    bad = {**good, "loss": {"terms": {"msee": 1.0}}}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("align")
        deployment = client.create_deployment(flow_id=flow_id, name="schema-check",
                                              parameter_openapi_schema=parameter_schema(align.fn).model_dump_for_openapi(),
                                              enforce_parameter_schema=True)
        client.create_flow_run_from_deployment(deployment, parameters={"params": good})  # accepted
        with pytest.raises(Exception) as refused:  # the server's 409, before any worker sees the run
            client.create_flow_run_from_deployment(deployment, parameters={"params": bad})
    assert "msee" in str(refused.value) and "409" in str(refused.value), str(refused.value)


def test_a_missing_store_is_one_line_naming_the_field_before_any_run(prefect_server, mlflow_uri, tmp_path):
    state = align(AlignParams(source_store=str(tmp_path / "nope.h5"), target_store=str(tmp_path / "nope2.h5")),
                  return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError) as exc:
        state.result()
    assert is_user_error(exc.value)
    line = one_line(exc.value)
    assert line.startswith("source_store does not exist") and str(tmp_path / "nope.h5") in line, line


def test_a_missing_stage2_manifest_is_one_line_naming_the_field_before_stage1(prefect_server, mlflow_uri,
                                                                              sample_data, tmp_path):
    from flows.pipeline import PipelineParams, pipeline

    state = pipeline(PipelineParams(manifest=str(sample_data["digits"]), class_manifest=None,
                                    finetune={"enabled": True, "manifest": str(tmp_path / "subset.csv")}),
                     return_state=True)
    with pytest.raises(FileNotFoundError) as exc:
        state.result()
    line = one_line(exc.value)
    assert line.startswith("finetune.manifest does not exist") and str(tmp_path / "subset.csv") in line, line
