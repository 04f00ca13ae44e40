"""Prefect persists cached task results with cloudpickle unless told otherwise: every persisted result here is JSON."""

import importlib
import pkgutil

import flows
from prefect import Task


def _tasks():
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Task):
                yield f"flows.{info.name}.{value.name}", value


def test_every_persisted_task_result_is_json_not_pickle():
    persisted = {name: t.result_serializer for name, t in _tasks() if t.persist_result}
    assert persisted, "the extract cache persists its result; none found"
    assert all(s == "json" or getattr(s, "type", None) == "json" for s in persisted.values()), persisted
