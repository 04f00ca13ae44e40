"""Constants shared by tests (a plain module: conftest files are not for importing)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "data" / "models" / "xmodal-tiny-vit.json"
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"


def make_store(path, ids, emb, normalized: bool = True) -> str:
    """A complete store written directly (no encoder): synthetic embeddings with known answers."""
    from encoders.store import StoreWriter

    attrs = {"encoder_spec": "synthetic", "weights_digest": "w", "manifest_digest": path.name,
             "normalized": normalized, "dataset": "synthetic", "modality": path.stem}
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs) as w:
        w.append(ids, emb, rows_done=len(ids))
        w.finish()
    return str(path)


def spawn_python(script, *args):
    """``python script args...`` from the repo root with the repo importable; output captured as text."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_9_after_first_checkpoint(victim, ckpt, timeout: float = 120) -> None:
    """Wait until the child has written its first checkpoint, then SIGKILL it mid-run."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not ckpt.exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL


_MISSING = object()


def form_values(schema: dict, given: dict | None = None) -> dict:
    """What Prefect's Custom-run form shows and submits: the deployment's parameters over the parameter schema's
    defaults. A value given for an object wins over that object's default; keys it lacks come from the object's
    own properties' defaults, recursively (so a nested default missing from the schema shows as the class's)."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def deref(node: dict) -> dict:
        while "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        for branch in node.get("anyOf", []) + node.get("allOf", []):  # Optional[Model] -> Model
            if "$ref" in branch:
                return {**deref(branch), **{k: v for k, v in node.items() if k not in ("anyOf", "allOf")}}
        return node

    def resolve(node: dict, value):
        node = deref(node)
        if value is _MISSING:
            value = node.get("default", _MISSING)
        if "properties" in node and (value is _MISSING or isinstance(value, dict)):
            value = {} if value is _MISSING else value
            out = {k: resolve(p, value.get(k, _MISSING)) for k, p in node["properties"].items()}
            return {k: v for k, v in out.items() if v is not _MISSING}
        return value

    return resolve({"properties": schema["properties"]}, given or {})


def descriptions(schema) -> list[str]:
    """Every description in a JSON schema (what the UI renders as text)."""
    if isinstance(schema, dict):
        own = [schema["description"]] if isinstance(schema.get("description"), str) else []
        return own + [d for v in schema.values() for d in descriptions(v)]
    if isinstance(schema, list):
        return [d for v in schema for d in descriptions(v)]
    return []


def python_values(flow, given: dict | None = None) -> dict:
    """What calling the flow's function with ``given`` runs with: each parameter validated by its annotation."""
    import inspect
    import typing

    from pydantic import TypeAdapter

    hints = typing.get_type_hints(flow.fn)
    out = {}
    for name, param in inspect.signature(flow.fn).parameters.items():
        adapter = TypeAdapter(hints[name])
        if given and name in given:
            out[name] = adapter.dump_python(adapter.validate_python(given[name]), mode="json")
        elif param.default is not inspect.Parameter.empty:
            out[name] = adapter.dump_python(param.default, mode="json")
    return out


def deployment_flows() -> list[tuple[dict, object]]:
    """(deployment entry of prefect.yaml, its flow object) for every deployment shipped."""
    import importlib

    import yaml

    out = []
    for dep in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        out.append((dep, getattr(module, name)))
    return out


def png_digest(folder) -> str:
    """One hash over every PNG under ``folder``, in path order: two builds made the same bytes iff equal."""
    import hashlib

    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(folder).rglob("*.png")))).hexdigest()
