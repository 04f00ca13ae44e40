"""The Prefect UI's run form runs what the Python defaults run: for every deployment in prefect.yaml, the form's
values (deployment parameters over the parameter schema's defaults) validate to the flow's Python values, field
for field, nested models included; and every description renders as text."""

from __future__ import annotations

import re

import pytest
from prefect.utilities.callables import parameter_schema

from flows.pipeline import PipelineParams, pipeline
from tests_support import deployment_flows, descriptions, form_values, python_values

DEPLOYMENTS = deployment_flows()


@pytest.mark.parametrize("dep,flow", DEPLOYMENTS, ids=[d["name"] for d, _ in DEPLOYMENTS])
def test_the_run_form_submits_the_flows_python_defaults(dep, flow):
    schema = parameter_schema(flow.fn).model_dump()
    given = dep.get("parameters") or {}
    assert form_values(schema, given) == python_values(flow, given)
    html_eaten = [d for d in descriptions(schema) if re.search(r"<[A-Za-z/!]", d)]
    assert not html_eaten, html_eaten  # the UI drops '<dataset>' as a tag


def test_the_pipeline_schema_alone_carries_pipelineconfig_defaults():
    """With no deployment parameters at all (a flow served or deployed from Python), the form is PipelineParams()."""
    schema = parameter_schema(pipeline.fn).model_dump()
    form = form_values(schema)["params"]
    assert form == PipelineParams().model_dump(mode="json")
    # the figures the issue found wrong in the form, named: stage-2 policy, loss terms
    assert (form["finetune"]["config"]["unfreeze"], form["finetune"]["config"]["encoder_lr"]) == ("last_n", 1e-4)
    assert form["align"]["loss"]["terms"] == {"mse": 1.0}
    # and the partial parameters the pipeline deployment ships keep every other default
    partial = form_values(schema, {"params": {"finetune": {"enabled": True}}})["params"]
    assert partial == PipelineParams(finetune={"enabled": True}).model_dump(mode="json")
