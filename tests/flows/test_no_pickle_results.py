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



def _pickles(folder) -> list[str]:
    """Files under Prefect's storage folder that hold a pickle: raw, base64 (what Prefect writes), or a record
    naming a pickle serializer. Every other file must be JSON."""
    import base64
    import binascii
    import json

    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        raw = f.read_bytes()
        try:
            decoded = base64.b64decode(b"".join(raw.split()), validate=True)  # Prefect wraps lines
        except (binascii.Error, ValueError):
            decoded = b""
        if raw.startswith(b"\x80") or decoded.startswith(b"\x80") or b"pickle" in raw:
            found.append(f.name)
        else:
            json.loads(raw)  # anything else Prefect wrote is JSON
    return found


def test_a_failing_flow_run_leaves_no_pickle_in_prefects_storage(prefect_server, mlflow_uri, tmp_path):
    """Prefect writes a failed flow run's exception to its storage folder even without persist_result, with the
    flow's result serializer (cloudpickle by default, as base64): xmodal's flows write it as JSON (type, message)."""
    import pytest
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.extract import ExtractParams, extract_embeddings
    from flows.pipeline import PipelineParams, pipeline

    @flow
    def prefect_defaults():
        raise ValueError("what Prefect does unless told otherwise")

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "defaults"}):
        prefect_defaults(return_state=True)
    assert _pickles(tmp_path / "defaults"), "the scan finds the pickle Prefect writes by default"

    storage = tmp_path / "storage"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        state = extract_embeddings(ExtractParams(manifest=str(tmp_path / "missing.csv"), column="image",
                                                 encoder="open_clip:image:data/models/xmodal-tiny-rn.json",
                                                 out_dir=str(tmp_path / "stores")), return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match="missing.csv"):  # a pipeline fails inside its first subflow
            pipeline(PipelineParams(manifest=str(tmp_path / "missing.csv"), class_manifest=None,
                                    out_dir=str(tmp_path / "runs")))
    written = [f.read_text() for f in storage.rglob("*") if f.is_file()]
    # the failures, as JSON: the missing manifest, named by the flows' first-line path check
    assert len(written) >= 2 and all("FileNotFoundError" in w and "missing.csv" in w for w in written), written
    assert _pickles(storage) == []
