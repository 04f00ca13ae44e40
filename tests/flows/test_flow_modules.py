"""`flows.align` is the module (params, helpers, patchable), and calling it runs the flow."""

import importlib
import unittest.mock as mock

import pytest
from prefect import Flow


@pytest.mark.parametrize("name,params", [("align", "AlignParams"), ("finetune", "FinetuneParams"),
                                         ("pipeline", "PipelineParams")])
def test_module_and_flow_share_a_name(name, params):
    module = importlib.import_module(f"flows.{name}")
    exec(f"import flows.{name} as m", globals())
    assert m is module and isinstance(getattr(m, params), type)   # noqa: F821
    package = importlib.import_module("flows")
    exported = getattr(package, name)
    assert exported is module
    flow_object = module.__dict__[name]
    assert isinstance(flow_object, Flow) and exported.name == flow_object.name
    assert exported.fn is flow_object.fn and exported.deploy == flow_object.deploy


def test_patching_a_module_attribute_reaches_the_flow_module():
    import flows.align as m
    original = m.AlignParams
    with mock.patch("flows.align.AlignParams", "patched"):
        assert m.AlignParams == "patched"
    assert m.AlignParams is original


def test_calling_the_module_calls_the_flow():
    import flows.align as m
    with mock.patch.object(m, "align", lambda *a, **k: ("called", a, k)):
        assert m(1, x=2) == ("called", (1,), {"x": 2})
